"""Token mixers: the one part of a MetaFormer block that differs between family members.

Every mixer is registered in ``mmpoolformer.registry.TOKEN_MIXERS`` and is built per stage by
:func:`build_token_mixer` with ``dim`` set to the stage's channels, so a mixer's constructor takes ``dim``
as its first argument, even when it does not need it. A mixer maps an ``(N, C, H, W)`` tensor to one of
the same shape.
"""
import torch.nn as nn

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
