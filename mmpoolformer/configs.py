"""Where our configs are, so that a config in another project can inherit one in one line::

    _base_ = __import__('mmpoolformer').config_path('detection/retinanet_poolformer_s12.py')

mmengine resolves ``pkg::path`` only for the OpenMMLab packages it knows by name, and its lookup of an
installed package's directory fails for editable installs, so ``mmpoolformer::`` cannot work; but it
evaluates the ``_base_`` expression with the builtins available, and an absolute path is a valid base.
"""
import os
import os.path as osp

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
