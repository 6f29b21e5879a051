"""tools/convert_checkpoint.py and the loading of released checkpoints by tools/test.py.

Synthetic checkpoints carry random tensors under the released key names and shapes, in each release's
wrapping: mmdet 2.x detectors and mmseg 0.x segmentors (``state_dict`` + ``meta``, the backbone in the
official layout under ``backbone.``, RetinaNet with the stage-0 output norm that ours does not build),
and the ImageNet backbones (official, timm, mmpretrain)."""
import os.path as osp
import subprocess
import sys

import pytest
import timm
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

from mmpoolformer import config_path
from mmpoolformer.demo import generate
from mmpoolformer.models import PoolFormer
from mmpoolformer.models.weights import read_checkpoint

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONVERT = osp.join(REPO, 'tools', 'convert_checkpoint.py')

# Names in the released mmdet 2.x / mmseg 0.x checkpoints that mmdet 3.x / mmseg 1.x must still use.
RELEASED_NAMES = {
    'detection/retinanet_poolformer_s12.py': [
        'neck.lateral_convs.0.conv.weight', 'neck.fpn_convs.4.conv.weight',
        'bbox_head.cls_convs.3.conv.weight', 'bbox_head.retina_cls.weight',
        'bbox_head.retina_reg.bias'],
    'detection/mask_rcnn_poolformer_s12.py': [
        'rpn_head.rpn_conv.weight', 'rpn_head.rpn_cls.weight', 'rpn_head.rpn_reg.weight',
        'roi_head.bbox_head.shared_fcs.1.weight', 'roi_head.bbox_head.fc_cls.weight',
        'roi_head.mask_head.convs.3.conv.weight', 'roi_head.mask_head.upsample.weight',
        'roi_head.mask_head.conv_logits.weight', 'backbone.norm0.weight'],
    'segmentation/fpn_poolformer_s12.py': [
        'decode_head.scale_heads.3.2.conv.weight', 'decode_head.scale_heads.0.0.bn.running_mean',
        'decode_head.conv_seg.weight', 'neck.lateral_convs.3.conv.weight'],
}


def build(config, **backbone):
    cfg = Config.fromfile(config_path(config))
    cfg.model.backbone.init_cfg = None
    cfg.model.backbone.update(backbone)
    init_default_scope(cfg.default_scope)
    return MODELS.build(cfg.model)


def randomized(state_dict, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.1 if v.is_floating_point() else v)
            for k, v in state_dict.items()}


def released_dense(config):
    """A released detector / segmentor: the official dense backbone with all four output norms."""
    sd = build(config, out_indices=(0, 1, 2, 3)).state_dict()
    return {'meta': {'mmdet_version': '2.19.0', 'CLASSES': ('person', 'car'), 'epoch': 12},
            'state_dict': randomized(sd), 'optimizer': {'state': {}, 'param_groups': []}}


def convert(*args):
    proc = subprocess.run([sys.executable, CONVERT, *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize('config', sorted(RELEASED_NAMES))
def test_dense_checkpoints_convert_and_load_strictly(config, tmp_path):
    src, dst, again = tmp_path / 'released.pth', tmp_path / 'ours.pth', tmp_path / 'again.pth'
    released = released_dense(config)
    torch.save(released, src)
    code, out = convert(src, dst, '--config', config_path(config))
    assert code == 0, out
    assert 'official dense (mmdet / mmseg) layout' in out

    model = build(config)
    own = model.state_dict()
    assert set(RELEASED_NAMES[config]) <= set(own) | {'backbone.norm0.weight'}
    converted = read_checkpoint(str(dst))
    model.load_state_dict(converted['state_dict'], strict=True)
    if config.startswith('detection/retinanet'):
        assert "dropped (not in retinanet_poolformer_s12.py's model): ['backbone.norm0.weight', " \
            "'backbone.norm0.bias']" in out
    assert converted['meta']['CLASSES'] == ('person', 'car')

    # the backbone computes what the released weights in the official layout compute
    official = PoolFormer('s12', out_indices=model.backbone.out_indices).eval()
    official.load_state_dict({k[9:]: v for k, v in released['state_dict'].items()
                              if k.startswith('backbone.') and k[9:] in official.state_dict()})
    x = torch.randn(1, 3, 67, 93)
    with torch.no_grad():
        for a, b in zip(model.backbone.eval()(x), official(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    code, out = convert(dst, again)  # converting twice changes nothing
    assert code == 0, out
    twice = read_checkpoint(str(again))
    assert twice['meta'] == converted['meta'] and list(twice['state_dict']) == list(
        converted['state_dict'])
    assert all(torch.equal(v, converted['state_dict'][k]) for k, v in twice['state_dict'].items())


def imagenet_files(tmp_path):
    ours = PoolFormer('s12', out_indices=(3, ))
    sd = randomized(ours.state_dict())
    official = {k: v for k, v in sd.items() if not k.startswith('norm6')}
    official.update({'norm.weight': sd['norm6.weight'], 'norm.bias': sd['norm6.bias'],
                     'head.weight': torch.randn(1000, 512), 'head.bias': torch.randn(1000)})
    mmpretrain = {'meta': {'mmpretrain_version': '1.0.0'},
                  'state_dict': {**{f'backbone.{k}': v for k, v in sd.items()},
                                 'head.fc.weight': torch.randn(1000, 512),
                                 'head.fc.bias': torch.randn(1000)}}
    t = timm.create_model('poolformer_s12')
    t.load_state_dict({**randomized(t.state_dict(), seed=1)})
    files = {}
    for name, obj in [('official', official), ('mmpretrain', mmpretrain), ('timm', t.state_dict())]:
        files[name] = tmp_path / f'{name}.pth'
        torch.save(obj, files[name])
    return files


def test_imagenet_checkpoints_become_backbone_weights(tmp_path):
    for layout, src in imagenet_files(tmp_path).items():
        dst = tmp_path / f'{layout}_converted.pth'
        config = ['--config', config_path('detection/mask_rcnn_poolformer_s12.py')]
        code, out = convert(src, dst, *(config if layout == 'official' else []))
        assert code == 0, out
        assert f'{layout} layout' in out
        state_dict = read_checkpoint(str(dst))['state_dict']
        assert not any(k.startswith(('head', 'norm.')) for k in state_dict)
        result = PoolFormer('s12').load_state_dict(state_dict, strict=False)
        assert result.unexpected_keys == []
        assert result.missing_keys == [f'norm{i}.{p}' for i in (0, 2, 4, 6) for p in ('weight', 'bias')]


@pytest.mark.parametrize('config, release', [
    ('detection/retinanet_metaformer_ppaa_s12.py', 'metaformer_ppaa_s12_224'),
    ('segmentation/fpn_metaformer_id_s12.py', 'metaformer_id_s12'),
])
def test_hybrid_imagenet_releases_convert_for_their_configs(config, release, tmp_path):
    """An official hybrid ImageNet file (its release's names, the position embedding at network.4)
    becomes the backbone weights of our config, and what the config builds loads it strictly."""
    sd = randomized(MODELS.build(dict(type=f'mmpoolformer.{release}', out_indices=(3, ))).state_dict())
    official = {k: v for k, v in sd.items() if not k.startswith('norm6')}
    official.update({'norm.weight': sd['norm6.weight'], 'norm.bias': sd['norm6.bias'],
                     'head.weight': torch.randn(1000, 512), 'head.bias': torch.randn(1000)})
    src, dst = tmp_path / f'{release}.pth.tar', tmp_path / 'backbone.pth'
    torch.save(official, src)
    code, out = convert(src, dst, '--config', config_path(config))
    assert code == 0, out
    assert 'official layout' in out
    assert "dropped (not part of the model): ['norm.weight', 'norm.bias', 'head.weight', 'head.bias']" \
        in out
    state_dict = read_checkpoint(str(dst))['state_dict']
    backbone = build(config).backbone
    result = backbone.load_state_dict(state_dict, strict=False)
    assert result.unexpected_keys == []
    norms = [f'norm{2 * i}.{p}' for i in backbone.out_indices for p in ('weight', 'bias')]
    assert result.missing_keys == norms  # the output norms: not part of an ImageNet model
    assert ('network.4.pos_embed' in state_dict) == ('ppaa' in release)
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in state_dict.items())


def test_unknown_layout_is_refused(tmp_path):
    torch.save({'state_dict': {'conv1.weight': torch.zeros(64, 3, 7, 7)}}, tmp_path / 'r50.pth')
    code, out = convert(tmp_path / 'r50.pth', tmp_path / 'out.pth')
    assert code != 0 and 'unrecognised checkpoint layout: expected the official names' in out
    assert not (tmp_path / 'out.pth').exists()


def test_malicious_and_truncated_files_are_refused(malicious_checkpoint, tmp_path):
    evil, marker = malicious_checkpoint
    code, out = convert(evil, tmp_path / 'out.pth')
    assert code != 0 and 'refusing to load' in out and 'GLOBAL posix.system' in out
    assert len(out.strip().splitlines()) == 1
    assert not marker.exists()

    data = (tmp_path / 'good.pth')
    torch.save(PoolFormer('s12').state_dict(), data)
    (tmp_path / 'cut.pth').write_bytes(data.read_bytes()[:100000])
    code, out = convert(tmp_path / 'cut.pth', tmp_path / 'out.pth')
    assert code != 0 and f'cannot read checkpoint {tmp_path / "cut.pth"}' in out
    assert len(out.strip().splitlines()) == 1


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    generate(str(root), {'train': 2, 'val': 2}, size=(96, 128))
    return str(root) + '/'


def run_test_tool(checkpoint, data_root, work_dir):
    config = osp.join(REPO, 'configs/demo/retinanet_poolformer_s12_shapes.py')
    ann = data_root + 'annotations/instances_val.json'
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools/test.py'), config, str(checkpoint), '--work-dir',
         str(work_dir), '--cfg-options', f'test_dataloader.dataset.data_root={data_root}',
         f'test_evaluator.ann_file={ann}'],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_test_tool_loads_a_released_detector_directly(shapes, tmp_path):
    released = released_dense('demo/retinanet_poolformer_s12_shapes.py')
    torch.save(released, tmp_path / 'released.pth')
    code, out = run_test_tool(tmp_path / 'released.pth', shapes, tmp_path / 'work')
    assert code == 0, out[-3000:]
    assert 'unexpected key in source state_dict: backbone.norm0.weight' in out
    assert 'Epoch(test)' in out


def test_test_tool_refuses_an_imagenet_backbone_with_the_way_out(shapes, tmp_path):
    src = imagenet_files(tmp_path)['official']
    code, out = run_test_tool(src, shapes, tmp_path / 'work')
    assert code != 0
    assert 'is an ImageNet backbone (official layout), not a whole model' in out
    assert 'model.backbone.init_cfg.checkpoint' in out
