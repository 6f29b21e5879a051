import os

import pytest
import torch

# the tiny project's fixtures and the private slurm, for every test module
from slurm_cluster import slurm  # noqa: F401
from tiny_project import (det_checkpoint, dist_uninterrupted, seg_checkpoint, tiny,  # noqa: F401
                          uninterrupted)


def pytest_configure(config):
    """Under pytest-xdist, split the cores between the workers (and the tools they start), so that two
    workers do not each run as many threads as there are cores."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', 1))
    if workers > 1:
        # the cores this process may use, as nproc counts them in run_tests.sh (Linux only)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        threads = max(1, (cores or 1) // workers)
        os.environ['OMP_NUM_THREADS'] = str(threads)  # inherited by the tools' processes
        torch.set_num_threads(threads)


def pytest_sessionstart(session):
    """The kernels time their plans on the first input of a kind and keep the fastest (see
    ``mmpoolformer/kernels/dispatch.py``); tests that compare two computations exactly need the same
    plan every time, which deterministic mode gives (as it gives a resumed training run).
    The ``timed_choices`` fixture lifts it where a test checks the choice itself."""
    torch.use_deterministic_algorithms(True, warn_only=True)


@pytest.fixture
def timed_choices():
    """Lift the suite's deterministic mode and start with no choices made."""
    from mmpoolformer.kernels import dispatch
    torch.use_deterministic_algorithms(False)
    dispatch.reset()
    yield
    dispatch.reset()
    torch.use_deterministic_algorithms(True, warn_only=True)


class _Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


@pytest.fixture
def malicious_checkpoint(tmp_path):
    """A checkpoint whose pickle calls os.system, and the file that appears if it ever runs."""
    marker, path = tmp_path / 'pwned', tmp_path / 'evil.pth'
    torch.save({'state_dict': {'patch_embed.proj.weight': torch.zeros(1)}, 'meta': _Payload(marker)},
               path)
    return path, marker
