"""Convolutions under autocast, in the precision the device computes faster.

Autocast runs a convolution in bf16 (CPU) or fp16 (CUDA). A CPU without bf16 instructions emulates
them and takes several times longer than in fp32; there the stem and downsampling convolutions run in
fp32 (exact, and the residual stream is fp32 anyway). Timed like every other choice (``dispatch``).
"""
import torch
import torch.nn as nn

from . import dispatch


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, under autocast in its dtype or in fp32, whichever is faster here."""
    low = dispatch.autocast_dtype(x.device)
    if low is None or low == conv.weight.dtype or dispatch.tracing():
        return conv(x)
    fp32 = dispatch.Plan(dtype=conv.weight.dtype)
    candidates = [fp32, dispatch.PLAIN]
    if dispatch.native_low_precision(x.device, low):
        candidates.reverse()

    def compute(plan, x):
        if not plan.fused:
            return conv(x)
        with torch.autocast(x.device.type, enabled=False):
            return conv(x.to(conv.weight.dtype))

    key = ('conv', conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0])
    return dispatch.run(key, candidates, compute, x, list(conv.parameters()))
