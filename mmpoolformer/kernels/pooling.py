"""The pooling branch of a PoolFormer block, ``r * x + s * (pool(GN(x)) - GN(x))``, in one pass.

Average pooling commutes with a map that is affine per sample and channel, which GroupNorm is (see
``group_norm.py``), and the difference cancels its shift: ``pool(GN(x)) - GN(x) = a * (pool(x) - x)``
with ``a = gamma * rstd``. The branch thus needs the norm's statistics but never the normalised map:
``x + s * a * (pool(x) - x)``, one pooling and one interpolation, keeping only ``x`` for backward.
``r`` is ResScale's per-channel factor on the residual (PoolFormerV2's last two stages), or none.

On CPUs the pooling and the interpolation are one compiled pass (``csrc/pooling.cpp``), and so is
each of backward's two steps; on CUDA devices the same three passes are Triton kernels
(``triton_ops.py``), a plan timed against PyTorch's operators; elsewhere, and where they cannot be
built, PyTorch's operators do them.

The pooling's backward (its adjoint) goes through :func:`pool_adjoint` here and in the plain
formulation (:func:`avg_pool`): PyTorch's CUDA backward of ``avg_pool2d`` with padding on channels-last
maps gave gradients 0.8-1.0 relative error away from the right ones in PyTorch 2.11 (every size and
dtype tried on an H200; its issue 188344), while its NCHW backward was right.
"""
import functools
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch, native, triton_ops
from .group_norm import group_stats, per_channel

CHANNELS_LAST = dict(memory_format=torch.channels_last)


class _NormPoolResidual(torch.autograd.Function):
    """``r * x + s * (avg_pool(x) - x)`` with ``s = rstd * weight``, ``rstd`` from ``x``'s GroupNorm
    statistics, ``weight`` of shape ``(N, C)`` and ``r`` of shape ``(C, )`` or None (one), keeping
    only ``x`` for backward.

    Backward needs no pooled map: it goes through the pooling's adjoint once. ``shift`` is the
    norm's bias, which the identity above cancels: its gradient is exactly zero (the reference
    formulation computes a rounding-level value) and is returned as such, so that optimisers and DDP
    see the parameter as used. ``compiled`` holds the three passes compiled (the CPU's ``native.ops()``
    or ``triton_ops.OPS``), or is None: PyTorch's operators.
    """

    @staticmethod
    def forward(ctx, x, weight, shift, res_scale, groups, eps, pool_size, compiled):
        ctx.pool_args = (pool_size, 1, pool_size // 2, False, False)  # kernel, stride, pad, ceil, incl.
        pooled = torch.empty_like(x)  # first the statistics' scratch
        mean, rstd = group_stats(x, groups, eps, scratch=pooled)
        scale = (per_channel(rstd, x.shape[1]) * weight).to(x.dtype)
        ctx.save_for_backward(x, weight, mean, rstd, res_scale)
        ctx.shift_shape = None if shift is None else shift.shape
        ctx.compiled = compiled
        if compiled is not None:
            compiled.pool_mix(x, scale, _float(res_scale), pooled, pool_size)
            return pooled
        scale = scale[:, :, None, None]
        torch.ops.aten.avg_pool2d.out(x, *ctx.pool_args, None, out=pooled)
        if res_scale is None:  # (1 - s) x + s pool(x), written over the pooled map
            return pooled.lerp_(x, 1 - scale)
        return pooled.mul_(scale).addcmul_(x, res_scale.view(-1, 1, 1).to(x.dtype) - scale)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd, res_scale = ctx.saved_tensors
        n, c = x.shape[:2]
        groups = mean.shape[1]
        kernel = ctx.pool_args[0]
        rstd_c = per_channel(rstd, c)
        scale = (rstd_c * weight).to(x.dtype)
        grad_x = grad_weight = grad_shift = grad_res_scale = None
        # (P^T - I) g, with P^T the pooling's adjoint (its backward): the input's gradient at fixed s
        # is r g + s (P^T - I) g, and the gradient of s is sum((P x - x) g) = sum(x (P^T - I) g) per
        # channel, so the pooled map is never recomputed
        compiled = ctx.compiled
        if compiled is not None:
            grad = grad.contiguous(**CHANNELS_LAST)
            mixed = torch.empty_like(x, **CHANNELS_LAST)
            grad_scale = compiled.pool_mix_adjoint(grad, x, mixed, kernel).to(rstd.dtype)
        else:
            mixed = pool_adjoint(grad, kernel).sub_(grad)
            grad_scale = (mixed * x).sum(dim=(2, 3), dtype=rstd.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_scale * rstd_c).to(weight.dtype)
        if ctx.needs_input_grad[3]:
            grad_res_scale = (grad * x).sum((0, 2, 3), dtype=rstd.dtype).to(res_scale.dtype)
        if ctx.needs_input_grad[0]:
            # r g + s (P^T - I) g, and through s = rstd * weight, with d rstd / dx = -rstd^3 (x -
            # mean) / count per (sample, group): coef * x + shift
            grad_rstd = (grad_scale * weight).view(n, groups, -1).sum(2)
            coef = per_channel(-grad_rstd * rstd.pow(3) / (x[0].numel() // groups), c)
            shift = -coef * per_channel(mean, c)
            if compiled is not None:
                compiled.pool_mix_input_grad(mixed, grad, x, scale, _float(res_scale),
                                             coef.to(x.dtype), shift.to(x.dtype))
                grad_x = mixed
            else:
                residual = grad if res_scale is None else grad * res_scale.view(-1, 1, 1).to(x.dtype)
                grad_x = torch.addcmul(residual, mixed, scale[:, :, None, None], out=mixed)
                grad_x.addcmul_(x, coef[:, :, None, None].to(x.dtype))
                grad_x.add_(shift[:, :, None, None].to(x.dtype))
        if ctx.needs_input_grad[2]:
            grad_shift = grad.new_zeros(ctx.shift_shape)
        return grad_x, grad_weight, grad_shift, grad_res_scale, None, None, None, None


def pool_adjoint(grad: torch.Tensor, kernel: int) -> torch.Tensor:
    """``P^T grad``, with ``P`` the average pooling of the Pooling mixer (``kernel`` odd, stride 1,
    padding ``kernel // 2`` excluded from the average): its backward, in ``grad``'s layout.

    On a device whose channels-last backward is wrong (:func:`channels_last_adjoint_is_right`), on an
    NCHW copy of ``grad``. (``grad`` also stands for the pooling's input, which the backward reads
    for its shape and layout only: stride 1 keeps the shape.)"""
    if grad.is_contiguous() or channels_last_adjoint_is_right(grad.device.type):
        return _pytorch_adjoint(grad, kernel)
    return _pytorch_adjoint(grad.contiguous(), kernel).contiguous(**CHANNELS_LAST)


def _pytorch_adjoint(grad: torch.Tensor, kernel: int) -> torch.Tensor:
    """PyTorch's backward of that pooling, in the layout of ``grad`` (which stands for the input)."""
    return torch.ops.aten.avg_pool2d_backward(grad, grad, [kernel] * 2, [1] * 2, [kernel // 2] * 2,
                                              False, False, None)


@functools.lru_cache(None)
def channels_last_adjoint_is_right(device_type: str) -> bool:
    """Whether PyTorch's ``avg_pool2d`` backward, with padding excluded, gives on channels-last maps
    of ``device_type`` what it gives on NCHW ones (module docstring); checked once on a small map."""
    if device_type == 'cpu':
        return True  # (every CPU test compares channels-last gradients with float64 NCHW ones)
    grad = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(0)).to(device_type)
    nchw = _pytorch_adjoint(grad, 3)
    nhwc = _pytorch_adjoint(grad.contiguous(**CHANNELS_LAST), 3)
    return bool(torch.allclose(nchw, nhwc, rtol=1e-5, atol=1e-6))


class _AvgPool(torch.autograd.Function):
    """The Pooling mixer's average pooling, with :func:`pool_adjoint` as its backward."""

    @staticmethod
    def forward(ctx, x, kernel):
        ctx.kernel = kernel
        return F.avg_pool2d(x, kernel, 1, kernel // 2, count_include_pad=False)

    @staticmethod
    def backward(ctx, grad):
        return pool_adjoint(grad, ctx.kernel), None


def avg_pool(pool: nn.AvgPool2d, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)`` for the Pooling mixer's pooling (odd kernel, stride 1, padding excluded), whose
    gradient is right on every device (module docstring): PyTorch's own wherever it is."""
    if (dispatch.tracing() or not (torch.is_grad_enabled() and x.requires_grad)
            or x.is_contiguous() or channels_last_adjoint_is_right(x.device.type)):
        return pool(x)
    return _AvgPool.apply(x, pool.kernel_size)


def _compiled(plan: dispatch.Plan, x: torch.Tensor):
    """The compiled passes that compute ``x``'s branch with ``plan``: Triton's for its plan (offered on
    CUDA devices where they work, for channels-last maps), the CPU's wherever they take ``x``, else
    None (PyTorch's operators)."""
    if plan.backend == 'triton':
        return triton_ops.ops(x.device)
    return native.ops() if native.takes(x, **CHANNELS_LAST) else None


def _float(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A coefficient as the compiled kernels take it: contiguous fp32."""
    return None if t is None else t.to(torch.float32).contiguous()


def norm_pool_residual(x: torch.Tensor, norm: nn.Module, pool_size: int,
                       layer_scale: Optional[torch.Tensor], factors: Optional[torch.Tensor],
                       plain: Callable, res_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``res_scale * x + factors * layer_scale * (pool(norm(x)) - norm(x))`` by the faster of the
    identity above and ``plain(x)`` (the modules as written), which is also taken for norms other
    than GroupNorm."""
    if dispatch.tracing() or not isinstance(norm, nn.GroupNorm) or not x.is_floating_point():
        return plain(x)

    def compute(plan, x):
        if not plan.fused:
            return plain(x)
        # the statistics' precision: fp32 at least, whatever autocast gave x
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        weight = torch.ones(x.shape[:2], dtype=stat_dtype, device=x.device)
        for factor in (norm.weight, layer_scale):
            if factor is not None:
                weight = weight * factor
        if factors is not None:
            weight = weight * factors.view(-1, 1)
        x = x.to(stat_dtype)
        return _NormPoolResidual.apply(x, weight, norm.bias, res_scale, norm.num_groups, norm.eps,
                                       pool_size, _compiled(plan, x))

    params = [p for p in (norm.weight, norm.bias, layer_scale, res_scale) if p is not None]
    # fp16 statistics overflow (sums of squares beyond 65504), and CPU autocast leaves GroupNorm
    # in fp16: an fp16 map is normalised here, in fp32, whatever is faster
    candidates = [dispatch.Plan()] + ([] if x.dtype == torch.float16 else [dispatch.PLAIN])
    if (x.dtype != torch.float64 and x.dim() == 4 and x.is_contiguous(**CHANNELS_LAST)
            and triton_ops.ops(x.device) is not None):
        candidates.insert(0, dispatch.Plan(backend='triton'))
    key = ('pool', x.shape[1], pool_size) + (() if res_scale is None else ('res_scale', ))
    return dispatch.run(key, candidates, compute, x, params)
