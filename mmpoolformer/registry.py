"""The ``mmpoolformer`` model registry.

It is a child of mmengine's root ``MODELS``, so any OpenMMLab 2.0 config (mmdet, mmseg, mmpretrain) can
name our modules with the scope prefix, e.g. ``type='mmpoolformer.PoolFormer'``: mmengine imports this
module for the ``mmpoolformer`` scope and ``locations`` imports the models that fill the registry.
Nothing here imports mmdet or mmseg.

``HOOKS`` holds our runner hooks (``type='mmpoolformer.ResumableCheckpointHook'``); it is a child of
mmengine's root ``HOOKS`` in the same way.

``OPTIM_WRAPPERS`` holds our ``AmpOptimWrapper`` (mmengine's, also on CPUs), the one
``tools/train.py --amp`` names.

``TOKEN_MIXERS`` holds the token mixers a MetaFormer stage can use; register your own there and name it
in ``token_mixers=[dict(type=...)]``.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import Registry

MODELS = Registry(
    'model', parent=MMENGINE_MODELS, scope='mmpoolformer', locations=['mmpoolformer.models'])

HOOKS = Registry(
    'hook', parent=MMENGINE_HOOKS, scope='mmpoolformer', locations=['mmpoolformer.engine'])

OPTIM_WRAPPERS = Registry('optim wrapper', parent=MMENGINE_OPTIM_WRAPPERS, scope='mmpoolformer',
                          locations=['mmpoolformer.engine'])

TOKEN_MIXERS = Registry('token mixer', scope='mmpoolformer', locations=['mmpoolformer.models'])
