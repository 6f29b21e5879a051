"""Every segmentation config: the paper's recipe, its parameter count, and one training step and one
prediction on synthetic ADE20K-style inputs on CPU."""
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from mmpoolformer import config_path

# Whole-model parameters (millions) in the paper's Table 4.
PAPER_PARAMS = {'s12': 15.7, 's24': 25.1, 's36': 34.6, 'm36': 59.8, 'm48': 77.1}
RELEASE = 'https://github.com/sail-sg/poolformer/releases/download/v1.0/poolformer_{}.pth.tar'


def load(arch):
    return Config.fromfile(config_path(f'segmentation/fpn_poolformer_{arch}.py'))


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


@pytest.mark.parametrize('arch', sorted(PAPER_PARAMS))
def test_train_step_and_prediction(arch):
    cfg = load(arch)
    init_default_scope('mmseg')
    cfg.model.backbone.init_cfg = None
    cfg.model.data_preprocessor.size = (96, 128)  # the crop, small for a CPU test
    model = MODELS.build(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / 1e6 - PAPER_PARAMS[arch]) <= 0.1, n_params

    data = seg_inputs([(96, 128), (96, 128)])
    model.train()
    loss, _ = model.parse_losses(model(**model.data_preprocessor(data, training=True), mode='loss'))
    assert torch.isfinite(loss)
    loss.backward()
    idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert idle == []

    model.eval()
    with torch.no_grad():
        results = model.test_step(seg_inputs([(75, 101)]))
    assert results[0].pred_sem_seg.data.shape == (1, 75, 101)
    assert int(results[0].pred_sem_seg.data.max()) < 150
