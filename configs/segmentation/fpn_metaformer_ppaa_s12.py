# Semantic FPN with the hybrid MetaFormer-S12 [pool, pool, attention, attention] backbone (the official
# `metaformer_ppaa_s12_224` ImageNet release): the PoolFormer-S12 recipe with only the backbone changed.
_base_ = './fpn_poolformer_s12.py'

checkpoint = ('https://github.com/sail-sg/poolformer/releases/download/v1.0/'
              'metaformer_ppaa_s12_224.pth.tar')
model = dict(
    backbone=dict(
        type='mmpoolformer.MetaFormer',
        # 512x512 crops give stage 2 only 32x32 tokens: full attention, exactly as the release.
        token_mixers=[
            dict(type='Pooling', pool_size=3),
            dict(type='Pooling', pool_size=3),
            dict(type='Attention', head_dim=32),
            dict(type='Attention', head_dim=32),
        ],
        # As the release: channel LayerNorm, and a position embedding learned for stage 2's 14x14
        # grid at 224x224, resized to each input's grid.
        norm_cfg=dict(type='LN2d'),
        pos_embed_sizes=[None, None, (14, 14), None],
        init_cfg=dict(checkpoint=checkpoint)))
