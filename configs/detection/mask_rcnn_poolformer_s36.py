_base_ = './mask_rcnn_poolformer_s12.py'

checkpoint = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_s36.pth.tar'
model = dict(backbone=dict(arch='s36', init_cfg=dict(checkpoint=checkpoint)))
