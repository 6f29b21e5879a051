# Semantic FPN with a PoolFormerV2-S24 backbone (MetaFormer Baselines: pooling, as PoolFormer, with
# StarReLU, ResScale and bias-free norms), ADE20K, 40k iterations: the PoolFormer-S24 recipe with
# only the backbone changed; the stage widths are PoolFormer's, so the neck is unchanged. The
# weights: the ImageNet-1k release, in sail-sg/metaformer's layout (timm's files load alike).
_base_ = './fpn_poolformer_s24.py'

checkpoint = 'https://huggingface.co/sail/dl/resolve/main/poolformerv2/poolformerv2_s24.pth'
model = dict(
    backbone=dict(type='mmpoolformer.PoolFormerV2', arch='s24', init_cfg=dict(checkpoint=checkpoint)))
