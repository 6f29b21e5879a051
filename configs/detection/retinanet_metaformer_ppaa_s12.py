# RetinaNet with the hybrid MetaFormer-S12 [pool, pool, attention, attention] backbone (the official
# `metaformer_ppaa_s12_224` ImageNet release): the PoolFormer-S12 recipe with only the backbone changed.
_base_ = './retinanet_poolformer_s12.py'

checkpoint = ('https://github.com/sail-sg/poolformer/releases/download/v1.0/'
              'metaformer_ppaa_s12_224.pth.tar')
model = dict(
    backbone=dict(
        type='mmpoolformer.MetaFormer',
        # At 1333x800, stage 2 has about 84x50 tokens: its keys and values come from 2x2-pooled maps
        # (the release was trained without reduction; its weights load unchanged). Stage 3 attends
        # to all of its tokens. Backbone at 1333x800: 66.8 GFLOPs, against 121.5 without reduction
        # and 39.0 for PoolFormer-S12 (tools/analysis/get_flops.py).
        token_mixers=[
            dict(type='Pooling', pool_size=3),
            dict(type='Pooling', pool_size=3),
            dict(type='Attention', head_dim=32, sr_ratio=2),
            dict(type='Attention', head_dim=32),
        ],
        # As the release: channel LayerNorm, and a position embedding learned for stage 2's 14x14
        # grid at 224x224, resized to each input's grid.
        norm_cfg=dict(type='LN2d'),
        pos_embed_sizes=[None, None, (14, 14), None],
        init_cfg=dict(checkpoint=checkpoint)))
