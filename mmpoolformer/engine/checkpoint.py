"""mmengine's checkpoint reads, made weights-only.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since PyTorch 2.6 that means weights-only
with no allow-list, which rejects mmengine's own checkpoints (their message hub holds ``HistoryBuffer``
objects and numpy arrays), so ``--resume`` and testing a local checkpoint fail. Turning weights-only
off would let any downloaded file run code. Instead, every scheme mmengine reads through goes to
:func:`mmpoolformer.models.weights.read_checkpoint`, which allows exactly the types that mmengine's own
checkpoints contain.
"""
import logging

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import CheckpointLoader

from ..models.weights import (CheckpointError, convert_state_dict, read_checkpoint,
                              unwrap_state_dict)


def _load_local(filename, map_location=None):
    return read_checkpoint(filename, map_location=map_location)


def _load_http(filename, map_location=None, model_dir=None, progress=False):
    return read_checkpoint(filename, map_location=map_location, model_dir=model_dir)


def use_safe_checkpoint_loading() -> None:
    """Route mmengine's local and http(s) checkpoint reads through our weights-only reader."""
    CheckpointLoader.register_scheme(prefixes='', loader=_load_local, force=True)
    CheckpointLoader.register_scheme(
        prefixes=('http://', 'https://'), loader=_load_http, force=True)


class CheckpointLayoutHook(Hook):
    """Refuse, with the way out, a checkpoint that is not one of the model being run.

    mmengine loads model checkpoints non-strictly: an ImageNet backbone file or a file of another layout
    given to ``tools/test.py`` would leave the model as initialised and evaluate it silently. A file in
    a released layout that maps onto the model is converted on the fly; anything else is an error
    naming ``tools/convert_checkpoint.py``. A checkpoint of the layout but of another model (another
    arch, number of classes, ...) is an error listing the tensors that do not fit.

    Args:
        strict (bool): Whether tensors of other shapes, or missing from the checkpoint, are an error
            (testing, resuming) or only listed in a warning (fine-tuning from ``load_from``, where a
            head for other classes is expected not to fit). Defaults to True.
    """

    def __init__(self, strict: bool = True):
        self.strict = strict

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        own = model.state_dict()
        state_dict = unwrap_state_dict(checkpoint)
        if _overlap(state_dict, own) < 0.5:
            state_dict = self._convert(checkpoint, state_dict, own)
        self._check_fit(state_dict, own)

    def _check_fit(self, state_dict: dict, own: dict) -> None:
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
        if self.strict and (other_shapes or missing):
            raise CheckpointError(report)
        print_log(report, logger='current', level=logging.WARNING)

    def _convert(self, checkpoint: dict, state_dict: dict, own: dict) -> dict:
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
