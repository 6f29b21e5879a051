"""mmpoolformer: PoolFormer and the MetaFormer family as OpenMMLab 2.0 backbones."""
from .configs import config_path
from .registry import MODELS, TOKEN_MIXERS
from .version import __version__
from . import models  # noqa: F401,E402  (fills the registry)

__all__ = ['MODELS', 'TOKEN_MIXERS', 'config_path', '__version__']
