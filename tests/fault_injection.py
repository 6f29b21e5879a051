"""Faults that the tests inject into a training run, at an iteration they choose: imported by the
run's config (``custom_imports``; tiny_project's ``env`` puts this folder on the path) and added as
``custom_hooks``. Iterations count from 1, as the log does."""
import os
import resource
import signal
import time

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from mmpoolformer.engine import ResumableCheckpointHook


@HOOKS.register_module()
class KillProcess(Hook):
    """SIGKILL the process of ``rank`` before ``iteration``, as the OOM killer would, in the first start
    of the worker group only (``TORCHELASTIC_RESTART_COUNT``)."""

    def __init__(self, rank: int, iteration: int):
        self.rank, self.iteration = rank, iteration

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if (runner.rank == self.rank and runner.iter + 1 == self.iteration
                and os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'):
            os.kill(os.getpid(), signal.SIGKILL)


@HOOKS.register_module()
class PauseForSigterm(Hook):
    """After ``iteration``, the process of ``rank`` creates the file ``marker`` and waits (at most 2
    minutes) for SIGTERM, so that the test sends it at a known iteration; the other processes wait for
    this one in the next collective."""

    priority = 'NORMAL'  # before the checkpoint hook, which acts on the signal

    def __init__(self, rank: int, iteration: int, marker: str):
        self.rank, self.iteration, self.marker = rank, iteration, marker

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.rank != self.rank or runner.iter + 1 != self.iteration:
            return
        hook = next(h for h in runner.hooks if isinstance(h, ResumableCheckpointHook))
        open(self.marker, 'w').close()
        deadline = time.time() + 120
        while not hook._sigterm_received and time.time() < deadline:
            time.sleep(0.05)


@HOOKS.register_module()
class FillTheDisk(Hook):
    """After the training iterations of ``epoch``, before its checkpoint is written, no file of this
    process may grow past 1 KiB (RLIMIT_FSIZE): every write fails as on a full disk."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def after_train_epoch(self, runner):
        if runner.epoch + 1 == self.epoch:
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))


@HOOKS.register_module()
class SpoilAWeight(Hook):
    """Before ``iteration``, one weight of the model becomes NaN, as a step with a far too high learning
    rate would leave it: the loss of that iteration is NaN."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if runner.iter + 1 == self.iteration:
            model = getattr(runner.model, 'module', runner.model)
            with torch.no_grad():
                model.backbone.patch_embed.proj.weight[0, 0, 0, 0] = float('nan')
