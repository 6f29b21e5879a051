"""The stem and downsampling convolutions: in the precision and with the weight gradient that are
faster on the device at hand.

- Under autocast a convolution runs in bf16 (CPU) or fp16 (CUDA). A CPU without bf16 instructions
  emulates them and takes several times longer than in fp32; there it runs in fp32 (exact, and the
  residual stream is fp32 anyway).
- In training on a CPU, the weight's gradient can be one matrix product over the input's patches
  (``grad_rows.T @ patches``, the patches gathered chunk by chunk), which on AVX2 CPUs takes about
  half the time of oneDNN's backward-weights kernel for the strided 3x3 downsampling; the forward pass
  and the input's gradient stay PyTorch's own.

Each is a candidate plan, timed like every other choice (``dispatch``): ``backend='onednn'`` is the
convolution as PyTorch computes it, ``'blas'`` with the weight gradient by the product.
"""
import contextlib
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch

CHUNK_BYTES = 1 << 22  # gathered patches per product: a few megabytes, in cache


def weight_grad_by_patches(grad: torch.Tensor, x: torch.Tensor, kernel_size: Tuple[int, int],
                           stride: Tuple[int, int], padding: Tuple[int, int]) -> torch.Tensor:
    """The gradient of a convolution's ``(out, in, kh, kw)`` weight (groups 1, dilation 1) from its
    output's gradient ``grad`` and its input ``x``, as a product over ``x``'s patches.

    The patches of a zero-padded channels-last copy of ``x`` are strided views ``(rows, ow, kh, kw,
    in)``; a chunk of output rows at a time is gathered into a matrix and multiplied with the same
    rows of ``grad``, accumulating into one ``(out, kh * kw * in)`` matrix."""
    n, c, h, w = x.shape
    cout, (oh, ow) = grad.shape[1], grad.shape[2:]
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    padded = x.new_zeros(n, h + 2 * ph, w + 2 * pw, c)
    padded[:, ph:ph + h, pw:pw + w] = x.permute(0, 2, 3, 1)
    row_stride, col_stride = padded.stride()[1:3]
    grad_rows = grad.permute(0, 2, 3, 1)  # (n, oh, ow, out); a view where grad is channels-last
    total = x.new_zeros(cout, kh * kw * c)
    rows = max(1, CHUNK_BYTES // (ow * kh * kw * c * x.element_size()))
    for i in range(n):
        sample = padded[i]
        for first in range(0, oh, rows):
            last = min(oh, first + rows)
            patches = sample.as_strided((last - first, ow, kh, kw, c),
                                        (row_stride * sh, col_stride * sw, row_stride, col_stride, 1),
                                        sample.storage_offset() + first * sh * row_stride)
            total.addmm_(grad_rows[i, first:last].reshape(-1, cout).t(),
                         patches.reshape(-1, kh * kw * c))
    return total.view(cout, kh, kw, c).permute(0, 3, 1, 2)


def backward_by_patches(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        stride: Tuple[int, int], padding: Tuple[int, int], needs: Sequence[bool]):
    """The gradients of a convolution's input, weight and bias (each where ``needs`` says, else
    None): the input's by PyTorch (oneDNN), the weight's by :func:`weight_grad_by_patches`."""
    grad = grad.contiguous(memory_format=torch.channels_last)
    grad_x = grad_weight = grad_bias = None
    if needs[0]:
        grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, (1, 1),
                                                     False, (0, 0), 1, [True, False, False])[0]
    if needs[1]:
        grad_weight = weight_grad_by_patches(grad, x, weight.shape[2:], stride, padding).contiguous()
    if needs[2]:
        grad_bias = grad.sum((0, 2, 3))
    return grad_x, grad_weight, grad_bias


class _PatchWeightGradConv(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, stride, padding)`` with :func:`backward_by_patches`."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return (*backward_by_patches(grad, x, weight, ctx.stride, ctx.padding,
                                     ctx.needs_input_grad[:3]), None, None)


def patches_apply(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether the weight gradient by patches is a candidate: a CPU, an fp32 or float64 weight that
    trains (the chunks accumulate in its dtype), a dense convolution larger than 1x1 (a 1x1 one is a
    product already) with zero padding."""
    return (x.device.type == 'cpu' and torch.is_grad_enabled() and conv.weight.requires_grad
            and conv.weight.dtype in (torch.float32, torch.float64)
            and conv.groups == 1 and conv.dilation == (1, 1) and conv.kernel_size != (1, 1)
            and conv.padding_mode == 'zeros' and not isinstance(conv.padding, str))


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` by the fastest plan here (module docstring)."""
    low = dispatch.autocast_dtype(x.device)
    mixed = low is not None and low != conv.weight.dtype
    patches = patches_apply(conv, x)
    if dispatch.tracing() or not (mixed or patches):
        return conv(x)
    dtype = conv.weight.dtype if mixed else None  # under autocast: fp32, against autocast's own
    candidates = [dispatch.Plan(backend='blas', dtype=dtype)] if patches else []
    if mixed:
        candidates += [dispatch.Plan(backend='onednn', dtype=dtype), dispatch.PLAIN]
        if dispatch.native_low_precision(x.device, low):
            candidates = candidates[-1:] + candidates[:-1]
    else:
        candidates.append(dispatch.PLAIN)

    def compute(plan, x):
        if not plan.fused:
            return conv(x)
        with torch.autocast(x.device.type, enabled=False) if mixed else contextlib.nullcontext():
            if mixed:
                x = x.to(conv.weight.dtype)
            if plan.backend == 'onednn':
                return conv(x)
            return _PatchWeightGradConv.apply(x, conv.weight, conv.bias, conv.stride, conv.padding)

    key = ('conv', conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0])
    return dispatch.run(key, candidates, compute, x, list(conv.parameters()))
