# RetinaNet with the identity-mixer MetaFormer-S12 backbone (no token mixing at all; the official
# `metaformer_id_s12` ImageNet release): the paper's lower bound, on the PoolFormer-S12 recipe with only
# the backbone changed.
_base_ = './retinanet_poolformer_s12.py'

checkpoint = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/metaformer_id_s12.pth.tar'
model = dict(
    backbone=dict(
        type='mmpoolformer.MetaFormer',
        token_mixers=dict(type='Identity'),
        init_cfg=dict(checkpoint=checkpoint)))
