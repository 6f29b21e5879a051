"""Every detection config: the paper's recipe, its parameter count, and one training step and one
prediction on synthetic COCO-style inputs (boxes and masks) on CPU."""
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmengine.config import Config
from mmengine.registry import init_default_scope

from mmpoolformer import config_path

# Whole-model parameters (millions) in the paper's Table 3.
PAPER_PARAMS = {
    'retinanet_poolformer_s12': 21.7,
    'retinanet_poolformer_s24': 31.1,
    'retinanet_poolformer_s36': 40.6,
    'mask_rcnn_poolformer_s12': 31.6,
    'mask_rcnn_poolformer_s24': 41.0,
    'mask_rcnn_poolformer_s36': 50.5,
}
RELEASE = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_{}.pth.tar'


def load(name):
    return Config.fromfile(config_path(f'detection/{name}.py'))


def build_detector(cfg):
    init_default_scope('mmdet')
    cfg.model.backbone.init_cfg = None  # no download in tests
    return MODELS.build(cfg.model)


@pytest.mark.parametrize('name', sorted(PAPER_PARAMS))
def test_recipe(name):
    cfg = load(name)
    arch = name[-3:]
    is_retina = name.startswith('retinanet')
    backbone = cfg.model.backbone
    assert backbone.type == 'mmpoolformer.PoolFormer' and backbone.arch == arch
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=RELEASE.format(arch))
    assert backbone.out_indices == ((1, 2, 3) if is_retina else (0, 1, 2, 3))
    assert cfg.model.neck.out_channels == 256 and cfg.model.neck.num_outs == 5
    assert cfg.optim_wrapper.type == 'OptimWrapper' and cfg.optim_wrapper.get('clip_grad') is None
    assert cfg.optim_wrapper.optimizer == dict(
        type='AdamW', lr=1e-4 if is_retina else 2e-4, weight_decay=1e-4)
    assert cfg.train_cfg.max_epochs == 12
    warmup, steps = cfg.param_scheduler
    assert (warmup.type, warmup.end, warmup.by_epoch) == ('LinearLR', 500, False)
    assert steps.milestones == [8, 11] and steps.gamma == 0.1
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
    resize, flip = cfg.train_pipeline[2], cfg.train_pipeline[3]
    assert resize.scale == (1333, 800) and resize.keep_ratio and flip.prob == 0.5


@pytest.mark.parametrize('name', sorted(PAPER_PARAMS))
def test_train_step_and_prediction(name):
    cfg = load(name)
    model = build_detector(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / 1e6 - PAPER_PARAMS[name]) <= 0.1, n_params

    torch.manual_seed(0)
    with_mask = name.startswith('mask_rcnn')
    data = demo_mm_inputs(batch_size=2, image_shapes=[(3, 160, 224), (3, 137, 201)],
                          num_items=[3, 1], num_classes=80, with_mask=with_mask)
    model.train()
    losses = model(**model.data_preprocessor(data, training=True), mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    # every parameter takes part, so DDP needs no find_unused_parameters
    idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert idle == []

    model.eval()
    with torch.no_grad():
        results = model.test_step(data)
    assert len(results) == 2
    for res, inputs in zip(results, data['inputs']):
        pred = res.pred_instances
        assert pred.bboxes.shape[1] == 4 and len(pred.scores) == len(pred.labels)
        if with_mask:
            assert pred.masks.shape[1:] == res.ori_shape
