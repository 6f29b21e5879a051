"""A private single-node slurm for the tests of tools/slurm_*.sh (the ``slurm`` fixture, made available by
conftest.py): munged, slurmctld and slurmd started from a temporary folder (their own key, config,
spool, state and logs, ports of their own on localhost), one partition of this machine's CPUs, and
stopped at the end; a slurm the machine already runs is never touched (every command gets
``SLURM_CONF``). Skipped without Debian's slurm-wlm and munge, or without root (slurmd starts jobs)."""
import os
import shutil
import socket
import subprocess
import time

import pytest

from tiny_project import free_port

COMMANDS = ('munged', 'slurmctld', 'slurmd', 'srun', 'sbatch', 'scontrol', 'scancel', 'sinfo')
PARTITION = 'debug'

SLURM_CONF = """\
ClusterName=mmpoolformer
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def which(command):
    """The command's path; the daemons are in sbin, which a PATH may leave out."""
    return shutil.which(command, path=os.pathsep.join([os.environ.get('PATH', ''), '/usr/sbin',
                                                       '/sbin']))


def missing():
    """Why the slurm tests cannot run here, or None."""
    absent = [c for c in COMMANDS if which(c) is None]
    if absent:
        return (f'needs Debian\'s slurm-wlm and munge ({", ".join(absent)} not found; apt-get install '
                f'slurm-wlm munge, as .ci/run does)')
    if os.geteuid() != 0:
        return 'needs root: slurmd starts the jobs'
    return None


class SlurmCluster:
    partition = PARTITION

    def __init__(self, root):
        self.root = root
        self.conf = root / 'slurm.conf'

    def env(self, base):
        return dict(base, SLURM_CONF=str(self.conf))

    def command(self, *args):
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env(os.environ),
                              timeout=60, check=True).stdout.strip()

    def job_state(self, job):
        """``(state, reason)`` of a job, e.g. ('PENDING', 'BeginTime')."""
        fields = dict(item.split('=', 1) for item in self.command('scontrol', 'show', 'job', job).split()
                      if '=' in item)
        return fields['JobState'], fields['Reason']

    def wait_for_job(self, job, states, timeout=300):
        deadline = time.time() + timeout
        while (state := self.job_state(job))[0] not in states:
            assert time.time() < deadline, f'job {job} still {state}'
            time.sleep(0.5)
        return state


@pytest.fixture(scope='session')
def slurm(tmp_path_factory):
    reason = missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp('slurm')
    root.chmod(0o700)  # munged refuses a socket folder others may write to
    for folder in ('state', 'spool'):
        (root / folder).mkdir()
    key = root / 'munge.key'
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    node = socket.gethostname().split('.')[0]
    cluster = SlurmCluster(root)
    cluster.conf.write_text(SLURM_CONF.format(
        root=root, node=node, cpus=os.cpu_count(), partition=PARTITION, ctld_port=free_port(),
        slurmd_port=free_port()))
    env = cluster.env(os.environ)
    subprocess.run([which('munged'), f'--key-file={key}', f'--socket={root}/munge.socket',
                    f'--pid-file={root}/munged.pid', f'--log-file={root}/munged.log',
                    f'--seed-file={root}/munge.seed', '--force'], check=True, env=env)
    daemons = [subprocess.Popen([which(daemon), '-D', '-f', str(cluster.conf)] + extra, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
               for daemon, extra in (('slurmctld', ['-i']), ('slurmd', ['-N', node]))]
    try:
        deadline = time.time() + 60
        while cluster.command('sinfo', '-h', '-o', '%t') != 'idle':
            assert time.time() < deadline, (root / 'slurmctld.log').read_text()[-3000:]
            time.sleep(0.5)
        yield cluster
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        os.kill(int((root / 'munged.pid').read_text()), 15)
