"""GroupNorm as the fused kernels use it: statistics, and the per-sample affine map it amounts to.

GroupNorm normalises each sample with its own statistics, so per sample it is an affine map per
channel, ``GN(x)[n, c] = a[n, c] * x[n, c] + b[n, c]``. The kernels apply that map chunk by chunk
(or fold it into what follows) instead of writing the normalised map.
"""
from typing import Optional, Tuple

import torch


def tokens(x: torch.Tensor) -> torch.Tensor:
    """The ``(N, H * W, C)`` token view of a channels-last ``(N, C, H, W)`` map (a copy otherwise)."""
    n, c = x.shape[:2]
    return x.permute(0, 2, 3, 1).reshape(n, -1, c)


def group_stats(x: torch.Tensor, groups: int, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and ``1 / sqrt(var + eps)`` of each ``(sample, group)`` of an ``(N, C, H, W)`` map, as
    ``(N, groups)`` tensors in at least fp32 (fp16 sums of squares overflow). Not differentiable:
    the kernels carry the statistics' gradients themselves.

    Where each group is contiguous in memory (one group, or the NCHW layout), the groups are the
    channels of a one-sample "batch" whose statistics PyTorch's BatchNorm kernel computes in two
    vectorised passes, about three times as fast as ``torch.var_mean`` and as accurate; several groups
    of a channels-last map take ``torch.var_mean``.
    """
    n, c = x.shape[:2]
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if channels_last and groups > 1:
        grouped = tokens(x).unflatten(2, (groups, c // groups)).to(stat_dtype)
        var, mean = torch.var_mean(grouped, dim=(1, 3), correction=0)
    else:
        rows = (tokens(x) if channels_last else x).reshape(1, n * groups, -1).to(stat_dtype)
        mean, var = torch.ops.aten.batch_norm_update_stats(rows, None, None, 0.)
        mean, var = mean.view(n, groups), var.view(n, groups)
    return mean, (var + eps).rsqrt()


def per_channel(stat: torch.Tensor, channels: int) -> torch.Tensor:
    """A ``(N, groups)`` statistic as ``(N, C)``."""
    return stat.repeat_interleave(channels // stat.shape[1], dim=1)


def affine(mean: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor],
           bias: Optional[torch.Tensor], channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` of shape ``(N, C)`` with ``GN(x) = a * x + b`` per sample and channel."""
    a = per_channel(rstd, channels)
    if weight is not None:
        a = a * weight
    b = -per_channel(mean, channels) * a
    if bias is not None:
        b = b + bias
    return a, b
