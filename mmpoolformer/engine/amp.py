"""Mixed precision training on machines without GPUs (``tools/train.py --amp``).

mmengine 0.10.7's ``AmpOptimWrapper`` asserts a GPU (or NPU, MLU, MUSA), takes its loss scaler from
``torch.cuda.amp`` and autocasts CPUs in bf16 only. PyTorch's ``GradScaler`` and ``autocast`` run on
CPUs too, in fp16 and bf16 (since 2.3), so this wrapper is mmengine's wherever mmengine's runs and the
same with a CPU loss scaler and CPU autocast elsewhere. On a CPU it also makes mmcv's fp32-only CPU
ops (NMS, RoIAlign) compute low-precision inputs in fp32, so that two-stage detectors train under it.
"""
import functools
import importlib
from contextlib import contextmanager
from typing import Union

import torch
from mmengine.optim import AmpOptimWrapper as MMEngineAmpOptimWrapper
from mmengine.optim import OptimWrapper

from ..registry import OPTIM_WRAPPERS

# mmcv's ops whose CPU kernels take fp32 only, which two-stage detectors (Mask R-CNN) call with the
# feature maps and scores that CPU autocast made bf16: their NMS stopped with "expected scalar type
# Float but found BFloat16" (mmcv 2.1.0), then their RoIAlign. ``in_fp32_on_cpu`` computes them in
# fp32 there, as autocast computes PyTorch's own fp32-only operators.
FP32_ONLY_CPU_OPS = ('mmcv.ops.nms:NMSop', 'mmcv.ops.roi_align:RoIAlignFunction')
LOW = (torch.bfloat16, torch.float16)


def in_fp32_on_cpu(method):
    """An autograd Function's ``forward`` or ``backward`` that, given low-precision CPU tensors,
    computes on fp32 copies with autocast off and returns its floating results in their dtype."""
    if getattr(method, 'in_fp32_on_cpu', False):
        return method

    @functools.wraps(method)
    def wrapped(ctx, *args):
        low = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.device.type == 'cpu'
                    and a.dtype in LOW), None)
        if low is None:
            return method(ctx, *args)
        args = [a.float() if isinstance(a, torch.Tensor) and a.dtype in LOW else a for a in args]
        with torch.autocast('cpu', enabled=False):
            out = method(ctx, *args)

        def back(t):
            return t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

        return tuple(map(back, out)) if isinstance(out, tuple) else back(out)

    wrapped.in_fp32_on_cpu = True
    return wrapped


def run_fp32_only_ops_in_fp32() -> None:
    """:func:`in_fp32_on_cpu` for the forward and backward of :data:`FP32_ONLY_CPU_OPS` (those this
    mmcv has)."""
    for spec in FP32_ONLY_CPU_OPS:
        module, name = spec.split(':')
        try:
            function_cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # (mmcv without its compiled ops: none to run)
            continue
        for method in ('forward', 'backward'):
            if method in vars(function_cls):
                setattr(function_cls, method, staticmethod(in_fp32_on_cpu(getattr(function_cls,
                                                                                    method))))


@OPTIM_WRAPPERS.register_module()
class AmpOptimWrapper(MMEngineAmpOptimWrapper):
    """mmengine's ``AmpOptimWrapper``, also on CPU.

    Args:
        loss_scale (str | float | dict): ``'dynamic'``, a fixed scale, or the arguments of
            ``torch.amp.GradScaler``, as in mmengine. Defaults to ``'dynamic'``.
        dtype (str | torch.dtype, optional): What autocast computes in: fp16 by default on a GPU,
            bf16 on a CPU.
        **kwargs: mmengine's other arguments (``optimizer``, ``use_fsdp``, ...).
    """

    def __init__(self, loss_scale: Union[str, float, dict] = 'dynamic',
                 dtype: Union[str, torch.dtype, None] = None, **kwargs):
        self._on_cpu = not torch.cuda.is_available() and not kwargs.get('use_fsdp')
        if not self._on_cpu:
            super().__init__(loss_scale=loss_scale, dtype=dtype, **kwargs)
            return
        OptimWrapper.__init__(self, **kwargs)
        self._scale_update_param = None
        if loss_scale == 'dynamic':
            scaler_args = {}
        elif isinstance(loss_scale, float):
            self._scale_update_param = loss_scale
            scaler_args = dict(init_scale=loss_scale)
        elif isinstance(loss_scale, dict):
            scaler_args = loss_scale
        else:
            raise TypeError(f'loss_scale must be "dynamic", a float or a dict, got {loss_scale!r}')
        self.loss_scaler = torch.amp.GradScaler('cpu', **scaler_args)
        run_fp32_only_ops_in_fp32()
        if isinstance(dtype, str):
            if dtype not in ('float16', 'bfloat16'):
                raise ValueError(f'dtype on CPU: float16 or bfloat16, got {dtype!r}')
            dtype = getattr(torch, dtype)
        self.cast_dtype = dtype or torch.bfloat16

    @contextmanager
    def optim_context(self, model: torch.nn.Module):
        if not self._on_cpu:
            with super().optim_context(model):
                yield
            return
        with OptimWrapper.optim_context(self, model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield
