# Mask R-CNN with a PoolFormer-S12 backbone, 1x COCO schedule: the paper's recipe (Table 3), i.e. the
# official PoolFormer detection settings on mmdet's own Mask R-CNN, COCO and schedule configs.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmpoolformer'], allow_failed_imports=False)

checkpoint = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_s12.pth.tar'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpoolformer.PoolFormer',
        arch='s12',
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[64, 128, 320, 512], num_outs=5))

# AdamW instead of SGD, no gradient clipping; 8 GPUs x 2 images (the base batch of auto_scale_lr).
optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=2e-4, weight_decay=1e-4))

# Checkpoints that survive pre-emption (atomic writes, random states, SIGTERM), and a stop at the first
# non-finite loss, also with the stock train.py of mmdet / mmseg; see mmpoolformer/engine/.
default_hooks = dict(checkpoint=dict(type='mmpoolformer.ResumableCheckpointHook'))
custom_hooks = [dict(type='mmpoolformer.NonFiniteLossHook')]
