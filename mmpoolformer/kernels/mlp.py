"""The MLP branch of a block, ``r * x + s * fc2(act(fc1(norm(x))))``, fused and computed in token chunks.

Unfused, this branch writes and reads back four maps per block (the normalised map, the hidden map, its
activation, the branch output), three of them four times as wide as the block, before the residual
add reads ``x`` again. Here each sample's tokens go through in chunks of a few megabytes of hidden
activations: a chunk is normalised, multiplied, activated, multiplied and added to its residual while
it is still in cache, and only the output is written. The products are the same matrix products as in
the plain formulation, over the channels-last token view; with oneDNN in inference, the activation is
applied by the first product as it writes, and elsewhere, where fc1's output is not kept for backward,
written over it (one hidden-width buffer in cache instead of two: S12's and CAFormer-S18's forward
passes 0.98 of the time on the Xeon of 2026-12-05). The norm is GroupNorm (PoolFormer, PoolFormerV2) or
channel LayerNorm (ConvFormer, CAFormer): :class:`GroupNormRows` and :class:`LayerNormRows` say how
each normalises a chunk of token rows and carries its gradient back.

Backward goes through the same chunks. Only ``x`` and (in blocks wider than
:data:`RECOMPUTE_HIDDEN_UP_TO` channels) the hidden map ``h`` are kept (under bf16 autocast in bf16,
whatever the products' dtype: :func:`kept_hidden_dtype`); the normalised map, the
activation and any ``h`` not kept are recomputed per chunk, and the weight gradients accumulate chunk by
chunk. A LayerNorm's backward is per token and runs in the chunks too; GroupNorm's needs the whole
map's gradient, which the chunks gather for its backward (``group_norm.group_norm_backward``). On a
GPU there is one chunk of every token row: no cache to stay in, and its products need many rows to
fill the device; what remains of the kernel there is what it keeps for backward. The activation's value
(for fc2's weight gradient) and derivative come from one compiled pass where there is one for it
(GELU and StarReLU on CPUs, ``native.py``), else from its forward and backward operators; so does its
forward pass.

On a CPU with several threads one more plan (:data:`THREADS`) runs the whole chunk loop compiled
(``csrc/mlp.cpp``; GroupNorm or channel LayerNorm, GELU or StarReLU, the first half too): each
thread takes whole chunks of about one core's L2 cache, with single-threaded products, where the loop
here splits every operation of every chunk between the threads (which then wait for each other, and
for Python, at every operation). On the Zen 4 machine, a block's MLP forward and backward at S12's
stage 0 took 0.71-0.77 of the time of the other plans, at stage 1 0.89-0.92, at stages 2-3 about as
long (their chunks are a few hundred rows: the products lose what the waits cost); the run-time
choice takes it where it pays.

``s`` is a per-channel scale folded into fc2 by the caller (LayerScale) times a per-sample factor
(stochastic depth: 0 for a dropped sample, whose output is then its residual, ``1 / keep``
otherwise); ``r`` is ResScale's per-channel factor on the residual, or none.

Without fc2 the kernel computes the first half alone, ``act(fc1(norm(x)))``, and writes the hidden
map: the expansion of a mixer whose spatial operation needs the whole map (ConvFormer's SepConv, before
its depthwise convolution, in training; in inference on CPUs ``sep_conv.py`` takes the whole branch
band by band), which otherwise writes and reads that wide map once per operation of its
activation. Its compiled loop made ConvFormer-S18's forward 2.0% and its training step 1.4% faster
than the Python loop's (the Xeon of 2026-12-04, 2 threads, 2x512x512, fp32, paired runs; under bf16
autocast as fast: the run-time choice keeps what pays).
"""
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from . import dispatch, native
from .dispatch import Plan
from .group_norm import affine, group_norm_backward, group_stats
from .layout import tokens, transposed

CHUNK_BYTES = 1 << 22  # hidden activations per chunk: stays in cache with room for the rest
# Training keeps the hidden map ``h`` (four times as wide as the block) for backward, except in blocks
# this narrow: the first stage of every released size (64 or 96 channels), which has the most tokens
# and so the network's largest hidden maps. Recomputing fc1 costs 2 * C flops per hidden value,
# keeping it a write and a read of memory: at C = 64 the two take about as long (a block of
# PoolFormer-S12's stage 0, forward and backward, on the CPUs measured); at C = 128 keeping it makes
# the block ~15% faster. Keeping it at 96 too would cost ConvFormer-M36 6% more training memory.
RECOMPUTE_HIDDEN_UP_TO = 96
# what the compiled passes (activations, rows) take: fp32 chunks, and bf16 ones where the products run in bf16
COMPILED_DTYPES = (torch.float32, torch.bfloat16)
# The plan whose chunks the threads share out, each taking its chunks whole (csrc/mlp.cpp), on CPUs:
# hidden activations per chunk, about one core's L2 cache.
THREADS = 'threads'
THREAD_CHUNK_BYTES = 1 << 20


class Activation:
    """An activation as the kernel needs it: into a given buffer (which may be its input), and its
    backward in place.

    ``params`` are its learned tensors (StarReLU's scale and bias), which the kernel takes as inputs
    and hands back to ``forward`` / ``backward`` as it received them; ``backward`` adds their
    gradients into ``grads`` (None where one is not needed).
    """

    def __init__(self, module: nn.Module):
        from ..models.layers import StarReLU  # (the architecture's; the models import the kernels)
        self.onednn_post_op = None  # (attr, scalars, algorithm) of oneDNN's fused activation
        self.params = ()
        self._value_and_backward = None  # a compiled kernel's, if there is one for it
        self._compiled_dtypes = (torch.float32, )  # what that kernel takes
        self._forward_with_bias = None  # a compiled forward that adds fc1's bias in its pass
        kind = type(module)
        if kind is nn.GELU:
            approximate = module.approximate
            self.onednn_post_op = ('gelu', [], approximate)
            if approximate == 'none':
                self._value_and_backward = _gelu_value_and_backward
                self._compiled_dtypes = COMPILED_DTYPES
                self._forward_with_bias = _bias_gelu_forward
                self.forward = _gelu_forward
            else:
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
            self._value_and_backward = _star_relu_value_and_backward
            self._compiled_dtypes = COMPILED_DTYPES
        else:
            raise TypeError(f'no fused kernel for activation {kind.__name__}')

    def value_and_backward(self, device: torch.device, dtype: torch.dtype) -> Optional[Callable]:
        """``fn(h, out, g, params, grads)``: the activation of ``h`` into ``out`` and its backward of
        ``g`` in place (as ``backward``), in one pass, where a compiled kernel does that for this
        device and dtype (``native.py``; it takes contiguous chunks, as the kernel's buffers and kept
        hidden map are); else None, and backward calls ``forward`` and ``backward``."""
        if (self._value_and_backward is None or device.type != 'cpu'
                or dtype not in self._compiled_dtypes or native.ops() is None):
            return None
        return self._value_and_backward

    def takes_bias(self, backend: str, bias: Optional[torch.Tensor], dtype: torch.dtype) -> bool:
        """Whether fc1's bias is better added in the activation's pass (``bias_gelu``: fp32 GELU,
        BLAS products, as in ``csrc/mlp.cpp``) than by the product (``addmm`` writes the bias over
        its output first, a pass of its own)."""
        return (self._forward_with_bias is not None and backend == 'blas' and bias is not None
                and dtype == torch.float32 and native.takes(bias))

    def forward_with_bias(self, h: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``h += bias`` in place, and the activation of it into ``out``, in one pass (where
        :meth:`takes_bias`)."""
        return self._forward_with_bias(h, bias, out)

    @staticmethod
    def supports(module: nn.Module) -> bool:
        from ..models.layers import StarReLU
        return type(module) in (nn.GELU, nn.ReLU, nn.SiLU, StarReLU)


def _gelu_forward(h, out, params):
    """GELU into ``out``: the compiled pass where it takes the chunk (twice as fast as PyTorch's in
    float32), else PyTorch's."""
    if native.takes(h, out, dtypes=COMPILED_DTYPES):
        native.ops().gelu(h, out)
        return out
    return torch.ops.aten.gelu.out(h, out=out)


def _bias_gelu_forward(h, bias, out):
    """``h += bias`` and GELU of it into ``out``: the compiled pass (fp32 chunks)."""
    native.ops().bias_gelu(h, bias, out)
    return out


def _gelu_value_and_backward(h, out, g, params, grads):
    native.ops().gelu_value_and_grad(h, out, g)


def _star_relu_forward(h, out, params):
    """``scale * relu(h) ** 2 + bias``, in ``out``."""
    scale, bias = params
    if native.takes(h, out, dtypes=COMPILED_DTYPES):
        native.ops().star_relu(h, out, scale, bias)
        return out
    return torch.clamp_min(h, 0, out=out).square_().mul_(scale).add_(bias)


def _star_relu_value_and_backward(h, out, g, params, grads):
    _add_star_relu_grads(native.ops().star_relu_backward(h, g, out, *params), grads)


def _add_star_relu_grads(sums, grads):
    """The compiled backward's ``(sum(g * relu(h) ** 2), sum(g))`` into the gradients of the scale
    and the bias."""
    for total, part in zip(grads, sums):
        if total is not None:
            total += part


def _star_relu_backward(g, h, params, grads, scratch):
    """``g * 2 * scale * relu(h)`` in ``g``; ``sum(g * relu(h) ** 2)`` and ``sum(g)`` into ``grads``."""
    if native.takes(g, h, dtypes=COMPILED_DTYPES):
        _add_star_relu_grads(native.ops().star_relu_backward(h, g, None, *params), grads)
        return g
    scale, _ = params
    grad_scale, grad_bias = grads
    if grad_bias is not None:
        grad_bias += g.sum(dtype=grad_bias.dtype)
    relu = torch.clamp_min(h, 0, out=scratch)
    g.mul_(relu)
    if grad_scale is not None:
        # a pairwise sum: a BLAS dot accumulates a chunk's 10^5-10^6 terms one by one (the scale's
        # gradient was 2.5x further from the exact one than the formulation as written)
        grad_scale += torch.mul(g, relu, out=relu).sum(dtype=grad_scale.dtype)
    return g.mul_(scale).mul_(2)


def _linear(backend: str, x, weight, bias=None, out=None, scratch=None):
    """``x @ weight.T + bias`` for ``(rows, in)`` tokens and an ``(out, in)`` weight, written into
    ``out``; or into ``scratch`` where the product writes where it is told (the BLAS: oneDNN's own
    result is returned instead of being copied there, unless its dtype differs)."""
    dest = out if out is not None else scratch
    if dest is not None and dest.dtype != x.dtype:
        return dest.copy_(_linear(backend, x, weight, bias))
    if backend == 'onednn':
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')
        return y if out is None else out.copy_(y)
    if bias is None:
        return torch.mm(x, weight.t(), out=dest)
    return torch.addmm(bias, x, weight.t(), out=dest)


class GroupNormRows:
    """GroupNorm for the kernel: statistics over each whole sample, computed before the chunks; each
    chunk then applies the per-sample affine map. Its backward needs the gradient of the whole
    normalised map, which the chunks gather for PyTorch's GroupNorm backward."""
    per_row = False

    def __init__(self, module: nn.GroupNorm):
        self.groups, self.eps = module.num_groups, module.eps

    def statistics(self, x, scratch=None):
        return group_stats(x, self.groups, self.eps, scratch)

    def coefficients(self, stats, weight, bias, channels):
        return affine(*stats, weight, bias, channels)

    def normalize(self, rows_x, start, end, samples, coefficients, out):
        """The chunk's rows normalised into ``out``: each sample's part with its own ``a * x + b``
        (compiled where it takes them: straight into bf16 products' dtype, where ``addcmul`` computes
        fp32 and copies it rounded)."""
        a, b = coefficients
        compiled = _compiled_rows_into(out, rows_x, a, b)
        for i, first, last in samples:
            part = out[first - start:last - start]
            if compiled:
                native.ops().affine_rows(rows_x[first:last], a[i], b[i], part)
            else:
                torch.addcmul(b[i], rows_x[first:last], a[i], out=part)
        return out, None

    def backward(self, grad_normed, x, stats, weight, needs):
        """Gradients of ``x``, the weight and the bias from the whole normalised map's."""
        return group_norm_backward(grad_normed, x, *stats, weight, needs)


class LayerNormRows:
    """Channel LayerNorm for the kernel: each token row is normalised on its own, so forward and
    backward both run chunk by chunk (its statistics are recomputed in backward, not kept)."""
    per_row = True

    def __init__(self, module: nn.LayerNorm):
        self.eps = module.eps

    def statistics(self, x, scratch=None):
        return None, None

    def coefficients(self, stats, weight, bias, channels):
        return weight, bias

    def normalize(self, rows_x, start, end, samples, coefficients, out):
        """The chunk's rows normalised into ``out``, with their ``(mean, rstd)`` for backward."""
        weight, bias = coefficients
        rows = rows_x[start:end]
        # (statistics of bf16 rows in fp32, as PyTorch's LayerNorm keeps them)
        stats = dict(dtype=torch.promote_types(rows.dtype, torch.float32))
        mean, rstd = rows.new_empty(len(rows), 1, **stats), rows.new_empty(len(rows), 1, **stats)
        if _compiled_layer_norm_into(out, rows, weight, bias):
            # (straight into the products' dtype)
            native.ops().layer_norm_rows(rows, weight, bias, self.eps, out, mean, rstd)
            return out, (mean, rstd)
        # low-precision products: normalised in the input's precision, then rounded
        normed = out if out.dtype == rows.dtype else torch.empty_like(rows)
        torch.ops.aten.native_layer_norm.out(rows, rows.shape[1:], weight, bias, self.eps,
                                             out0=normed, out1=mean, out2=rstd)
        return out if normed is out else out.copy_(normed), (mean, rstd)

    def backward_rows(self, grad_normed, rows, row_stats, weight, bias, out, grad_weight, grad_bias):
        """A chunk's rows' gradient into ``out``, its share of the weight's and bias's added into
        ``grad_weight`` and ``grad_bias`` (None: not needed)."""
        if _compiled_backward_rows(rows, out, weight, bias, grad_weight, grad_bias):
            # (a bf16 product's gradient widened first for fp32 rows, as the threads plan widens it)
            native.ops().layer_norm_rows_backward(grad_normed.to(rows.dtype), rows, *row_stats,
                                                  weight, out, grad_weight, grad_bias)
            return
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            grad_normed, rows, rows.shape[1:], *row_stats, weight, bias,
            [True, grad_weight is not None, grad_bias is not None])
        out.copy_(gx)
        for total, part in ((grad_weight, gw), (grad_bias, gb)):
            if total is not None:
                total += part


def _compiled_rows(rows: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether the compiled rows (``csrc/layer_norm.h``) take these: fp32 CPU tensors."""
    return native.takes(rows, *(t for t in others if t is not None))


def _compiled_backward_rows(rows: torch.Tensor, out: torch.Tensor, *params: Optional[torch.Tensor]) -> bool:
    """Whether the compiled rows' backward takes these: fp32 rows, or bf16 rows (a bf16 map's under
    bf16 autocast) with their gradient written in bf16; fp32 parameters and sums."""
    params = [t for t in params if t is not None]
    if rows.dtype == torch.bfloat16:
        return (out.dtype == torch.bfloat16 and native.takes(rows, out, dtypes=(torch.bfloat16, ))
                and (not params or native.takes(*params)))
    return _compiled_rows(rows, *params)


def _compiled_rows_into(out: torch.Tensor, rows: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether they also write ``out``: fp32, or bf16 (the products' dtype under bf16 autocast)."""
    return out.dtype in COMPILED_DTYPES and _compiled_rows(rows, *others)


def _compiled_layer_norm_into(out: torch.Tensor, rows: torch.Tensor, weight: Optional[torch.Tensor],
                              bias: Optional[torch.Tensor]) -> bool:
    """Whether the compiled rows normalise these into ``out``: fp32 rows, or bf16 ones (a bf16 map
    under bf16 autocast), fp32 parameters, into fp32 or bf16."""
    return (rows.device.type == 'cpu' and rows.dtype in COMPILED_DTYPES and rows.is_contiguous()
            and out.dtype in COMPILED_DTYPES
            and all(native.takes(t) for t in (weight, bias) if t is not None) and native.ops() is not None)


def norm_rows(module: nn.Module):
    """The kernel's view of a block norm, or None where the kernel has none."""
    from ..models.layers import LayerNorm2d  # (the architecture's; the models import the kernels)
    if isinstance(module, nn.GroupNorm):
        return GroupNormRows(module)
    if type(module) is LayerNorm2d:
        return LayerNormRows(module)
    return None


class _NormMlpResidual(torch.autograd.Function):
    """On channels-last ``(N, C, H, W)`` maps; ``scales`` is a list of N per-sample factors of the
    branch, ``res_scale`` the ``(C, )`` factor of the residual or None. With ``w2`` None: the first
    half, ``act(fc1(norm(x)))`` (``b2`` and ``res_scale`` None, ``scales`` all 1). ``records``: whether
    autograd records the call (grad mode was on); inside ``forward`` grad mode is always off, and
    ``needs_input_grad`` says only which inputs require grad, which they do in inference too (a
    model's parameters under ``torch.no_grad()``). ``overwrite``: the output is written over ``x``
    (inference, where the caller owns ``x``); each chunk's rows are read before they are written."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, w1, b1, w2, b2, res_scale, norm, act, scales, plan,
                records, overwrite, *act_params):
        dtype = plan.dtype or x.dtype
        keep = kept_hidden_dtype(dtype, dispatch.autocast_dtype(x.device))
        with torch.autocast(x.device.type, enabled=False):
            n, c = x.shape[:2]
            first_half = w2 is None
            assert not (overwrite and (first_half or records)), 'only an inference residual overwrites'
            out = x if overwrite else torch.empty(
                (n, w1.shape[0]) + x.shape[2:] if first_half else x.shape, dtype=x.dtype,
                device=x.device, memory_format=torch.channels_last)
            # (a fresh output, before the chunks write it, is the statistics' scratch)
            mean, rstd = norm.statistics(x, None if first_half or overwrite else out)
            coefficients = norm.coefficients((mean, rstd), norm_weight, norm_bias, c)
            w1, b1, w2, b2_low = (None if t is None else t.to(dtype) for t in (w1, b1, w2, b2))
            act_params = tuple(t.to(dtype) for t in act_params)
            tx, tout = tokens(x), tokens(out)
            for_backward = records and any(ctx.needs_input_grad)
            # the hidden map for backward, chunk by chunk as the products return it (oneDNN's own
            # results, kept as they are instead of copied into one map)
            kept_h = [] if for_backward and c > RECOMPUTE_HIDDEN_UP_TO else None
            keep_apart = kept_h is not None and keep != dtype  # (each chunk's rounded into it)
            fused_act = act.onednn_post_op if plan.backend == 'onednn' and not for_backward else None
            bias_later = act.takes_bias(plan.backend, b1, dtype)
            bufs = _Buffers(tx, w1.shape[0], dtype)
            rows_x, rows_out = tx.flatten(0, 1), tout.flatten(0, 1)
            dropped = lambda i: _residual(tx[i], res_scale, out=tout[i])  # noqa: E731
            if plan.backend == THREADS:  # the whole chunk loop compiled, chunks shared by the threads
                kept_h = None if kept_h is None else [rows_x.new_empty(len(rows_x), w1.shape[0],
                                                                       dtype=keep)]
                native.ops().mlp_forward(rows_x, *coefficients, norm.per_row, norm.eps, w1, b1, w2, b2,
                                         res_scale,
                                         *(act_params or (None, None)), scales[0], tx.shape[1],
                                         _thread_rows(w1.shape[0], dtype), rows_out, kept_h and kept_h[0])
            else:
                for start, end, samples, scale in _chunks(tx, bufs.rows, scales, dropped):
                    xc = rows_x[start:end]
                    nc, _ = norm.normalize(rows_x, start, end, samples, coefficients,
                                           bufs.normed(end - start))
                    oc = rows_out[start:end]
                    # the activation where it is read next: the first half's straight into the
                    # output where dtypes agree; else over fc1's output where that is not kept
                    act_out = oc if first_half and dtype == x.dtype else None
                    if fused_act:  # inference: oneDNN applies the activation as it writes fc1's output
                        ac = torch.ops.mkldnn._linear_pointwise(nc, w1, b1, *fused_act)
                    else:
                        b1_product = None if bias_later else b1
                        if kept_h is None or keep_apart:
                            hc = _linear(plan.backend, nc, w1, b1_product,
                                         scratch=bufs.hidden(end - start))
                        else:
                            hc = _linear(plan.backend, nc, w1, b1_product)
                            kept_h.append(hc)
                        if act_out is None:
                            act_out = hc if kept_h is None else bufs.act(end - start)
                        ac = act.forward_with_bias(hc, b1, act_out) if bias_later else act.forward(
                            hc, act_out, act_params)
                        if keep_apart:  # (with fc1's bias, where the activation's pass added it)
                            kept_h.append(hc.to(keep))
                    if first_half:
                        if fused_act or act_out is not oc:
                            oc.copy_(ac)
                        continue
                    if plan.backend == 'onednn':  # (the bias costs nothing in its product)
                        torch.add(_residual(xc, res_scale), _linear('onednn', ac, w2, b2_low),
                                  alpha=scale, out=oc)
                    elif dtype == x.dtype:
                        _residual(xc, res_scale, b2, scale, out=oc).addmm_(ac, w2.t(), alpha=scale)
                    else:  # (low-precision products: the bias joins the residual, in its precision)
                        torch.add(_residual(xc, res_scale, b2, scale), torch.mm(ac, w2.t()),
                                  alpha=scale, out=oc)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, w1, b1, w2, res_scale, *act_params,
                              *(kept_h or ()))
        ctx.norm, ctx.act, ctx.scales, ctx.plan = norm, act, scales, plan
        ctx.act_params = len(act_params)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, norm_weight, norm_bias, w1, b1, w2, res_scale, *rest = ctx.saved_tensors
        act_params, kept_h = rest[:ctx.act_params], rest[ctx.act_params:]
        needs = ctx.needs_input_grad
        plan, norm, act, scales = ctx.plan, ctx.norm, ctx.act, ctx.scales
        dtype, hidden = w1.dtype, w1.shape[0]
        c = x.shape[1]
        bias_later = act.takes_bias(plan.backend, b1, dtype)
        with torch.autocast(x.device.type, enabled=False):
            coefficients = norm.coefficients((mean, rstd), norm_weight, norm_bias, c)
            grad = grad.contiguous(memory_format=torch.channels_last)
            tx, tg = tokens(x), tokens(grad)
            acc = dict(dtype=torch.promote_types(dtype, torch.float32), device=x.device)
            # (the compiled loop writes them; the Python loop adds into them)
            sums = torch.empty if plan.backend == THREADS else torch.zeros
            gw1 = sums(w1.shape, **acc) if needs[3] else None
            gb1 = sums(hidden, **acc) if needs[4] else None
            gw2 = sums(w2.shape, **acc) if needs[5] else None
            gb2 = sums(c, **acc) if needs[6] else None
            act_needs = needs[len(needs) - ctx.act_params:]  # (forward's last inputs)
            grad_act = [torch.zeros(t.shape, **acc) if need else None
                        for t, need in zip(act_params, act_needs)]
            into_norm = any(needs[:3])
            into_hidden = into_norm or needs[3] or needs[4] or any(act_needs)
            # where the chunks write: the norm's input gradient (a per-row norm), or its output's
            grad_rows = torch.empty_like(x, memory_format=torch.channels_last) if into_norm else None
            rows_gr = None if grad_rows is None else tokens(grad_rows).flatten(0, 1)
            grad_norm_weight, grad_norm_bias = (
                sums(t.shape, **acc) if norm.per_row and need else None
                for t, need in zip((norm_weight, norm_bias), needs[1:3]))
            # the products that carry the gradient back, by the transposed weights: oneDNN's linear
            # takes (out, in) matrices, fp32 ones turned by the compiled transposition (PyTorch's copy
            # goes element by element); bf16 ones go as they lie through torch.mm, which gives them to
            # oneDNN's matmul (a block's forward and backward with oneDNN's bf16 products, S12's
            # stages 2 / 3 on the Xeon of 2026-12-05: 0.87 / 0.77 of the time of the copies and linear)
            first_half = w2 is None
            back = 'blas' if plan.backend == 'onednn' and dtype != torch.float32 else plan.backend
            turn = transposed if back == 'onednn' else torch.t
            w2_t = None if first_half else turn(w2)
            w1_t = turn(w1)
            bufs = _Buffers(tx, hidden, dtype)
            rows_x, rows_g = tx.flatten(0, 1), tg.flatten(0, 1)
            joint = act.value_and_backward(x.device, dtype) if (
                needs[5] and into_hidden and not first_half) else None

            def dropped(i):  # the branch has no gradient: the residual's alone, added below
                if rows_gr is not None:
                    rows_gr[i * tx.shape[1]:(i + 1) * tx.shape[1]].zero_()

            if plan.backend == THREADS:  # the whole chunk loop compiled (forward's)
                rows_gr = rows_gr if into_norm else torch.empty_like(rows_x)
                native.ops().mlp_backward(rows_g, rows_x, *coefficients, norm.per_row, norm.eps, w1, b1,
                                          w2, kept_h[0] if kept_h else None,
                                          *(act_params or (None, None)), scales[0], tx.shape[1],
                                          _thread_rows(hidden, dtype), rows_gr, gw1, gb1, gw2, gb2,
                                          *(grad_act or (None, None)), grad_norm_weight, grad_norm_bias)
            else:
                for index, (start, end, samples, scale) in enumerate(
                        _chunks(tx, bufs.rows, scales, dropped)):
                    k = end - start
                    gc = rows_g[start:end]
                    if not first_half and (scale != 1 or gc.dtype != dtype):
                        # (a cast alone is one pass; a product into another dtype goes through a
                        # temporary of the input's)
                        gc = bufs.grad(k).copy_(gc) if scale == 1 else torch.mul(gc, scale,
                                                                                  out=bufs.grad(k))
                    nc, row_stats = norm.normalize(rows_x, start, end, samples, coefficients,
                                                   bufs.normed(k))
                    if kept_h:  # (widened where it was kept in a lower precision)
                        hc = kept_h[index] if kept_h[index].dtype == dtype else bufs.hidden(k).copy_(
                            kept_h[index])
                    else:  # (rounded as forward's bias_gelu rounded it, where it took the bias)
                        hc = _linear(plan.backend, nc, w1, None if bias_later else b1,
                                     scratch=bufs.hidden(k))
                        if bias_later:
                            hc.add_(b1)
                    if needs[6]:
                        gb2 += gc.sum(0)
                    if joint is not None:  # the activation's value and gradient in one pass
                        gh, value = _linear(back, gc, w2_t, scratch=bufs.scratch(k)), bufs.act(k)
                        joint(hc, value, gh, act_params, grad_act)
                        _accumulate(gw2, gc.t(), value)
                    else:
                        if needs[5]:
                            _accumulate(gw2, gc.t(), act.forward(hc, bufs.act(k), act_params))
                        if not into_hidden:
                            continue
                        # the activation's gradient: given (the first half), or back through fc2;
                        # computed on in place, in a chunk buffer
                        grad_act_out = bufs.act(k).copy_(gc) if first_half else _linear(
                            back, gc, w2_t, scratch=bufs.act(k))
                        gh = act.backward(grad_act_out, hc, act_params, grad_act, bufs.scratch(k))
                    if needs[3]:
                        _accumulate(gw1, gh.t(), nc)
                    if needs[4]:
                        gb1 += gh.sum(0)
                    if not into_norm:
                        continue
                    if not norm.per_row:
                        _linear(back, gh, w1_t, out=rows_gr[start:end])
                        continue
                    grad_normed = _linear(back, gh, w1_t, scratch=bufs.grad_normed(k))
                    norm.backward_rows(grad_normed, rows_x[start:end], row_stats, norm_weight, norm_bias,
                                       rows_gr[start:end], grad_norm_weight, grad_norm_bias)
            grad_x = grad_rows
            if into_norm and not norm.per_row:
                grad_x, grad_norm_weight, grad_norm_bias = norm.backward(grad_rows, x, (mean, rstd),
                                                                         norm_weight, needs[:3])
            # the residual: d/dx (r * x) = r, d/dr = sum(grad * x) per channel
            grad_res_scale = None
            if needs[7]:
                grad_res_scale = (grad * x).sum((0, 2, 3))
            if needs[0] and not first_half:  # (then into_norm, and grad_x holds the branch's part)
                if res_scale is None:
                    grad_x += grad
                else:
                    grad_x.addcmul_(grad, res_scale.view(-1, 1, 1).to(grad.dtype))
        param_dtype = (norm_weight if norm_weight is not None else x).dtype
        cast = lambda t: None if t is None else t.to(param_dtype)  # noqa: E731
        return (grad_x if needs[0] else None, cast(grad_norm_weight), cast(grad_norm_bias), cast(gw1),
                cast(gb1), cast(gw2), cast(gb2), cast(grad_res_scale), None, None, None, None, None,
                None, *map(cast, grad_act))


def kept_hidden_dtype(dtype: torch.dtype, autocast: Optional[torch.dtype]) -> torch.dtype:
    """The dtype in which training keeps the hidden map of products in ``dtype`` under autocast's
    ``autocast`` dtype (None: outside autocast): bf16 under bf16 autocast even where the products run
    in fp32 (a CPU whose bf16 products are slower than its fp32 ones), as the modules under autocast
    keep fc1's bf16 output; the products' otherwise. Without it such a CPU trained under bf16
    autocast in fp32's memory, against the peers' bf16 maps (0.61-0.66x of their memory, past the
    goal of 0.6x, on the Xeon of 2026-12-05 with oneDNN held to avx512_bf16)."""
    return torch.bfloat16 if dtype == torch.float32 and autocast == torch.bfloat16 else dtype


def _residual(xc: torch.Tensor, res_scale: Optional[torch.Tensor], bias=None, scale: float = 1.,
              out=None) -> torch.Tensor:
    """``res_scale * xc + scale * bias`` (into ``out``; without ``out`` and bias, ``xc`` itself where
    there is no ResScale)."""
    if res_scale is None:
        if bias is not None:
            return torch.add(xc, bias, alpha=scale, out=out)
        return xc if out is None or out.data_ptr() == xc.data_ptr() else out.copy_(xc)
    if bias is not None:
        return torch.addcmul(bias * scale, xc, res_scale, out=out)
    return torch.mul(xc, res_scale, out=out)


class _Buffers:
    """Chunk-sized scratch tensors, allocated once per call and reused by every chunk."""

    def __init__(self, tx: torch.Tensor, hidden: int, dtype: torch.dtype):
        self.rows, self.c, self.hidden_dim = _rows(hidden, dtype, tx), tx.shape[2], hidden
        self.tx, self.dtype, self._bufs = tx, dtype, {}

    def _get(self, name, width, k, dtype=None):
        buf = self._bufs.get(name)
        if buf is None:
            buf = self._bufs[name] = self.tx.new_empty((self.rows, width), dtype=dtype or self.dtype)
        return buf[:k]

    def normed(self, k):
        return self._get('normed', self.c, k)

    def grad(self, k):
        return self._get('grad', self.c, k)

    def grad_normed(self, k):  # in the input's precision: what a per-row norm's backward takes
        return self._get('grad_normed', self.c, k, self.tx.dtype)

    def hidden(self, k):
        return self._get('hidden', self.hidden_dim, k)

    def act(self, k):
        return self._get('act', self.hidden_dim, k)

    def scratch(self, k):
        return self._get('scratch', self.hidden_dim, k)


def _rows(hidden: int, dtype: torch.dtype, tx: torch.Tensor) -> int:
    """Token rows per chunk: on a CPU, hidden activations of about :data:`CHUNK_BYTES`, which stay in
    its cache; elsewhere every row of ``tx`` at once (a GPU's products need many rows to fill it, and
    one chunk launches each kernel once)."""
    if tx.device.type != 'cpu':
        return tx.shape[0] * tx.shape[1]
    return max(16, CHUNK_BYTES // (hidden * dtype.itemsize))


def _thread_rows(hidden: int, dtype: torch.dtype) -> int:
    """Token rows per chunk of the :data:`THREADS` plan: :data:`THREAD_CHUNK_BYTES` of hidden
    activations (each thread's chunk stays in its core's cache)."""
    return max(16, THREAD_CHUNK_BYTES // (hidden * dtype.itemsize))


def compiled_plans(x: torch.Tensor, norm: nn.Module, act: nn.Module,
                   bf16_map: bool = False) -> List[Plan]:
    """The :data:`THREADS` plans where a compiled loop of ``csrc/mlp.cpp`` computes this branch: on a
    CPU with the compiled kernels, a GroupNorm or channel LayerNorm, the exact GELU or StarReLU, an
    fp32 or fp64 map; products in its dtype, and under bf16 autocast in bf16 where the CPU multiplies
    it natively. ``bf16_map``: also a bf16 map under bf16 autocast (the residual stream where no fp32
    factor has met it), with bf16 products."""
    from ..models.layers import StarReLU  # (the architecture's; the models import the kernels)
    maps = (torch.float32, torch.float64) + (
        (torch.bfloat16, ) if bf16_map and dispatch.autocast_dtype(x.device) == torch.bfloat16 else ())
    if not (x.device.type == 'cpu' and norm_rows(norm) is not None
            and (type(act) is StarReLU or type(act) is nn.GELU and act.approximate == 'none')
            and x.dtype in maps and native.ops() is not None):
        return []
    return [Plan(backend=THREADS, dtype=dtype) for dtype in dispatch.product_dtypes(x.device, x.dtype)
            if dtype == x.dtype or (dtype == torch.bfloat16
                                    and dispatch.native_low_precision(x.device, dtype))]


def _threads_plan(x: torch.Tensor, norm: nn.Module, act: nn.Module) -> List[Plan]:
    """The compiled chunk loop's plans (:func:`compiled_plans`), offered where several threads share
    its chunks."""
    return compiled_plans(x, norm, act) if torch.get_num_threads() > 1 else []


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


def _accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += a @ b``, in ``total``'s (fp32) precision."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    else:
        total += torch.mm(a, b)


def _fused_plans(x: torch.Tensor, norm: nn.Module, act: nn.Module,
                 scaled_weight: bool = False) -> Optional[List[Plan]]:
    """The kernel's plans for ``x`` (every product dtype and backend here), or None where it does not
    apply: tracing, another norm or activation, an fp16 map, bf16 outside bf16 autocast or other
    dtypes. ``scaled_weight``: a LayerScale is folded into fc2's weight, which then takes no fp16
    products (a LayerScale of 1e-5 times a weight of 0.01 is below fp16's normal range, 6e-5, and
    loses its digits; the modules as written multiply fp16's product by it in fp32)."""
    # (a bf16 map: the residual stream under bf16 autocast where no fp32 factor meets it, as in
    # ConvFormer's stages without ResScale; its products then run in bf16)
    low = x.dtype == torch.bfloat16 and x.dtype == dispatch.autocast_dtype(x.device)
    if dispatch.tracing() or norm_rows(norm) is None or not Activation.supports(act) or not (
            (x.dtype in (torch.float32, torch.float64) or low) and x.dim() == 4):
        return None
    # fp16 products where the device multiplies them (a GPU: what --amp gives there), as autocast does
    dtypes = [d for d in dispatch.product_dtypes(x.device, x.dtype) if d != torch.float16 or (
        dispatch.native_low_precision(x.device, d) and not scaled_weight)]
    return [Plan(backend=backend, dtype=dtype) for dtype in dtypes
            for backend in dispatch.backends(x.device, dtype)]


def _norm_params(norm: nn.Module):
    return getattr(norm, 'weight', None), getattr(norm, 'bias', None)


def norm_mlp_residual(x: torch.Tensor, norm: nn.Module, fc1: nn.Conv2d, act: nn.Module,
                      fc2: nn.Conv2d, layer_scale: Optional[torch.Tensor],
                      res_scale: Optional[torch.Tensor], factors: Optional[torch.Tensor],
                      plain: Callable, overwrite: bool = False) -> torch.Tensor:
    """``res_scale * x + factors * layer_scale * fc2(act(fc1(norm(x))))``, by the fastest plan for
    this input.

    ``norm`` is a GroupNorm or a channel LayerNorm, ``fc1`` / ``fc2`` are 1x1 convolutions,
    ``layer_scale`` and ``res_scale`` per-channel vectors or None, ``factors`` the ``(N, 1, 1, 1)``
    per-sample factors of stochastic depth (None: all one) and ``plain(x)`` the same branch as the
    modules compute it, which is taken where the kernel does not apply (another norm or activation,
    dropout, fp16 or other dtypes) and wherever it is faster. ``overwrite``: the caller owns ``x``
    (a temporary of its own), which the kernel may then write its result over where nothing records
    gradients: in inference a map fewer to allocate, and the residual added where it lies.
    """
    fused = _fused_plans(x, norm, act, scaled_weight=layer_scale is not None)
    if fused is None:
        return plain(x)
    kernel_act, rows = Activation(act), norm_rows(norm)
    scales = [1.] * x.shape[0] if factors is None else factors.flatten().tolist()
    norm_weight, norm_bias = _norm_params(norm)
    params = [p for p in (norm_weight, norm_bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                          layer_scale, res_scale, *kernel_act.params) if p is not None]

    def compute(plan, x):
        if not plan.fused:
            return plain(x)
        if plan.backend == THREADS and len(set(scales)) > 1:  # (its chunks run across samples)
            plan = Plan(dtype=plan.dtype)
        w2, b2 = fc2.weight.flatten(1), fc2.bias
        if layer_scale is not None:
            w2 = w2 * layer_scale[:, None]
            b2 = None if b2 is None else b2 * layer_scale
        # (a copy into channels-last is the kernel's own, to write over as well)
        x = x.contiguous(memory_format=torch.channels_last)
        return _NormMlpResidual.apply(x, norm_weight, norm_bias, fc1.weight.flatten(1), fc1.bias, w2,
                                      b2, res_scale, rows, kernel_act, scales, plan,
                                      torch.is_grad_enabled(),
                                      overwrite and dispatch.may_overwrite(x, params),
                                      *kernel_act.params)

    key = ('mlp', type(norm).__name__, fc1.in_channels, fc1.out_channels, type(act).__name__,
           'res_scale' if res_scale is not None else 'residual')
    return dispatch.run(key, fused + _threads_plan(x, norm, act) + [dispatch.PLAIN], compute, x,
                        params)


def norm_linear_act(x: torch.Tensor, norm: nn.Module, fc: nn.Conv2d, act: nn.Module,
                    plain: Callable) -> torch.Tensor:
    """``act(fc(norm(x)))`` by the fastest plan for this input: the MLP kernel's first half (module
    docstring), for a mixer that expands the channels before a spatial operation. ``fc`` is a 1x1
    convolution and ``plain(x)`` the same as the modules compute it."""
    fused = _fused_plans(x, norm, act)
    if fused is None:
        return plain(x)
    kernel_act, rows = Activation(act), norm_rows(norm)
    norm_weight, norm_bias = _norm_params(norm)
    params = [p for p in (norm_weight, norm_bias, fc.weight, fc.bias, *kernel_act.params)
              if p is not None]

    def compute(plan, x):
        if not plan.fused:
            return plain(x)
        x = x.contiguous(memory_format=torch.channels_last)
        return _NormMlpResidual.apply(x, norm_weight, norm_bias, fc.weight.flatten(1), fc.bias, None,
                                      None, None, rows, kernel_act, [1.] * x.shape[0], plan,
                                      torch.is_grad_enabled(), False, *kernel_act.params)

    key = ('expand', type(norm).__name__, fc.in_channels, fc.out_channels, type(act).__name__)
    return dispatch.run(key, fused + _threads_plan(x, norm, act) + [dispatch.PLAIN], compute, x,
                        params)
