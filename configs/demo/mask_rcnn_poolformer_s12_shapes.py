# The paper's Mask R-CNN / PoolFormer-S12 config on the bundled shapes data (boxes and masks), sized
# for a CPU as retinanet_poolformer_s12_shapes.py is.
_base_ = ['../detection/mask_rcnn_poolformer_s12.py', './_base_/shapes_detection.py']

# 128 sampled RoIs per image instead of 512: a few shapes per image need no more, and the box and mask
# heads' cost on a CPU grows with them (2.3 s an iteration instead of 5.2 on 2 cores).
model = dict(
    backbone=dict(init_cfg=None),
    roi_head=dict(bbox_head=dict(num_classes=3), mask_head=dict(num_classes=3)),
    train_cfg=dict(rcnn=dict(sampler=dict(num=128))))

train_dataloader = {{_base_.shapes_train_dataloader}}
val_dataloader = {{_base_.shapes_val_dataloader}}
test_dataloader = val_dataloader
val_evaluator = dict(ann_file={{_base_.shapes_ann_val}}, metric=['bbox', 'segm'])
test_evaluator = val_evaluator

train_cfg = {{_base_.shapes_train_cfg}}
param_scheduler = {{_base_.shapes_param_scheduler}}
optim_wrapper = dict(optimizer=dict(lr={{_base_.shapes_lr}}))
default_hooks = {{_base_.shapes_default_hooks}}
auto_scale_lr = dict(base_batch_size=2)
randomness = dict(seed=0)
