"""The MetaFormer Baselines configs: each is the PoolFormer config of its task with only the backbone
and its weights changed, builds, and (one per task) trains a step and predicts on CPU."""
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

from test_detection import assert_trains_one_step, det_inputs
from test_segmentation import seg_inputs

from mmpoolformer import config_path, models

HF = 'https://huggingface.co/sail/dl/resolve/main/{family}/{family}_{arch}.pth'
# config -> the PoolFormer config it changes the backbone of
CONFIGS = {
    **{f'detection/{model}_{family}_s18': f'detection/{model}_poolformer_s12'
       for model in ('retinanet', 'mask_rcnn') for family in ('convformer', 'caformer')},
    **{f'segmentation/fpn_{family}_s18': 'segmentation/fpn_poolformer_s12'
       for family in ('convformer', 'caformer')},
    **{f'segmentation/fpn_poolformerv2_{arch}': f'segmentation/fpn_poolformer_{arch}'
       for arch in ('s12', 's24', 's36')},
}
FAMILIES = {'convformer': 'ConvFormer', 'caformer': 'CAFormer', 'poolformerv2': 'PoolFormerV2'}


def load(name):
    return Config.fromfile(config_path(f'{name}.py'))


def build(cfg):
    init_default_scope(cfg.default_scope)
    cfg.model.backbone.init_cfg = None  # no download in tests
    return MODELS.build(cfg.model)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_changes_only_the_backbone_and_builds_it(name):
    config, base = load(name), load(CONFIGS[name])
    cfg, base = config.to_dict(), base.to_dict()
    backbone, base_backbone = cfg['model'].pop('backbone'), base['model'].pop('backbone')
    del cfg['checkpoint'], base['checkpoint']
    assert cfg == base  # neck (the widths are PoolFormer's), heads, data, schedule, hooks

    family, arch = name.split('/')[1].split('_')[-2:]
    assert backbone.pop('type') == f'mmpoolformer.{FAMILIES[family]}'
    assert backbone.pop('arch') == arch
    assert backbone.pop('init_cfg') == dict(type='Pretrained',
                                            checkpoint=HF.format(family=family, arch=arch))
    for key in ('type', 'arch', 'init_cfg'):
        base_backbone.pop(key)
    assert backbone == base_backbone  # out_indices, frozen_stages as the recipe

    # the whole model builds, with the family's backbone as built on its own
    model = build(config)
    assert type(model.backbone).__name__ == FAMILIES[family]
    expected = getattr(models, FAMILIES[family])(arch=arch, **backbone)
    assert model.backbone.state_dict().keys() == expected.state_dict().keys()


@pytest.mark.parametrize('name', ['detection/retinanet_caformer_s18',
                                  'detection/mask_rcnn_convformer_s18',
                                  'segmentation/fpn_poolformerv2_s12'])
def test_train_step_and_prediction(name):
    cfg = load(name)
    torch.manual_seed(0)
    if cfg.default_scope == 'mmdet':
        data = det_inputs(with_mask=name.startswith('detection/mask_rcnn'))
    else:
        cfg.model.data_preprocessor.size = (96, 128)  # the crop, small for a CPU test
        data = seg_inputs([(96, 128), (96, 128)])
    model = build(cfg)
    assert_trains_one_step(model, data)
    model.eval()
    with torch.no_grad():
        assert len(model.test_step(data)) == 2
