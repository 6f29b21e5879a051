"""GroupNorm as the fused kernels use it: statistics, and the per-sample affine map it amounts to.

GroupNorm normalises each sample with its own statistics, so per sample it is an affine map per
channel, ``GN(x)[n, c] = a[n, c] * x[n, c] + b[n, c]``. The kernels apply that map chunk by chunk
(or fold it into what follows) instead of writing the normalised map.

GroupNorm on its own (:func:`group_normalize`: the blocks' norms where no fused branch takes them, the
output norms) is computed the same way on CUDA devices. There PyTorch's GroupNorm reduces each
(sample, group) in one thread block, so that ``GroupNorm(1, C)`` at batch 2 keeps two of an H200's 132
multiprocessors busy: 3.1 ms for a 2x64x200x304 fp32 map, whose bytes take 4 us to read (measured on
an H200, PyTorch 2.11), and 21 of the 33 ms of PoolFormer-S12's bf16 training step at 2x800x1216.
PyTorch's reductions spread one sum over the whole device.

The backbone emits NCHW maps from its channels-last stages: on CPUs its output norms write them as
they normalise (``group_normalize(..., contiguous=True)``, the compiled ``transpose_affine``), where
PyTorch's GroupNorm writes a channels-last map that ``.contiguous()`` then turns element by element.
S12's four output norms on the Zen 4 machine (2 threads, 2x512x512), interleaved runs: forward 2.3 ms
less (stage 0: 2.7 against 4.3 ms), training step 7 ms less (stage 0: 7.9 against 12.6 ms).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch, native
from .layout import channels_last, samples, tokens, transposes


def group_stats(x: torch.Tensor, groups: int, eps: float,
                scratch: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and ``1 / sqrt(var + eps)`` of each ``(sample, group)`` of an ``(N, C, H, W)`` map, as
    ``(N, groups)`` tensors in at least fp32 (fp16 sums of squares overflow). Not differentiable:
    the kernels carry the statistics' gradients themselves.

    On CUDA devices ``x`` in fp32 or fp64, one pass: ``torch.var_mean`` (Welford's), which PyTorch
    spreads over the whole device. Otherwise two passes, each a summation (pairwise, as accurate as
    Welford's): the mean, then the squared deviations from it, written over ``scratch`` where the
    caller has a buffer of ``x``'s shape, dtype and layout that it writes afterwards (its output),
    else over a temporary. Unlike
    ``E[x^2] - E[x]^2`` (what PyTorch's channels-last GroupNorm computes) it loses nothing where the
    mean is large against the spread. It takes a quarter to a third of the time of PyTorch's BatchNorm
    statistics kernel and a tenth of ``torch.var_mean``'s (AVX2, 2x64x128x128: 0.5-0.8 against 2.2
    and 7.5 ms). Where each group is one block of memory, the compiled kernel (``native``) reads the
    map once without writing, each block's deviations from its own mean summed while it is in L1 and
    the blocks merged exactly: half that time again, and a third less than two reading passes.
    """
    blocks = _group_blocks(x, groups)
    if blocks is not None and native.takes(blocks):  # compiled: one pass that only reads
        mean, rstd = native.ops().row_stats(blocks, eps)
        return mean.view(x.shape[0], groups), rstd.view(x.shape[0], groups)
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    rows, dims = _grouped(x, groups)
    if x.device.type != 'cpu' and x.dtype == stat_dtype:  # one pass (Welford's), spread over the GPU
        var, mean = torch.var_mean(rows, dims, correction=0)
        return mean.view(x.shape[0], groups), (var + eps).rsqrt().view(x.shape[0], groups)
    rows = rows.to(stat_dtype)
    count = x[0].numel() // groups
    mean = rows.sum(dims, keepdim=True) / count
    if rows.dtype != x.dtype:  # a converted copy, a temporary already
        deviations = rows.sub_(mean)
    elif scratch is not None:
        deviations = torch.sub(rows, mean, out=_grouped(scratch, groups)[0])
    else:
        deviations = rows - mean
    var = deviations.square_().sum(dims) / count
    return mean.view(x.shape[0], groups), (var + eps).rsqrt()


def _group_blocks(x: torch.Tensor, groups: int) -> Optional[torch.Tensor]:
    """A ``(N * groups, count)`` view of ``x`` where each group is one contiguous block of memory (an
    NCHW map; a channels-last one with one group), else None."""
    if x.is_contiguous():
        return x.view(x.shape[0] * groups, -1)
    if groups == 1 and x.is_contiguous(memory_format=torch.channels_last):
        return tokens(x).flatten(1)
    return None


def _grouped(x: torch.Tensor, groups: int) -> Tuple[torch.Tensor, tuple]:
    """A view of ``x`` with each (sample, group) apart, and the dimensions that hold one group."""
    n, c = x.shape[:2]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return tokens(x).unflatten(2, (groups, c // groups)), (1, 3)
    return x.reshape(n, groups, -1), (2, )


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


def group_norm_backward(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        weight: Optional[torch.Tensor], needs: Sequence[bool]) -> tuple:
    """Gradients of GroupNorm's input, weight and bias (None where ``needs`` says no) from its
    output's ``grad``, its input ``x`` and the ``(N, groups)`` statistics; in ``x``'s dtype and layout
    (weight's and bias's in fp32 at least).

    On CPUs, PyTorch's backward (it reads channels-last maps as they are). Elsewhere from two sums
    per sample and channel, ``sum(g)`` and ``sum(g * x)``: PyTorch's CUDA backward reads its inputs as
    NCHW memory whatever their layout (right only through ``F.group_norm``, which makes them
    contiguous first), and its reductions run one block per sample and channel."""
    if x.device.type != 'cpu':
        return backward_by_sums(grad, x, mean, rstd, weight, needs)
    acc = torch.promote_types(x.dtype, torch.float32)  # (a bf16 map's: in fp32)
    grad_x, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
        grad.to(acc), x.to(acc), mean.to(acc), rstd.to(acc), weight, *x.shape[:2], x[0, 0].numel(),
        mean.shape[1], list(needs))
    return None if grad_x is None else grad_x.to(x.dtype), grad_weight, grad_bias


def backward_by_sums(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                     weight: Optional[torch.Tensor], needs: Sequence[bool]) -> tuple:
    """:func:`group_norm_backward` on any device, from ``sum(g)`` and ``sum(g * x)`` per sample and
    channel."""
    n, c = x.shape[:2]
    groups = mean.shape[1]
    acc, out_dtype = torch.promote_types(x.dtype, torch.float32), x.dtype
    x, grad = x.to(acc), grad.to(acc)  # (a bf16 map's: in fp32, rounded once, as on CPUs)
    sum_g = grad.sum((2, 3))  # (N, C)
    sum_gx = (grad * x).sum((2, 3))
    mean_c, rstd_c = per_channel(mean.to(acc), c), per_channel(rstd.to(acc), c)
    grad_weight = ((sum_gx - mean_c * sum_g) * rstd_c).sum(0) if needs[1] else None
    grad_bias = sum_g.sum(0) if needs[2] else None
    if not needs[0]:
        return None, grad_weight, grad_bias
    # with y = w (x - mean) rstd + b per (sample, group) of M elements:
    # dx = rstd w g - rstd (A + rstd^2 (x - mean) (B - mean A)) / M, A = sum(w g), B = sum(w g x)
    w = 1. if weight is None else weight.to(acc)
    per_group = lambda t: (t * w).view(n, groups, -1).sum(2)  # noqa: E731
    sums_g, sums_gx = per_group(sum_g), per_group(sum_gx)
    count = x[0].numel() // groups
    rstd, mean = rstd.to(acc), mean.to(acc)
    coef_x = -rstd.pow(3) * (sums_gx - mean * sums_g) / count
    shift = -rstd * sums_g / count - coef_x * mean
    grad_x = torch.addcmul(per_channel(shift, c)[:, :, None, None], x,
                           per_channel(coef_x, c)[:, :, None, None])
    grad_x.addcmul_(grad, (rstd_c * w)[:, :, None, None])
    return grad_x.to(out_dtype), grad_weight, grad_bias


class _GroupNorm(torch.autograd.Function):
    """GroupNorm from :func:`group_stats` and the affine map, keeping ``x`` and the statistics. With
    ``contiguous``, the output as a contiguous NCHW map: from a channels-last map on a CPU with the
    compiled kernels, normalised as it is transposed (one pass, where PyTorch's GroupNorm and
    ``.contiguous()`` make three), and the gradient turned channels-last the same way in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, contiguous=False):
        mean, rstd = group_stats(x, groups, eps)
        a, b = affine(mean, rstd, weight, bias, x.shape[1])
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.param_dtype = next((p.dtype for p in (weight, bias) if p is not None), x.dtype)
        ctx.transposed = contiguous and transposes(x)
        if ctx.transposed:
            out = x.new_empty(x.shape)
            native.ops().transpose_affine(tokens(x), a.float(), b.float(), samples(out))
            return out
        out = torch.addcmul(b[:, :, None, None].to(x.dtype), x, a[:, :, None, None].to(x.dtype))
        return out.contiguous() if contiguous else out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        if ctx.transposed and native.takes(grad):  # (an NCHW gradient: turned as x is laid out)
            grad = channels_last(grad)
        grads = group_norm_backward(grad, x, mean, rstd, weight, ctx.needs_input_grad[:3])
        grad_x, grad_weight, grad_bias = (None if t is None else t.to(dtype) for t, dtype in zip(
            grads, (x.dtype, ctx.param_dtype, ctx.param_dtype)))
        return grad_x, grad_weight, grad_bias, None, None, None


LOW = (torch.float16, torch.bfloat16)


def offered_on(device: torch.device) -> bool:
    """Where :func:`group_normalize` offers :class:`_GroupNorm` (module docstring): off the CPU."""
    return device.type != 'cpu'


def group_normalize(norm: nn.GroupNorm, x: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
    """``norm(x)`` by the faster of PyTorch's GroupNorm and :class:`_GroupNorm` on CUDA devices
    (module docstring); PyTorch's elsewhere (its CPU kernel already uses every core), in tracing,
    and for other dtypes. Under autocast in fp32, as PyTorch's GroupNorm is computed there.

    With ``contiguous``, ``norm(x).contiguous()`` (a backbone's emitted maps): on CPUs also by the
    faster of that and :class:`_GroupNorm`'s normalisation as it transposes a channels-last map."""
    def plain(x):
        out = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return out.contiguous() if contiguous else out

    # (tracing first: asking for the compiled kernels may build and check them, which a tracer records)
    if dispatch.tracing() or x.dim() != 4 or not (offered_on(x.device)
                                                  or contiguous and transposes(x)):
        return plain(x)
    # (a low-precision map outside autocast: PyTorch's, whose output keeps that dtype)
    autocast = dispatch.autocast_dtype(x.device) is not None
    if x.dtype not in (torch.float32, torch.float64) + (LOW if autocast else ()):
        return plain(x)

    def compute(plan, x):
        if not plan.fused:
            return plain(x)
        if x.dtype in LOW:
            x = x.float()  # (under autocast PyTorch's GroupNorm is computed in fp32 too)
        with torch.autocast(x.device.type, enabled=False):
            return _GroupNorm.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps,
                                    contiguous)

    params: List[torch.Tensor] = [p for p in (norm.weight, norm.bias) if p is not None]
    key = ('group_norm', x.shape[1], norm.num_groups) + (('contiguous', ) if contiguous else ())
    return dispatch.run(key, [dispatch.Plan(), dispatch.PLAIN], compute, x, params)
