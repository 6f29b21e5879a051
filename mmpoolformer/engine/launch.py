"""Starting the processes of a distributed run: on machines without GPUs, and again after a restart.

mmengine assumes one GPU per process: its ``init_dist`` calls ``torch.cuda.set_device``, its runner wraps
the model in DDP with ``device_ids=[LOCAL_RANK]``, and SyncBN runs only on GPUs. Without CUDA we start
the process group with gloo ourselves (mmengine then skips its own start), wrap CPU modules in DDP
without device ids and replace SyncBN by BN in the model config.

torchrun (its default, static rendezvous) keeps one store for every start of a worker group
(``MAX_RESTARTS``): processes started again would read there the addresses of the ones that failed, and
fail to connect. Each start therefore keeps its keys apart (:func:`start_process_group`); with CUDA that
is all that changes, and only after a restart.
"""
import datetime
import os
import subprocess
from typing import Optional

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


def start_process_group(backend: str, timeout: Optional[float] = None) -> None:
    """``init_process_group`` through ``env://``, with the store's keys under a prefix of this start
    of the worker group (``TORCHELASTIC_RESTART_COUNT``)."""
    store, rank, world_size = next(torch_dist.rendezvous('env://'))
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
    kwargs = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=timeout))
    torch_dist.init_process_group(backend, store=torch_dist.PrefixStore(f'start_{attempt}', store),
                                  rank=rank, world_size=world_size, **kwargs)


def setup_distributed(cfg: Config) -> bool:
    """Prepare ``cfg`` (and the process group) for a distributed run on CPUs. With CUDA, leave it to
    mmengine, but for a restarted torchrun worker group, whose process group this starts as mmengine
    would, with its keys apart.

    Returns True if it prepared a run on CPUs, False when the run is not distributed or has GPUs.
    """
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none':
        return False
    if torch.cuda.is_available():
        restarted = int(os.environ.get('TORCHELASTIC_RESTART_COUNT') or 0) > 0
        if launcher == 'pytorch' and restarted and not torch_dist.is_initialized():
            dist_cfg = cfg.get('env_cfg', {}).get('dist_cfg', {})
            torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
            start_process_group(dist_cfg.get('backend', 'nccl'), dist_cfg.get('timeout'))
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
        start_process_group('gloo', dist_cfg.get('timeout'))

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
