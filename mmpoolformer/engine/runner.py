"""The one path from a config file to an mmengine Runner, shared by tools/train.py and tools/test.py."""
import difflib
import os
import os.path as osp
from typing import Optional

from mmengine.config import Config
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner, find_latest_checkpoint

from .checkpoint import CheckpointLayoutHook
from .data_errors import DataErrorSyncHook
from .faults import NonFiniteLossHook
from .launch import setup_distributed


def load_config(path: str, cfg_options: Optional[dict] = None, work_dir: Optional[str] = None,
                launcher: str = 'none') -> Config:
    """Read a config, apply ``--cfg-options`` and choose the work dir (command line, then the
    config's own ``work_dir``, then ``./work_dirs/<config name>``, as mmdet and mmseg do)."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file not found: {path}')
    cfg = Config.fromfile(path)
    if cfg_options:
        check_option_keys(cfg.to_dict(), cfg_options)
        try:
            cfg.merge_from_dict(cfg_options)
        except (TypeError, KeyError) as e:  # e.g. a dict where the config has a value
            raise ValueError(f'--cfg-options: {e}') from e
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    return cfg


def check_option_keys(cfg: dict, cfg_options: dict) -> None:
    """Refuse a ``--cfg-options`` key that goes through a misspelt key of the config:
    ``trian_cfg.max_epochs=1`` would otherwise add a setting nothing reads, and the run go on without
    it. Options may add settings, so a missing key is refused only when the config has one spelt
    almost alike, or when it indexes past the end of a list."""
    for key in cfg_options:
        node, path = cfg, []
        for part in key.split('.')[:-1]:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, dict):
                close = difflib.get_close_matches(part, [str(k) for k in node], n=1)
                if close:
                    raise ValueError(f'--cfg-options {key}: {".".join(path) or "the config"} has no '
                                     f'{part!r}; did you mean {close[0]!r}?')
                break
            elif isinstance(node, (list, tuple)) and part.isdigit():
                if int(part) >= len(node):
                    raise ValueError(f'--cfg-options {key}: {".".join(path)} has {len(node)} items')
                node = node[int(part)]
            else:
                break
            path.append(part)


def use_resumable_checkpoints(cfg: Config) -> None:
    """Save with :class:`ResumableCheckpointHook` where the config has mmengine's ``CheckpointHook`` (or
    none, for which mmengine would add one), keeping its arguments.

    With ``randomness.deterministic``, also turn off persistent data loader workers: their generators
    run on across epochs, and a resumed run, whose workers start afresh from the seed, could not draw
    what the interrupted run would have. Workers started every epoch are seeded alike in both.
    """
    hooks = cfg.setdefault('default_hooks', {})
    checkpoint = hooks.get('checkpoint', dict(type='CheckpointHook', interval=1))
    if checkpoint is not None and checkpoint.get('type') in ('CheckpointHook', 'mmengine.CheckpointHook',
                                                             CheckpointHook):
        hooks['checkpoint'] = dict(checkpoint, type='mmpoolformer.ResumableCheckpointHook')
    loader = cfg.get('train_dataloader') or {}
    if (cfg.get('randomness', {}).get('deterministic') and loader.get('num_workers', 0) > 0
            and loader.get('persistent_workers')):
        loader['persistent_workers'] = False
        print_log('randomness.deterministic: persistent_workers turned off, so that a resumed run '
                  'draws the augmentation an uninterrupted one would', logger='current')


def build_runner(cfg: Config, strict_checkpoint: bool = True) -> Runner:
    """A Runner whose checkpoint reads are checked against the model (and weights-only, as every mmengine
    read is once ``mmpoolformer`` is imported), whose checkpoints survive being killed (see
    :mod:`.resume`), which stops every process together at a fault (bad data, a non-finite loss; see
    :mod:`.faults`), and which also runs distributed on CPUs.

    Args:
        cfg: The config, as :func:`load_config` returns it.
        strict_checkpoint: Whether a checkpoint loaded that does not fit the model is an error (testing,
            resuming) or a warning (fine-tuning; see :class:`CheckpointLayoutHook`).
    """
    use_resumable_checkpoints(cfg)
    setup_distributed(cfg)
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    runner.register_hook(CheckpointLayoutHook(strict=strict_checkpoint), priority='VERY_HIGH')
    runner.register_hook(DataErrorSyncHook())
    if not any(isinstance(hook, NonFiniteLossHook) for hook in runner.hooks):
        runner.register_hook(NonFiniteLossHook())
    return runner


def resume_after_restart(cfg: Config) -> None:
    """Resume from the work dir's last checkpoint when this run is a restart: a worker group that
    torchrun started again (``MAX_RESTARTS``, ``TORCHELASTIC_RESTART_COUNT``) or a slurm job requeued
    (``SLURM_RESTART_COUNT``). Before the first checkpoint the run starts again as it started."""
    restarts = max(int(os.environ.get(name) or 0)
                   for name in ('TORCHELASTIC_RESTART_COUNT', 'SLURM_RESTART_COUNT'))
    if restarts == 0:
        return
    latest = find_latest_checkpoint(cfg.work_dir)
    if latest is not None:
        cfg.resume, cfg.load_from = True, latest
    # before the runner's logger, which knows the rank
    if os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0')) == '0':
        print_log(f'restart {restarts}: ' + (f'resuming from {latest}' if latest else
                                             f'no checkpoint in {cfg.work_dir} yet, starting again'),
                  logger='current')
