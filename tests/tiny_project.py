"""A tiny project shared by the tests of training, resuming and inference (the ``tiny`` fixture, made
available by conftest.py): the bundled shapes data, a RetinaNet and a Semantic FPN whose PoolFormer is
cut down to one block per stage (the mechanics under test do not depend on its size, the tests' run time
does), trained with tools/train.py (or tools/dist_train.sh, two CPU processes) in their own processes;
and what the tests of interrupted runs share: the uninterrupted runs to compare with, and the
comparison."""
import fcntl
import os
import os.path as osp
import socket
import subprocess
import sys
import time

import pytest
import torch

from mmpoolformer.demo import generate
from mmpoolformer.models.weights import read_checkpoint

TESTS = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(TESTS)
EPOCHS = 3  # of 4 iterations each (8 images, batch 2)

# Random flips (NumPy) and drop path (torch) make every run draw random numbers.
TINY_RETINANET = """
_base_ = '{repo}/configs/demo/retinanet_poolformer_s12_shapes.py'
model = dict(
    backbone=dict(arch=dict(_delete_=True, depths=[1, 1, 1, 1], embed_dims=[8, 16, 32, 64]),
                  drop_path_rate=0.2),
    neck=dict(in_channels=[16, 32, 64], out_channels=16),
    bbox_head=dict(in_channels=16, feat_channels=16, stacked_convs=1),
    test_cfg=dict(score_thr=0.0))
scale = (96, 64)
train_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root='{data}', pipeline=[
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='Resize', scale=scale, keep_ratio=True),
        dict(type='RandomFlip', prob=0.5),
        dict(type='PackDetInputs'),
    ]))
val_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root='{data}', pipeline=[
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=scale, keep_ratio=True),
        dict(type='LoadAnnotations', with_bbox=True),
        dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                              'scale_factor')),
    ]))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file='{data}annotations/instances_val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs={epochs}, val_interval=1)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=1))
randomness = dict(seed=0, deterministic=True)
"""


# The Semantic FPN demo, cut down alike, for 2 iterations.
TINY_FPN = """
_base_ = '{repo}/configs/demo/fpn_poolformer_s12_shapes.py'
model = dict(
    backbone=dict(arch=dict(_delete_=True, depths=[1, 1, 1, 1], embed_dims=[8, 16, 32, 64])),
    neck=dict(in_channels=[8, 16, 32, 64], out_channels=16),
    decode_head=dict(in_channels=[16, 16, 16, 16], channels=16))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root='{data}'))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root='{data}'))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=2, val_interval=2)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=2))
"""


class TinyProject:
    """``root/shapes/`` (data), ``root/tiny.py`` (config) and ``root/tiny_fpn.py`` (a segmentation
    config); configs written next to them may inherit them (``_base_ = './tiny.py'``) and import
    modules from ``root`` (custom_imports)."""

    epochs, iters_per_epoch = EPOCHS, 4

    def __init__(self, root):
        self.root = root
        self.data = root / 'shapes'
        self.config = root / 'tiny.py'
        self.seg_config = root / 'tiny_fpn.py'

    def train_cmd(self, work_dir, *extra, config=None):
        return [sys.executable, osp.join(REPO, 'tools/train.py'), str(config or self.config),
                '--work-dir', str(work_dir), *extra]

    def dist_train_cmd(self, work_dir, *extra, config=None):
        """Two CPU processes through torchrun (``dist_env`` gives them a port of their own)."""
        return [osp.join(REPO, 'tools/dist_train.sh'), str(config or self.config), '2', '--work-dir',
                str(work_dir), *extra]

    def env(self, **extra):
        """The tools' environment: modules in ``root`` and in tests/ (fault_injection.py) import."""
        env = dict(os.environ, **extra)
        env['PYTHONPATH'] = os.pathsep.join([str(self.root), TESTS, env.get('PYTHONPATH', '')])
        return env

    def config_with(self, name, *hooks, **settings):
        """``root/<name>.py``: tiny.py with the fault-injection ``hooks`` (dicts) and ``settings``."""
        lines = ["_base_ = './tiny.py'",
                 "custom_imports = dict(imports=['mmpoolformer', 'fault_injection'], "
                 "allow_failed_imports=False)",
                 f'custom_hooks = {list(hooks)!r}']
        lines += [f'{key} = {value!r}' for key, value in settings.items()]
        path = self.root / f'{name}.py'
        path.write_text('\n'.join(lines) + '\n')
        return path

    def dist_env(self, **extra):
        return self.env(PORT=str(free_port()), **extra)

    def run(self, cmd, env=None, expect=0, timeout=300):
        """Run ``cmd``, check its exit status, and return its output."""
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env or self.env(),
                              timeout=timeout)
        out = proc.stdout + proc.stderr
        assert (proc.returncode == 0) == (expect == 0), out[-3000:]
        return out


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start(cmd, env, log):
    """Start ``cmd`` in the background, its output going to the file ``log``."""
    return subprocess.Popen(cmd, stdout=open(log, 'w'), stderr=subprocess.STDOUT, env=env)


def wait_for(condition, proc, log, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f'the run ended early:\n{open(log).read()[-3000:]}'
        assert time.time() < deadline, f'timed out:\n{open(log).read()[-3000:]}'
        time.sleep(0.1)


def last_checkpoint(work_dir):
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return f.read()


def assert_same_training_state(path, expected_path):
    """Every tensor of the model and of the optimizer equal, and the same iteration."""
    ckpt, expected = read_checkpoint(str(path)), read_checkpoint(str(expected_path))
    assert ckpt['meta']['iter'] == expected['meta']['iter']
    for part in ('state_dict', 'optimizer', 'param_schedulers'):
        assert_equal(ckpt[part], expected[part], part)


def assert_equal(a, b, where):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f'{where}[{i}]')
    else:
        assert a == b, where


@pytest.fixture(scope='session')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny_project')
    generate(str(root / 'shapes'), {'train': 8, 'val': 4}, size=(96, 128))
    (root / 'tiny.py').write_text(TINY_RETINANET.format(repo=REPO, data=f'{root}/shapes/', epochs=EPOCHS))
    (root / 'tiny_fpn.py').write_text(TINY_FPN.format(repo=REPO, data=f'{root}/shapes/'))
    return TinyProject(root)


@pytest.fixture(scope='session')
def det_checkpoint(tiny, tmp_path_factory):
    """A RetinaNet checkpoint written by our tools/train.py (1 epoch); tests only read it."""
    work_dir = once_for_all_workers(
        tmp_path_factory, 'det_1_epoch',
        lambda work_dir: tiny.run(tiny.train_cmd(work_dir, '--cfg-options', 'train_cfg.max_epochs=1')))
    return work_dir / 'epoch_1.pth'


@pytest.fixture(scope='session')
def seg_checkpoint(tiny, tmp_path_factory):
    """A Semantic FPN checkpoint written by our tools/train.py (2 iterations); tests only read it."""
    work_dir = once_for_all_workers(
        tmp_path_factory, 'seg_2_iters',
        lambda work_dir: tiny.run(tiny.train_cmd(work_dir, config=tiny.seg_config)))
    return work_dir / 'iter_2.pth'


def once_for_all_workers(tmp_path_factory, name, make):
    """``make(folder)`` run once in the test session, by whichever pytest-xdist worker asks first (the
    others wait for it and take its folder): for the runs that tests only compare with."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        base = base.parent  # the workers' folders are in it
    folder, done = base / name, base / f'{name}.done'
    with open(base / f'{name}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope='session')
def uninterrupted(tiny, tmp_path_factory):
    """The last checkpoint of the tiny RetinaNet trained without interruption, in one process."""
    work_dir = once_for_all_workers(tmp_path_factory, 'uninterrupted',
                                    lambda work_dir: tiny.run(tiny.train_cmd(work_dir)))
    final = work_dir / f'epoch_{tiny.epochs}.pth'
    assert read_checkpoint(str(final))['meta']['iter'] == tiny.epochs * tiny.iters_per_epoch
    return final


@pytest.fixture(scope='session')
def dist_uninterrupted(tiny, tmp_path_factory):
    """The same, in two CPU processes through tools/dist_train.sh: 2 iterations an epoch."""

    def train(work_dir):
        out = tiny.run(tiny.dist_train_cmd(work_dir), env=tiny.dist_env())
        assert 'distributed on CPU: gloo backend, 2 processes' in out
        assert f'Epoch(val) [{tiny.epochs}][1/1]    coco/bbox_mAP: ' in out  # evaluated across both

    final = once_for_all_workers(tmp_path_factory, 'dist_uninterrupted', train) / (
        f'epoch_{tiny.epochs}.pth')
    checkpoint = read_checkpoint(str(final))
    assert checkpoint['meta']['iter'] == tiny.epochs * tiny.iters_per_epoch // 2
    assert len(checkpoint['random_state']) == 2  # the generators of both processes
    return final
