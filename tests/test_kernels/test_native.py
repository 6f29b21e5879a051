"""The compiled CPU kernels (``kernels/native.py``): their numbers against float64 and PyTorch's
operators, the MLP kernel using them, and what happens where they cannot be built."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from mmpoolformer import kernels
from mmpoolformer.kernels import mlp as mlp_kernel
from mmpoolformer.kernels import native
from mmpoolformer.models.layers import LayerNorm2d, StarReLU
from mmpoolformer.testing import OpLog, max_rel_err

# Where PyTorch's CPU kernels have vector instructions of the kinds ours are built for, a machine with
# a compiler (every one that builds mmcv, as tools/setup_env.sh does) must build them.
BUILDABLE = torch.backends.cpu.get_cpu_capability() in native.CAPABILITY_FLAGS


@pytest.fixture(scope='module')
def compiled():
    if not BUILDABLE:
        pytest.skip(f'no kernels of ours for {torch.backends.cpu.get_cpu_capability()}')
    ops = native.ops()
    assert ops is not None, 'the compiled kernels failed to build or their check (see the warning)'
    return ops


@pytest.fixture
def gelu_value_and_grad(compiled):
    return compiled.gelu_value_and_grad


@pytest.mark.parametrize('numel', [1, 7, 8, 100_003, 1 << 20])
def test_compiled_gelu_value_and_gradient_match_pytorch(gelu_value_and_grad, numel, threads):
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


def test_compiled_kernels_refuse_what_they_do_not_compute(gelu_value_and_grad):
    h = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match='contiguous float32'):
        gelu_value_and_grad(h.t(), torch.empty(6, 4), torch.empty(6, 4))
    with pytest.raises(RuntimeError, match='contiguous float32'):
        gelu_value_and_grad(h.double(), torch.empty(4, 6), torch.empty(4, 6))
    with pytest.raises(RuntimeError, match='one size'):
        gelu_value_and_grad(h, torch.empty(4, 5), torch.empty(4, 6))
    one = torch.ones(1)
    with pytest.raises(RuntimeError, match='contiguous float32'):
        native.ops().star_relu(h.t(), torch.empty(6, 4), one, one)
    with pytest.raises(RuntimeError, match='one size'):
        native.ops().star_relu_backward(h, torch.empty(4, 5), None, one, one)


@pytest.fixture(params=[1, 2], ids=['1_thread', '2_threads'])
def threads(request):
    """The suite's workers run one thread each; the kernels' shares of several threads (and the
    per-thread sums added in thread order) are checked on two as well."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize('with_value', [True, False], ids=['with_value', 'gradient_only'])
@pytest.mark.parametrize('numel', [1, 7, 8, 100_003, 1 << 20])
def test_compiled_star_relu_matches_float64(compiled, numel, with_value, threads):
    """Value, input gradient and the sums that are the gradients of scale and bias (float64 totals
    of float32 blocks)."""
    ops = compiled
    g = torch.Generator().manual_seed(numel)
    h, grad = torch.randn(numel, generator=g) * 3, torch.randn(numel, generator=g)
    scale, bias = torch.tensor([0.8]), torch.tensor([-0.1])
    relu = h.double().clamp_min(0)
    value = torch.full_like(h, float('nan'))
    ops.star_relu(h, value, scale, bias)
    assert max_rel_err(value, 0.8 * relu ** 2 - 0.1) <= 1e-7
    ours, backward_value = grad.clone(), torch.full_like(h, float('nan')) if with_value else None
    sums = ops.star_relu_backward(h, ours, backward_value, scale, bias)
    assert max_rel_err(ours, grad.double() * 1.6 * relu) <= 1e-7
    if with_value:
        assert torch.equal(backward_value, value)
    for total, terms in zip(sums, (grad.double() * relu ** 2, grad.double())):
        # within about a rounding of the terms' magnitude, however many they are
        assert (total - terms.sum()).abs() <= 1e-7 * terms.abs().sum()


def mlp_step(x, modules, first_half=False):
    with kernels.forced(kernels.Plan(backend='blas')):
        if first_half:
            y = kernels.norm_linear_act(x, *modules, plain=lambda x: pytest.fail('plain'))
        else:
            y = kernels.norm_mlp_residual(x, *modules, None, None, plain=lambda x: pytest.fail('plain'))
    params = [p for m in modules if isinstance(m, nn.Module) for p in m.parameters()]
    params += [m for m in modules if isinstance(m, nn.Parameter)]
    return [y] + list(torch.autograd.grad(y, [x] + params, torch.ones_like(y)))


def branch(act, first_half):
    torch.manual_seed(0)
    norm = nn.GroupNorm(1, 12) if isinstance(act, nn.GELU) else LayerNorm2d(12, eps=1e-6)
    if first_half:
        return [norm, nn.Conv2d(12, 48, 1), act]
    return [norm, nn.Conv2d(12, 48, 1), act, nn.Conv2d(48, 12, 1), nn.Parameter(torch.rand(12) + 0.5)]


# what each activation's compiled kernel replaces: (compiled forward, compiled backward, PyTorch's)
COMPILED = {'gelu': (None, 'mmpoolformer.gelu_value_and_grad', 'aten.gelu_backward'),
            'star_relu': ('mmpoolformer.star_relu', 'mmpoolformer.star_relu_backward', 'aten.clamp_min')}


@pytest.mark.parametrize('recompute_up_to', [1000, 0], ids=['hidden_recomputed', 'hidden_kept'])
@pytest.mark.parametrize('first_half', [False, True], ids=['mlp', 'first_half'])
@pytest.mark.parametrize('act', [nn.GELU(), StarReLU(0.8, -0.1)], ids=COMPILED.keys())
def test_the_mlp_kernel_takes_the_compiled_activations_and_gives_pytorchs_numbers(
        compiled, act, first_half, recompute_up_to, monkeypatch):
    """With the kernels, each chunk's activation is one compiled call forward and one backward, in
    place of PyTorch's operators (GELU's forward stays PyTorch's: as fast); every output and gradient
    agrees with the same kernel on PyTorch's operators."""
    if first_half and isinstance(act, nn.GELU):
        pytest.skip("GELU's backward without its value is PyTorch's gelu_backward alone")
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', 64 * 48 * 4)  # several chunks
    monkeypatch.setattr(mlp_kernel, 'RECOMPUTE_HIDDEN_UP_TO', recompute_up_to)
    modules = branch(copy.deepcopy(act), first_half)
    x = torch.randn(2, 12, 15, 13, requires_grad=True)
    with OpLog() as log:
        ours = mlp_step(x, modules, first_half)
    names = [name for name, _ in log.ops]
    forward_op, backward_op, replaced = COMPILED['gelu' if isinstance(act, nn.GELU) else 'star_relu']
    chunks = names.count(backward_op)
    assert chunks >= 4 and replaced not in names
    if forward_op:
        assert names.count(forward_op) == chunks
    monkeypatch.setattr(native, 'takes', lambda *tensors: False)
    monkeypatch.setattr(mlp_kernel.Activation, 'value_and_backward', lambda *args: None)
    with OpLog() as log:
        reference = mlp_step(x, copy.deepcopy(modules), first_half)
    assert not any(name.startswith('mmpoolformer.') for name, _ in log.ops)
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
            assert native.ops() is None
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            assert native.ops() is None  # (this process: decided once)
        native.ops.cache_clear()
        monkeypatch.setattr(cpp_extension, 'load', lambda **kwargs: pytest.fail('built again'))
        with pytest.warns(UserWarning, match='command not found; delete .* to retry'):
            assert native.ops() is None  # (a later process)
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
            assert native.ops() is None
    finally:
        native.ops.cache_clear()


def test_a_finished_build_is_loaded_without_building_again(compiled, monkeypatch):
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, 'load', lambda **kwargs: pytest.fail('built again'))
    native.ops.cache_clear()
    try:
        assert native.ops() is not None
    finally:
        native.ops.cache_clear()
