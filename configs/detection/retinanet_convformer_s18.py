# RetinaNet with a ConvFormer-S18 backbone (MetaFormer Baselines: separable-convolution mixers in
# every stage), 1x COCO: the PoolFormer-S12 recipe with only the backbone changed; the stage widths
# are PoolFormer's, so the neck is unchanged. The weights: the ImageNet-1k release at 224, in sail-
# sg/metaformer's layout; the 384 and ImageNet-21k fine-tuned releases, and timm's files, load
# alike.
_base_ = './retinanet_poolformer_s12.py'

checkpoint = 'https://huggingface.co/sail/dl/resolve/main/convformer/convformer_s18.pth'
model = dict(
    backbone=dict(type='mmpoolformer.ConvFormer', arch='s18', init_cfg=dict(checkpoint=checkpoint)))
