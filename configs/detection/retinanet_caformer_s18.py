# RetinaNet with a CAFormer-S18 backbone (MetaFormer Baselines: separable convolutions in stages
# 0-1, attention in stages 2-3), 1x COCO: the PoolFormer-S12 recipe with only the backbone changed;
# the stage widths are PoolFormer's, so the neck is unchanged. The weights: the ImageNet-1k release
# at 224, in sail-sg/metaformer's layout; the 384 and ImageNet-21k fine-tuned releases, and timm's
# files, load alike.
_base_ = './retinanet_poolformer_s12.py'

checkpoint = 'https://huggingface.co/sail/dl/resolve/main/caformer/caformer_s18.pth'
model = dict(
    backbone=dict(
        type='mmpoolformer.CAFormer',
        arch='s18',
        # As released, stage 2 attends over all of its ~4,200 tokens at 1333x800 (its cost:
        # README); to attend to 2x2-pooled keys and values instead, give stage 2
        # dict(type='Attention', proj_bias=False, sr_ratio=2) in token_mixers.
        init_cfg=dict(checkpoint=checkpoint)))
