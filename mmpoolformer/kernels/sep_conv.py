"""ConvFormer's SepConv as a residual branch, ``res_scale * x + layer_scale * pw2(dw(act(pw1(norm(x)))))``,
in inference on CPUs band by band of image rows (``csrc/mlp.cpp``'s ``sep_conv_forward``).

Composed (the expansion by the MLP kernel's first half, then PyTorch's depthwise convolution and
projection), the branch writes two maps of the whole image, each twice the block's width: at
ConvFormer-S18's and CAFormer-S18's stage 0 at 2x512x512, 16 MB each. glibc serves allocations that
large from fresh pages and hands them back when they are freed, so each call faults them in again:
8160 page faults and 9 of the branch's 16 ms on the Xeon of 2026-12-05 (2 threads). In bands, a band's
expanded rows (with the rows around them that the filter reads, carried from the band above) and its
filtered rows are a few megabytes at most, reused band after band; the products, the filter and the
activation are the same operators. Where nothing faults, the two take about as long (stages 1-3).

In training (autograd records), in tracing and where the MLP kernel's compiled loop does not apply:
the composed branch, which the timed choice also keeps wherever it is faster.
"""
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import dispatch, native
from .layout import tokens
from .mlp import Activation, _norm_params, compiled_plans, norm_rows

# image rows per band: about this many tokens (fewer made the products and the filter slower at
# ConvFormer-S18's stages 0 and 2; more gained nothing)
BAND_TOKENS = 2048


def _filters_each_channel(dwconv: nn.Conv2d) -> bool:
    """Whether ``dwconv`` is what the kernel computes: one odd square filter per channel, stride 1,
    zero padding that keeps the size."""
    k = dwconv.kernel_size[0]
    return (dwconv.groups == dwconv.in_channels == dwconv.out_channels and k % 2 == 1
            and dwconv.kernel_size == (k, k) and dwconv.stride == (1, 1) and dwconv.dilation == (1, 1)
            and dwconv.padding == (k // 2, k // 2) and dwconv.padding_mode == 'zeros')


def sep_conv_residual(x: torch.Tensor, norm: nn.Module, pwconv1: nn.Conv2d, act: nn.Module,
                      dwconv: nn.Conv2d, pwconv2: nn.Conv2d, layer_scale: Optional[torch.Tensor],
                      res_scale: Optional[torch.Tensor], factors: Optional[torch.Tensor],
                      composed: Callable) -> torch.Tensor:
    """``res_scale * x + factors * layer_scale * pwconv2(dwconv(act(pwconv1(norm(x)))))`` by the
    fastest plan for this input; ``composed(x)`` computes it otherwise (and in training).

    ``norm`` is a GroupNorm or channel LayerNorm, ``pwconv1`` / ``pwconv2`` 1x1 convolutions,
    ``dwconv`` a depthwise one, ``layer_scale`` / ``res_scale`` per-channel vectors or None and
    ``factors`` stochastic depth's per-sample factors (None in inference)."""
    norm_weight, norm_bias = _norm_params(norm)
    params = [p for p in (norm_weight, norm_bias, pwconv1.weight, pwconv1.bias, *act.parameters(),
                          dwconv.weight, dwconv.bias, pwconv2.weight, pwconv2.bias, layer_scale,
                          res_scale) if p is not None]
    if (dispatch.tracing() or factors is not None or dispatch.records(x, params) or x.dim() != 4
            or not _filters_each_channel(dwconv)):
        return composed(x)
    # (on any number of threads: on one, the bands spare the faults all the same; a bf16 map, under
    # bf16 autocast, stays bf16 only where no fp32 factor meets it here either)
    plans = compiled_plans(x, norm, act, bf16_map=layer_scale is None and res_scale is None)
    if not plans:
        return composed(x)
    rows, kernel_act = norm_rows(norm), Activation(act)

    def compute(plan, x):
        if not plan.fused:
            return composed(x)
        with torch.autocast(x.device.type, enabled=False):
            x = x.contiguous(memory_format=torch.channels_last)
            (_, c, height, width), dtype = x.shape, plan.dtype
            coefficients = rows.coefficients(rows.statistics(x), norm_weight, norm_bias, c)
            w2, b2 = pwconv2.weight.flatten(1), pwconv2.bias
            if layer_scale is not None:
                w2 = w2 * layer_scale[:, None]
                b2 = None if b2 is None else b2 * layer_scale
            # the products and the filter in the plan's dtype; fc2's bias joins the residual in x's
            w1, b1, dw, dw_bias, w2 = (None if t is None else t.to(dtype) for t in (
                pwconv1.weight.flatten(1), pwconv1.bias, dwconv.weight, dwconv.bias, w2))
            act_params = tuple(t.to(dtype) for t in kernel_act.params) or (None, None)
            out = torch.empty_like(x, memory_format=torch.channels_last)
            band = -(-BAND_TOKENS // width)
            native.ops().sep_conv_forward(tokens(x).flatten(0, 1), *coefficients, rows.per_row, rows.eps,
                                          w1, b1, dw, dw_bias, w2, b2, res_scale, *act_params, 1.,
                                          height, width, band, tokens(out).flatten(0, 1))
            return out

    key = ('sep_conv', type(norm).__name__, pwconv1.in_channels, pwconv1.out_channels,
           dwconv.kernel_size[0], type(act).__name__, 'res_scale' if res_scale is not None else 'residual')
    return dispatch.run(key, plans + [dispatch.PLAIN], compute, x, params)
