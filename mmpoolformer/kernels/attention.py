"""Multi-head attention without a mask, ``softmax(q k^T / sqrt(head_dim)) v``.

Where nothing needs its gradient (inference, evaluation), on fp32 CPU tensors the compiled forward
pass of ``csrc/attention.cpp`` competes with PyTorch's flash attention for CPUs: it keeps the products'
tiles in registers, makes the exponentials with a short polynomial, and reads queries, keys and values
where the qkv projection left them. On the Xeon of 2026-12-05 (2 threads), CAFormer-S18's attention at
2x512x512 (2x10 heads of 1024 tokens of 32 at stage 2, 2x16 of 256 at stage 3): 0.75-0.78 and
0.70-0.76 of the time of PyTorch's flash attention for CPUs (10.2-11.4 against 13.5-14.7 ms at stage 2
as the machine drifted), 0.75-0.9 with 4200 keys, 0.9 at a head dimension of 64 or 16. Built for AVX2
(there emulated: ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``, both sides AVX2): 0.92 and
0.87 of PyTorch's time at stages 2 and 3. The timed choice keeps the faster. In training, under
autocast and in tracing: PyTorch's.
"""
import torch
import torch.nn.functional as F

from . import dispatch, native

HEAD_DIMS = (16, 32, 64)  # 1, 2 or 4 vectors of AVX-512 floats and 2, 4 or 8 of AVX2's


def _compiled_takes(*tensors: torch.Tensor) -> bool:
    return (all(t.device.type == 'cpu' and t.dtype == torch.float32 and t.dim() == 4
                and t.stride(-1) == 1 for t in tensors)
            and tensors[0].shape[-1] in HEAD_DIMS and tensors[1].shape[-2] > 0
            and native.ops() is not None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.) -> torch.Tensor:
    """Attention of ``(N, heads, L, head_dim)`` queries over keys and values ``(N, heads, keys,
    head_dim)``, scaled by ``1 / sqrt(head_dim)``; the output ``(N, heads, L, head_dim)`` (from the
    compiled kernel, a view of an ``(N, L, heads, head_dim)`` tensor, which the output projection
    takes without a copy)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if dropout_p or needs_grad or dispatch.tracing() or not _compiled_takes(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)

    def compute(plan, q):
        if not plan.fused:
            return F.scaled_dot_product_attention(q, k, v)
        n, heads, length, dim = q.shape
        out = q.new_empty(n, length, heads, dim)
        native.ops().attention(q, k, v, dim ** -0.5, out)
        return out.transpose(1, 2)

    key = ('attention', q.shape[-1], 'keys', dispatch.size_class(k.shape[-2]))
    return dispatch.run(key, [dispatch.Plan(), dispatch.PLAIN], compute, q, ())
