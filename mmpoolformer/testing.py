"""What parity checks share: the tests and ``tools/analysis/benchmark.py`` compare implementations."""
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode


def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a value far from its init, in place, and return the model.

    LayerScale (any parameter named ``*scale*``) is drawn from [0.5, 1): at its init of 1e-5 a wrong
    block would change the output by less than the tolerance of a comparison. Norm weights are near 1
    and biases near 0, matrices have unit gain, position embeddings are of the order of the features.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'scale' in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
            elif 'pos_embed' in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + ('weight' in name))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel()**0.5)
    return model


def max_rel_err(a, b) -> float:
    """The largest difference between ``a`` and the reference ``b`` (tensors or arrays), relative to
    ``b``'s largest magnitude: the measure every parity check of this project states its tolerance in."""
    a, b = (torch.as_tensor(t).detach().double() for t in (a, b))
    return ((a - b).abs().max() / b.abs().max()).item()


class OpLog(TorchDispatchMode):
    """Records each operator run inside it as ``(name, most elements of one output)``: what a kernel
    computes and how large a tensor it makes, for tests that assert work is not done."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out])
                   if isinstance(t, torch.Tensor)]
        self.ops.append((func.overloadpacket._qualified_op_name.replace('::', '.'),
                         max((t.numel() for t in tensors), default=0)))
        return out
