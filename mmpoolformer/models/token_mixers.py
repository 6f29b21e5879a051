"""Token mixers: the one part of a MetaFormer block that differs between family members.

Every mixer is registered in ``mmpoolformer.registry.TOKEN_MIXERS`` and is built per stage by
:func:`build_token_mixer` with ``dim`` set to the stage's channels, so a mixer's constructor takes ``dim``
as its first argument, even when it does not need it. A mixer maps an ``(N, C, H, W)`` tensor to one of
the same shape.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import TOKEN_MIXERS


def build_token_mixer(cfg: dict, dim: int) -> nn.Module:
    """Build a mixer from ``dict(type=NAME_OR_CLASS, **kwargs)`` for a stage of ``dim`` channels.

    Looked up in ``TOKEN_MIXERS`` itself rather than through mmengine's default scope, which inside an
    mmdet or mmseg model points at their registries.
    """
    cfg = dict(cfg)
    mixer_type = cfg.pop('type')
    cls = TOKEN_MIXERS.get(mixer_type) if isinstance(mixer_type, str) else mixer_type
    if cls is None:
        raise KeyError(f'unknown token mixer {mixer_type!r}; registered in '
                       f'mmpoolformer.registry.TOKEN_MIXERS: {sorted(TOKEN_MIXERS.module_dict)}')
    try:
        return cls(dim=dim, **cfg)
    except TypeError as e:
        raise TypeError(f'bad token mixer config {dict(type=mixer_type, **cfg)!r}: {e}') from e


@TOKEN_MIXERS.register_module()
class Pooling(nn.Module):
    """PoolFormer's mixer: average pooling minus the input.

    The block adds its input back through the residual branch, so subtracting it here leaves only the
    "mix with the neighbours" term. Padding is excluded from the average so border tokens are not pulled
    towards zero.

    Args:
        dim (int): Channels of the stage (unused: pooling has no parameters).
        pool_size (int): Side of the pooling window; odd so that the output keeps the input size.
            Defaults to 3, the paper's choice.
    """

    def __init__(self, dim: int, pool_size: int = 3):
        super().__init__()
        if not isinstance(pool_size, int) or pool_size < 1 or pool_size % 2 == 0:
            raise ValueError(
                f'Pooling: pool_size must be a positive odd int (so the output keeps the input '
                f'size), got {pool_size!r}')
        self.pool_size = pool_size
        self.pool = nn.AvgPool2d(
            pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x):
        return self.pool(x) - x

    def extra_repr(self) -> str:
        return f'pool_size={self.pool_size}'


class _PoolingResidual(torch.autograd.Function):
    """``x + scale * (avg_pool(x) - x)`` in one pass, keeping only ``x`` for backward.

    The pooled map is as cheap to recompute as to store, so backward pools again instead of holding a
    second activation per block. ``shift`` is the norm's bias, which the pooling mixer cancels: its
    gradient is exactly zero (the reference formulation computes a rounding-level value) and is
    returned as such, so optimisers and DDP see the parameter as used.
    """

    @staticmethod
    def forward(ctx, x, scale, shift, pool_size):
        ctx.pool_args = (pool_size, 1, pool_size // 2, False, False)  # kernel, stride, pad, ceil, incl.
        ctx.save_for_backward(x, scale)
        ctx.shift_shape = None if shift is None else shift.shape
        return torch.lerp(x, F.avg_pool2d(x, *ctx.pool_args), scale)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        kernel, stride, pad, ceil_mode, count_include_pad = ctx.pool_args
        grad_x = grad_scale = grad_shift = None
        if ctx.needs_input_grad[0]:
            # d/dx [(1 - s) x + s P x] = (1 - s) g + P^T (s g)
            grad_x = torch.ops.aten.avg_pool2d_backward(grad * scale, x, [kernel] * 2, [stride] * 2,
                                                        [pad] * 2, ceil_mode, count_include_pad, None)
            grad_x.addcmul_(grad, 1 - scale)
        if ctx.needs_input_grad[1]:
            mixed = F.avg_pool2d(x, *ctx.pool_args).sub_(x).mul_(grad)
            grad_scale = mixed.sum(dim=(2, 3), keepdim=True).sum_to_size(scale.shape)
        if ctx.needs_input_grad[2]:
            grad_shift = grad.new_zeros(ctx.shift_shape)
        return grad_x, grad_scale, grad_shift, None


@TOKEN_MIXERS.register_module()
class Identity(nn.Module):
    """No token mixing at all: the paper's lower bound ("IdentityFormer").

    Args:
        dim (int): Channels of the stage (unused).
    """

    def __init__(self, dim: int):
        super().__init__()

    def forward(self, x):
        return x


def pooling_residual(x, scale, shift=None, pool_size: int = 3):
    """``x + scale * (avg_pool(x) - x)``: a pooling mixer's residual branch after a norm that is affine
    per sample and channel (``scale`` broadcasts over ``(N, C, 1, 1)``); see :class:`_PoolingResidual`."""
    return _PoolingResidual.apply(x, scale, shift, pool_size)
