"""Triton kernels for CUDA devices: the pooling branch's passes, as ``csrc/pooling.cpp`` on CPUs.

As PyTorch's operators, the pooling branch ``r * x + s * (pool(x) - x)`` (``pooling.py``) is two
passes over the map forward and, backward, the pooling's adjoint, its difference with the gradient,
the per-channel sums against ``x`` and three more element-wise operators; on channels-last CUDA maps
the adjoint also needs an NCHW copy each way (PyTorch's own is wrong there, ``pooling.py``). Here,
on channels-last fp32 maps, forward is one pass and backward two, with the same signatures as the
CPU kernels, so that ``pooling.py`` calls either:

- ``pool_mix(x, scale, res_scale, out, kernel)``: ``out = res_scale * x + scale * (pool(x) - x)``;
- ``pool_mix_adjoint(grad, x, mixed, kernel)``: ``mixed = pool^T(grad) - grad``, returning the sums
  of ``mixed * x`` per (sample, channel); each program writes its partial sums, which are added in
  float64 afterwards (no atomics: the same sums every run, as deterministic mode needs);
- ``pool_mix_input_grad(mixed, grad, x, scale, res_scale, coef, shift)``: in place,
  ``mixed = scale * mixed + res_scale * grad + coef * x + shift``.

``pool`` is the k x k average, stride 1, padding k / 2 excluded from the count. A program holds a
tile of one row of one sample: ``BLOCK_W`` positions by ``BLOCK_C`` channels, channels adjacent in
memory. They are a plan of the pooling branch on CUDA, timed against the branch as PyTorch's
operators and the plain formulation (``dispatch``); where Triton is missing, or its kernels fail the
check against PyTorch's operators at first use, one warning says why and they are not offered.
``TRITON_INTERPRET=1`` when this module is imported runs them on CPU tensors (the tests do).
"""
import functools
import warnings
from types import SimpleNamespace
from typing import Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

try:  # (PyTorch's CUDA wheels bring it; the kernels' bodies need ``tl`` among their globals)
    import triton
    import triton.language as tl
    IMPORT_ERROR = None
except Exception as error:  # not installed, or broken (said where a CUDA device would use it)
    triton = tl = None
    IMPORT_ERROR = f'{type(error).__name__}: {error}'
constexpr = object if tl is None else tl.constexpr  # (the kernels' compile-time arguments)


def _jit(fn):
    """Triton's wrapper where there is Triton (it compiles nothing before a kernel's first launch;
    under ``TRITON_INTERPRET=1`` at import, the interpreter's)."""
    return fn if triton is None else triton.jit(fn)


BLOCK_W = 16  # positions of a row per program
MAX_BLOCK_C = 64  # channels per program (fewer where the map has fewer, as a power of two)


@_jit
def _window_size(i, n, PAD: constexpr):
    """How many of the window's positions along a side of ``n`` the position ``i`` (within the side)
    has: ``2 PAD + 1``, fewer at the edges."""
    return tl.minimum(i + PAD, n - 1) - tl.maximum(i - PAD, 0) + 1


@_jit
def _tile(ptr, sample, hh, ww, c, inside, H, W, C):
    """The ``(positions, channels)`` values at row ``hh``, columns ``ww`` of a sample's channels-last
    map; zeros beyond the map and outside the program's tile (``inside``)."""
    there = (ww >= 0) & (ww < W) & (hh >= 0) & (hh < H)
    return tl.load(ptr + sample + hh * W * C + ww[:, None] * C + c[None, :],
                   mask=there[:, None] & inside, other=0.)


@_jit
def _program_tile(H, W, C, BLOCK_W: constexpr, BLOCK_C: constexpr):
    """The tile of a pooling program (grid: sample and row, column block, channel block): its
    sample row ``nh``, sample ``n``, row ``h``, columns ``w``, channels ``c``, which of them are in
    the map (``inside``), the sample's offset and the tile's own offsets in a channels-last map."""
    nh = tl.program_id(0).to(tl.int64)
    n, h = nh // H, nh % H
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (w < W)[:, None] & (c < C)[None, :]
    sample = n * H * W * C
    return nh, n, h, w, c, inside, sample, sample + h * W * C + w[:, None] * C + c[None, :]


@_jit
def _pool_mix(x_ptr, out_ptr, scale_ptr, res_ptr, H, W, C, PAD: constexpr,
              HAS_RES: constexpr, BLOCK_W: constexpr, BLOCK_C: constexpr):
    _, n, h, w, c, inside, sample, at = _program_tile(H, W, C, BLOCK_W, BLOCK_C)
    total = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(2 * PAD + 1):
        hh = h + i - PAD
        for j in tl.static_range(2 * PAD + 1):
            total += _tile(x_ptr, sample, hh, w + j - PAD, c, inside, H, W, C)
    count = _window_size(h, H, PAD) * _window_size(w, W, PAD)
    pooled = total / tl.maximum(count, 1).to(tl.float32)[:, None]  # (>= 1 beyond the map)
    x = tl.load(x_ptr + at, mask=inside, other=0.)
    s = tl.load(scale_ptr + n * C + c, mask=c < C, other=0.)[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + c, mask=c < C, other=0.)[None, :]
        out = r * x + s * (pooled - x)
    else:
        out = x + s * (pooled - x)
    tl.store(out_ptr + at, out, mask=inside)


@_jit
def _pool_mix_adjoint(grad_ptr, x_ptr, mixed_ptr, partial_ptr, H, W, C, PAD: constexpr,
                      BLOCK_W: constexpr, BLOCK_C: constexpr):
    nh, n, h, w, c, inside, sample, at = _program_tile(H, W, C, BLOCK_W, BLOCK_C)
    # the windows that hold a position are those of the positions in its own window; each gives
    # it its share, 1 / (that window's rows * its columns)
    total = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    for i in tl.static_range(2 * PAD + 1):
        hh = h + i - PAD
        rows = _window_size(hh, H, PAD)
        for j in tl.static_range(2 * PAD + 1):
            ww = w + j - PAD
            cols = _window_size(ww, W, PAD)
            g = _tile(grad_ptr, sample, hh, ww, c, inside, H, W, C)
            # (positions beyond the map count no values: kept from dividing by zero)
            total += g / tl.maximum(rows * cols, 1).to(tl.float32)[:, None]
    mixed = total - tl.load(grad_ptr + at, mask=inside, other=0.)
    tl.store(mixed_ptr + at, mixed, mask=inside)
    x = tl.load(x_ptr + at, mask=inside, other=0.)
    part = tl.sum(mixed * x, axis=0)  # (masked positions hold zeros)
    tl.store(partial_ptr + (nh * tl.num_programs(1) + tl.program_id(1)) * C + c, part, mask=c < C)


@_jit
def _pool_mix_input_grad(mixed_ptr, grad_ptr, x_ptr, scale_ptr, res_ptr, coef_ptr, shift_ptr, HW, C,
                         HAS_RES: constexpr, BLOCK_P: constexpr, BLOCK_C: constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # (sample, position) rows
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (c < C)[None, :]  # (the caller launches whole rows only)
    at = p[:, None] * C + c[None, :]
    per_sample = (p // HW)[:, None] * C + c[None, :]
    mixed = tl.load(mixed_ptr + at, mask=inside, other=0.)
    g = tl.load(grad_ptr + at, mask=inside, other=0.)
    x = tl.load(x_ptr + at, mask=inside, other=0.)
    s = tl.load(scale_ptr + per_sample, mask=inside, other=0.)
    k = tl.load(coef_ptr + per_sample, mask=inside, other=0.)
    b = tl.load(shift_ptr + per_sample, mask=inside, other=0.)
    if HAS_RES:
        g = g * tl.load(res_ptr + c, mask=c < C, other=0.)[None, :]
    tl.store(mixed_ptr + at, s * mixed + g + k * x + b, mask=inside)


def _block_c(channels: int) -> int:
    return min(MAX_BLOCK_C, 1 << max(channels - 1, 1).bit_length())


def _check_map(x: torch.Tensor, kernel: int, *others: torch.Tensor) -> None:
    if not (x.dim() == 4 and x.dtype == torch.float32 and kernel % 2 == 1 and all(
            t.is_contiguous(memory_format=torch.channels_last) and t.shape == x.shape
            and t.dtype == x.dtype and t.device == x.device for t in (x, ) + others)):
        raise ValueError('the Triton pooling kernels take channels-last float32 (N, C, H, W) maps of '
                         f'one shape and an odd pool size, got {tuple(x.shape)} {x.dtype}, pool size '
                         f'{kernel}')


def _per_sample(t: torch.Tensor, shape) -> torch.Tensor:
    return t.to(torch.float32).expand(shape).contiguous()


def pool_mix(x: torch.Tensor, scale: torch.Tensor, res_scale: Optional[torch.Tensor],
             out: torch.Tensor, kernel: int) -> None:
    """``out = res_scale * x + scale * (pool(x) - x)``; ``scale`` (N, C), ``res_scale`` (C, ) or
    None (one)."""
    _check_map(x, kernel, out)
    n, c, h, w = x.shape
    block_c = _block_c(c)
    res = None if res_scale is None else res_scale.to(torch.float32).contiguous()
    _pool_mix[(n * h, -(-w // BLOCK_W), -(-c // block_c))](
        x, out, _per_sample(scale, (n, c)), x if res is None else res, h, w, c, PAD=kernel // 2,
        HAS_RES=res is not None, BLOCK_W=BLOCK_W, BLOCK_C=block_c)


def pool_mix_adjoint(grad: torch.Tensor, x: torch.Tensor, mixed: torch.Tensor,
                     kernel: int) -> torch.Tensor:
    """``mixed = pool^T(grad) - grad``; returns the (N, C) float32 sums of ``mixed * x`` over
    positions (added in float64)."""
    _check_map(x, kernel, grad, mixed)
    n, c, h, w = x.shape
    block_c = _block_c(c)
    blocks = -(-w // BLOCK_W)
    partial = x.new_empty(n * h * blocks, c)
    _pool_mix_adjoint[(n * h, blocks, -(-c // block_c))](
        grad, x, mixed, partial, h, w, c, PAD=kernel // 2, BLOCK_W=BLOCK_W, BLOCK_C=block_c)
    return partial.view(n, h * blocks, c).sum(1, dtype=torch.float64).to(torch.float32)


def pool_mix_input_grad(mixed: torch.Tensor, grad: torch.Tensor, x: torch.Tensor,
                        scale: torch.Tensor, res_scale: Optional[torch.Tensor], coef: torch.Tensor,
                        shift: torch.Tensor) -> None:
    """In place: ``mixed = scale * mixed + res_scale * grad + coef * x + shift``, with ``scale``,
    ``coef`` and ``shift`` per (sample, channel)."""
    _check_map(x, 1, grad, mixed)
    n, c, h, w = x.shape
    block_c = _block_c(c)
    # rows of positions per program: a divisor of H * W, so that every program's rows are whole
    block_p = next(b for b in (16, 8, 4, 2, 1) if (h * w) % b == 0)
    res = None if res_scale is None else res_scale.to(torch.float32).contiguous()
    _pool_mix_input_grad[(n * h * w // block_p, -(-c // block_c))](
        mixed, grad, x, _per_sample(scale, (n, c)), x if res is None else res,
        _per_sample(coef, (n, c)), _per_sample(shift, (n, c)), h * w, c, HAS_RES=res is not None,
        BLOCK_P=block_p, BLOCK_C=block_c)


OPS = SimpleNamespace(pool_mix=pool_mix, pool_mix_adjoint=pool_mix_adjoint,
                      pool_mix_input_grad=pool_mix_input_grad)


def ops(device: torch.device) -> Optional[SimpleNamespace]:
    """The kernels for ``device``, or None: not a CUDA device, no Triton, or kernels that disagree
    with PyTorch's operators there (checked once per device type, with one warning)."""
    if device.type != 'cuda':
        return None
    return OPS if _usable(device.type) else None


@functools.lru_cache(None)
def _usable(device_type: str) -> bool:
    if IMPORT_ERROR is not None and 'No module named' in IMPORT_ERROR:
        return False  # (a CUDA PyTorch without Triton: nothing to say, PyTorch's operators work)
    try:
        # (first used inside a dispatch mode, as a FLOP counter's, the check is no work of the caller's)
        with _disable_current_modes():
            problem = IMPORT_ERROR or check(OPS, torch.device(device_type))
    except Exception as error:  # a failed compilation, an unsupported GPU, ...
        problem = f'{type(error).__name__}: {(str(error).strip().splitlines() or [""])[-1]}'
    if problem:
        warnings.warn(f"mmpoolformer's Triton kernels are unavailable on {device_type} ({problem}); "
                      "PyTorch's operators do their work instead")
    return not problem


def check(namespace, device: torch.device) -> Optional[str]:
    """What is wrong with the pooling kernels of ``namespace`` on ``device`` against PyTorch's
    operators in float64, or None. The map has a channel tail after a block, rows longer than a
    block and windows cut by every edge."""
    shape = (2, 70, 5, 19)
    x, grad = (torch.sin(torch.arange(2 * 70 * 95., dtype=torch.float64) * k).view(shape)
               for k in (0.37, 0.11))
    scale = torch.linspace(0.5, 1.5, 140, dtype=torch.float64).view(2, 70)
    res = torch.linspace(0.9, 1.1, 70, dtype=torch.float64)
    s, r = scale[:, :, None, None], res[:, None, None]
    pool = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    adjoint = torch.ops.aten.avg_pool2d_backward(grad, x, [3, 3], [1, 1], [1, 1], False, False,
                                                 None) - grad
    on = lambda t: t.to(device, torch.float32).contiguous(  # noqa: E731
        memory_format=torch.channels_last if t.dim() == 4 else torch.contiguous_format)
    out, mixed = torch.empty_like(on(x)), torch.empty_like(on(x))
    namespace.pool_mix(on(x), on(scale), on(res), out, 3)
    sums = namespace.pool_mix_adjoint(on(grad), on(x), mixed, 3)
    close = lambda a, b, tol=1e-5: torch.allclose(a.cpu().double(), b, rtol=tol, atol=tol)  # noqa
    if not (close(out, r * x + s * (pool - x)) and close(mixed, adjoint)
            and close(sums, (adjoint * x).sum((2, 3)), 1e-4)):
        return "their pooling disagrees with PyTorch's"
    namespace.pool_mix_input_grad(mixed, on(grad), on(x), on(scale), on(res), on(-scale), on(scale))
    if not close(mixed, s * adjoint + r * grad - s * x + s):
        return "their pooling's input gradient disagrees with PyTorch's"
    return None
