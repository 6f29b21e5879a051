"""mmengine's checkpoint reads, made weights-only.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since PyTorch 2.6 that means weights-only
with no allow-list, which rejects mmengine's own checkpoints (their message hub holds ``HistoryBuffer``
objects and numpy arrays), so ``--resume`` and testing a local checkpoint fail. Turning weights-only
off would let any downloaded file run code. Instead, every scheme mmengine reads through goes to
:func:`mmpoolformer.models.weights.read_checkpoint`, which allows exactly the types that mmengine's own
checkpoints contain.
"""
from mmengine.runner import CheckpointLoader

from ..models.weights import read_checkpoint


def _load_local(filename, map_location=None):
    return read_checkpoint(filename, map_location=map_location)


def _load_http(filename, map_location=None, model_dir=None, progress=False):
    return read_checkpoint(filename, map_location=map_location, model_dir=model_dir)


def use_safe_checkpoint_loading() -> None:
    """Route mmengine's local and http(s) checkpoint reads through our weights-only reader."""
    CheckpointLoader.register_scheme(prefixes='', loader=_load_local, force=True)
    CheckpointLoader.register_scheme(
        prefixes=('http://', 'https://'), loader=_load_http, force=True)
