"""Mixed precision training on machines without GPUs (``tools/train.py --amp``).

mmengine 0.10.7's ``AmpOptimWrapper`` asserts a GPU (or NPU, MLU, MUSA), takes its loss scaler from
``torch.cuda.amp`` and autocasts CPUs in bf16 only. PyTorch's ``GradScaler`` and ``autocast`` run on
CPUs too, in fp16 and bf16 (since 2.3), so this wrapper is mmengine's wherever mmengine's runs and the
same with a CPU loss scaler and CPU autocast elsewhere.
"""
from contextlib import contextmanager
from typing import Union

import torch
from mmengine.optim import AmpOptimWrapper as MMEngineAmpOptimWrapper
from mmengine.optim import OptimWrapper

from ..registry import OPTIM_WRAPPERS


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
