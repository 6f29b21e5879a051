"""Training that is killed and resumed ends exactly where an uninterrupted run ends.

Every run is tools/train.py in its own process, on the bundled shapes data, with a RetinaNet whose
PoolFormer is cut down to one block per stage (the mechanics under test do not depend on its size, the
test's run time does). Random flips (NumPy) and drop path (torch) make each run draw random numbers, so
a resumed run that did not restore the generators would end with other weights.
"""
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import pytest
import torch

from mmpoolformer.demo import generate
from mmpoolformer.models.weights import read_checkpoint

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
EPOCHS = 3  # of 4 iterations each (8 images, batch 2)

TINY_RETINANET = """
_base_ = '{repo}/configs/demo/retinanet_poolformer_s12_shapes.py'
custom_imports = dict(imports=['mmpoolformer'{extra_imports}], allow_failed_imports=False)
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
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=2))
randomness = dict(seed=0, deterministic=True)
"""

# Imported by the run that is to be killed while writing epoch_2.pth: the file is all but renamed into
# place when the write stops (half of it truncated away, as a kill mid-write would leave it).
STALL_WRITING_EPOCH_2 = """
import os
import time

_replace = os.replace


def _stall(src, dst, *args, **kwargs):
    if str(dst).endswith('epoch_2.pth'):
        with open(src, 'r+b') as f:
            f.truncate(os.path.getsize(src) // 2)
        open(os.environ['STALL_MARKER'], 'w').close()
        time.sleep(600)
    return _replace(src, dst, *args, **kwargs)


os.replace = _stall
"""


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    """The shapes data and the tiny configs: ``tiny.py``, and ``stall.py``, which stalls writing
    epoch_2.pth."""
    root = tmp_path_factory.mktemp('resume')
    data = root / 'shapes'
    generate(str(data), {'train': 8, 'val': 4}, size=(96, 128))
    (root / 'stall_writing_epoch_2.py').write_text(STALL_WRITING_EPOCH_2)
    for name, extra in (('tiny.py', ''), ('stall.py', ", 'stall_writing_epoch_2'")):
        (root / name).write_text(
            TINY_RETINANET.format(repo=REPO, data=f'{data}/', epochs=EPOCHS, extra_imports=extra))
    return root


def train_cmd(config, work_dir, *extra):
    return [sys.executable, osp.join(REPO, 'tools/train.py'), str(config), '--work-dir',
            str(work_dir), *extra]


def env_for(project, **extra):
    env = dict(os.environ, **extra)
    env['PYTHONPATH'] = os.pathsep.join([str(project), env.get('PYTHONPATH', '')])
    return env


def run(cmd, env, timeout=300):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def start(cmd, env, log):
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
    assert ckpt['meta']['iter'] == expected['meta']['iter'] == EPOCHS * 4
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


@pytest.fixture(scope='module')
def uninterrupted(project):
    work_dir = project / 'uninterrupted'
    run(train_cmd(project / 'tiny.py', work_dir), env_for(project))
    return work_dir / f'epoch_{EPOCHS}.pth'


def test_killed_after_a_checkpoint_resumes_exactly(project, uninterrupted, tmp_path):
    work_dir, log = tmp_path / 'work', tmp_path / 'killed.log'
    env = env_for(project)
    proc = start(train_cmd(project / 'tiny.py', work_dir), env, log)
    wait_for(lambda: osp.isfile(work_dir / 'last_checkpoint'), proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = last_checkpoint(work_dir)
    assert osp.basename(resumed_from) in ('epoch_1.pth', 'epoch_2.pth')

    out = run(train_cmd(project / 'tiny.py', work_dir, '--resume'), env)
    assert f'Load checkpoint from {resumed_from}' in out
    assert_same_training_state(work_dir / f'epoch_{EPOCHS}.pth', uninterrupted)


def test_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(
        project, uninterrupted, tmp_path):
    work_dir, log, marker = tmp_path / 'work', tmp_path / 'killed.log', tmp_path / 'stalled'
    env = env_for(project, STALL_MARKER=str(marker))
    proc = start(train_cmd(project / 'stall.py', work_dir), env, log)
    wait_for(marker.exists, proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # half of epoch_2 is on disk, under a temporary name; nothing points at it
    assert not osp.exists(work_dir / 'epoch_2.pth')
    assert [n for n in os.listdir(work_dir) if n.startswith('.epoch_2.pth.')]
    assert last_checkpoint(work_dir) == str(work_dir / 'epoch_1.pth')

    out = run(train_cmd(project / 'tiny.py', work_dir, '--resume'), env_for(project))
    assert 'resumed epoch: 1, iter: 4' in out
    assert not [n for n in os.listdir(work_dir) if n.endswith('.tmp')]
    assert_same_training_state(work_dir / f'epoch_{EPOCHS}.pth', uninterrupted)
    # max_keep_ckpts=2: the oldest checkpoint is gone, the last two are whole
    assert sorted(n for n in os.listdir(work_dir) if n.endswith('.pth')) == [
        f'epoch_{EPOCHS - 1}.pth', f'epoch_{EPOCHS}.pth']


def test_resume_without_the_random_state_differs(project, uninterrupted, tmp_path):
    """The control: the same resume from a checkpoint stripped of its generator states ends with other
    weights, so the two tests above do test the restored states."""
    work_dir = tmp_path / 'work'
    work_dir.mkdir()
    ckpt = read_checkpoint(str(uninterrupted.parent / f'epoch_{EPOCHS - 1}.pth'))
    del ckpt['random_state']
    torch.save(ckpt, work_dir / 'stripped.pth')
    out = run(train_cmd(project / 'tiny.py', work_dir, '--resume', str(work_dir / 'stripped.pth')),
              env_for(project))
    assert 'holds no random generator states' in out
    final = read_checkpoint(str(work_dir / f'epoch_{EPOCHS}.pth'))['state_dict']
    expected = read_checkpoint(str(uninterrupted))['state_dict']
    assert any(not torch.equal(final[k], expected[k]) for k in expected)


def test_sigterm_saves_and_exits_cleanly_then_resume_continues_exactly(
        project, uninterrupted, tmp_path):
    work_dir, log = tmp_path / 'work', tmp_path / 'terminated.log'
    env = env_for(project)
    proc = start(train_cmd(project / 'tiny.py', work_dir), env, log)
    # in the middle of the first epoch, as slurm would, at a moment the test does not choose exactly
    wait_for(lambda: 'Epoch(train) [1][2/4]' in open(log).read(), proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=240) == 0, open(log).read()[-3000:]
    out = open(log).read()
    saved = last_checkpoint(work_dir)
    done = int(osp.basename(saved)[len('iter_'):-len('.pth')])
    assert f'SIGTERM: saved {saved} after iteration {done}' in out
    assert read_checkpoint(saved)['meta']['iter'] == done
    assert 2 <= done < EPOCHS * 4 and f'Epoch(train) [{1 + done // 4}][{done % 4 + 1}/4]' not in out

    out = run(train_cmd(project / 'tiny.py', work_dir, '--resume'), env)
    assert f'resumed epoch: {(done - 1) // 4}, iter: {done}' in out
    assert_same_training_state(work_dir / f'epoch_{EPOCHS}.pth', uninterrupted)
    assert not osp.exists(saved)  # superseded by the later, complete checkpoints
