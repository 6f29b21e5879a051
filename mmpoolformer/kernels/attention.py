"""Multi-head attention without a mask, ``softmax(q k^T / sqrt(head_dim)) v``.

Where nothing needs its gradient (inference, evaluation), on fp32 CPU tensors the compiled forward
pass of ``csrc/attention.cpp`` competes with PyTorch's flash attention for CPUs: it keeps the products'
tiles in registers, makes the exponentials with a short polynomial, and reads queries, keys and values
where the qkv projection left them. On the Xeon of 2026-12-05 (2 threads), CAFormer-S18's attention at
2x512x512 (2x10 heads of 1024 tokens of 32 at stage 2, 2x16 of 256 at stage 3): 0.75-0.78 and
0.70-0.76 of the time of PyTorch's flash attention for CPUs (10.2-11.4 against 13.5-14.7 ms at stage 2
as the machine drifted), 0.75-0.9 with 4200 keys, 0.9 at a head dimension of 64 or 16. Built for AVX2
(there emulated: ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``, both sides AVX2): 0.92 and
0.87 of PyTorch's time at stages 2 and 3. The timed choice keeps the faster.

In training under bf16 autocast, on CPUs with avx512_bf16, the backward pass of
``csrc/attention_backward.cpp`` competes with flash attention's (forward: flash attention's in both):
its products on oneDNN's micro-kernel in bf16 (AMX where there is AMX), the softmax recomputed from
whole rows of scores between them. PyTorch's computes in fp32 tiles, as slowly as in fp32; on the Xeon
(AMX) ours took 0.6 of its time at stage 2, 0.3 at stage 3. Elsewhere in training and in tracing:
PyTorch's.
"""
import functools
import warnings

import torch
import torch.nn.functional as F

from . import dispatch, native

HEAD_DIMS = (16, 32, 64)  # 1, 2 or 4 vectors of AVX-512 floats and 2, 4 or 8 of AVX2's


def _compiled_takes(*tensors: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    return (all(t.device.type == 'cpu' and t.dtype == dtype and t.dim() == 4
                and t.stride(-1) == 1 for t in tensors)
            and tensors[0].shape[-1] in HEAD_DIMS and tensors[1].shape[-2] > 0
            and native.ops() is not None)


def compiled_backward_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the compiled backward pass (bf16, with the CPU's bf16 products) takes these: asked on
    every call, since oneDNN, whose micro-kernel it calls, may be switched off at any time
    (``torch.backends.mkldnn.flags(enabled=False)``)."""
    return (_compiled_takes(q, k, v, dtype=torch.bfloat16) and torch.backends.mkldnn.enabled
            and bf16_backward_available())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.) -> torch.Tensor:
    """Attention of ``(N, heads, L, head_dim)`` queries over keys and values ``(N, heads, keys,
    head_dim)``, scaled by ``1 / sqrt(head_dim)``; the output ``(N, heads, L, head_dim)`` (from the
    compiled kernel, a view of an ``(N, L, heads, head_dim)`` tensor, which the output projection
    takes without a copy)."""
    if dropout_p or dispatch.tracing():
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        if not compiled_backward_takes(q, k, v):
            return F.scaled_dot_product_attention(q, k, v)
        compute, params = _trained, (k, v)
    elif _compiled_takes(q, k, v):
        compute, params = _inferred, ()
    else:
        return F.scaled_dot_product_attention(q, k, v)
    key = ('attention', q.shape[-1], 'keys', dispatch.size_class(k.shape[-2]))
    return dispatch.run(key, [dispatch.Plan(), dispatch.PLAIN],
                        lambda plan, q: compute(plan, q, k, v), q, params)


def _inferred(plan: dispatch.Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not plan.fused:
        return F.scaled_dot_product_attention(q, k, v)
    n, heads, length, dim = q.shape
    out = q.new_empty(n, length, heads, dim)
    native.ops().attention(q, k, v, dim ** -0.5, out)
    return out.transpose(1, 2)


def _trained(plan: dispatch.Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not plan.fused:
        return F.scaled_dot_product_attention(q, k, v)
    return _Bf16Attention.apply(q, k, v)


class _Bf16Attention(torch.autograd.Function):
    """Flash attention's forward pass; the compiled bf16 backward pass, from q, k and v alone (flash
    attention keeps its output and log-sum-exp too)."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        n, heads, length, dim = q.shape
        if grad.stride(-1) != 1:  # (as from a sum: expanded)
            grad = grad.contiguous()
        # the gradients laid out as the qkv projection's output, which autograd stacks them into
        grads = q.new_empty(n, length, 3, heads, dim).permute(2, 0, 3, 1, 4)
        grad_q, grad_k, grad_v = grads if k.shape == q.shape else (
            grads[0], k.new_empty(k.shape), v.new_empty(v.shape))
        native.ops().attention_backward(q, k, v, grad, dim ** -0.5, grad_q, grad_k, grad_v)
        return grad_q, grad_k, grad_v


@functools.lru_cache(None)
def bf16_backward_available() -> bool:
    """Whether the compiled bf16 backward runs here and agrees with float64 attention (once a
    process: oneDNN, whose micro-kernel it calls, may be limited to fewer instructions than ATen)."""
    ops = native.ops()
    if ops is None or not ops.attention_backward_available():
        return False
    with native.apart():
        return _bf16_backward_agrees(ops)


def _bf16_backward_agrees(ops) -> bool:
    draw = torch.Generator().manual_seed(0)
    # queries and keys of odd counts and a tail after the vectors, strided views of one projection
    q, k, v = torch.randn(2, 37, 3, 2, 16, generator=draw).bfloat16().permute(2, 0, 3, 1, 4)
    k, v = k[:, :, :21], v[:, :, :21]
    grad = torch.randn(q.shape, generator=draw).bfloat16()
    grads = [torch.empty_like(t) for t in (q, k, v)]
    try:
        ops.attention_backward(q, k, v, grad, 0.25, *grads)
    except RuntimeError as error:
        warnings.warn(f"mmpoolformer's bf16 attention backward is unavailable ({error}); PyTorch's "
                      'does its work instead')
        return False
    tensors = [t.double().requires_grad_() for t in (q, k, v)]
    torch.autograd.backward(F.scaled_dot_product_attention(*tensors, scale=0.25), grad.double())
    if not all(torch.allclose(got.double(), t.grad, rtol=2e-2, atol=2e-2 * t.grad.abs().max())
               for got, t in zip(grads, tensors)):
        warnings.warn("mmpoolformer's bf16 attention backward disagrees with PyTorch's attention; "
                      "PyTorch's does its work instead")
        return False
    return True
