from .metaformer import HYBRID_RELEASES, MetaFormer, MetaFormerBlock, PoolFormer, PositionEmbedding
from .token_mixers import (Attention, DepthwiseConv, Identity, Pooling, RandomMixing, SpatialFc,
                           build_token_mixer)

__all__ = [
    'MetaFormer', 'MetaFormerBlock', 'PoolFormer', 'PositionEmbedding', 'HYBRID_RELEASES', 'Pooling',
    'Identity', 'DepthwiseConv', 'Attention', 'SpatialFc', 'RandomMixing', 'build_token_mixer'
]
