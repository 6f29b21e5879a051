# The real Semantic FPN / PoolFormer-S12 config on the bundled shapes label maps (ADE20K-style: 0 is
# ignored through reduce_zero_label), sized for a CPU: small crops, a short schedule, no download.
_base_ = '../segmentation/fpn_poolformer_s12.py'

data_root = 'data/shapes/'
metainfo = dict(
    classes=('background', 'circle', 'triangle', 'square'),
    palette=[(90, 90, 90), (220, 20, 60), (0, 130, 230), (250, 170, 30)])
image_scale = (160, 112)
crop_size = (128, 128)

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(init_cfg=None),
    decode_head=dict(num_classes=4))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=image_scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=32),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
dataset = dict(
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=True)
train_dataloader = dict(
    batch_size=4,
    num_workers=2,
    dataset=dict(
        dataset,
        data_prefix=dict(img_path='images/train', seg_map_path='seg/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    dataset=dict(
        dataset,
        data_prefix=dict(img_path='images/val', seg_map_path='seg/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

max_iters = 600
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='PolyLR', power=0.9, eta_min=0.0, begin=0, end=max_iters, by_epoch=False),
]
optim_wrapper = dict(optimizer=dict(lr=2e-4))
# Draw every validation image under --show-dir, not mmseg's every 50th.
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=2),
    visualization=dict(interval=1))
auto_scale_lr = dict(base_batch_size=4)
randomness = dict(seed=0)
