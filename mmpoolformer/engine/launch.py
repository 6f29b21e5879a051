"""Multi-process training and testing on machines without GPUs.

mmengine assumes one GPU per process: its ``init_dist`` calls ``torch.cuda.set_device``, its runner wraps
the model in DDP with ``device_ids=[LOCAL_RANK]``, and SyncBN runs only on GPUs. Without CUDA we start
the process group with gloo ourselves (mmengine then skips its own start), wrap CPU modules in DDP
without device ids and replace SyncBN by BN in the model config. With CUDA nothing here changes anything.
"""
import datetime
import os
import subprocess

import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.logging import print_log


def replace_sync_bn(cfg) -> int:
    """Turn every ``type='SyncBN'`` in a (nested) config into ``'BN'``; returns how many."""
    count = 0
    if isinstance(cfg, dict):
        if cfg.get('type') == 'SyncBN':
            cfg['type'] = 'BN'
            count += 1
        for value in cfg.values():
            count += replace_sync_bn(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            count += replace_sync_bn(value)
    return count


def _export_slurm_env() -> None:
    """What torchrun would set, from slurm's variables (as mmengine's slurm launcher does)."""
    node_list = os.environ['SLURM_NODELIST']
    os.environ.setdefault(
        'MASTER_ADDR', subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1'))
    os.environ.setdefault('MASTER_PORT', '29500')
    os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
    os.environ['RANK'] = os.environ['SLURM_PROCID']
    os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')


def setup_cpu_distributed(cfg: Config) -> bool:
    """Prepare ``cfg`` (and the process group) for a distributed run on CPUs.

    Returns True if it did, False when the run is not distributed or has GPUs.
    """
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or torch.cuda.is_available():
        return False
    if launcher not in ('pytorch', 'slurm'):
        raise ValueError(f'launcher {launcher!r} is not supported without GPUs; use pytorch '
                         f'(tools/dist_train.sh) or slurm (tools/slurm_train.sh)')
    if launcher == 'slurm':
        _export_slurm_env()

    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    dist_cfg['backend'] = 'gloo'
    cfg.setdefault('env_cfg', {})['dist_cfg'] = dist_cfg
    if not torch_dist.is_initialized():
        kwargs = {}
        if dist_cfg.get('timeout') is not None:
            kwargs['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
        torch_dist.init_process_group(backend='gloo', **kwargs)

    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    cfg.pop('sync_bn', None)
    replaced = replace_sync_bn(cfg.model)
    print_log(f'distributed on CPU: gloo backend, {os.environ.get("WORLD_SIZE")} processes, DDP '
              f'without device ids, {replaced} SyncBN layer config(s) replaced by BN',
              logger='current')
    return True
