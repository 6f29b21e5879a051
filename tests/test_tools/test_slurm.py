"""tools/slurm_train.sh and tools/slurm_test.sh on a real slurm (slurm_cluster.py: a private one, on a
partition of CPUs) with two CPU tasks; a job told to stop (scancel --signal=TERM) saves and ends
cleanly, and requeued, resumes by itself and ends exactly as two torchrun processes do uninterrupted."""
import os
import subprocess
import time

import pytest
from tiny_project import REPO, assert_same_training_state, free_port, last_checkpoint

from mmpoolformer.models.weights import read_checkpoint

pytestmark = pytest.mark.dist


def slurm_env(tiny, slurm):
    return slurm.env(tiny.env(GPUS='2', GPUS_PER_NODE='0', CPUS_PER_TASK='1',
                              MASTER_PORT=str(free_port())))


def test_a_job_told_to_stop_saves_requeued_resumes_by_itself_exactly_and_tests(
        tiny, slurm, dist_uninterrupted, tmp_path):
    """sbatch --requeue of slurm_train.sh on a CPU partition (two tasks, no GPUs asked for);
    scancel --signal=TERM while process 0 is in iteration 3: both tasks save iter_3.pth and the job
    ends with status 0. scontrol requeue: the job runs again and resumes. slurm_test.sh then tests
    the trained model. (One job for all of it: each run of the tools costs most of a minute.)"""
    marker, work_dir, log = tmp_path / 'paused', tmp_path / 'work', tmp_path / 'job.log'
    config = tiny.config_with('slurm_paused_in_iteration_3',
                              dict(type='PauseForSigterm', rank=0, iteration=3, marker=str(marker)))
    job = subprocess.run(
        ['sbatch', '--parsable', '--requeue', '--open-mode=append', '-p', slurm.partition, '-n', '2',
         '-c', '1', '-o', str(log), '--wrap',
         f'{REPO}/tools/slurm_train.sh {slurm.partition} preempted {config} {work_dir}'],
        env=slurm_env(tiny, slurm), capture_output=True, text=True, check=True).stdout.strip()

    slurm.wait_for_job(job, ('RUNNING', ), timeout=60)
    while not marker.exists():
        assert slurm.job_state(job)[0] == 'RUNNING', log.read_text()[-3000:]
        time.sleep(0.2)
    slurm.command('scancel', '--signal=TERM', job)
    slurm.wait_for_job(job, ('COMPLETED', 'FAILED', 'CANCELLED'))
    assert slurm.command('scontrol', 'show', 'job', job).count('ExitCode=0:0') == 1, log.read_text()
    assert '--gres' not in log.read_text() and '--ntasks=2' in log.read_text()  # srun, as set -x says
    assert 'distributed on CPU: gloo backend, 2 processes' in log.read_text()
    saved = last_checkpoint(work_dir)
    assert saved == str(work_dir / 'iter_3.pth')
    assert f'SIGTERM: saved {saved} after iteration 3' in log.read_text()
    assert len(read_checkpoint(saved)['random_state']) == 2  # one checkpoint holds both tasks

    # (slurm holds a requeued job back as long as a credential lives: cred_expire, 10 s here)
    slurm.command('scontrol', 'requeue', job)
    assert slurm.wait_for_job(job, ('COMPLETED', 'FAILED')) == ('COMPLETED', 'None'), log.read_text()
    assert f'restart 1: resuming from {saved}' in log.read_text()
    assert_same_training_state(work_dir / f'epoch_{tiny.epochs}.pth', dist_uninterrupted)
    assert os.listdir(work_dir).count('iter_3.pth') == 0  # superseded

    out = tiny.run([f'{REPO}/tools/slurm_test.sh', slurm.partition, 'test', str(tiny.config),
                    str(work_dir / f'epoch_{tiny.epochs}.pth'), '--work-dir', str(tmp_path / 'test')],
                   env=slurm_env(tiny, slurm))
    assert '--ntasks=2' in out and 'coco/bbox_mAP: ' in out
