"""How the MetaFormer's branches are computed, apart from what they compute (``models/``).

A module of ``models/`` that can compute its residual branch faster than as written offers a
``fused_residual`` method (see ``MetaFormerBlock``) that calls a kernel from here with its tensors and
its plain formulation. The kernel picks, once per kind of input, the fastest of its plans on the
device at hand, the plain formulation always among them (``dispatch``).

- ``mlp``: GroupNorm or channel LayerNorm, fc1, activation, fc2, scales and residual in token chunks
  (or the first three alone: SepConv's expansion);
- ``sep_conv``: ConvFormer's SepConv with its norm and residual, in inference on CPUs band by band
  of image rows;
- ``pooling``: GroupNorm, pooling, scale and residual as one interpolation; the plain pooling with a
  backward that is right on CUDA's channels-last maps;
- ``conv``: the stem's, the downsamplings' and the depthwise convolutions: their precision under
  autocast, and in training their weight gradient as a product over patches or as a correlation;
- ``group_norm``: the statistics and the per-sample affine map the others share; GroupNorm on its
  own, on CUDA devices from statistics spread over the whole device; the emitted maps on CPUs
  normalised as they are turned from channels-last to NCHW;
- ``layer_norm``: channel LayerNorm on its own, on CPUs by the compiled rows the MLP kernel uses;
- ``layout``: maps turned between channels-last and NCHW by the compiled transposition (the emitted
  maps after other norms, ``to_nchw``; the depthwise convolutions' weight gradients);
- ``attention``: multi-head attention, in inference on CPUs by a compiled forward pass;
- ``native``: compiled CPU kernels (``csrc/``) for the element-wise work of ``mlp``, ``pooling`` and
  ``group_norm``, and for ``attention``, built on first use for the CPU at hand;
- ``triton_ops``: the pooling branch's passes as Triton kernels, a plan of ``pooling`` on CUDA devices.
"""
from .attention import attend
from .conv import conv2d
from .dispatch import PLAIN, Plan, chosen, cpu_info, forced
from .group_norm import group_normalize
from .layer_norm import layer_normalize
from .layout import to_nchw
from .mlp import norm_linear_act, norm_mlp_residual
from .pooling import avg_pool, norm_pool_residual
from .sep_conv import sep_conv_residual

__all__ = [
    'Plan', 'PLAIN', 'forced', 'chosen', 'cpu_info', 'attend', 'avg_pool', 'conv2d', 'group_normalize',
    'layer_normalize', 'norm_linear_act', 'norm_mlp_residual', 'norm_pool_residual',
    'sep_conv_residual', 'to_nchw'
]
