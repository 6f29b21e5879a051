"""mmpoolformer: PoolFormer and the MetaFormer family as OpenMMLab 2.0 backbones.

Importing it (as our configs do through ``custom_imports``) fills the registries and keeps every
checkpoint read of mmengine's in this process weights-only while letting it read mmengine's own
checkpoints (see :mod:`mmpoolformer.engine.checkpoint`), so that the stock tools of mmdet and mmseg,
their Inferencers and ``Runner.resume`` work on PyTorch >= 2.6. It also makes mmengine look up the
packages that configs' ``mmdet::`` / ``mmseg::`` bases name once per process, not once per base
(:func:`mmpoolformer.configs.cache_base_lookups`).
"""
from .configs import config_path, cache_base_lookups
from .registry import MODELS, TOKEN_MIXERS
from .version import __version__
from . import models  # noqa: F401,E402  (fills the registry)
from .engine.checkpoint import use_safe_checkpoint_loading

use_safe_checkpoint_loading()
cache_base_lookups()

__all__ = ['MODELS', 'TOKEN_MIXERS', 'config_path', '__version__']
