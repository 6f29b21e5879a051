"""The families of "MetaFormer Baselines for Vision" (Yu et al., TPAMI 2024) as dense backbones.

Each family is :class:`~mmpoolformer.models.MetaFormer` with its own tables: the sizes (``arch_zoo``)
and the settings it fixes (``family_defaults``). What sets the Baselines apart from PoolFormer is in
those tables, not in the block:

- StarReLU in the MLPs, which have no biases;
- norms with a scale and no bias: GroupNorm(1, C)-style for the families with cheap mixers, channel
  LayerNorm for ConvFormer and CAFormer, ``eps=1e-6`` throughout;
- a norm after the stem's convolution and before each downsampling convolution;
- ResScale (a learned per-channel factor on the residual) in stages 2 and 3, no LayerScale.

Module names extend PoolFormer's official ones (``patch_embed.post_norm``, ``network.{1,3,5}.pre_norm``,
``res_scale_{1,2}``); ``weights.py`` maps timm's and sail-sg/metaformer's layouts onto them.

The emitted maps go through a channel LayerNorm with bias (``eps=1e-6``), the norm the released
classifiers apply to the last stage: ``out_norm_cfg=None`` emits the raw stage outputs, which equal
timm's ``forward_intermediates`` on the same weights.
"""
from ..registry import MODELS
from .metaformer import MetaFormer


def _sizes(depths: dict, dims: dict) -> dict:
    return {name: dict(depths=depths[name], embed_dims=dims[name]) for name in depths}


# The paper's sizes (Table 1 of the Baselines): PoolFormerV2, IdentityFormer, RandFormer ...
_SIZES_12 = _sizes(
    depths=dict(s12=[2, 2, 6, 2], s24=[4, 4, 12, 4], s36=[6, 6, 18, 6], m36=[6, 6, 18, 6],
                m48=[8, 8, 24, 8]),
    dims=dict(s12=[64, 128, 320, 512], s24=[64, 128, 320, 512], s36=[64, 128, 320, 512],
              m36=[96, 192, 384, 768], m48=[96, 192, 384, 768]))
# ... and ConvFormer, CAFormer.
_SIZES_18 = _sizes(
    depths=dict(s18=[3, 3, 9, 3], s36=[3, 12, 18, 3], m36=[3, 12, 18, 3], b36=[3, 12, 18, 3]),
    dims=dict(s18=[64, 128, 320, 512], s36=[64, 128, 320, 512], m36=[96, 192, 384, 576],
              b36=[128, 256, 512, 768]))

_ARCH = dict(mlp_ratios=4, layer_scale_init_value=None, res_scale_init_values=(None, None, 1., 1.))
_CHANNEL_LN = dict(type='LN2d', eps=1e-6, bias=False)
_MODIFIED_LN = dict(type='GN', num_groups=1, eps=1e-6, bias=False)
_COMMON = dict(
    act_cfg=dict(type='StarReLU'),
    mlp_bias=False,
    downsample_norm_cfg=_CHANNEL_LN,
    out_norm_cfg=dict(type='LN2d', eps=1e-6))
_IDENTITY = dict(type='Identity')
_SEPCONV = dict(type='SepConv', expansion_ratio=2, kernel_size=7)
_ATTENTION = dict(type='Attention', head_dim=32, qkv_bias=False, proj_bias=False)


class _Baseline(MetaFormer):
    arch_defaults = _ARCH


@MODELS.register_module()
class PoolFormerV2(_Baseline):
    """PoolFormerV2: PoolFormer's pooling mixer in the Baselines' MetaFormer.

    Takes every argument of :class:`MetaFormer`; ``arch`` is one of ``s12, s24, s36, m36, m48``.
    """
    arch_zoo = _SIZES_12
    family_defaults = dict(_COMMON, token_mixers=dict(type='Pooling', pool_size=3),
                           norm_cfg=_MODIFIED_LN)


@MODELS.register_module()
class IdentityFormer(_Baseline):
    """IdentityFormer: no token mixing at all, the Baselines' lower bound.

    Takes every argument of :class:`MetaFormer`; ``arch`` is one of ``s12, s24, s36, m36, m48``.
    """
    arch_zoo = _SIZES_12
    family_defaults = dict(_COMMON, token_mixers=_IDENTITY, norm_cfg=_MODIFIED_LN)


@MODELS.register_module()
class RandFormer(_Baseline):
    """RandFormer: no mixing in stages 0-1, a frozen random token-mixing matrix in stages 2-3.

    The matrices are drawn for the 14x14 and 7x7 token grids of a 224x224 image; on any other grid
    they are resampled to it and their rows renormalised (see
    :class:`~mmpoolformer.models.token_mixers.RandomMixing`), which costs ``(h * w) ** 2`` entries
    per stage: at 1333x800, stage 2's matrix has 4200 ** 2 entries (70 MB in fp32).

    Takes every argument of :class:`MetaFormer`; ``arch`` is one of ``s12, s24, s36, m36, m48``.
    """
    arch_zoo = _SIZES_12
    family_defaults = dict(
        _COMMON, norm_cfg=_MODIFIED_LN,
        token_mixers=[_IDENTITY, _IDENTITY, dict(type='RandomMixing', spatial_shape=(14, 14)),
                      dict(type='RandomMixing', spatial_shape=(7, 7))])


@MODELS.register_module()
class ConvFormer(_Baseline):
    """ConvFormer: the separable-convolution mixer (:class:`~mmpoolformer.models.SepConv`) in every
    stage.

    Takes every argument of :class:`MetaFormer`; ``arch`` is one of ``s18, s36, m36, b36``.
    """
    arch_zoo = _SIZES_18
    family_defaults = dict(_COMMON, token_mixers=_SEPCONV, norm_cfg=_CHANNEL_LN)


@MODELS.register_module()
class CAFormer(_Baseline):
    """CAFormer: separable convolutions in stages 0-1, attention over all tokens in stages 2-3.

    Attention's cost grows with the square of the tokens: stage 2 of a 1333x800 image has 84x50
    tokens. To attend to keys and values from pooled maps instead (no new parameters; the released
    weights load unchanged), give stage 2 ``sr_ratio``::

        token_mixers=[dict(type='SepConv')] * 2 + [
            dict(type='Attention', proj_bias=False, sr_ratio=2), dict(type='Attention', proj_bias=False)]

    Takes every argument of :class:`MetaFormer`; ``arch`` is one of ``s18, s36, m36, b36``.
    """
    arch_zoo = _SIZES_18
    family_defaults = dict(_COMMON, token_mixers=[_SEPCONV, _SEPCONV, _ATTENTION, _ATTENTION],
                           norm_cfg=_CHANNEL_LN)
