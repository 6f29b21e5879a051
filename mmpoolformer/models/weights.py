"""Reading released weights safely, and mapping every released layout onto ours.

Our module names are the official release's (see ``metaformer.py``). Other layouts in circulation:

* official ImageNet (``poolformer_s12.pth.tar``): a raw state dict, ``patch_embed.proj``,
  ``network.{0..6}``, a classifier ``norm`` and ``head``;
* official COCO / ADE20K (mmdet 2.x, mmseg 0.x): ``{'state_dict': ..., 'meta': ...}``, the backbone under
  ``backbone.`` with output norms ``norm{0,2,4,6}``;
* mmpretrain (and mmseg 1.x, which uses it): the official names under ``backbone.``, the classifier's
  norm as ``backbone.norm6`` and its linear layer as ``head.fc``;
* timm (PoolFormer and the MetaFormer Baselines): ``stem.conv``, ``stem.norm``,
  ``stages.{i}.downsample.{norm,conv}``, ``stages.{i}.blocks.{j}``, ``layer_scale1.scale``,
  ``res_scale1.scale``, ``head.norm``, ``head.fc``; in attention stages the MLP's layers are linear;
* sail-sg/metaformer (the Baselines' release): ``downsample_layers.0.{conv,post_norm}`` (the stem),
  ``downsample_layers.{i}.{pre_norm,conv}``, ``stages.{i}.{j}``, ``layer_scale1.scale``, ``norm``,
  ``head``; the pointwise layers are linear.

A checkpoint from the internet is untrusted: it is only ever unpickled with ``weights_only=True``.
"""
import logging
import os
import pickle
import re
import urllib.parse
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log

# timm name -> official name, the first rule that matches.
_TIMM_TO_OFFICIAL = [
    (re.compile(r'^stem\.conv\.'), lambda m: 'patch_embed.proj.'),
    (re.compile(r'^stem\.norm\.'), lambda m: 'patch_embed.post_norm.'),
    (re.compile(r'^stages\.(\d+)\.downsample\.conv\.'),
     lambda m: f'network.{2 * int(m[1]) - 1}.proj.'),
    (re.compile(r'^stages\.(\d+)\.downsample\.norm\.'),
     lambda m: f'network.{2 * int(m[1]) - 1}.pre_norm.'),
    (re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.(layer|res)_scale(\d)\.scale$'),
     lambda m: f'network.{2 * int(m[1])}.{m[2]}.{m[3]}_scale_{m[4]}'),
    (re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.'), lambda m: f'network.{2 * int(m[1])}.{m[2]}.'),
    (re.compile(r'^head\.norm\.'), lambda m: 'norm.'),
    (re.compile(r'^head\.fc\.'), lambda m: 'head.'),
]
# sail-sg/metaformer name -> official name, likewise.
_SAIL_TO_OFFICIAL = [
    (re.compile(r'^downsample_layers\.0\.conv\.'), lambda m: 'patch_embed.proj.'),
    (re.compile(r'^downsample_layers\.0\.post_norm\.'), lambda m: 'patch_embed.post_norm.'),
    (re.compile(r'^downsample_layers\.(\d+)\.conv\.'), lambda m: f'network.{2 * int(m[1]) - 1}.proj.'),
    (re.compile(r'^downsample_layers\.(\d+)\.pre_norm\.'),
     lambda m: f'network.{2 * int(m[1]) - 1}.pre_norm.'),
    (re.compile(r'^stages\.(\d+)\.(\d+)\.(layer|res)_scale(\d)\.scale$'),
     lambda m: f'network.{2 * int(m[1])}.{m[2]}.{m[3]}_scale_{m[4]}'),
    (re.compile(r'^stages\.(\d+)\.(\d+)\.'), lambda m: f'network.{2 * int(m[1])}.{m[2]}.'),
]
# The layouts renamed onto ours, each recognised by its stem's convolution.
_RENAMED_LAYOUTS = {
    'stem.conv.weight': ('timm', _TIMM_TO_OFFICIAL),
    'downsample_layers.0.conv.weight': ('sail-sg/metaformer', _SAIL_TO_OFFICIAL),
}
# Our pointwise layers are 1x1 convolutions; where a layout has them as linear layers, their
# ``(out, in)`` weights gain the two unit dimensions.
_POINTWISE = re.compile(r'\.(mlp\.fc[12]|token_mixer\.pwconv[12])\.weight$')
_WRAPPER_PREFIXES = ('module.', )


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the model."""


def _is_url(path: str) -> bool:
    return isinstance(path, str) and path.startswith(('http://', 'https://'))


def _mmengine_checkpoint_types() -> list:
    """The non-tensor globals inside mmengine's own checkpoints: the message hub's ``HistoryBuffer``,
    the numpy arrays and scalars it holds, and ``getattr``, with which it pickles its statistics
    methods (``getattr(HistoryBuffer, 'mean')``; see :func:`_guard_history_buffer`)."""
    import numpy as np
    from mmengine.logging import HistoryBuffer
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    # (bytes: an empty buffer's array pickles its empty data as bytes())
    types = [HistoryBuffer, np.ndarray, np.dtype, getattr, bytes]
    # numpy 1 pickles these as numpy.core.*, numpy 2 as numpy._core.*: allow both spellings.
    for fn in (multiarray._reconstruct, multiarray.scalar):
        types += [(fn, f'numpy.core.multiarray.{fn.__name__}'),
                  (fn, f'numpy._core.multiarray.{fn.__name__}')]
    types += [type(np.dtype(t)) for t in ('float64', 'float32', 'int64', 'int32', 'bool')]
    return types


@contextmanager
def _guard_history_buffer(path: str):
    """Unpickling a ``HistoryBuffer`` merges the file's statistics methods into a class-wide table that
    mmengine later calls. A genuine file only holds ``HistoryBuffer``'s own methods there; anything
    else (reachable through the allowed ``getattr``) is undone and the file refused."""
    from mmengine.logging import HistoryBuffer
    table = HistoryBuffer._statistics_methods
    before = dict(table)
    yield
    own = {name: getattr(HistoryBuffer, name) for name in ('min', 'max', 'current', 'mean')}
    foreign = [k for k, v in table.items() if v is not before.get(k, own.get(k))]
    if foreign:
        table.clear()
        table.update(before)
        raise CheckpointError(
            f'refusing to load {path}: its message hub replaces HistoryBuffer statistics methods '
            f'{foreign} with functions that are not mmengine\'s own')


@contextmanager
def weights_only_reads(path: str):
    """The conditions of every checkpoint read: ``torch.load`` inside may unpickle the plain-data types
    of mmengine's own checkpoints and nothing else that is not a tensor, the ``HistoryBuffer`` statistics
    table is guarded, and a failure becomes a :class:`CheckpointError` that names ``path``.

    ``torch.load`` inside must be weights-only itself: this widens what it accepts, it does not ask
    for weights-only loading.
    """
    try:
        with torch.serialization.safe_globals(_mmengine_checkpoint_types()), \
                _guard_history_buffer(path):
            yield
    except CheckpointError:
        raise
    except FileNotFoundError as e:
        raise CheckpointError(f'checkpoint not found: {path}') from e
    except pickle.UnpicklingError as e:
        # torch's message wraps the reason (the global it refused) in advice to turn the check off
        lines = [ln for ln in str(e).splitlines()
                 if re.search(r'GLOBAL|Unsupported|Can only|Trying to', ln)]
        reason = (lines[0].replace('WeightsUnpickler error:', '').strip()
                  if lines else str(e).strip()[:300])
        raise CheckpointError(
            f'refusing to load {path}: it holds Python objects other than tensors and plain '
            f'data, which could run code when unpickled; read with weights_only=True, it was '
            f'rejected: {reason}') from e
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f'cannot read checkpoint {path}: the file is truncated or corrupt ({e})') from e


def read_checkpoint(path: str, map_location='cpu', model_dir: Optional[str] = None) -> dict:
    """Unpickle a local file or URL with ``weights_only=True`` (allowing only the plain-data types of
    mmengine's checkpoints), failing with a message that names the file. A ``.safetensors`` file
    (timm's Hugging Face releases) holds tensors only and is read as such."""
    if str(path).endswith('.safetensors'):
        return _read_safetensors(path, map_location, model_dir)
    with weights_only_reads(path):
        if _is_url(path):
            return torch.hub.load_state_dict_from_url(
                path, model_dir=model_dir, map_location=map_location, weights_only=True,
                progress=False)
        return torch.load(path, map_location=map_location, weights_only=True)


def _read_safetensors(path: str, map_location, model_dir: Optional[str]) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise CheckpointError(f'reading {path} needs the safetensors package (pip install '
                              f'safetensors; timm installs it)') from e
    local = path
    if _is_url(path):
        local = os.path.join(model_dir or os.path.join(torch.hub.get_dir(), 'checkpoints'),
                             os.path.basename(urllib.parse.urlparse(path).path))
        if not os.path.exists(local):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            torch.hub.download_url_to_file(path, local, progress=False)
    if not os.path.exists(local):
        raise CheckpointError(f'checkpoint not found: {path}')
    device = map_location if isinstance(map_location, (str, torch.device)) else 'cpu'
    try:
        return load_file(local, device=str(device))
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f'cannot read checkpoint {path}: not a valid safetensors file '
                              f'({e})') from e


def unwrap_state_dict(ckpt: dict) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: mmengine / mmdet / mmseg / timm keep it under
    ``state_dict``, some training scripts under ``model``; ImageNet releases are raw state dicts."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'expected a dict of tensors, got {type(ckpt).__name__}')
    for key in ('state_dict', 'model'):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    state_dict = OrderedDict()
    for k, v in ckpt.items():
        if isinstance(v, torch.Tensor):
            for p in _WRAPPER_PREFIXES:
                k = k[len(p):] if k.startswith(p) else k
            state_dict[k] = v
    return state_dict


def convert_backbone_state_dict(
        state_dict: Dict[str, torch.Tensor],
        prefix: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], List[str], str]:
    """Map a checkpoint's backbone weights onto our (the official) names.

    Args:
        state_dict: A flat state dict in any layout listed in the module docstring.
        prefix: Take only keys under this prefix (stripped). None: ``backbone.`` if any key has it.

    Returns:
        The backbone state dict, the keys dropped (classifier, neck, heads), and the layout's name.
    """
    if prefix is None and any(k.startswith('backbone.') for k in state_dict):
        prefix = 'backbone.'
    dropped = []
    if prefix:
        selected = OrderedDict()
        for k, v in state_dict.items():
            if k.startswith(prefix):
                selected[k[len(prefix):]] = v
            else:
                dropped.append(k)
    else:
        selected = OrderedDict(state_dict)
    # ImageNet checkpoints carry a classifier under "head." (official, timm and mmpretrain alike);
    # dense models' heads are "bbox_head.", "decode_head.", ...
    has_classifier = any(k.startswith('head.') for k in state_dict)

    original = {}  # our name -> the checkpoint's, for reporting
    renamed_layout = next((v for k, v in _RENAMED_LAYOUTS.items() if k in selected), None)
    if renamed_layout is not None:
        layout, rules = renamed_layout
        renamed = OrderedDict()
        for k, v in selected.items():
            new = k
            for pattern, repl in rules:
                if pattern.search(k):
                    new = pattern.sub(repl, k, count=1)
                    break
            if _POINTWISE.search(new) and v.dim() == 2:
                v = v[:, :, None, None]
            renamed[new] = v
            original[new] = k
        selected = renamed
    elif 'patch_embed.proj.weight' in selected:
        if prefix == 'backbone.' and has_classifier:
            layout = 'mmpretrain'
        elif prefix == 'backbone.':
            layout = 'official dense (mmdet / mmseg)'
        else:
            layout = 'official'
    else:
        raise CheckpointError(
            'unrecognised checkpoint layout: expected the official names (patch_embed.proj.weight, '
            'network.0.0.norm1.weight, ...), optionally under backbone. (mmdet, mmseg, mmpretrain), '
            'timm\'s (stem.conv.weight, stages.0.blocks.0.norm1.weight, ...) or sail-sg/metaformer\'s '
            f'(downsample_layers.0.conv.weight, stages.0.0.norm1.weight, ...); first keys found: '
            f'{list(state_dict)[:5]}')

    out = OrderedDict()
    for k, v in selected.items():
        # A classifier's final norm (official "norm", mmpretrain "norm6", timm "head.norm") and its
        # linear layer belong to the ImageNet head, not to a dense model's output norms.
        if k.startswith(('head.', 'norm.')) or (has_classifier and re.match(r'^norm\d+\.', k)):
            dropped.append((prefix or '') + original.get(k, k))
        else:
            out[k] = v
    return out, dropped, layout


# Parts of detection and segmentation models besides the backbone. mmdet 3.x and mmseg 1.x kept the
# names that mmdet 2.x and mmseg 0.x gave them in RetinaNet, Mask R-CNN and Semantic FPN.
DENSE_PARTS = ('neck.', 'bbox_head.', 'rpn_head.', 'roi_head.', 'decode_head.', 'auxiliary_head.')


def convert_state_dict(
        state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str], str]:
    """Map a whole released checkpoint onto our names.

    A detection or segmentation model keeps its neck and heads and gets its backbone under
    ``backbone.``; an ImageNet model becomes a bare backbone state dict (for ``init_cfg``).

    Returns:
        The state dict, the keys dropped, and the layout's name.
    """
    backbone, dropped, layout = convert_backbone_state_dict(state_dict)
    if not any(k.startswith(DENSE_PARTS) for k in state_dict):
        return backbone, dropped, layout
    out = OrderedDict(('backbone.' + k, v) for k, v in backbone.items())
    out.update((k, state_dict[k]) for k in dropped if k.startswith(DENSE_PARTS))
    return out, [k for k in dropped if not k.startswith(DENSE_PARTS)], layout


class LoadReport(NamedTuple):
    """What :func:`load_pretrained` did: the layout recognised and the keys that did not fit."""
    layout: str
    loaded: List[str]
    dropped: List[str]
    missing: List[str]
    unexpected: List[str]


def load_pretrained(model: nn.Module, checkpoint: str, prefix: Optional[str] = None) -> LoadReport:
    """Load released weights into a backbone, logging exactly what did not fit.

    Shapes that differ are an error (the checkpoint is for another arch); keys that only the model or
    only the checkpoint has are logged as warnings: output norms, for one, are absent from ImageNet
    checkpoints by design and start as identity.
    """
    state_dict, dropped, layout = convert_backbone_state_dict(
        unwrap_state_dict(read_checkpoint(checkpoint)), prefix)
    own = model.state_dict()
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise CheckpointError(
            f'{checkpoint} does not fit {type(model).__name__} (another arch?); mismatched shapes:\n  '
            + '\n  '.join(mismatched))
    result = model.load_state_dict(state_dict, strict=False)
    name = type(model).__name__
    loaded = [k for k in state_dict if k in own]
    print_log(f'{name}: loaded {len(loaded)} tensors from {checkpoint} ({layout} layout)',
              logger='current')
    if dropped:
        print_log(f'{name}: dropped (not part of the backbone): {dropped}', logger='current')
    if result.missing_keys:
        print_log(f'{name}: missing in the checkpoint, left as initialised: {result.missing_keys}',
                  logger='current', level=logging.WARNING)
    if result.unexpected_keys:
        print_log(f'{name}: unexpected in the checkpoint, ignored: {result.unexpected_keys}',
                  logger='current', level=logging.WARNING)
    return LoadReport(layout, loaded, dropped, list(result.missing_keys),
                      list(result.unexpected_keys))
