from .checkpoint import use_safe_checkpoint_loading
from .cli import parse_tool_args, run_tool, tool_parser
from .data_errors import DataError, run
from .launch import replace_sync_bn, setup_cpu_distributed
from .resume import ResumableCheckpointHook, atomic_write
from .runner import build_runner, load_config, use_resumable_checkpoints

__all__ = [
    'DataError', 'ResumableCheckpointHook', 'atomic_write', 'build_runner', 'load_config', 'parse_tool_args',
    'replace_sync_bn', 'run', 'run_tool', 'setup_cpu_distributed', 'tool_parser', 'use_resumable_checkpoints',
    'use_safe_checkpoint_loading'
]
