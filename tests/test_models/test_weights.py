"""Released layouts load onto our backbone and reproduce their models' outputs.

The oracles are independent implementations: timm's ``poolformer_s12`` (timm layout) and mmpretrain's
``PoolFormer`` (the official layout, which mmpretrain keeps). Checkpoint files are written from their
real state dicts, in each release's wrapping.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from mmpretrain.models.backbones import PoolFormer as MMPretrainPoolFormer

from mmpoolformer.models import PoolFormer
from mmpoolformer.models.weights import CheckpointError, load_pretrained
from mmpoolformer.testing import max_rel_err, randomize_weights

OUTPUT_NORMS = [f'norm{i}.{p}' for i in (0, 2, 4, 6) for p in ('weight', 'bias')]



def randomize(model, seed=0):
    randomize_weights(model, seed).eval()  # not chained: mmpretrain's train() returns None
    return model


def reset_output_norms(model):
    for i in (0, 2, 4, 6):
        norm = getattr(model, f'norm{i}')
        torch.nn.init.ones_(norm.weight)
        torch.nn.init.zeros_(norm.bias)


@pytest.fixture(scope='module')
def x():
    return torch.randn(2, 3, 83, 109, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def mmpretrain_dense():
    """The official dense layout: mmpretrain's port keeps the official module names."""
    return randomize(MMPretrainPoolFormer(arch='s12', out_indices=(0, 2, 4, 6), frozen_stages=-1))


@pytest.fixture(scope='module')
def timm_s12():
    return randomize(timm.create_model('poolformer_s12', pretrained=False), seed=2)


def timm_stage_outputs(model, x):
    outs, x = [], model.stem(x)
    for stage in model.stages:
        x = stage(x)
        outs.append(x)
    return outs


def test_official_layout_parity_with_mmpretrain(mmpretrain_dense, x):
    ours = PoolFormer('s12').eval()
    ours.load_state_dict(mmpretrain_dense.state_dict(), strict=True)
    with torch.no_grad():
        for a, b in zip(ours(x), mmpretrain_dense(x)):
            assert a.shape == b.shape and max_rel_err(a, b) <= 1e-5


def test_timm_layout_parity_with_timm(timm_s12, x, tmp_path):
    path = tmp_path / 'timm_poolformer_s12.pth'
    torch.save(timm_s12.state_dict(), path)
    ours = randomize(PoolFormer('s12'), seed=3)  # output norms random too, everything else loaded
    report = load_pretrained(ours, str(path))
    assert report.layout == 'timm'
    assert report.missing == OUTPUT_NORMS and report.unexpected == []
    assert sorted(report.dropped) == ['head.fc.bias', 'head.fc.weight', 'head.norm.bias',
                                      'head.norm.weight']
    with torch.no_grad():
        expected = [
            F.group_norm(f, 1, getattr(ours, f'norm{2 * i}').weight, getattr(ours, f'norm{2 * i}').bias)
            for i, f in enumerate(timm_stage_outputs(timm_s12, x))]
        for a, b in zip(ours(x), expected):
            assert max_rel_err(a, b) <= 1e-5


def official_imagenet(sd):
    """poolformer_s12.pth.tar: a raw state dict with the classifier's norm and head."""
    out = {k: v for k, v in sd.items() if not k.startswith('norm')}
    out.update({'norm.weight': sd['norm6.weight'], 'norm.bias': sd['norm6.bias'],
                'head.weight': torch.randn(1000, 512), 'head.bias': torch.randn(1000)})
    return out


def mmpretrain_classifier(sd):
    out = {f'backbone.{k}': v for k, v in sd.items() if not k.startswith(('norm0', 'norm2', 'norm4'))}
    out.update({'head.fc.weight': torch.randn(1000, 512), 'head.fc.bias': torch.randn(1000)})
    return {'meta': {'mmpretrain_version': '1.0.0', 'epoch': 300}, 'state_dict': out}


def mmdet2_retinanet(sd):
    out = {f'backbone.{k}': v for k, v in sd.items()}
    out.update({'neck.lateral_convs.0.conv.weight': torch.randn(256, 128, 1, 1),
                'bbox_head.retina_cls.weight': torch.randn(720, 256, 3, 3)})
    return {'meta': {'mmdet_version': '2.19.0', 'CLASSES': ['person']}, 'state_dict': out,
            'optimizer': {'state': {}, 'param_groups': []}}


@pytest.mark.parametrize('wrap, layout, imagenet', [
    (official_imagenet, 'official', True),
    (mmpretrain_classifier, 'mmpretrain', True),
    (mmdet2_retinanet, 'official dense (mmdet / mmseg)', False),
])
def test_official_family_layouts_load_through_init_cfg(wrap, layout, imagenet, x, tmp_path):
    source = randomize(MMPretrainPoolFormer(arch='s12', out_indices=(0, 2, 4, 6), frozen_stages=-1))
    if imagenet:  # ImageNet files have no output norms: ours stay identity, so must the oracle's
        reset_output_norms(source)
    path = tmp_path / 'ckpt.pth'
    torch.save(wrap(source.state_dict()), path)

    ours = PoolFormer('s12')
    report = load_pretrained(ours, str(path))
    assert report.layout == layout
    assert report.missing == (OUTPUT_NORMS if imagenet else []) and report.unexpected == []

    ours = PoolFormer('s12', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    ours.init_weights()
    with torch.no_grad():
        for a, b in zip(ours.eval()(x), source(x)):
            assert max_rel_err(a, b) <= 1e-5


def test_mismatched_arch_lists_the_shapes(tmp_path):
    path = tmp_path / 'm36.pth'
    torch.save(PoolFormer('m36').state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(PoolFormer('s12'), str(path))
    assert 'patch_embed.proj.weight: checkpoint (96, 3, 7, 7) vs model (64, 3, 7, 7)' in str(info.value)


def test_unknown_layout_is_refused(tmp_path):
    path = tmp_path / 'resnet.pth'
    torch.save({'conv1.weight': torch.randn(64, 3, 7, 7)}, path)
    with pytest.raises(CheckpointError, match='unrecognised checkpoint layout.*conv1.weight'):
        load_pretrained(PoolFormer('s12'), str(path))


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / 'poolformer_s12.pth.tar'
    torch.save(PoolFormer('s12').state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=f'cannot read checkpoint {path}: .*truncated'):
        load_pretrained(PoolFormer('s12'), str(path))


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match='checkpoint not found: .*nope.pth'):
        load_pretrained(PoolFormer('s12'), str(tmp_path / 'nope.pth'))


def test_malicious_pickle_is_refused_and_never_runs(malicious_checkpoint):
    path, marker = malicious_checkpoint
    with pytest.raises(CheckpointError, match='refusing to load .*evil.pth'):
        load_pretrained(PoolFormer('s12'), str(path))
    assert not marker.exists()


def test_mmengine_checkpoint_types_load_but_foreign_history_methods_are_refused(tmp_path):
    import numpy as np
    from mmengine.logging import HistoryBuffer
    from mmpoolformer.models.weights import read_checkpoint

    buffer = HistoryBuffer()
    buffer.update(np.float64(1.5))
    path = tmp_path / 'mmengine.pth'
    torch.save({'message_hub': {'log_scalars': {'loss': buffer}}, 'state_dict': {}}, path)
    loaded = read_checkpoint(str(path))
    assert loaded['message_hub']['log_scalars']['loss'].mean() == 1.5

    # getattr is allowed (HistoryBuffer pickles its methods with it), so a file could smuggle another
    # callable into the statistics table that mmengine calls: the reader undoes it and refuses
    table = dict(HistoryBuffer._statistics_methods)
    evil = HistoryBuffer()
    evil.__dict__['_statistics_methods'] = {'mean': np.ndarray.tofile}
    torch.save({'message_hub': {'log_scalars': {'loss': evil}}}, path)
    with pytest.raises(CheckpointError, match=r"replaces HistoryBuffer statistics methods \['mean'\]"):
        read_checkpoint(str(path))
    assert HistoryBuffer._statistics_methods == table
