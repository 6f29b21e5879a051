"""Token mixers: the one part of a MetaFormer block that differs between family members.

Every mixer is registered in ``mmpoolformer.registry.TOKEN_MIXERS`` and is built per stage by
:func:`build_token_mixer` with ``dim`` set to the stage's channels, so a mixer's constructor takes ``dim``
as its first argument, even when it does not need it. A mixer maps an ``(N, C, H, W)`` tensor to one of
the same shape, for any ``H`` and ``W``.

Here: the paper's ``Pooling`` and its ablations (``Identity``, ``DepthwiseConv``, the frozen
``RandomMixing``), the mixers of the official hybrids (``Attention``, ``SpatialFc``), and ConvFormer's
``SepConv`` (the MetaFormer Baselines; their CAFormer uses ``Attention`` without biases, their RandFormer
``RandomMixing``). The two defined on a fixed token grid (``SpatialFc``, ``RandomMixing``) resample their
matrix to the grid of the input.
"""
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import attend, avg_pool, conv2d, norm_linear_act, norm_pool_residual, sep_conv_residual
from ..registry import TOKEN_MIXERS
from .layers import add_residual, build_act


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
        return avg_pool(self.pool, x) - x  # (``self.pool(x)`` with a backward right on every device)

    def fused_residual(self, x, norm, layer_scale, res_scale, factors, plain):
        """After a GroupNorm the branch needs the norm's statistics only (``kernels.pooling``); see
        :meth:`~mmpoolformer.models.MetaFormerBlock.residual`."""
        return norm_pool_residual(x, norm, self.pool_size, layer_scale, factors, plain, res_scale)

    def extra_repr(self) -> str:
        return f'pool_size={self.pool_size}'


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


@TOKEN_MIXERS.register_module()
class DepthwiseConv(nn.Module):
    """A learned local mixer: one ``k x k`` filter per channel (the paper's ablation of pooling).

    Args:
        dim (int): Channels of the stage (one filter each).
        kernel_size (int): Side of the filter; odd so that the output keeps the input size. Defaults
            to 3, the window of the pooling it replaces.
    """

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f'DepthwiseConv: kernel_size must be a positive odd int (so the output keeps the '
                f'input size), got {kernel_size!r}')
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x):
        return conv2d(self.conv, x)


@TOKEN_MIXERS.register_module()
class SepConv(nn.Module):
    """ConvFormer's mixer: MobileNetV2's inverted separable convolution, a pointwise expansion, an
    activation, one large ``k x k`` filter per channel and a pointwise projection (MetaFormer Baselines,
    Sec. 3.2). Parameter names are the release's (``pwconv1``, ``act1``, ``dwconv``, ``pwconv2``).

    Args:
        dim (int): Channels of the stage.
        expansion_ratio (float): Width of the depthwise filter's map relative to ``dim``. Defaults to 2.
        kernel_size (int): Side of the depthwise filter; odd, so that the output keeps the input size.
            Defaults to 7.
        act_cfg (dict): Activation after the expansion. Defaults to StarReLU.
        bias (bool): Biases in the three convolutions. Defaults to False, as released.
    """

    def __init__(self,
                 dim: int,
                 expansion_ratio: float = 2.,
                 kernel_size: int = 7,
                 act_cfg: dict = dict(type='StarReLU'),
                 bias: bool = False):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'SepConv: kernel_size must be a positive odd int (so the output keeps '
                             f'the input size), got {kernel_size!r}')
        if not isinstance(expansion_ratio, (int, float)) or expansion_ratio <= 0:
            raise ValueError(f'SepConv: expansion_ratio must be a positive number, got '
                             f'{expansion_ratio!r}')
        hidden = int(expansion_ratio * dim)
        self.pwconv1 = nn.Conv2d(dim, hidden, 1, bias=bias)
        self.act1 = build_act(act_cfg)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden,
                                bias=bias)
        self.pwconv2 = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x):
        return self.pwconv2(conv2d(self.dwconv, self.act1(self.pwconv1(x))))

    def fused_residual(self, x, norm, layer_scale, res_scale, factors, plain):
        """See :meth:`MetaFormerBlock.residual`: in inference on CPUs the whole branch band by band of
        image rows (``kernels.sep_conv_residual``); else the norm, the expansion and its activation in
        token chunks (the MLP kernel's first half: the expanded map is written once, not once per
        operation), then the depthwise convolution and the projection."""
        def composed(x):
            expanded = norm_linear_act(x, norm, self.pwconv1, self.act1,
                                       plain=lambda x: self.act1(self.pwconv1(norm(x))))
            return add_residual(x, self.pwconv2(conv2d(self.dwconv, expanded)), layer_scale,
                                res_scale, factors)

        return sep_conv_residual(x, norm, self.pwconv1, self.act1, self.dwconv, self.pwconv2,
                                 layer_scale, res_scale, factors, composed)


@TOKEN_MIXERS.register_module()
class Attention(nn.Module):
    """Multi-head self-attention over all tokens of the map, without a position embedding, as in the
    official hybrid MetaFormers and CAFormer (there without any bias): PyTorch's scaled-dot-product
    attention, or in inference on CPUs the compiled kernel where it is faster (``kernels.attend``).

    Parameters keep the official names (a fused ``qkv``, then ``proj``), so the released hybrids and
    CAFormers load unchanged. Tokens attend to every token, so the cost grows with the square of
    their number: at detection resolutions use ``sr_ratio``.

    Args:
        dim (int): Channels of the stage; a multiple of ``head_dim``.
        head_dim (int): Channels per head; the number of heads is ``dim // head_dim``. Defaults to 32,
            the official hybrids' value.
        qkv_bias (bool): Bias in the query / key / value projection. Defaults to False (official).
        proj_bias (bool): Bias in the output projection. Defaults to True (the hybrids; CAFormer:
            False).
        sr_ratio (int): Spatial reduction as in PVT: keys and values come from the map average-pooled
            over ``sr_ratio x sr_ratio`` windows (border windows average what is inside the map), which
            divides the cost of attention by about ``sr_ratio ** 2``. The reduction has no parameters,
            so ``qkv`` keeps its meaning and a checkpoint trained without reduction loads with any
            ratio. Defaults to 1 (no reduction: exactly the official attention).
        attn_drop (float): Dropout on the attention weights. Defaults to 0.
        proj_drop (float): Dropout after the output projection. Defaults to 0.
    """

    def __init__(self,
                 dim: int,
                 head_dim: int = 32,
                 qkv_bias: bool = False,
                 proj_bias: bool = True,
                 sr_ratio: int = 1,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 1 or dim % head_dim:
            raise ValueError(f'Attention: head_dim must be a positive int dividing the stage\'s '
                             f'{dim} channels, got {head_dim!r}')
        if not isinstance(sr_ratio, int) or sr_ratio < 1:
            raise ValueError(f'Attention: sr_ratio must be a positive int (1: no reduction), got '
                             f'{sr_ratio!r}')
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def _heads(self, tokens):
        """``(N, L, k * C)`` -> ``k`` tensors of ``(N, heads, L, head_dim)``."""
        n, length, _ = tokens.shape
        return tokens.view(n, length, -1, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        if self.sr_ratio == 1:
            q, k, v = self._heads(self.qkv(tokens))
        else:
            w_q, w_kv = self.qkv.weight.split([c, 2 * c])
            b_q, b_kv = self.qkv.bias.split([c, 2 * c]) if self.qkv.bias is not None else (None, None)
            reduced = F.avg_pool2d(x, self.sr_ratio, ceil_mode=True).flatten(2).transpose(1, 2)
            [q] = self._heads(F.linear(tokens, w_q, b_q))
            k, v = self._heads(F.linear(reduced, w_kv, b_kv))
        out = attend(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(n, h * w, c)))
        return out.transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, head_dim={self.head_dim}, sr_ratio={self.sr_ratio}'


def _check_grid(name: str, spatial_shape) -> Tuple[int, int]:
    if (not isinstance(spatial_shape, (list, tuple)) or len(spatial_shape) != 2
            or not all(isinstance(s, int) and s > 0 for s in spatial_shape)):
        raise ValueError(
            f'{name}: spatial_shape must be the (height, width) token grid its matrix is defined '
            f'for, e.g. (7, 7) for stage 3 of a 224x224 input, got {spatial_shape!r}')
    return tuple(spatial_shape)


def resize_token_matrix(matrix: torch.Tensor, src: Sequence[int], dst: Sequence[int]) -> torch.Tensor:
    """Resample a token-to-token matrix defined on an ``src`` grid to a ``dst`` grid.

    Entry ``(i, j)`` weighs source token ``j`` into output token ``i``; seen as a function of the
    four grid coordinates, it is resized bilinearly over the source coordinates, then over the output
    coordinates. Entries are not rescaled here; callers decide what to conserve.
    """
    (h, w), (new_h, new_w) = src, dst
    if (h, w) == (new_h, new_w):
        return matrix
    n, new_n = h * w, new_h * new_w
    matrix = F.interpolate(matrix.reshape(n, 1, h, w), size=(new_h, new_w), mode='bilinear',
                           align_corners=False).reshape(n, new_n)
    matrix = F.interpolate(matrix.t().reshape(new_n, 1, h, w), size=(new_h, new_w), mode='bilinear',
                           align_corners=False).reshape(new_n, new_n)
    return matrix.t()


def _mix_tokens(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out[:, :, i] = sum_j matrix[i, j] * x[:, :, j]`` over the flattened tokens of ``x``."""
    n, c, h, w = x.shape
    return (x.reshape(n, c, h * w) @ matrix.t()).reshape(n, c, h, w)


@TOKEN_MIXERS.register_module()
class SpatialFc(nn.Module):
    """The spatial MLP: a learned ``n x n`` matrix over the ``n`` tokens of a fixed grid, shared by
    all channels (the official ``SpatialFc``; parameter ``fc.weight``).

    The matrix is defined for one token grid, ``spatial_shape``. On another grid (a detection or
    segmentation input, an odd size) it is resampled bilinearly to the actual grid (see
    :func:`resize_token_matrix`) and scaled by ``n_trained / n_actual``, so that each output token
    keeps the total weight it gave its sources. The resampled matrix has ``n_actual ** 2`` entries:
    affordable for the late, coarse stages the official models use it in, not for stride-4 maps of
    large images.

    Args:
        dim (int): Channels of the stage (unused: the matrix is shared by all channels).
        spatial_shape (tuple[int, int]): The token grid ``(h, w)`` the matrix is defined for, e.g.
            (14, 14) for stage 2 and (7, 7) for stage 3 of a 224x224 input.
    """

    def __init__(self, dim: int, spatial_shape: Sequence[int]):
        super().__init__()
        self.spatial_shape = _check_grid('SpatialFc', spatial_shape)
        n = self.spatial_shape[0] * self.spatial_shape[1]
        self.fc = nn.Linear(n, n, bias=False)

    def forward(self, x):
        grid = tuple(x.shape[2:])
        matrix = resize_token_matrix(self.fc.weight, self.spatial_shape, grid)
        if grid != self.spatial_shape:
            matrix = matrix * (self.fc.in_features / (grid[0] * grid[1]))
        return _mix_tokens(matrix, x)

    def extra_repr(self) -> str:
        return f'spatial_shape={self.spatial_shape}'


@TOKEN_MIXERS.register_module()
class RandomMixing(nn.Module):
    """A frozen global random matrix over the tokens: the paper's ablation showing that even random
    mixing beats none. Each row is a softmax of uniform noise (non-negative, sums to one), drawn once
    at construction and kept as the buffer ``random_matrix``, so checkpoints carry it and it never
    trains.

    On a grid other than ``spatial_shape`` the matrix is resampled bilinearly to the actual grid (see
    :func:`resize_token_matrix`) and each row renormalised to sum to one, so the mixer stays a
    weighted average of tokens; it costs ``n_actual ** 2`` entries, like :class:`SpatialFc`.

    Args:
        dim (int): Channels of the stage (unused: the matrix is shared by all channels).
        spatial_shape (tuple[int, int]): The token grid ``(h, w)`` the matrix is drawn for.
    """

    def __init__(self, dim: int, spatial_shape: Sequence[int]):
        super().__init__()
        self.spatial_shape = _check_grid('RandomMixing', spatial_shape)
        n = self.spatial_shape[0] * self.spatial_shape[1]
        self.register_buffer('random_matrix', torch.rand(n, n).softmax(dim=-1))

    def forward(self, x):
        grid = tuple(x.shape[2:])
        matrix = resize_token_matrix(self.random_matrix, self.spatial_shape, grid)
        if grid != self.spatial_shape:
            matrix = matrix / matrix.sum(dim=1, keepdim=True)
        return _mix_tokens(matrix, x)

    def extra_repr(self) -> str:
        return f'spatial_shape={self.spatial_shape}'
