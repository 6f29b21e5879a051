"""The norms and activations of the MetaFormer families, by config ``type``.

PoolFormer uses GroupNorm(1, C) (the paper's "modified LayerNorm") and GELU; the MetaFormer Baselines
use the same norms without a bias, channel LayerNorm, and StarReLU. The paper's ablations swap them
through ``norm_cfg`` and ``act_cfg``. ``add_residual`` is how a block adds a branch to its residual.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``(N, C, H, W)`` tensor (the hybrids' "channel LayerNorm"),
    computed the faster way for the device at hand (``kernels.layer_normalize``)."""

    def forward(self, x):
        return kernels.layer_normalize(self, x)


def add_residual(x: torch.Tensor, y: torch.Tensor, layer_scale: Optional[torch.Tensor],
                 res_scale: Optional[torch.Tensor], factors: Optional[torch.Tensor]) -> torch.Tensor:
    """``res_scale * x + factors * layer_scale * y``: a residual branch ``y`` added as a block adds
    it (per-channel ResScale and LayerScale, per-sample stochastic-depth factors; None: all one)."""
    if layer_scale is not None:
        y = y * layer_scale.view(-1, 1, 1)
    y = y if factors is None else y * factors
    # (ResScale in the same pass as the sum: one map written instead of two)
    return x + y if res_scale is None else torch.addcmul(y, x, res_scale.view(-1, 1, 1))


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm``, computed the faster way for the device at hand (``kernels.group_normalize``).

    ``contiguous_output``: whether it emits a contiguous ``(N, C, H, W)`` map whatever the input's
    layout (a backbone's output norms, ahead of its necks), then written as it is normalised.
    """
    contiguous_output = False

    def forward(self, x):
        return kernels.group_normalize(self, x, contiguous=self.contiguous_output)


def group_norm(dim: int, num_groups: int = 1, bias: bool = True, **kwargs) -> nn.GroupNorm:
    """GroupNorm over ``dim`` channels; ``bias=False`` learns a scale only, as the MetaFormer
    Baselines' norms do (not every PyTorch version takes that argument itself)."""
    norm = GroupNorm(num_groups, dim, **kwargs)
    if not bias:
        norm.bias = None
    return norm


class StarReLU(nn.Module):
    """``scale * relu(x) ** 2 + bias``, with a learned scalar ``scale`` and ``bias`` (MetaFormer
    Baselines, Sec. 3.1): squared ReLU, whose output statistics the two scalars correct, at the cost of
    one multiply-add instead of GELU's transcendental function.

    Args:
        scale_value (float): Initial scale. Defaults to 1, as the released models.
        bias_value (float): Initial bias. Defaults to 0.
    """

    def __init__(self, scale_value: float = 1., bias_value: float = 0.):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1, ), float(scale_value)))
        self.bias = nn.Parameter(torch.full((1, ), float(bias_value)))

    def forward(self, x):
        return self.scale * F.relu(x).square() + self.bias


# ``type`` -> constructor(dim, **rest of the cfg). 'GN' with one group is the paper's "modified
# LayerNorm": it normalises over channels *and* space, per sample. ``bias=False`` (GN, LN2d): a scale
# only, as in the MetaFormer Baselines.
NORM_LAYERS = {
    'GN': group_norm,
    'LN2d': LayerNorm2d,
    'BN': nn.BatchNorm2d,
    'SyncBN': nn.SyncBatchNorm,
}
ACT_LAYERS = {'GELU': nn.GELU, 'ReLU': nn.ReLU, 'SiLU': nn.SiLU, 'StarReLU': StarReLU}


def _build_from_table(table: dict, cfg: dict, what: str, *args) -> nn.Module:
    if not isinstance(cfg, dict) or 'type' not in cfg:
        raise TypeError(f'{what} must be a dict with a "type" key, got {cfg!r}')
    cfg = dict(cfg)
    layer_type = cfg.pop('type')
    if layer_type not in table:
        raise ValueError(f'unknown {what} type {layer_type!r}; allowed: {sorted(table)}')
    try:
        return table[layer_type](*args, **cfg)
    except TypeError as e:
        raise TypeError(f'bad {what} {dict(type=layer_type, **cfg)!r}: {e}') from e


def build_norm(cfg: dict, dim: int) -> nn.Module:
    return _build_from_table(NORM_LAYERS, cfg, 'norm_cfg', dim)


def build_act(cfg: dict) -> nn.Module:
    return _build_from_table(ACT_LAYERS, cfg, 'act_cfg')
