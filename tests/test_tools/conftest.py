"""What the tests of tools/ share."""
import importlib.util
import os.path as osp

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@pytest.fixture(scope='module')
def analysis_tool():
    """A script of tools/analysis (they are scripts, not a package), loaded by name as a module."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(
            name, osp.join(REPO, 'tools', 'analysis', f'{name}.py'))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture
def quick_rates(benchmark, monkeypatch):
    """The machine's rates measured on a small product and copy (seconds, not minutes, in a test),
    by the ``benchmark`` module of the test's own fixture."""
    monkeypatch.setattr(benchmark, 'RATE_PRODUCT_SIZE', 64)
    monkeypatch.setattr(benchmark, 'RATE_COPY_MIB', 1)
