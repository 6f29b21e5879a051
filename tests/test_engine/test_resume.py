"""Training that is killed, restarted or terminated, and resumed, ends exactly where an uninterrupted run
ends, in one process and in two (see tiny_project.py for the tiny project every run trains, and
fault_injection.py for the faults injected)."""
import os
import os.path as osp
import signal
import sys

import mmdet
import pytest
import torch
from mmengine.config import Config
from tiny_project import assert_same_training_state, last_checkpoint, start, wait_for

from mmpoolformer.engine import resume_after_restart
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


def test_a_killed_process_is_restarted_and_the_run_resumes_by_itself_exactly(
        tiny, dist_uninterrupted, tmp_path):
    """MAX_RESTARTS=1 tools/dist_train.sh: one of the two processes is killed in the second epoch;
    torchrun starts both again, they resume from epoch_1.pth and end as the uninterrupted run."""
    config = tiny.config_with('killed_in_epoch_2', dict(type='KillProcess', rank=1, iteration=4))
    work_dir = tmp_path / 'work'
    out = tiny.run(tiny.dist_train_cmd(work_dir, config=config), env=tiny.dist_env(MAX_RESTARTS='1'))
    assert 'exitcode: -9' in out  # torchrun saw the process killed ...
    assert f'restart 1: resuming from {work_dir}/epoch_1.pth' in out  # ... and started them again
    assert 'resumed epoch: 1, iter: 2' in out
    assert_same_training_state(work_dir / f'epoch_{tiny.epochs}.pth', dist_uninterrupted)


def test_sigterm_to_dist_train_stops_every_process_after_one_iteration_and_exits_cleanly(
        tiny, dist_uninterrupted, tmp_path):
    """SIGTERM to tools/dist_train.sh, while process 0 is in iteration 3 and process 1 waits for it:
    both stop after iteration 3, one checkpoint holds both, the job exits 0, --resume continues."""
    marker, work_dir, log = tmp_path / 'paused', tmp_path / 'work', tmp_path / 'terminated.log'
    config = tiny.config_with('paused_in_iteration_3',
                              dict(type='PauseForSigterm', rank=0, iteration=3, marker=str(marker)))
    env = tiny.dist_env()
    proc = start(tiny.dist_train_cmd(work_dir, config=config), env, log)
    wait_for(marker.exists, proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=240) == 0, open(log).read()[-3000:]
    saved = last_checkpoint(work_dir)
    assert saved == str(work_dir / 'iter_3.pth')
    assert f'SIGTERM: saved {saved} after iteration 3' in open(log).read()
    checkpoint = read_checkpoint(saved)
    assert checkpoint['meta']['iter'] == 3 and len(checkpoint['random_state']) == 2

    out = tiny.run(tiny.dist_train_cmd(work_dir, '--resume'), env=env)
    assert 'resumed epoch: 1, iter: 3' in out and 'skipping the 1 batches trained on' in out
    assert_same_training_state(work_dir / f'epoch_{tiny.epochs}.pth', dist_uninterrupted)
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


@pytest.mark.parametrize('variable', ['TORCHELASTIC_RESTART_COUNT', 'SLURM_RESTART_COUNT'])
def test_a_restart_resumes_from_the_work_dirs_last_checkpoint(variable, tmp_path, monkeypatch):
    """torchrun's restart count and slurm's requeue count alike; the first start, and a restart before
    any checkpoint, start as configured."""
    cfg = Config(dict(work_dir=str(tmp_path), resume=False, load_from='pretrained.pth'))
    monkeypatch.setenv(variable, '0')
    resume_after_restart(cfg)
    assert (cfg.resume, cfg.load_from) == (False, 'pretrained.pth')
    monkeypatch.setenv(variable, '1')
    resume_after_restart(cfg)
    assert (cfg.resume, cfg.load_from) == (False, 'pretrained.pth')
    (tmp_path / 'epoch_1.pth').write_bytes(b'')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_1.pth'))
    resume_after_restart(cfg)
    assert (cfg.resume, cfg.load_from) == (True, str(tmp_path / 'epoch_1.pth'))
