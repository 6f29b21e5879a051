# The bundled shapes data (mmpoolformer.demo) and a CPU-sized schedule for the detection demos.
# Every name here starts with "shapes_": mmengine refuses keys that two bases both define, so a demo
# takes this file and one of the paper's configs as bases and picks these up as {{_base_.shapes_...}}.
shapes_root = 'data/shapes/'
shapes_metainfo = dict(
    classes=('circle', 'triangle', 'square'),
    palette=[(220, 20, 60), (0, 130, 230), (250, 170, 30)])
# The images are generated at this size (mmpoolformer.demo.generate): objects of 32-56 pixels, the
# sizes of the smallest RetinaNet anchors. Small images buy more iterations in the same time.
shapes_scale = (160, 112)
shapes_epochs = 14

# Masks are loaded for Mask R-CNN; RetinaNet ignores them.
# Batch 2: on a CPU, twice the updates in the same time learn more than bigger batches do.
shapes_train_dataloader = dict(
    batch_size=2,
    num_workers=2,
    dataset=dict(
        data_root=shapes_root,
        metainfo=shapes_metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='images/train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
            dict(type='Resize', scale=shapes_scale, keep_ratio=True),
            dict(type='RandomFlip', prob=0.5),
            dict(type='PackDetInputs'),
        ]))
shapes_val_dataloader = dict(
    batch_size=4,
    num_workers=2,
    dataset=dict(
        data_root=shapes_root,
        metainfo=shapes_metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='images/val/'),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=shapes_scale, keep_ratio=True),
            dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
            dict(type='PackDetInputs',
                 meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
        ]))
shapes_ann_val = shapes_root + 'annotations/instances_val.json'

shapes_train_cfg = dict(max_epochs=shapes_epochs, val_interval=shapes_epochs)
shapes_param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', begin=0, end=shapes_epochs, by_epoch=True, milestones=[11, 13],
         gamma=0.1),
]
shapes_default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=shapes_epochs, max_keep_ckpts=2))
shapes_lr = 1e-4
