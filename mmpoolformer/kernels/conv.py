"""The stem's, the downsamplings' and the depthwise convolutions: in the precision and with the weight
gradient that are faster on the device at hand.

- Under autocast a convolution runs in bf16 (CPU) or fp16 (CUDA). A CPU without bf16 instructions
  emulates them and takes several times longer than in fp32; there it runs in fp32 (exact, and the
  residual stream is fp32 anyway).
- In training on a CPU, the weight's gradient can be computed by our own formulation, while the
  forward pass and the input's gradient stay PyTorch's:

  - a dense convolution larger than 1x1 (the stem, a downsampling): one matrix product over the
    input's patches (``grad_rows.T @ patches``, gathered chunk by chunk), about half the time of
    oneDNN's backward-weights kernel for the strided 3x3 downsampling on AVX2 CPUs;
  - a depthwise convolution of stride 1 (ConvFormer's 7x7): per channel, the correlation of the input
    with the output's gradient, itself a depthwise convolution whose filters are the gradient's maps,
    which oneDNN computes over an NCHW copy of the input 1.2-2.4 times faster, copy included, than
    its backward-weights kernel over channels-last maps (ConvFormer-S18's four stages on AVX2); with
    both maps turned by the compiled transposition (``layout``) rather than PyTorch's copies,
    ConvFormer-S18's training step took 0.91 of the time, 0.89 under bf16 autocast (the Xeon of
    2026-12-04, 2 threads, 2x512x512);
  - the same sums by a compiled kernel (``csrc/depthwise.cpp``) straight over the channels-last fp32
    maps, for a square odd filter padded to keep the size (ConvFormer's): no copy of either map, the
    channels as vector lanes; on the Xeon of 2026-12-05 (2 threads), ConvFormer-S18's four stages at
    2x512x512 took 2.4 / 1.2 / 0.78 / 0.31 ms against the correlation's 23 / 4.2 / 2.2 / 0.94. Under
    bf16 autocast it also reads bf16 maps, so the convolution can stay in bf16 (oneDNN's bf16 weight
    gradient took 128 ms at stage 0, and its bf16 backward-data kernel 2.5 times its fp32 one, so the
    input's gradient is its forward kernel's, with the filter turned): no conversions to fp32 and back
    around it; ConvFormer-S18's bf16 training step 0.938 of the time of the fp32 plan's.

Each is a candidate plan, timed like every other choice (``dispatch``): ``backend='onednn'`` is the
convolution as PyTorch computes it, ``'blas'`` / ``'correlation'`` / ``'compiled'`` the one with our
weight gradient.
"""
import contextlib
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch, layout, native

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
    return total.view(cout, kh, kw, c).permute(0, 3, 1, 2)  # channels-last, as the weight is


def weight_grad_by_correlation(grad: torch.Tensor, x: torch.Tensor, kernel_size: Tuple[int, int],
                               stride: Tuple[int, int], padding: Tuple[int, int]) -> torch.Tensor:
    """The gradient of a depthwise convolution's ``(C, 1, kh, kw)`` weight (stride 1, dilation 1):
    ``weight[c, 0, i, j]`` takes the sum over positions of ``grad[c]`` times ``x[c]`` shifted by
    ``(i, j)``, so each channel's ``kh x kw`` gradient is the zero-padded ``x[c]`` correlated with the
    map ``grad[c]``: a depthwise convolution of ``x`` whose filters are the gradient's maps, one
    sample at a time. oneDNN computes it fast with ``x`` and the filters in NCHW, both turned by the
    compiled transposition (``layout.nchw``; PyTorch's copies took 4-5 times the convolutions' time:
    60 + 36 ms of CAFormer-S18's stage 0 in a training step on the Xeon of 2026-12-04)."""
    assert tuple(stride) == (1, 1), stride
    x, grad = layout.nchw(x), layout.nchw(grad)
    total = None
    for i in range(x.shape[0]):
        part = F.conv2d(x[i:i + 1], grad[i].unsqueeze(1), padding=padding, groups=x.shape[1])
        total = part if total is None else total.add_(part)
    return total.view(x.shape[1], 1, *kernel_size)


def weight_grad_compiled(grad: torch.Tensor, x: torch.Tensor, kernel_size: Tuple[int, int],
                         stride: Tuple[int, int], padding: Tuple[int, int]) -> torch.Tensor:
    """:func:`weight_grad_by_correlation`'s gradient, in fp32, by the compiled kernel over the
    channels-last maps themselves, fp32 or bf16 (a square odd filter, stride 1, padding that keeps the
    size: :func:`_compiled_depthwise`)."""
    out = x.new_empty(x.shape[1], 1, *kernel_size, dtype=torch.float32)
    native.ops().depthwise_weight_grad(layout.channels_last(x), grad, out)
    return out


WEIGHT_GRADS = {'blas': weight_grad_by_patches, 'correlation': weight_grad_by_correlation,
                'compiled': weight_grad_compiled}
# those that also take the low-precision maps of autocast, and which: there the convolution stays in it
LOW_PRECISION = {'compiled': (torch.bfloat16, )}


def _compiled_depthwise(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether the compiled kernel takes this depthwise convolution's weight gradient: a square odd
    filter with the padding that keeps the size, an fp32 weight and a channels-last map (fp32, or
    bf16 under autocast: read by the bf16 plan, widened by the fp32 one)."""
    k = conv.kernel_size[0]
    return (conv.kernel_size == (k, k) and k % 2 == 1 and tuple(conv.padding) == (k // 2, k // 2)
            and conv.weight.dtype == torch.float32
            and native.takes(x, memory_format=torch.channels_last,
                             dtypes=(torch.float32, torch.bfloat16)))


def own_weight_grads(conv: nn.Conv2d, x: torch.Tensor) -> List[str]:
    """Which of our weight gradients (:data:`WEIGHT_GRADS`) are candidates for ``conv(x)``, the
    preferred first.

    On a CPU, for an fp32 or float64 weight that trains (they accumulate in its dtype), dilation 1 and
    zero padding: the product over patches for a dense convolution larger than 1x1 (a 1x1 one is a
    product already); for a depthwise one of stride 1 the compiled kernel where it takes the maps,
    and the correlation."""
    if not (x.device.type == 'cpu' and torch.is_grad_enabled() and conv.weight.requires_grad
            and conv.weight.dtype in (torch.float32, torch.float64) and conv.dilation == (1, 1)
            and conv.padding_mode == 'zeros' and not isinstance(conv.padding, str)):
        return []
    if conv.groups == 1 and conv.kernel_size != (1, 1):
        return ['blas']
    if conv.groups == conv.in_channels == conv.out_channels and conv.stride == (1, 1):
        return ['compiled', 'correlation'] if _compiled_depthwise(conv, x) else ['correlation']
    return []


def backward_own(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Tuple[int, int],
                 padding: Tuple[int, int], groups: int, method: str, needs: Sequence[bool]):
    """The gradients of a convolution's input, weight and bias (each where ``needs`` says, else
    None): the input's by PyTorch (oneDNN), the weight's by ``WEIGHT_GRADS[method]``.

    With the compiled depthwise gradient, the input's is the forward convolution of ``grad`` with
    the filter turned by 180 degrees (stride 1, the padding that keeps the size): in bf16 oneDNN's
    forward kernel takes 0.4 of the time of its backward-data one (the Xeon of 2026-12-05), in fp32
    about as long."""
    grad = layout.channels_last(grad)
    grad_x = grad_weight = grad_bias = None
    if needs[0] and method == 'compiled':
        grad_x = F.conv2d(grad, weight.flip(-1, -2), None, 1, padding, 1, groups)
    elif needs[0]:
        grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, (1, 1),
                                                     False, (0, 0), groups, [True, False, False])[0]
    if needs[1]:
        grad_weight = WEIGHT_GRADS[method](grad, x, weight.shape[2:], stride, padding)
    if needs[2]:
        grad_bias = grad.sum((0, 2, 3), dtype=torch.promote_types(grad.dtype, torch.float32))
    return grad_x, grad_weight, grad_bias


class _OwnWeightGradConv(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, stride, padding, 1, groups)`` with :func:`backward_own`, in
    ``x``'s dtype (a bf16 ``x`` under autocast: the fp32 weight and bias rounded to it, their
    gradients fp32)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, groups, method):
        w, b = (None if t is None else t.to(x.dtype) for t in (weight, bias))
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding, ctx.groups, ctx.method = stride, padding, groups, method
        ctx.dtype = weight.dtype
        return F.conv2d(x, w, b, stride, padding, 1, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grads = backward_own(grad, x, weight, ctx.stride, ctx.padding, ctx.groups, ctx.method,
                             ctx.needs_input_grad[:3])
        return (grads[0], *(None if g is None else g.to(ctx.dtype) for g in grads[1:]), None, None,
                None, None)


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` by the fastest plan here (module docstring)."""
    low = dispatch.autocast_dtype(x.device)
    mixed = low is not None and low != conv.weight.dtype
    methods = own_weight_grads(conv, x)
    if dispatch.tracing() or not (mixed or methods):
        return conv(x)
    dtype = conv.weight.dtype if mixed else None  # under autocast: fp32, against autocast's own
    candidates = [dispatch.Plan(backend=method, dtype=dtype) for method in methods]
    if mixed:
        candidates += [dispatch.Plan(backend='onednn', dtype=dtype), dispatch.PLAIN]
        if dispatch.native_low_precision(x.device, low):
            # autocast's own first, then ours in its dtype where they take it
            low_own = [dispatch.Plan(backend=method, dtype=low) for method in methods
                       if low in LOW_PRECISION.get(method, ())]
            candidates = candidates[-1:] + low_own + candidates[:-1]
    else:
        candidates.append(dispatch.PLAIN)

    def compute(plan, x):
        if not plan.fused:
            return conv(x)
        with torch.autocast(x.device.type, enabled=False) if mixed else contextlib.nullcontext():
            if mixed:
                x = x.to(plan.dtype)
            if plan.backend == 'onednn':
                return conv(x)
            return _OwnWeightGradConv.apply(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                            conv.groups, plan.backend)

    key = ('conv', conv.in_channels, conv.out_channels, conv.groups, conv.kernel_size[0],
           conv.stride[0])
    return dispatch.run(key, candidates, compute, x, list(conv.parameters()))
