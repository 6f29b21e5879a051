"""The compiled CPU kernels (``kernels/native.py``): their numbers against PyTorch's operators, the MLP
kernel's backward using them, and what happens where they cannot be built."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from mmpoolformer import kernels
from mmpoolformer.kernels import mlp as mlp_kernel
from mmpoolformer.kernels import native
from mmpoolformer.testing import OpLog, max_rel_err

# Where PyTorch's CPU kernels have vector instructions of the kinds ours are built for, a machine with
# a compiler (every one that builds mmcv, as tools/setup_env.sh does) must build them.
BUILDABLE = torch.backends.cpu.get_cpu_capability() in native.CAPABILITY_FLAGS


@pytest.fixture(scope='module')
def gelu_value_and_grad():
    if not BUILDABLE:
        pytest.skip(f'no kernels of ours for {torch.backends.cpu.get_cpu_capability()}')
    kernel = native.gelu_value_and_grad()
    assert kernel is not None, 'the compiled kernels failed to build or their check (see the warning)'
    return kernel


@pytest.mark.parametrize('numel', [1, 7, 8, 100_003, 1 << 20])
def test_compiled_gelu_value_and_gradient_match_pytorch(gelu_value_and_grad, numel):
    """Against float64 and against PyTorch's fp32 operators, on every length class: shorter than a
    vector (the scalar loop alone), one vector, a tail after the vectors, several threads' shares;
    values spanning the exponential's underflow (|h| > 13)."""
    g = torch.Generator().manual_seed(numel)
    h = torch.randn(numel, generator=g) * 4
    grad = torch.randn(numel, generator=g)
    value, ours = torch.full_like(h, float('nan')), grad.clone()
    gelu_value_and_grad(h, value, ours)
    reference = torch.nn.functional.gelu(h.double())
    reference_grad = torch.ops.aten.gelu_backward(grad.double(), h.double())
    assert (value.double() - reference).abs().max() <= 1e-6
    assert (ours.double() - reference_grad).abs().max() <= 2e-6
    # no further from float64 than PyTorch's own fp32 operators, give or take a rounding
    torch_err = (torch.nn.functional.gelu(h).double() - reference).abs().max()
    torch_grad_err = (torch.ops.aten.gelu_backward(grad, h).double() - reference_grad).abs().max()
    assert (value.double() - reference).abs().max() <= torch_err + 3e-7
    assert (ours.double() - reference_grad).abs().max() <= torch_grad_err + 3e-7


def test_compiled_gelu_refuses_what_it_does_not_compute(gelu_value_and_grad):
    h = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match='contiguous float32'):
        gelu_value_and_grad(h.t(), torch.empty(6, 4), torch.empty(6, 4))
    with pytest.raises(RuntimeError, match='contiguous float32'):
        gelu_value_and_grad(h.double(), torch.empty(4, 6), torch.empty(4, 6))
    with pytest.raises(RuntimeError, match='one size'):
        gelu_value_and_grad(h, torch.empty(4, 5), torch.empty(4, 6))


def mlp_step(x, modules):
    with kernels.forced(kernels.Plan(backend='blas')):
        y = kernels.norm_mlp_residual(x, *modules, None, None, plain=lambda x: pytest.fail('plain'))
    params = [p for m in modules if isinstance(m, nn.Module) for p in m.parameters()] + [modules[-1]]
    return [y] + list(torch.autograd.grad(y, [x] + params, torch.ones_like(y)))


@pytest.mark.parametrize('recompute_up_to', [1000, 0], ids=['hidden_recomputed', 'hidden_kept'])
def test_mlp_backward_takes_the_compiled_gelu_and_gives_pytorchs_numbers(gelu_value_and_grad,
                                                                         recompute_up_to, monkeypatch):
    """With the kernel, backward runs it once per chunk in place of GELU and its backward, and every
    gradient agrees with the same backward on PyTorch's operators."""
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', 64 * 48 * 4)  # several chunks
    monkeypatch.setattr(mlp_kernel, 'RECOMPUTE_HIDDEN_UP_TO', recompute_up_to)
    torch.manual_seed(0)
    modules = [nn.GroupNorm(1, 12), nn.Conv2d(12, 48, 1), nn.GELU(), nn.Conv2d(48, 12, 1),
               nn.Parameter(torch.rand(12) + 0.5)]
    x = torch.randn(2, 12, 15, 13, requires_grad=True)
    with OpLog() as log:
        ours = mlp_step(x, modules)
    names = [name for name, _ in log.ops]
    chunks = names.count('mmpoolformer.gelu_value_and_grad')
    assert chunks >= 4 and 'aten.gelu_backward' not in names
    assert names.count('aten.gelu') == chunks  # forward's, none in backward
    monkeypatch.setattr(mlp_kernel.Activation, 'value_and_backward', lambda *args: None)
    reference = mlp_step(x, copy.deepcopy(modules))
    for a, b in zip(ours, reference):
        assert max_rel_err(a, b) <= 1e-6


def test_kernels_that_cannot_be_built_leave_the_work_to_pytorch(tmp_path, monkeypatch):
    """A failed build warns once, says why and how to retry, is not retried by the next process, and
    the MLP kernel then computes with PyTorch's operators."""
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError('Error building extension\nc++: command not found')

    monkeypatch.setenv('MMPF_CACHE', str(tmp_path))
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')
    monkeypatch.setattr(cpp_extension, 'load', no_compiler)
    native.ops.cache_clear()
    try:
        with pytest.warns(UserWarning, match='c\\+\\+: command not found.*operators do their work'):
            assert native.gelu_value_and_grad() is None
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            assert native.gelu_value_and_grad() is None  # (this process: decided once)
        native.ops.cache_clear()
        monkeypatch.setattr(cpp_extension, 'load', lambda **kwargs: pytest.fail('built again'))
        with pytest.warns(UserWarning, match='command not found; delete .* to retry'):
            assert native.gelu_value_and_grad() is None  # (a later process)
        assert mlp_kernel.Activation(nn.GELU()).value_and_backward(torch.device('cpu'),
                                                                   torch.float32) is None
    finally:
        native.ops.cache_clear()


def test_no_kernels_of_ours_without_vector_instructions(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'DEFAULT')
    native.ops.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            assert native.gelu_value_and_grad() is None
    finally:
        native.ops.cache_clear()


def test_a_finished_build_is_loaded_without_building_again(gelu_value_and_grad, monkeypatch):
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, 'load', lambda **kwargs: pytest.fail('built again'))
    native.ops.cache_clear()
    try:
        assert native.gelu_value_and_grad() is not None
    finally:
        native.ops.cache_clear()
