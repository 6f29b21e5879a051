from .baselines import CAFormer, ConvFormer, IdentityFormer, PoolFormerV2, RandFormer
from .layers import StarReLU
from .metaformer import HYBRID_RELEASES, MetaFormer, MetaFormerBlock, PoolFormer, PositionEmbedding
from .token_mixers import (Attention, DepthwiseConv, Identity, Pooling, RandomMixing, SepConv,
                           SpatialFc, build_token_mixer)

__all__ = [
    'MetaFormer', 'MetaFormerBlock', 'PoolFormer', 'PositionEmbedding', 'HYBRID_RELEASES',
    'PoolFormerV2', 'IdentityFormer', 'RandFormer', 'ConvFormer', 'CAFormer', 'StarReLU', 'Pooling',
    'Identity', 'DepthwiseConv', 'Attention', 'SpatialFc', 'RandomMixing', 'SepConv',
    'build_token_mixer'
]
