from .amp import AmpOptimWrapper
from .checkpoint import use_safe_checkpoint_loading
from .cli import parse_tool_args, run_tool, tool_parser
from .data_errors import DataError, DataErrorSyncHook, run
from .faults import NonFiniteLossError, NonFiniteLossHook, TrainingStopped, ranks_where
from .launch import replace_sync_bn, setup_distributed
from .resume import CheckpointSaveError, ResumableCheckpointHook, atomic_write
from .runner import build_runner, load_config, resume_after_restart, use_resumable_checkpoints

__all__ = [
    'AmpOptimWrapper', 'CheckpointSaveError', 'DataError', 'DataErrorSyncHook',
    'NonFiniteLossError', 'NonFiniteLossHook', 'ResumableCheckpointHook', 'TrainingStopped',
    'atomic_write', 'build_runner', 'load_config', 'parse_tool_args', 'ranks_where',
    'replace_sync_bn', 'resume_after_restart', 'run', 'run_tool', 'setup_distributed',
    'tool_parser', 'use_resumable_checkpoints', 'use_safe_checkpoint_loading'
]
