"""Every detection config: the paper's recipe, its parameter count, and one training step and one
prediction on synthetic COCO-style inputs (boxes and masks) on CPU."""
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs
from mmengine.config import Config
from mmengine.registry import init_default_scope

from mmpoolformer import config_path
from mmpoolformer.models.metaformer import HYBRID_RELEASES

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

# The MetaFormer configs and the PoolFormer config each changes only the backbone of.
METAFORMER_BASES = {
    f'{model}_metaformer_{mixers}_s12': f'{model}_poolformer_s12'
    for model in ('retinanet', 'mask_rcnn') for mixers in ('ppaa', 'id')
}
# Attention's parameters where pooling has none, in [pool, pool, attention, attention] S12: qkv (3C^2,
# no bias) and proj (C^2 + C) in the 6 + 2 blocks of stages 2 and 3, and stage 2's 14x14 position
# embedding. Identity, like pooling, has none.
PPAA_EXTRA = 6 * (4 * 320**2 + 320) + 2 * (4 * 512**2 + 512) + 320 * 14 * 14
MODEL_PARAMS = dict(PAPER_PARAMS, **{
    name: PAPER_PARAMS[base] + (PPAA_EXTRA / 1e6 if 'ppaa' in name else 0)
    for name, base in METAFORMER_BASES.items()})
# Whole-backbone parameters of PoolFormer-S12 with all four output norms (the official count).
POOLFORMER_S12_BACKBONE = 11_403_200


def load(name):
    return Config.fromfile(config_path(f'detection/{name}.py'))


def det_inputs(with_mask):
    """Two synthetic COCO-style images of odd sizes, with boxes (and masks)."""
    return demo_mm_inputs(batch_size=2, image_shapes=[(3, 160, 224), (3, 137, 201)],
                          num_items=[3, 1], num_classes=80, with_mask=with_mask)


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


@pytest.mark.parametrize('name', sorted(METAFORMER_BASES))
def test_metaformer_config_changes_only_the_backbone(name):
    cfg, base = load(name).to_dict(), load(METAFORMER_BASES[name]).to_dict()
    backbone, base_backbone = cfg['model'].pop('backbone'), base['model'].pop('backbone')
    del cfg['checkpoint'], base['checkpoint']
    assert cfg == base

    release = 'metaformer_ppaa_s12_224' if 'ppaa' in name else 'metaformer_id_s12'
    assert backbone.pop('init_cfg') == dict(
        type='Pretrained',
        checkpoint=f'https://github.com/sail-sg/poolformer/releases/download/v1.0/{release}.pth.tar')
    assert backbone.pop('type') == 'mmpoolformer.MetaFormer'
    assert backbone.pop('out_indices') == base_backbone['out_indices']
    # the release's settings, but for the reduced attention in stage 2 (84x50 tokens at 1333x800)
    expected = HYBRID_RELEASES[release]
    if 'ppaa' in name:
        assert backbone['token_mixers'][2].pop('sr_ratio') == 2
    if 'id' in name:
        assert 'norm_cfg' not in backbone  # the default, the modified LayerNorm, as the release
        expected = {k: v for k, v in expected.items() if k != 'norm_cfg'}
    assert backbone == expected


@pytest.mark.parametrize('name', sorted(METAFORMER_BASES))
def test_metaformer_backbone_parameters(name):
    backbone = build_detector(load(name)).backbone
    expected = POOLFORMER_S12_BACKBONE + (PPAA_EXTRA if 'ppaa' in name else 0)
    if name.startswith('retinanet'):
        expected -= 2 * 64  # no stage-0 output norm
    assert sum(p.numel() for p in backbone.parameters()) == expected


@pytest.mark.parametrize('name', sorted(MODEL_PARAMS))
def test_parameters(name):
    n_params = sum(p.numel() for p in build_detector(load(name)).parameters())
    assert abs(n_params / 1e6 - MODEL_PARAMS[name]) <= 0.1, n_params


def assert_trains_one_step(model, data):
    """A finite loss, and a gradient for every parameter: all take part, so DDP needs no
    find_unused_parameters."""
    model.train()
    losses = model(**model.data_preprocessor(data, training=True), mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert idle == []


# The S24 and S36 configs differ from S12's in depth only: their parameters are counted above.
@pytest.mark.parametrize('name', sorted(n for n in MODEL_PARAMS if n.endswith('s12')))
def test_train_step_and_prediction(name):
    model = build_detector(load(name))
    torch.manual_seed(0)
    with_mask = name.startswith('mask_rcnn')
    data = det_inputs(with_mask)
    assert_trains_one_step(model, data)

    model.eval()
    with torch.no_grad():
        results = model.test_step(data)
    assert len(results) == 2
    for res, inputs in zip(results, data['inputs']):
        pred = res.pred_instances
        assert pred.bboxes.shape[1] == 4 and len(pred.scores) == len(pred.labels)
        if with_mask:
            assert pred.masks.shape[1:] == res.ori_shape


def test_mask_rcnn_trains_under_cpu_amp():
    """``--amp`` on a CPU: bf16 autocast reaches mmcv's NMS and RoIAlign, whose CPU kernels take fp32
    only (they stopped with "expected scalar type Float but found BFloat16"); our AMP wrapper runs them
    in fp32. Two iterations: finite losses, the backbone moved."""
    from mmengine.optim import build_optim_wrapper
    cfg = load('mask_rcnn_poolformer_s12')
    model = build_detector(cfg)
    model.init_weights()  # (as the runner does)
    optim = build_optim_wrapper(model, dict(cfg.optim_wrapper, type='mmpoolformer.AmpOptimWrapper'))
    before = model.backbone.patch_embed.proj.weight.detach().clone()
    torch.manual_seed(0)
    data = det_inputs(with_mask=True)
    model.train()
    for _ in range(2):
        losses = model.train_step(data, optim)
        assert all(torch.isfinite(v).all() for v in losses.values()), losses
    assert not torch.equal(before, model.backbone.patch_embed.proj.weight)
