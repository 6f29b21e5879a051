from .metaformer import MetaFormer, MetaFormerBlock, PoolFormer
from .token_mixers import Identity, Pooling, build_token_mixer

__all__ = ['MetaFormer', 'MetaFormerBlock', 'PoolFormer', 'Pooling', 'Identity', 'build_token_mixer']
