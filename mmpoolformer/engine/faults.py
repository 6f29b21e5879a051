"""Faults that stop training, learnt by every process of a distributed run at the same iteration.

A fault seen by one process (SIGTERM, a batch that did not load, a non-finite loss, a checkpoint that
could not be written) must stop all of them at the same point: a process that goes on waits in the
next collective for one that has stopped, with NCCL until its time-out. So wherever training may stop,
every process says whether it met the fault (:func:`ranks_where`), and all stop together, each
raising a :class:`TrainingStopped` whose message is one line for the user.
"""
from typing import List, Optional

import torch
import torch.distributed as torch_dist
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook

from ..registry import HOOKS

_cpu_groups: dict = {}


class TrainingStopped(RuntimeError):
    """Training stopped for the reason the message gives, in one line; the tools print it and exit 1."""


class NonFiniteLossError(TrainingStopped):
    """The loss of an iteration was NaN or infinite."""


def ranks_where(flag: bool) -> List[int]:
    """The ranks of the processes that pass True; every process of the run must call it at the same
    point. One all-reduce of ``world_size`` integers, on CPU tensors (see :func:`_cpu_group`); no
    communication at all in a single process."""
    world_size = get_world_size()
    if world_size == 1:
        return [0] if flag else []
    flags = torch.zeros(world_size, dtype=torch.int32)
    flags[get_rank()] = int(flag)
    torch_dist.all_reduce(flags, group=_cpu_group())
    return flags.nonzero().flatten().tolist()


def _cpu_group() -> Optional[object]:
    """The default process group if it is gloo, else a gloo group of all processes (made by the first
    call, which every process makes at the same point): a flag on the GPU would wait for every kernel
    queued before it."""
    if torch_dist.get_backend() == 'gloo':
        return None
    world = torch_dist.group.WORLD
    if world not in _cpu_groups:
        _cpu_groups[world] = torch_dist.new_group(backend='gloo')
    return _cpu_groups[world]


def describe_ranks(ranks: List[int]) -> str:
    return f'process{"es" if len(ranks) > 1 else ""} {", ".join(map(str, ranks))}'


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Stop training, in every process, at the first iteration whose loss is NaN or infinite, before
    anything saves the weights that its step has spoilt; the line names the iteration and the terms.

    mmdet's ``CheckInvalidLossHook`` falls short of that: it checks every 50th iteration by default
    (checkpoints in between may hold NaN), with an ``assert`` (gone under ``python -O``) whose message
    is None, in the process that saw the loss alone (the others then wait for it in the next
    all-reduce), and it names no term. This hook checks every iteration, at the cost of one all-reduce
    of a flag (see :func:`ranks_where`).

    Only the loss is checked. Under fp16 AMP the loss scaler skips the steps whose gradients overflow
    and lowers its scale: their loss is finite and the weights are left as they were, so they are
    not errors. :class:`~mmpoolformer.engine.ResumableCheckpointHook` also refuses to save non-finite
    weights, whatever made them so.
    """

    # after the logger (the iteration's losses are logged), before the checkpoint hook (VERY_LOW)
    priority = 'LOW'

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        terms = {name: torch.as_tensor(value).detach().float()
                 for name, value in (outputs or {}).items() if 'loss' in name}
        not_finite = any(not torch.isfinite(value).all() for value in terms.values())
        ranks = ranks_where(not_finite)
        if not ranks:
            return
        where = f'at iteration {runner.iter + 1} (epoch {runner.epoch + 1})'
        if not_finite:
            values = ', '.join(f'{name}={value.mean().item():.4g}' for name, value in terms.items())
            what = f'the loss is not finite {where}: {values}'
        else:
            what = f'the loss of {describe_ranks(ranks)} is not finite {where}'
        last = runner.message_hub.get_info('last_ckpt')
        kept, then = ((f'the last checkpoint, {last}, is kept', 'continue with --resume') if last else
                      ('no checkpoint was saved', 'train again'))
        raise NonFiniteLossError(
            f'{what}; training stopped before saving these weights ({kept}). Lower the learning '
            f'rate or check the data, then {then}')
