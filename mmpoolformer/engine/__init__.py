from .checkpoint import use_safe_checkpoint_loading
from .launch import replace_sync_bn, setup_cpu_distributed
from .runner import build_runner, load_config

__all__ = [
    'build_runner', 'load_config', 'replace_sync_bn', 'setup_cpu_distributed',
    'use_safe_checkpoint_loading'
]
