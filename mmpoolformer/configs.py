"""Where our configs are, so that a config in another project can inherit one in one line::

    _base_ = __import__('mmpoolformer').config_path('detection/retinanet_poolformer_s12.py')

mmengine resolves ``pkg::path`` only for the OpenMMLab packages it knows by name, and its lookup of an
installed package's directory fails for editable installs, so ``mmpoolformer::`` cannot work; but it
evaluates the ``_base_`` expression with the builtins available, and an absolute path is a valid base.

Reading a config that inherits ``mmdet::`` / ``mmseg::`` bases is made fast here too (see
:func:`cache_base_lookups`).
"""
import functools
import os
import os.path as osp

import mmengine.config.config as mmengine_config
import mmengine.config.utils as mmengine_config_utils
from mmengine.fileio import load
from mmengine.utils import is_installed

_PACKAGE_DIR = osp.dirname(osp.abspath(__file__))


def config_root() -> str:
    """The ``configs/`` directory: packaged inside a wheel install, beside the package in a checkout."""
    for root in (osp.join(_PACKAGE_DIR, '.mim', 'configs'), osp.join(osp.dirname(_PACKAGE_DIR),
                                                                      'configs')):
        if osp.isdir(root):
            return root
    raise FileNotFoundError(f'mmpoolformer configs not found beside {_PACKAGE_DIR}')


def config_path(name: str) -> str:
    """Absolute path of one of our configs, e.g. ``'detection/retinanet_poolformer_s12.py'``."""
    root = config_root()
    path = osp.join(root, name)
    if not osp.isfile(path):
        available = sorted(
            osp.relpath(osp.join(d, f), root) for d, _, files in os.walk(root) for f in files
            if f.endswith('.py'))
        raise FileNotFoundError(f'no config {name!r} in {root}; available: {available}')
    return path


@functools.lru_cache(maxsize=None)
def _load_unchanged(path: str, modified_ns: int):
    return load(path)


def _load_once(path: str):
    return _load_unchanged(path, os.stat(path).st_mtime_ns)


_installed = set()


def _is_installed_once(package: str) -> bool:
    if package not in _installed and is_installed(package):
        _installed.add(package)
    return package in _installed


def cache_base_lookups() -> None:
    """Look up each package that configs' ``mmdet::`` / ``mmseg::`` bases name once per process.

    For every such base, mmengine checks that the package is installed by reloading
    ``pkg_resources`` (65 ms here), then looks the path up among the models of the package's model
    index, reading the index and every metafile it imports (about 80 YAML files, 0.5 s), and only
    then, not finding it, takes it as a base file. A detection config of ours has four such bases:
    reading it took over 2 s. Here an installed package stays installed and a YAML file is parsed
    again only when it changed. Idempotent; importing ``mmpoolformer`` calls it.
    """
    mmengine_config.is_installed = _is_installed_once
    mmengine_config_utils.load = _load_once
