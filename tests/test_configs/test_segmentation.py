"""Every segmentation config: the paper's recipe, its parameter count, and one training step and one
prediction on synthetic ADE20K-style inputs on CPU."""
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from test_detection import assert_trains_one_step

from mmpoolformer import config_path
from mmpoolformer.models.metaformer import HYBRID_RELEASES

# Whole-model parameters (millions) in the paper's Table 4.
PAPER_PARAMS = {'s12': 15.7, 's24': 25.1, 's36': 34.6, 'm36': 59.8, 'm48': 77.1}
RELEASE = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_{}.pth.tar'


# The MetaFormer-S12 configs (named by their mixers), each the PoolFormer-S12 one with another backbone,
# and the ImageNet release each starts from.
METAFORMER_RELEASES = {'ppaa': 'metaformer_ppaa_s12_224', 'id': 'metaformer_id_s12'}
# Attention's parameters where pooling has none, in [pool, pool, attention, attention] S12: qkv (3C^2,
# no bias) and proj (C^2 + C) in the 6 + 2 blocks of stages 2 and 3, and stage 2's 14x14 position
# embedding. Identity, like pooling, has none.
PPAA_EXTRA = 6 * (4 * 320**2 + 320) + 2 * (4 * 512**2 + 512) + 320 * 14 * 14
MODEL_PARAMS = dict(PAPER_PARAMS, ppaa=PAPER_PARAMS['s12'] + PPAA_EXTRA / 1e6, id=PAPER_PARAMS['s12'])


def load(arch):
    """``arch``: a PoolFormer arch (``s12``, ...) or the mixers of a MetaFormer-S12 (``ppaa``, ``id``)."""
    family = 'metaformer' if arch in METAFORMER_RELEASES else 'poolformer'
    suffix = '_s12' if family == 'metaformer' else ''
    return Config.fromfile(config_path(f'segmentation/fpn_{family}_{arch}{suffix}.py'))


def seg_inputs(shapes, num_classes=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for h, w in shapes:
        inputs.append(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
        label = torch.randint(0, num_classes, (1, h, w), generator=g)
        label[:, :4] = 255  # some ignored pixels, as reduce_zero_label makes
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w)))
        sample.gt_sem_seg = PixelData(data=label)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize('arch', sorted(PAPER_PARAMS))
def test_recipe(arch):
    cfg = load(arch)
    backbone = cfg.model.backbone
    assert backbone.type == 'mmpoolformer.PoolFormer' and backbone.arch == arch
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=RELEASE.format(arch))
    assert backbone.frozen_stages == -1 and backbone.out_indices == (0, 1, 2, 3)
    assert cfg.model.pretrained is None
    assert cfg.model.neck.out_channels == 256 and cfg.model.neck.num_outs == 4
    head = cfg.model.decode_head
    assert (head.type, head.channels, head.dropout_ratio, head.num_classes) == ('FPNHead', 128, 0.1,
                                                                                150)
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=2e-4, weight_decay=1e-4)
    [poly] = cfg.param_scheduler
    assert (poly.type, poly.power, poly.eta_min, poly.end) == ('PolyLR', 0.9, 0.0, 40000)
    assert cfg.train_cfg.max_iters == 40000 and cfg.train_cfg.val_interval == 4000
    assert cfg.default_hooks.checkpoint.interval == 4000
    assert cfg.train_dataloader.batch_size == 4 and cfg.model.data_preprocessor.size == (512, 512)
    train = {t.type: t for t in cfg.train_dataloader.dataset.pipeline}
    assert train['LoadAnnotations'].reduce_zero_label
    assert train['RandomResize'].scale == (2048, 512)
    assert train['RandomResize'].ratio_range == (0.5, 2.0)
    assert train['RandomCrop'].crop_size == (512, 512) and train['RandomCrop'].cat_max_ratio == 0.75
    assert 'PhotoMetricDistortion' in train and train['RandomFlip'].prob == 0.5
    test = [t.type for t in cfg.test_dataloader.dataset.pipeline]
    assert test[1:3] == ['Resize', 'ResizeToMultiple']
    assert cfg.test_dataloader.dataset.pipeline[2].size_divisor == 32
    assert cfg.val_evaluator.type == 'IoUMetric'


@pytest.mark.parametrize('mixers', sorted(METAFORMER_RELEASES))
def test_metaformer_config_changes_only_the_backbone(mixers):
    cfg, base = load(mixers).to_dict(), load('s12').to_dict()
    backbone, base_backbone = cfg['model'].pop('backbone'), base['model'].pop('backbone')
    del cfg['checkpoint'], base['checkpoint']
    assert cfg == base

    release = METAFORMER_RELEASES[mixers]
    assert backbone.pop('init_cfg') == dict(
        type='Pretrained',
        checkpoint=f'https://github.com/sail-sg/poolformer/releases/download/v1.0/{release}.pth.tar')
    assert backbone.pop('type') == 'mmpoolformer.MetaFormer'
    assert backbone.pop('out_indices') == base_backbone['out_indices'] == (0, 1, 2, 3)
    assert backbone.pop('frozen_stages') == -1
    # exactly the release's settings: at 512x512 attention needs no reduction
    expected = dict(HYBRID_RELEASES[release])
    if mixers == 'id':
        assert 'norm_cfg' not in backbone  # the default, the modified LayerNorm, as the release
        del expected['norm_cfg']
    assert backbone == expected


@pytest.mark.parametrize('arch', sorted(MODEL_PARAMS))
def test_train_step_and_prediction(arch):
    cfg = load(arch)
    init_default_scope('mmseg')
    cfg.model.backbone.init_cfg = None
    cfg.model.data_preprocessor.size = (96, 128)  # the crop, small for a CPU test
    model = MODELS.build(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / 1e6 - MODEL_PARAMS[arch]) <= 0.1, n_params
    if arch in METAFORMER_RELEASES:
        backbone = sum(p.numel() for p in model.backbone.parameters())
        assert backbone == 11_403_200 + (PPAA_EXTRA if arch == 'ppaa' else 0)

    assert_trains_one_step(model, seg_inputs([(96, 128), (96, 128)]))

    model.eval()
    with torch.no_grad():
        results = model.test_step(seg_inputs([(75, 101)]))
    assert results[0].pred_sem_seg.data.shape == (1, 75, 101)
    assert int(results[0].pred_sem_seg.data.max()) < 150
