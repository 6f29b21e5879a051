"""Channel LayerNorm on its own: the MetaFormer Baselines' norms before attention and before each
downsampling, and their output norms (inside the MLP branch the MLP kernel normalises its chunks).

On a channels-last fp32 CPU map each token is a row of channels: the compiled rows of
``csrc/layer_norm.h`` normalise them forward and backward (two reads of a row from L1 for its
statistics, one write). On the Xeon of 2026-12-04 (2 threads), the 32768 rows of 64 channels of a
2x64x128x128 map: backward 0.57 against PyTorch's 1.42 ms, forward 0.38-0.45 against 0.73-0.77 ms;
CAFormer-S18's training step 0.987 of the time (paired steps; its forward pass 0.998). Also a bf16
map's rows (under bf16 autocast, the MetaFormer Baselines' stages 0-1), from their bf16 values into a
bf16 map, and back (computed in fp32, rounded once, as PyTorch's bf16 LayerNorm). Elsewhere, and where
it is faster, PyTorch's.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch, native
from .layout import channels_last, tokens


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The ``(N * H * W, C)`` rows of a channels-last map (a view)."""
    return tokens(x).flatten(0, 1)


def _normalized(x, weight, bias, eps):
    """The compiled rows' LayerNorm of a channels-last map (fp32, or bf16 in inference), in its
    dtype, with each row's mean and ``1 / std`` (fp32)."""
    out = torch.empty_like(x, memory_format=torch.channels_last)
    rows = _rows(x)
    mean, rstd = (rows.new_empty(len(rows), dtype=torch.float32) for _ in range(2))
    native.ops().layer_norm_rows(rows, weight, bias, eps, _rows(out), mean, rstd)
    return out, mean, rstd


class _LayerNorm(torch.autograd.Function):
    """LayerNorm over the channels of a channels-last fp32 or bf16 map by the compiled rows, keeping
    ``x`` and each row's mean and ``1 / std`` (fp32)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        out, mean, rstd = _normalized(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.with_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        grad_weight = torch.zeros_like(weight) if weight is not None and needs[1] else None
        grad_bias = x.new_zeros(x.shape[1], dtype=torch.float32) if ctx.with_bias and needs[2] else None
        native.ops().layer_norm_rows_backward(_rows(channels_last(grad)), _rows(x), mean, rstd, weight,
                                              _rows(grad_x), grad_weight, grad_bias)
        return grad_x if needs[0] else None, grad_weight, grad_bias, None


def layer_normalize(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """A channel LayerNorm of an ``(N, C, H, W)`` map: by the faster of PyTorch's and the compiled
    rows (module docstring) for a channels-last fp32 map on a CPU with the kernels, or a bf16 one
    (under bf16 autocast, the residual stream where no fp32 factor has met it: the MetaFormer
    Baselines' stages 0-1, ahead of their downsamplings and output norms); PyTorch's elsewhere and in
    tracing."""
    def plain(x):
        y = F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return y.permute(0, 3, 1, 2)

    params = [p for p in (norm.weight, norm.bias) if p is not None]
    if dispatch.tracing() or x.dim() != 4 or not native.takes(*params):
        return plain(x)
    if not native.takes(x, memory_format=torch.channels_last, dtypes=(torch.float32, torch.bfloat16)):
        return plain(x)

    def compute(plan, x):
        if not plan.fused:
            return plain(x)
        if not dispatch.records(x, params):  # (nothing to keep for backward)
            return _normalized(x, norm.weight, norm.bias, norm.eps)[0]
        return _LayerNorm.apply(x, norm.weight, norm.bias, norm.eps)

    return dispatch.run(('layer_norm', x.shape[1]), [dispatch.Plan(), dispatch.PLAIN], compute, x,
                        params)
