# The paper's Mask R-CNN / PoolFormer-S12 config on the bundled shapes data (boxes and masks), sized
# for a CPU as retinanet_poolformer_s12_shapes.py is.
_base_ = ['../detection/mask_rcnn_poolformer_s12.py', './_base_/shapes_detection.py']

# 128 sampled RoIs per image instead of 512: a few shapes per image need no more, and the box and mask
# heads' cost on a CPU grows with them.
model = dict(
    backbone=dict(init_cfg=None),
    roi_head=dict(bbox_head=dict(num_classes=3), mask_head=dict(num_classes=3)),
    train_cfg=dict(rcnn=dict(sampler=dict(num=128))))

train_dataloader = {{_base_.shapes_train_dataloader}}
val_dataloader = {{_base_.shapes_val_dataloader}}
test_dataloader = val_dataloader
val_evaluator = dict(ann_file={{_base_.shapes_ann_val}}, metric=['bbox', 'segm'])
test_evaluator = val_evaluator

# About 3 s an iteration on 2 cores even so: 5 epochs (320 iterations) keep the demo near 20 minutes.
epochs = 5
train_cfg = dict(max_epochs=epochs, val_interval=epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', begin=0, end=epochs, by_epoch=True, milestones=[4], gamma=0.1),
]
optim_wrapper = dict(optimizer=dict(lr={{_base_.shapes_lr}}))
default_hooks = dict(
    logger=dict(interval=10), checkpoint=dict(interval=epochs, max_keep_ckpts=2))
auto_scale_lr = dict(base_batch_size=2)
randomness = dict(seed=0)
