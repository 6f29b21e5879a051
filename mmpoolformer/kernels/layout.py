"""Maps between channels-last and NCHW on CPUs, by the compiled transposition (``csrc/group_norm.cpp``'s
``transpose_affine`` without a map: tiles of one vector each way, transposed in registers).

The stages run channels-last; what turns a map around is PyTorch's ``.contiguous()``, which goes element
by element there: 6.7 ms for a 2x64x128x128 fp32 map on the Xeon of 2026-12-04 (2 threads), the
transposition 0.55 ms. Turned here: the emitted maps after a channel LayerNorm (:func:`to_nchw`, and its
gradient back), the maps of a depthwise convolution's weight gradient (``conv.py``), and the MLP's
weights for oneDNN's products in backward (:func:`transposed`, ``mlp.py``).
"""
import torch

from . import dispatch, native


def tokens(x: torch.Tensor) -> torch.Tensor:
    """The ``(N, H * W, C)`` token view of a channels-last ``(N, C, H, W)`` map (a copy otherwise)."""
    n, c = x.shape[:2]
    return x.permute(0, 2, 3, 1).reshape(n, -1, c)


def samples(nchw: torch.Tensor) -> torch.Tensor:
    """The ``(N, C, H * W)`` view of an NCHW map: each sample's channels-by-positions matrix."""
    return nchw.view(*nchw.shape[:2], -1)


def transposes(x: torch.Tensor) -> bool:
    """Whether the compiled kernels turn ``x`` (a channels-last fp32 CPU map) into an NCHW one."""
    return x.dim() == 4 and native.takes(x, memory_format=torch.channels_last)


def nchw(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()``: by the compiled transposition where it takes ``x`` (no autograd)."""
    if x.is_contiguous() or not transposes(x):
        return x.contiguous()
    out = x.new_empty(x.shape)
    native.ops().transpose_affine(tokens(x), None, None, samples(out))
    return out


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous(memory_format=torch.channels_last)``: by the compiled transposition where it
    takes ``x``, a contiguous NCHW fp32 CPU map (no autograd)."""
    if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last) or not native.takes(x):
        return x.contiguous(memory_format=torch.channels_last)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    native.ops().transpose_affine(samples(x), None, None, tokens(out))
    return out


def transposed(w: torch.Tensor) -> torch.Tensor:
    """``w.t().contiguous()`` for a matrix: by the compiled transposition where it takes ``w`` (a
    contiguous fp32 CPU matrix; PyTorch's copy reads the transposed matrix element by element: a
    2048x512 fp32 weight in 0.88 ms on the Xeon of 2026-12-05, 2 threads, the transposition 0.29 ms);
    no autograd."""
    if w.dim() != 2 or not native.takes(w):
        return w.t().contiguous()
    out = w.new_empty(w.shape[1], w.shape[0])
    native.ops().transpose_affine(w.unsqueeze(0), None, None, out.unsqueeze(0))
    return out


class _ToNCHW(torch.autograd.Function):
    """:func:`nchw` of a channels-last map, and its gradient turned back the same way."""

    @staticmethod
    def forward(ctx, x):
        return nchw(x)

    @staticmethod
    def backward(ctx, grad):
        return channels_last(grad)


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()``, for a backbone's emitted maps: a channels-last fp32 map on a CPU by the
    faster of PyTorch's copy and the compiled transposition (timed once, as every plan); its
    gradient, an NCHW map, would cost the same copy again in a channel LayerNorm's backward."""
    if x.is_contiguous() or dispatch.tracing() or not transposes(x):
        return x.contiguous()
    return dispatch.run(('to_nchw', x.shape[1]), [dispatch.Plan(), dispatch.PLAIN],
                        lambda plan, x: _ToNCHW.apply(x) if plan.fused else x.contiguous(), x, [])
