# Semantic FPN with a PoolFormer-S12 backbone on ADE20K, 40k iterations: the paper's recipe (Table 4),
# i.e. the official PoolFormer segmentation settings on mmseg's own FPN, ADE20K and schedule configs.
_base_ = [
    'mmseg::_base_/models/fpn_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/schedules/schedule_40k.py',
    'mmseg::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmpoolformer'], allow_failed_imports=False)

crop_size = (512, 512)
checkpoint = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_s12.pth.tar'
model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='mmpoolformer.PoolFormer',
        arch='s12',
        out_indices=(0, 1, 2, 3),
        # Everything trains, the stem included (frozen_stages=-1).
        frozen_stages=-1,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[64, 128, 320, 512]),
    decode_head=dict(num_classes=150))

# Evaluate at (2048, 512) keeping the aspect ratio, then at a size divisible by 32 as the official code.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=32),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# AdamW, poly decay to 0 over the 40k iterations of 8 GPUs x 4 images.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=1e-4))
param_scheduler = [
    dict(type='PolyLR', power=0.9, eta_min=0.0, begin=0, end=40000, by_epoch=False),
]
auto_scale_lr = dict(enable=False, base_batch_size=32)

# Checkpoints that survive pre-emption (atomic writes, random states, SIGTERM), and a stop at the first
# non-finite loss, also with the stock train.py of mmdet / mmseg; see mmpoolformer/engine/.
default_hooks = dict(checkpoint=dict(type='mmpoolformer.ResumableCheckpointHook'))
custom_hooks = [dict(type='mmpoolformer.NonFiniteLossHook')]
