"""The MLP branch of a block, ``x + s * fc2(act(fc1(GN(x))))``, fused and computed in token chunks.

Unfused, this branch writes and reads back four maps per block (the normalised map, the hidden map, its
activation, the branch output), three of them four times as wide as the block, before the residual
add reads ``x`` again. Here each sample's tokens go through in chunks of a few megabytes of hidden
activations: a chunk is normalised, multiplied, activated, multiplied and added to its residual while
it is still in cache, and only the output is written. The products are the same matrix products as in
the plain formulation, over the channels-last token view; with oneDNN in inference, the activation is
applied by the first product as it writes.

Backward goes through the same chunks. Only ``x`` and (in blocks wider than
:data:`RECOMPUTE_HIDDEN_UP_TO` channels) the hidden map ``h`` are kept; the normalised map, the
activation and any ``h`` not kept are recomputed per chunk, and the weight gradients accumulate chunk by
chunk. What reaches the norm's input is the one full-size gradient, handed to PyTorch's own GroupNorm
backward.

``s`` is a per-channel scale folded into fc2 by the caller (LayerScale) times a per-sample factor
(stochastic depth: 0 for a dropped sample, whose tokens are then copied, ``1 / keep`` otherwise).
"""
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from . import dispatch
from .dispatch import Plan
from .group_norm import affine, group_stats, tokens

CHUNK_BYTES = 1 << 22  # hidden activations per chunk: stays in cache with room for the rest
# Training keeps the hidden map ``h`` (four times as wide as the block) for backward, except in blocks
# this narrow: there it is the largest tensor of the network (the first stages have the most tokens)
# and the cheapest to recompute (fc1 over so few input channels is a small share of the products).
RECOMPUTE_HIDDEN_UP_TO = 128


class Activation:
    """An activation as the kernel needs it: into a given buffer, and its backward in place.

    ``params`` are its learned tensors (StarReLU's scale and bias), which the kernel takes as inputs
    and hands back to ``forward`` / ``backward`` as it received them; ``backward`` adds their
    gradients into ``grads`` (None where one is not needed).
    """

    def __init__(self, module: nn.Module):
        from ..models.layers import StarReLU  # (the architecture's; the models import the kernels)
        self.onednn_post_op = None  # (attr, scalars, algorithm) of oneDNN's fused activation
        self.params = ()
        kind = type(module)
        if kind is nn.GELU:
            approximate = module.approximate
            self.onednn_post_op = ('gelu', [], approximate)
            self.forward = lambda h, out, params: torch.ops.aten.gelu.out(
                h, approximate=approximate, out=out)
            self.backward = lambda g, h, *unused: torch.ops.aten.gelu_backward.grad_input(
                g, h, approximate=approximate, grad_input=g)
        elif kind is nn.ReLU:
            self.onednn_post_op = ('relu', [], '')
            self.forward = lambda h, out, params: torch.clamp_min(h, 0, out=out)
            self.backward = lambda g, h, *unused: torch.ops.aten.threshold_backward.grad_input(
                g, h, 0, grad_input=g)
        elif kind is nn.SiLU:
            self.onednn_post_op = ('swish', [], '')
            self.forward = lambda h, out, params: torch.ops.aten.silu.out(h, out=out)
            self.backward = lambda g, h, *unused: torch.ops.aten.silu_backward.grad_input(
                g, h, grad_input=g)
        elif kind is StarReLU:
            self.params = (module.scale, module.bias)
            self.forward, self.backward = _star_relu_forward, _star_relu_backward
        else:
            raise TypeError(f'no fused kernel for activation {kind.__name__}')

    @staticmethod
    def supports(module: nn.Module) -> bool:
        from ..models.layers import StarReLU
        return type(module) in (nn.GELU, nn.ReLU, nn.SiLU, StarReLU)


def _star_relu_forward(h, out, params):
    """``scale * relu(h) ** 2 + bias``, in ``out``."""
    scale, bias = params
    return torch.clamp_min(h, 0, out=out).square_().mul_(scale).add_(bias)


def _star_relu_backward(g, h, params, grads, scratch):
    """``g * 2 * scale * relu(h)`` in ``g``; ``sum(g * relu(h) ** 2)`` and ``sum(g)`` into ``grads``."""
    scale, _ = params
    grad_scale, grad_bias = grads
    if grad_bias is not None:
        grad_bias += g.sum(dtype=grad_bias.dtype)
    relu = torch.clamp_min(h, 0, out=scratch)
    g.mul_(relu)
    if grad_scale is not None:
        grad_scale += torch.dot(g.flatten(), relu.flatten())
    return g.mul_(scale).mul_(2)


def _linear(backend: str, x, weight, bias=None, out=None):
    """``x @ weight.T + bias`` for ``(rows, in)`` tokens and an ``(out, in)`` weight."""
    if out is not None and out.dtype != x.dtype:
        return out.copy_(_linear(backend, x, weight, bias))
    if backend == 'onednn':
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')
        return y if out is None else out.copy_(y)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


class _NormMlpResidual(torch.autograd.Function):
    """On channels-last ``(N, C, H, W)`` maps; ``scales`` is a list of N per-sample factors."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, w1, b1, w2, b2, groups, eps, act, scales, plan,
                *act_params):
        with torch.autocast(x.device.type, enabled=False):
            dtype = plan.dtype or x.dtype
            n, c = x.shape[:2]
            mean, rstd = group_stats(x, groups, eps)
            a, b = affine(mean, rstd, norm_weight, norm_bias, c)
            w1, b1, w2, b2 = (None if t is None else t.to(dtype) for t in (w1, b1, w2, b2))
            act_params = tuple(t.to(dtype) for t in act_params)
            out = torch.empty_like(x, memory_format=torch.channels_last)
            tx, tout = tokens(x), tokens(out)
            h_all = None
            if any(ctx.needs_input_grad) and c > RECOMPUTE_HIDDEN_UP_TO:
                h_all = tx.new_empty(tx.shape[:2] + w1.shape[:1], dtype=dtype)
            fused_act = act.onednn_post_op if plan.backend == 'onednn' and not any(
                ctx.needs_input_grad) else None
            bufs = _Buffers(tx, w1.shape[0], dtype)
            rows_x, rows_out = tx.flatten(0, 1), tout.flatten(0, 1)
            rows_h = None if h_all is None else h_all.flatten(0, 1)
            copy_input = lambda i: tout[i].copy_(tx[i])  # noqa: E731 (a dropped sample's output)
            for start, end, samples, scale in _chunks(tx, bufs.rows, scales, copy_input):
                xc = rows_x[start:end]
                nc = _normalize(rows_x, a, b, start, samples, bufs.normed(end - start))
                if fused_act:  # inference: oneDNN applies the activation as it writes fc1's output
                    ac = torch.ops.mkldnn._linear_pointwise(nc, w1, b1, *fused_act)
                else:
                    hc = _linear(plan.backend, nc, w1, b1, out=bufs.hidden(end - start)
                                 if rows_h is None else rows_h[start:end])
                    ac = act.forward(hc, bufs.act(end - start), act_params)
                oc = rows_out[start:end]
                if plan.backend == 'blas' and dtype == x.dtype:
                    if b2 is None:
                        oc.copy_(xc)
                    else:
                        torch.add(xc, b2, alpha=scale, out=oc)
                    oc.addmm_(ac, w2.t(), alpha=scale)
                else:
                    torch.add(xc, _linear(plan.backend, ac, w2, b2), alpha=scale, out=oc)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, w1, b1, w2, h_all, *act_params)
        ctx.groups, ctx.act, ctx.scales, ctx.plan = groups, act, scales, plan
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, norm_weight, norm_bias, w1, b1, w2, h_all, *act_params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        plan, act, scales = ctx.plan, ctx.act, ctx.scales
        dtype, hidden = w1.dtype, w1.shape[0]
        n, c = x.shape[:2]
        with torch.autocast(x.device.type, enabled=False):
            a, b = affine(mean, rstd, norm_weight, norm_bias, c)
            grad = grad.contiguous(memory_format=torch.channels_last)
            tx, tg = tokens(x), tokens(grad)
            acc = dict(dtype=torch.promote_types(dtype, torch.float32), device=x.device)
            gw1 = torch.zeros(w1.shape, **acc) if needs[3] else None
            gb1 = torch.zeros(hidden, **acc) if needs[4] else None
            gw2 = torch.zeros(w2.shape, **acc) if needs[5] else None
            gb2 = torch.zeros(c, **acc) if needs[6] else None
            act_needs = needs[12:]  # the activation's tensors come after forward's 12 inputs
            grad_act = [torch.zeros(t.shape, **acc) if need else None
                        for t, need in zip(act_params, act_needs)]
            into_norm = any(needs[:3])
            into_hidden = into_norm or needs[3] or needs[4] or any(act_needs)
            grad_normed = torch.empty_like(x, memory_format=torch.channels_last) if into_norm else None
            tgn = None if grad_normed is None else tokens(grad_normed)
            # the products that carry the gradient back, as (out, in) weights for oneDNN
            w2_t = w2.t().contiguous() if plan.backend == 'onednn' else w2.t()
            w1_t = w1.t().contiguous() if plan.backend == 'onednn' else w1.t()
            bufs = _Buffers(tx, hidden, dtype)
            rows_x, rows_g = tx.flatten(0, 1), tg.flatten(0, 1)
            rows_gn = None if tgn is None else tgn.flatten(0, 1)
            rows_h = None if h_all is None else h_all.flatten(0, 1)
            no_grad = lambda i: tgn is not None and tgn[i].zero_()  # noqa: E731 (a dropped sample)
            for start, end, samples, scale in _chunks(tx, bufs.rows, scales, no_grad):
                k = end - start
                gc = rows_g[start:end]
                if scale != 1 or gc.dtype != dtype:
                    gc = torch.mul(gc, scale, out=bufs.grad(k))
                nc = _normalize(rows_x, a, b, start, samples, bufs.normed(k))
                hc = rows_h[start:end] if rows_h is not None else _linear(
                    plan.backend, nc, w1, b1, out=bufs.hidden(k))
                if needs[5]:
                    _accumulate(gw2, gc.t(), act.forward(hc, bufs.act(k), act_params))
                if needs[6]:
                    gb2 += gc.sum(0)
                if not into_hidden:
                    continue
                gh = act.backward(_linear(plan.backend, gc, w2_t, out=bufs.act(k)), hc, act_params,
                                  grad_act, bufs.scratch(k))
                if needs[3]:
                    _accumulate(gw1, gh.t(), nc)
                if needs[4]:
                    gb1 += gh.sum(0)
                if into_norm:
                    _linear(plan.backend, gh, w1_t, out=rows_gn[start:end])
            grad_x = grad_norm_weight = grad_norm_bias = None
            if into_norm:
                grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_group_norm_backward(
                    grad_normed, x, mean.to(x.dtype), rstd.to(x.dtype), norm_weight, n, c,
                    tx.shape[1], ctx.groups, list(needs[:3]))
                if needs[0]:
                    grad_x += grad
            elif needs[0]:
                grad_x = grad.clone()
        param_dtype = (norm_weight if norm_weight is not None else x).dtype
        cast = lambda t: None if t is None else t.to(param_dtype)  # noqa: E731
        return (grad_x, grad_norm_weight, grad_norm_bias, cast(gw1), cast(gb1), cast(gw2), cast(gb2),
                None, None, None, None, None, *map(cast, grad_act))


class _Buffers:
    """Chunk-sized scratch tensors, allocated once per call and reused by every chunk."""

    def __init__(self, tx: torch.Tensor, hidden: int, dtype: torch.dtype):
        self.rows, self.c, self.hidden_dim = _rows(hidden, dtype), tx.shape[2], hidden
        self.tx, self.dtype, self._bufs = tx, dtype, {}

    def _get(self, name, width, k):
        buf = self._bufs.get(name)
        if buf is None:
            buf = self._bufs[name] = self.tx.new_empty((self.rows, width), dtype=self.dtype)
        return buf[:k]

    def normed(self, k):
        return self._get('normed', self.c, k)

    def grad(self, k):
        return self._get('grad', self.c, k)

    def hidden(self, k):
        return self._get('hidden', self.hidden_dim, k)

    def act(self, k):
        return self._get('act', self.hidden_dim, k)

    def scratch(self, k):
        return self._get('scratch', self.hidden_dim, k)


def _rows(hidden: int, dtype: torch.dtype) -> int:
    return max(16, CHUNK_BYTES // (hidden * dtype.itemsize))


def _chunks(tx: torch.Tensor, rows: int, scales: List[float], on_dropped):
    """``(start, end, samples, scale)`` of every chunk of the ``(N * HW, C)`` token rows: its rows, the
    samples whose tokens it holds as ``(sample, start, end)`` rows, and the factor of its output.

    Where every sample has the same factor, chunks run across samples, about ``rows`` long and all of
    one length: the products then get as many rows as the cache allows even where a sample has few
    tokens (the last stages), and no short remainder per sample. Otherwise (stochastic depth in
    training) each sample is chunked alone, and ``on_dropped(i)`` is called for a sample of factor 0.
    """
    n, hw = tx.shape[:2]
    if len(set(scales)) == 1 and scales[0] != 0:
        total = n * hw
        count = -(-total // rows)
        length = -(-total // count)
        for start in range(0, total, length):
            end = min(start + length, total)
            samples = [(i, max(start, i * hw), min(end, (i + 1) * hw))
                       for i in range(start // hw, (end - 1) // hw + 1)]
            yield start, end, samples, scales[0]
        return
    for i in range(n):
        if scales[i] == 0:
            on_dropped(i)
            continue
        for start in range(i * hw, (i + 1) * hw, rows):
            end = min(start + rows, (i + 1) * hw)
            yield start, end, [(i, start, end)], scales[i]


def _normalize(rows_x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, start: int, samples: list,
               out: torch.Tensor) -> torch.Tensor:
    """GroupNorm of a chunk's rows into ``out``: each sample's part with its own ``a * x + b``."""
    for i, first, last in samples:
        torch.addcmul(b[i], rows_x[first:last], a[i], out=out[first - start:last - start])
    return out


def _accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += a @ b``, in ``total``'s (fp32) precision."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    else:
        total += torch.mm(a, b)


def norm_mlp_residual(x: torch.Tensor, norm: nn.Module, fc1: nn.Conv2d, act: nn.Module,
                      fc2: nn.Conv2d, layer_scale: Optional[torch.Tensor],
                      factors: Optional[torch.Tensor], plain: Callable) -> torch.Tensor:
    """``x + factors * layer_scale * fc2(act(fc1(norm(x))))``, by the fastest plan for this input.

    ``fc1`` / ``fc2`` are 1x1 convolutions, ``factors`` the ``(N, 1, 1, 1)`` per-sample factors of
    stochastic depth (None: all one) and ``plain(x)`` the same branch as the modules compute it, which
    is taken where the kernel does not apply (another norm or activation, dropout, fp16 or other
    dtypes) and wherever it is faster.
    """
    if dispatch.tracing() or not (isinstance(norm, nn.GroupNorm) and Activation.supports(act)
            and x.dtype in (torch.float32, torch.float64) and x.dim() == 4):
        return plain(x)
    dtypes = [d for d in dispatch.product_dtypes(x.device, x.dtype) if d != torch.float16]
    fused = [Plan(backend=backend, dtype=dtype) for dtype in dtypes
             for backend in dispatch.backends(x.device, dtype)]
    kernel_act = Activation(act)
    scales = [1.] * x.shape[0] if factors is None else factors.flatten().tolist()
    params = [p for p in (norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                          layer_scale, *kernel_act.params) if p is not None]

    def compute(plan, x):
        if not plan.fused:
            return plain(x)
        w2, b2 = fc2.weight.flatten(1), fc2.bias
        if layer_scale is not None:
            w2 = w2 * layer_scale[:, None]
            b2 = None if b2 is None else b2 * layer_scale
        x = x.contiguous(memory_format=torch.channels_last)
        return _NormMlpResidual.apply(x, norm.weight, norm.bias, fc1.weight.flatten(1), fc1.bias, w2,
                                      b2, norm.num_groups, norm.eps, kernel_act, scales, plan,
                                      *kernel_act.params)

    key = ('mlp', fc1.in_channels, fc1.out_channels, type(act).__name__)
    return dispatch.run(key, fused + [dispatch.PLAIN], compute, x, params)
