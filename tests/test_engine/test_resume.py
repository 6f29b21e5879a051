"""Training that is killed and resumed ends exactly where an uninterrupted run ends (see tiny_project.py
for the tiny project every run trains)."""
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import mmdet
import pytest
import torch

from mmpoolformer.models.weights import read_checkpoint

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


STALL_CONFIG = """
_base_ = './tiny.py'
custom_imports = dict(imports=['mmpoolformer', 'stall_writing_epoch_2'], allow_failed_imports=False)
"""


@pytest.fixture(scope='module')
def stall_config(tiny):
    """tiny.py, stalling while it writes epoch_2.pth."""
    (tiny.root / 'stall_writing_epoch_2.py').write_text(STALL_WRITING_EPOCH_2)
    (tiny.root / 'stall.py').write_text(STALL_CONFIG)
    return tiny.root / 'stall.py'


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


@pytest.fixture(scope='module')
def uninterrupted(tiny):
    work_dir = tiny.root / 'uninterrupted'
    tiny.run(tiny.train_cmd(work_dir))
    final = work_dir / f'epoch_{tiny.epochs}.pth'
    assert read_checkpoint(str(final))['meta']['iter'] == tiny.epochs * tiny.iters_per_epoch
    return final


def test_killed_after_a_checkpoint_resumes_exactly(tiny, uninterrupted, tmp_path):
    work_dir, log = tmp_path / 'work', tmp_path / 'killed.log'
    proc = start(tiny.train_cmd(work_dir), tiny.env(), log)
    wait_for(lambda: osp.isfile(work_dir / 'last_checkpoint'), proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = last_checkpoint(work_dir)
    assert osp.basename(resumed_from) in ('epoch_1.pth', 'epoch_2.pth')
    stripped = read_checkpoint(resumed_from)

    out = tiny.run(tiny.train_cmd(work_dir, '--resume'))
    assert f'Load checkpoint from {resumed_from}' in out
    assert_same_training_state(work_dir / f'epoch_{tiny.epochs}.pth', uninterrupted)

    # The control: the same resume without the generator states ends with other weights, so this
    # test and the next ones do test the restored states.
    del stripped['random_state']
    torch.save(stripped, tmp_path / 'stripped.pth')
    out = tiny.run(tiny.train_cmd(tmp_path / 'control', '--resume', str(tmp_path / 'stripped.pth')))
    assert 'holds no random generator states' in out
    final = read_checkpoint(str(tmp_path / 'control' / f'epoch_{tiny.epochs}.pth'))['state_dict']
    expected = read_checkpoint(str(uninterrupted))['state_dict']
    assert any(not torch.equal(final[k], expected[k]) for k in expected)


def test_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(
        tiny, stall_config, uninterrupted, tmp_path):
    work_dir, log, marker = tmp_path / 'work', tmp_path / 'killed.log', tmp_path / 'stalled'
    proc = start(tiny.train_cmd(work_dir, config=stall_config), tiny.env(STALL_MARKER=str(marker)),
                 log)
    wait_for(marker.exists, proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Half of epoch_2 is on disk, under a temporary name that nothing points at; epoch_1, which
    # max_keep_ckpts=1 replaces by epoch_2, is still there and whole.
    assert not osp.exists(work_dir / 'epoch_2.pth')
    assert [n for n in os.listdir(work_dir) if n.startswith('.epoch_2.pth.')]
    assert last_checkpoint(work_dir) == str(work_dir / 'epoch_1.pth')
    assert read_checkpoint(str(work_dir / 'epoch_1.pth'))['meta']['iter'] == 4

    out = tiny.run(tiny.train_cmd(work_dir, '--resume'))
    assert 'resumed epoch: 1, iter: 4' in out
    assert_same_training_state(work_dir / f'epoch_{tiny.epochs}.pth', uninterrupted)
    # the stray temporary file removed, and the checkpoints kept as max_keep_ckpts says
    assert [n for n in os.listdir(work_dir) if n.endswith(('.tmp', '.pth'))] == [
        f'epoch_{tiny.epochs}.pth']


def test_sigterm_saves_and_exits_cleanly_then_resume_continues_exactly(
        tiny, uninterrupted, tmp_path):
    work_dir, log = tmp_path / 'work', tmp_path / 'terminated.log'
    proc = start(tiny.train_cmd(work_dir), tiny.env(), log)
    # in the middle of the first epoch, as slurm would, at a moment the test does not choose exactly
    wait_for(lambda: 'Epoch(train) [1][2/4]' in open(log).read(), proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=240) == 0, open(log).read()[-3000:]
    out = open(log).read()
    saved = last_checkpoint(work_dir)
    done = int(osp.basename(saved)[len('iter_'):-len('.pth')])
    assert f'SIGTERM: saved {saved} after iteration {done}' in out
    assert read_checkpoint(saved)['meta']['iter'] == done
    assert 2 <= done < tiny.epochs * 4 and f'Epoch(train) [{1 + done // 4}][{done % 4 + 1}/4]' not in out

    out = tiny.run(tiny.train_cmd(work_dir, '--resume'))
    assert f'resumed epoch: {(done - 1) // 4}, iter: {done}' in out
    assert_same_training_state(work_dir / f'epoch_{tiny.epochs}.pth', uninterrupted)
    assert not osp.exists(saved)  # superseded by the later, complete checkpoints


def test_mmdet_stock_train_resumes_a_run_of_ours_exactly(tiny, uninterrupted, tmp_path):
    """mmdet's own tools/train.py --resume continues a run that our tools/train.py started (reading
    mmengine's checkpoint weights-only), and ends where the uninterrupted run ends."""
    work_dir = tmp_path / 'work'
    tiny.run(tiny.train_cmd(work_dir, '--cfg-options', 'train_cfg.max_epochs=1'))
    stock_train = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'train.py')
    out = tiny.run([sys.executable, stock_train, str(tiny.config), '--work-dir', str(work_dir),
                    '--resume'])
    assert 'resumed epoch: 1, iter: 4' in out
    assert_same_training_state(work_dir / f'epoch_{tiny.epochs}.pth', uninterrupted)
