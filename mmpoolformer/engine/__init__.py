from .checkpoint import use_safe_checkpoint_loading
from .cli import parse_tool_args, run_tool, tool_parser
from .launch import replace_sync_bn, setup_cpu_distributed
from .runner import build_runner, load_config

__all__ = [
    'build_runner', 'load_config', 'parse_tool_args', 'replace_sync_bn', 'run_tool',
    'setup_cpu_distributed', 'tool_parser', 'use_safe_checkpoint_loading'
]
