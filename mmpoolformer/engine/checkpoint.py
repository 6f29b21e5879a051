"""mmengine's checkpoint reads, kept weights-only and made able to read mmengine's own checkpoints.

mmengine 0.10.7 reads every checkpoint (``load_checkpoint``, ``Runner.resume`` / ``load_or_resume``,
the Inferencers, ``init_detector`` / ``init_model``, ``init_cfg=dict(type='Pretrained')``) through
the loaders registered in ``CheckpointLoader``, each ending in ``torch.load`` without ``weights_only``.
Since PyTorch 2.6 that means weights-only with no allow-list, which rejects mmengine's own checkpoints
(their message hub holds ``HistoryBuffer`` objects and numpy arrays): ``--resume`` and testing a local
checkpoint fail in every stock tool. Turning weights-only off would let any downloaded file run code.

:func:`use_safe_checkpoint_loading`, which importing ``mmpoolformer`` calls, wraps each of those
loaders in :func:`~mmpoolformer.models.weights.weights_only_reads`: it allows exactly the types that
mmengine's checkpoints contain, undoes and refuses a file that smuggles callables into
``HistoryBuffer``, and names the file in every failure. Nothing is read with weights-only turned off.
"""
import functools
import logging
import os

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import CheckpointLoader

from ..models.weights import (CheckpointError, convert_state_dict, unwrap_state_dict,
                              weights_only_reads)


def _weights_only(loader):
    """``loader`` (one of ``CheckpointLoader``'s) reading inside :func:`weights_only_reads`."""

    @functools.wraps(loader)  # the name too: mmengine logs it as the backend's
    def load(filename, *args, **kwargs):
        if _weights_only_turned_off():
            raise CheckpointError(
                f'refusing to load {filename}: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, which would '
                f'let mmengine unpickle any object; mmpoolformer keeps checkpoint reads weights-only '
                f'(unset the variable)')
        with weights_only_reads(filename):
            return loader(filename, *args, **kwargs)

    load.weights_only = True
    return load


def _weights_only_turned_off() -> bool:
    """Whether the environment makes ``torch.load`` without ``weights_only`` unpickle anything, as
    mmengine's loaders call it (torch accepts 1, y, yes and true)."""
    value = os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '')
    return value.strip().lower() in ('1', 'y', 'yes', 'true')


def use_safe_checkpoint_loading() -> None:
    """Wrap every loader registered in mmengine's ``CheckpointLoader`` (local files, http(s),
    ``torchvision://``, ``open-mmlab://``, ``mmcls://``, ``pavi://``, ``s3://``) in
    :func:`weights_only_reads`. Idempotent; importing ``mmpoolformer`` calls it."""
    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if not getattr(loader, 'weights_only', False):
            CheckpointLoader.register_scheme(prefixes=prefix, loader=_weights_only(loader),
                                             force=True)


class CheckpointLayoutHook(Hook):
    """Refuse, with the way out, a checkpoint that is not one of the model being run (see
    :func:`fit_checkpoint`), when the runner loads or resumes one.

    Args:
        strict (bool): Whether tensors of other shapes, or missing from the checkpoint, are an error
            (testing, resuming) or only listed in a warning (fine-tuning from ``load_from``, where a
            head for other classes is expected not to fit). Defaults to True.
    """

    def __init__(self, strict: bool = True):
        self.strict = strict

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        fit_checkpoint(runner.model, checkpoint, self.strict)


def fit_checkpoint(model, checkpoint: dict, strict: bool = True) -> None:
    """Make ``checkpoint`` one of ``model``, or refuse it with the way out.

    mmengine loads model checkpoints non-strictly: an ImageNet backbone file or a file of another layout
    given to a test tool or an Inferencer would leave the model as initialised and evaluate it
    silently. A file in a released layout that maps onto the model is converted in place; anything else
    is an error naming ``tools/convert_checkpoint.py``. A checkpoint of the layout but of another model
    (another arch, number of classes, ...) is an error listing the tensors that do not fit, or with
    ``strict=False`` a warning.
    """
    model = model.module if is_model_wrapper(model) else model
    own = model.state_dict()
    state_dict = unwrap_state_dict(checkpoint)
    if _overlap(state_dict, own) < 0.5:
        state_dict = _convert(checkpoint, state_dict, own)
    _check_fit(state_dict, own, strict)


def _check_fit(state_dict: dict, own: dict, strict: bool) -> None:
    other_shapes = [f'{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}'
                    for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    found = {'tensors of other shapes': other_shapes,
             'model tensors missing in the checkpoint': missing,
             'checkpoint tensors the model does not have': unexpected}
    parts = [f'{len(keys)} {what}: {_first(keys)}' for what, keys in found.items() if keys]
    if not parts:
        return
    report = 'the checkpoint does not match the model of this config: ' + '; '.join(parts)
    if strict and (other_shapes or missing):
        raise CheckpointError(report)
    print_log(report, logger='current', level=logging.WARNING)


def _convert(checkpoint: dict, state_dict: dict, own: dict) -> dict:
    """Convert a released layout in place, or refuse the checkpoint."""
    hint = ('convert it once with: python tools/convert_checkpoint.py CHECKPOINT OUT.pth '
            '--config CONFIG')
    try:
        converted, _, layout = convert_state_dict(state_dict)
    except CheckpointError as e:
        raise CheckpointError(f'the checkpoint does not fit the model ({e}); {hint}') from e
    if not any(k.startswith('backbone.') for k in converted):
        raise CheckpointError(
            f'the checkpoint is an ImageNet backbone ({layout} layout), not a whole model: use '
            f'it as model.backbone.init_cfg.checkpoint (e.g. --cfg-options '
            f'model.backbone.init_cfg.checkpoint=FILE)')
    if _overlap(converted, own) < 0.5:
        raise CheckpointError(f'the checkpoint ({layout} layout) does not fit the model; {hint}')
    print_log(f'checkpoint in the {layout} layout, converted while loading; {hint}',
              logger='current')
    target = checkpoint['state_dict'] if isinstance(checkpoint.get('state_dict'),
                                                    dict) else checkpoint
    target.clear()
    target.update(converted)
    return converted


def _first(items: list, count: int = 10) -> str:
    more = f', ... ({len(items) - count} more)' if len(items) > count else ''
    return ', '.join(items[:count]) + more


def _overlap(state_dict: dict, own: dict) -> float:
    """The share of the model's keys that the state dict has."""
    return sum(k in state_dict for k in own) / max(len(own), 1)
