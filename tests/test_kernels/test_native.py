"""The compiled CPU kernels (``kernels/native.py``): their numbers against float64 and PyTorch's
operators, the MLP kernel using them, and what happens where they cannot be built."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpoolformer import kernels
from mmpoolformer.kernels import mlp as mlp_kernel
from mmpoolformer.kernels import native
from mmpoolformer.models.layers import LayerNorm2d, StarReLU, add_residual
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


@pytest.mark.parametrize('numel', [1, 31, 32, 100_003, 1 << 20])
def test_compiled_gelu_in_bf16_rounds_once_as_pytorchs_operators(gelu_value_and_grad, numel, threads):
    """bf16 chunks (the MLP kernel's under bf16 autocast): computed in float32 and rounded once, so
    within half a bf16 unit of float64 (plus the float32 formula's own error, 2e-6 as above, which
    is all there is where the result is tiny), and no further than PyTorch's bf16 operators, on every
    length class (the scalar tail, one vector of 32, several threads' shares)."""
    g = torch.Generator().manual_seed(numel)
    h = (torch.randn(numel, generator=g) * 4).bfloat16()
    grad = torch.randn(numel, generator=g).bfloat16()
    value, ours = torch.full_like(h, float('nan')), grad.clone()
    gelu_value_and_grad(h, value, ours)
    assert value.dtype == ours.dtype == torch.bfloat16
    reference = torch.nn.functional.gelu(h.double())
    reference_grad = torch.ops.aten.gelu_backward(grad.double(), h.double())
    for result, exact, pytorchs in (
            (value, reference, torch.nn.functional.gelu(h)),
            (ours, reference_grad, torch.ops.aten.gelu_backward(grad, h))):
        error = (result.double() - exact).abs()
        assert (error <= exact.abs() * 2 ** -8 + 2e-6).all()
        assert error.max() <= (pytorchs.double() - exact).abs().max() + 2e-6


@pytest.mark.parametrize('numel', [1, 31, 32, 100_003])
def test_compiled_bf16_passes_round_their_float32_results_to_nearest_even(compiled, numel, threads):
    """Every bf16 pass computes in float32 what its float32 pass computes and rounds it once, to
    nearest even: bit for bit the float32 pass's results rounded by PyTorch, whichever rounding the
    CPU takes (its own instruction with avx512_bf16, at::vec's integer arithmetic elsewhere), on
    every length class, halves of each vector pair in place; subnormal floats (below 1.2e-38; GELU's
    gradient at -13 here) may be flushed to zero, as the CPU's instruction does."""
    g = torch.Generator().manual_seed(numel)
    h = (torch.randn(numel, generator=g) * 4).bfloat16()
    grad = torch.randn(numel, generator=g).bfloat16()
    scale, bias = torch.tensor([0.8]), torch.tensor([-0.1])

    def rounded(ours, single):
        expected = single.bfloat16()
        flushed = (single.abs() < torch.finfo(torch.float32).tiny) & (ours == 0)
        return torch.equal(torch.where(flushed, ours, expected), ours)

    ours, single = torch.empty_like(h), torch.empty(numel)
    for op in (compiled.gelu, lambda x, out: compiled.star_relu(x, out, scale, bias)):
        op(h, ours)
        op(h.float(), single)
        assert rounded(ours, single)
    value, ours, value32, grad32 = torch.empty_like(h), grad.clone(), torch.empty(numel), grad.float()
    compiled.gelu_value_and_grad(h, value, ours)
    compiled.gelu_value_and_grad(h.float(), value32, grad32)
    assert rounded(value, value32) and rounded(ours, grad32)
    value, ours, value32, grad32 = torch.empty_like(h), grad.clone(), torch.empty(numel), grad.float()
    sums = compiled.star_relu_backward(h, ours, value, scale, bias)
    sums32 = compiled.star_relu_backward(h.float(), grad32, value32, scale, bias)
    assert rounded(value, value32) and rounded(ours, grad32)
    assert torch.allclose(sums, sums32, rtol=1e-12)


def test_compiled_gelu_forward_is_as_close_to_float64_as_pytorchs(compiled):
    """GELU's forward pass (its rational erf): over every float32 of [-8, 8] a step of 2^-18 apart, no
    further from float64 than PyTorch's fp32 GELU (1.2e-6 here), within 1.2e-6 everywhere and within
    3 units in the last place for positive values (below zero, 1 + erf cancels, in PyTorch's too: ~1e-7
    away on values of -0.1); beyond the fitted range erf is +-1 (first, so that the vector loop takes
    them on any number of threads: gelu(-1e4) must be 0 there too), and NaN stays NaN."""
    h = torch.cat([torch.tensor([-1e4, -30., 30., 1e4, float('nan')]), torch.arange(-8, 8, 2 ** -18)])
    ours = torch.full_like(h, -1.)
    compiled.gelu(h, ours)
    exact = torch.nn.functional.gelu(h.double())
    error = (ours.double() - exact).abs()
    pytorchs = (torch.nn.functional.gelu(h).double() - exact).abs()
    finite = ~h.isnan()
    assert ours[4].isnan()
    assert error[finite].max() <= pytorchs[finite].max()
    ulp = exact.float().abs().nextafter(torch.tensor(float('inf'))).double() - exact.float().abs()
    positive = h > 0
    assert (error[positive] <= 3 * ulp[positive]).all()
    assert error[finite].max() <= 1.2e-6
    assert torch.equal(ours[:4], torch.tensor([0., 0., 30., 1e4]))


@pytest.mark.parametrize('numel', [1, 31, 32, 100_003, 1 << 20])
def test_compiled_gelu_forward_on_every_length_in_fp32_and_bf16(compiled, numel, threads):
    """Every length class (the scalar tail alone, one vector pair, a tail after them, several threads'
    shares) gives what the vectors give; bf16 is computed in float32 and rounded once: within half a
    bf16 unit of float64, as PyTorch's bf16 GELU."""
    h = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 4
    ours = torch.full_like(h, float('nan'))
    compiled.gelu(h, ours)
    assert (ours.double() - torch.nn.functional.gelu(h.double())).abs().max() <= 1.2e-6
    h16 = h.bfloat16()
    ours16 = torch.full_like(h16, float('nan'))
    compiled.gelu(h16, ours16)
    exact = torch.nn.functional.gelu(h16.double())
    error = (ours16.double() - exact).abs()
    assert (error <= exact.abs() * 2 ** -8 + 2e-6).all()
    assert error.max() <= (torch.nn.functional.gelu(h16).double() - exact).abs().max() + 2e-6


def test_compiled_kernels_refuse_what_they_do_not_compute(gelu_value_and_grad):
    h = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match='contiguous float32'):
        gelu_value_and_grad(h.t(), torch.empty(6, 4), torch.empty(6, 4))
    with pytest.raises(RuntimeError, match='contiguous float32'):
        gelu_value_and_grad(h.double(), torch.empty(4, 6), torch.empty(4, 6))
    with pytest.raises(RuntimeError, match='one shape'):
        gelu_value_and_grad(h, torch.empty(4, 5), torch.empty(4, 6))
    with pytest.raises(RuntimeError, match='all of one dtype'):
        gelu_value_and_grad(h.bfloat16(), torch.empty(4, 6), torch.empty(4, 6).bfloat16())
    one = torch.ones(1)
    with pytest.raises(RuntimeError, match='contiguous float32'):
        native.ops().star_relu(h.t(), torch.empty(6, 4), one, one)
    with pytest.raises(RuntimeError, match='one shape'):
        native.ops().star_relu_backward(h, torch.empty(4, 5), None, one, one)
    with pytest.raises(RuntimeError, match='all of one dtype'):
        native.ops().star_relu(h.bfloat16(), torch.empty(4, 6), one, one)
    with pytest.raises(RuntimeError, match='all of one dtype'):
        native.ops().star_relu_backward(h.bfloat16(), torch.empty(4, 6).bfloat16(), torch.empty(4, 6),
                                        one, one)


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


@pytest.mark.parametrize('with_value', [True, False], ids=['with_value', 'gradient_only'])
@pytest.mark.parametrize('numel', [1, 31, 32, 100_003, 1 << 20])
def test_compiled_star_relu_in_bf16_rounds_once(compiled, numel, with_value, threads):
    """bf16 chunks (under bf16 autocast): value and input gradient computed in float32 and rounded
    once, so within half a bf16 unit of float64 (and closer than PyTorch's bf16 operators, which
    round after each of their four passes); the sums in float64 over float32 blocks, as in fp32."""
    ops = compiled
    g = torch.Generator().manual_seed(numel)
    h = (torch.randn(numel, generator=g) * 3).bfloat16()
    grad = torch.randn(numel, generator=g).bfloat16()
    scale, bias = torch.tensor([0.8]), torch.tensor([-0.1])
    relu = h.double().clamp_min(0)
    value = torch.empty_like(h)
    ops.star_relu(h, value, scale, bias)
    half_unit = lambda exact: exact.abs() * 2 ** -8 + 1e-6  # noqa: E731
    exact_value = 0.8 * relu ** 2 - 0.1
    assert ((value.double() - exact_value).abs() <= half_unit(exact_value)).all()
    ours, backward_value = grad.clone(), torch.empty_like(h) if with_value else None
    sums = ops.star_relu_backward(h, ours, backward_value, scale, bias)
    exact_grad = grad.double() * 1.6 * relu
    assert ((ours.double() - exact_grad).abs() <= half_unit(exact_grad)).all()
    if with_value:
        assert torch.equal(backward_value, value)
    pytorchs = torch.clamp_min(h, 0).square_().mul_(0.8).add_(-0.1)
    assert (value.double() - exact_value).abs().max() <= (pytorchs.double() - exact_value).abs().max()
    for total, terms in zip(sums, (grad.double() * relu ** 2, grad.double())):
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


# what each activation's compiled kernel replaces: (compiled forwards, compiled backward, PyTorch's);
# GELU's forward with fc1's bias where fc1's product in fp32 leaves it out (bias_gelu)
COMPILED = {'gelu': (('mmpoolformer.gelu', 'mmpoolformer.bias_gelu'), 'mmpoolformer.gelu_value_and_grad',
                     'aten.gelu_backward'),
            'star_relu': (('mmpoolformer.star_relu', ), 'mmpoolformer.star_relu_backward',
                          'aten.clamp_min')}


def took_the_compiled_passes(names, act) -> str:
    """Every chunk's activation ran through the compiled passes (names: the operators run), none
    through PyTorch's; returns the operator of PyTorch's they replace."""
    forward_ops, backward_op, replaced = COMPILED['gelu' if isinstance(act, nn.GELU) else 'star_relu']
    chunks = names.count(backward_op)
    assert chunks >= 4 and replaced not in names
    assert sum(names.count(op) for op in forward_ops) == chunks
    return replaced


def without_compiled_kernels(monkeypatch):
    monkeypatch.setattr(native, 'takes', lambda *tensors, **kwargs: False)
    monkeypatch.setattr(mlp_kernel.Activation, 'value_and_backward', lambda *args: None)


@pytest.mark.parametrize('recompute_up_to', [1000, 0], ids=['hidden_recomputed', 'hidden_kept'])
@pytest.mark.parametrize('first_half', [False, True], ids=['mlp', 'first_half'])
@pytest.mark.parametrize('act', [nn.GELU(), StarReLU(0.8, -0.1)], ids=COMPILED.keys())
def test_the_mlp_kernel_takes_the_compiled_activations_and_gives_pytorchs_numbers(
        compiled, act, first_half, recompute_up_to, monkeypatch):
    """With the kernels, each chunk's activation is one compiled call forward and one backward, in
    place of PyTorch's operators; every output and gradient agrees with the same kernel on PyTorch's
    operators."""
    if first_half and isinstance(act, nn.GELU):
        pytest.skip("GELU's backward without its value is PyTorch's gelu_backward alone")
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', 64 * 48 * 4)  # several chunks
    monkeypatch.setattr(mlp_kernel, 'RECOMPUTE_HIDDEN_UP_TO', recompute_up_to)
    modules = branch(copy.deepcopy(act), first_half)
    x = torch.randn(2, 12, 15, 13, requires_grad=True)
    with OpLog() as log:
        ours = mlp_step(x, modules, first_half)
    took_the_compiled_passes([name for name, _ in log.ops], act)
    without_compiled_kernels(monkeypatch)
    with OpLog() as log:
        reference = mlp_step(x, copy.deepcopy(modules), first_half)
    assert not any(name.startswith('mmpoolformer.') for name, _ in log.ops)
    for a, b in zip(ours, reference):
        assert max_rel_err(a, b) <= 1e-6


@pytest.mark.parametrize('backend', kernels.dispatch.backends(torch.device('cpu'), torch.bfloat16))
@pytest.mark.parametrize('act', [nn.GELU(), StarReLU(0.8, -0.1)], ids=COMPILED.keys())
def test_the_mlp_kernel_under_bf16_autocast_takes_the_compiled_activations(compiled, act, backend,
                                                                          monkeypatch):
    """With bf16 products, the activation's compiled passes run over each bf16 chunk too (in place of
    PyTorch's bf16 operators), and the gradients are those of PyTorch's operators, up to bf16
    roundings."""
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', 64 * 48 * 2)  # several chunks
    modules = branch(copy.deepcopy(act), False)
    x = torch.randn(2, 12, 15, 13, requires_grad=True)
    params = [x, modules[1].weight, modules[3].weight] + list(modules[2].parameters())

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16), OpLog() as log, kernels.forced(
                kernels.Plan(backend=backend, dtype=torch.bfloat16)):
            y = kernels.norm_mlp_residual(x, *modules, None, None, plain=lambda x: pytest.fail('plain'))
            grads = torch.autograd.grad(y.float().square().sum(), params)
        return [y] + list(grads), [name for name, _ in log.ops]

    ours, names = step()
    replaced = took_the_compiled_passes(names, act)
    without_compiled_kernels(monkeypatch)
    pytorchs, names = step()
    assert replaced in names and not any(name.startswith('mmpoolformer.') for name in names)
    for a, b in zip(ours, pytorchs):
        assert max_rel_err(a, b) <= 1e-2


@pytest.fixture
def two_threads():
    """The plan whose chunks the threads share is offered on several threads only."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def threads_branch(c=12, res_scale=False, dtype=torch.float32, act=None, layer_norm=False):
    torch.manual_seed(0)
    norm = LayerNorm2d(c, eps=1e-6) if layer_norm else nn.GroupNorm(1, c)
    fc1, fc2 = nn.Conv2d(c, 4 * c, 1), nn.Conv2d(4 * c, c, 1)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.normal_(norm.bias)
    layer_scale = nn.Parameter(torch.rand(c) + 0.5)
    res = nn.Parameter(torch.rand(c) + 0.5) if res_scale else None
    modules = [m.to(dtype) for m in (norm, fc1, act or nn.GELU(), fc2)]
    return modules + [nn.Parameter(t.to(dtype)) if t is not None else None for t in (layer_scale, res)]


def threads_step(x, modules, backend, factors=None, dtype=None, first_half=False, positive=False):
    """The branch with ``backend``'s plan forced (products in ``dtype``, default ``x``'s), or its first
    half alone, ``act(fc1(norm(x)))`` (SepConv's expansion): its output and every gradient, for a
    random output gradient (``positive``: in [0.5, 1.5), whose sums do not cancel)."""
    norm, fc1, act, fc2, layer_scale, res = modules
    used = modules[:3] if first_half else modules
    x = x.detach().requires_grad_()
    with kernels.forced(kernels.Plan(backend=backend, dtype=dtype or x.dtype)), OpLog() as log:
        if first_half:
            y = kernels.norm_linear_act(x, norm, fc1, act, plain=lambda x: pytest.fail('plain'))
        else:
            y = kernels.norm_mlp_residual(x, norm, fc1, act, fc2, layer_scale, res, factors,
                                          plain=lambda x: pytest.fail('plain'))
        params = [x] + [p for m in used if m is not None for p in
                        (m.parameters() if isinstance(m, nn.Module) else [m])]
        random = torch.rand if positive else torch.randn
        grad = random(y.shape, generator=torch.Generator().manual_seed(1)) + (0.5 if positive else 0)
        grads = torch.autograd.grad(y, params, grad.to(y.dtype))
    return [y, *grads], [name for name, _ in log.ops]


@pytest.mark.parametrize('layer_norm', [False, True], ids=['group_norm', 'layer_norm'])
@pytest.mark.parametrize('act', [nn.GELU(), StarReLU(0.8, -0.1)], ids=COMPILED.keys())
@pytest.mark.parametrize('recompute_up_to', [1000, 0], ids=['hidden_recomputed', 'hidden_kept'])
@pytest.mark.parametrize('res_scale', [False, True], ids=['', 'res_scale'])
def test_the_threads_plan_gives_the_blas_plans_numbers(compiled, res_scale, recompute_up_to, act,
                                                       layer_norm, two_threads, monkeypatch):
    """The chunk loop compiled, its chunks shared by the threads (chunks of 7 rows, several across two
    samples; a factor on the branch, ResScale on the residual): the same output and gradients as the
    kernel's loop in Python, to fp32 rounding."""
    monkeypatch.setattr(mlp_kernel, 'THREAD_CHUNK_BYTES', 7 * 48 * 4)
    monkeypatch.setattr(mlp_kernel, 'RECOMPUTE_HIDDEN_UP_TO', recompute_up_to)
    modules = threads_branch(res_scale=res_scale, act=copy.deepcopy(act), layer_norm=layer_norm)
    x = (torch.randn(2, 12, 5, 9) * 2 + 1).contiguous(memory_format=torch.channels_last)
    factors = torch.full((2, 1, 1, 1), 0.8)
    ours, names = threads_step(x, modules, 'threads', factors)
    assert names.count('mmpoolformer.mlp_forward') == 1
    assert names.count('mmpoolformer.mlp_backward') == 1
    python_loop, names = threads_step(x, modules, 'blas', factors)
    assert 'mmpoolformer.mlp_forward' not in names
    for a, b in zip(ours, python_loop):
        assert max_rel_err(a, b) <= 1e-6


@pytest.mark.parametrize('backend', ['threads', *kernels.dispatch.backends(torch.device('cpu'),
                                                                        torch.float32)])
@pytest.mark.parametrize('layer_norm', [False, True], ids=['group_norm', 'layer_norm'])
@pytest.mark.parametrize('res_scale, bias', [(False, True), (True, True), (False, False)],
                         ids=['bias', 'res_scale', 'no_bias'])
def test_an_inference_residual_is_written_over_the_input_it_owns(compiled, backend, layer_norm,
                                                                   res_scale, bias, two_threads,
                                                                   monkeypatch):
    """``overwrite``: in inference the output takes the input's memory, with the numbers of a fresh
    output (chunks of 7 rows, across two samples); where autograd records, or without ``overwrite``,
    the input stays as it was."""
    for chunks in ('THREAD_CHUNK_BYTES', 'CHUNK_BYTES'):
        monkeypatch.setattr(mlp_kernel, chunks, 7 * 48 * 4)
    norm, fc1, act, fc2, layer_scale, res = threads_branch(res_scale=res_scale, layer_norm=layer_norm)
    if not bias:
        fc2.bias = None
    x = (torch.randn(2, 12, 5, 9) * 2 + 1).contiguous(memory_format=torch.channels_last)
    original = x.clone()

    def run(x, overwrite):
        return kernels.norm_mlp_residual(x, norm, fc1, act, fc2, layer_scale, res, None,
                                         plain=lambda x: pytest.fail('plain'), overwrite=overwrite)

    with kernels.forced(kernels.Plan(backend=backend)), OpLog() as log:
        recorded = run(x, True)  # (the parameters require grad)
        assert torch.equal(x, original) and recorded.data_ptr() != x.data_ptr()
        with torch.no_grad():
            fresh = run(x, False)
            assert torch.equal(x, original)
            y = run(x, True)
    assert y.data_ptr() == x.data_ptr()
    assert torch.equal(y, fresh)
    assert max_rel_err(fresh, recorded) <= 1e-6  # (oneDNN applies GELU as it writes in inference only)
    assert ('mmpoolformer.mlp_forward' in [name for name, _ in log.ops]) == (backend == 'threads')


def test_an_inference_residual_leaves_the_plans_trials_their_input(compiled, two_threads,
                                                                    timed_choices):
    """The run-time choice times every plan on the same input: none may overwrite it then, the kept
    plan's run may."""
    norm, fc1, act, fc2, layer_scale, res = threads_branch(c=32)
    x = torch.randn(2, 32, 24, 24).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = x + layer_scale.view(-1, 1, 1) * fc2(act(fc1(norm(x))))
        y = kernels.norm_mlp_residual(x, norm, fc1, act, fc2, layer_scale, res, None,
                                      plain=lambda x: x + layer_scale.view(-1, 1, 1) * fc2(
                                          act(fc1(norm(x)))), overwrite=True)
    assert len(kernels.chosen()) == 1  # (the plans were timed)
    assert max_rel_err(y, expected) <= 1e-6


@pytest.mark.parametrize('layer_norm', [False, True], ids=['group_norm', 'layer_norm'])
@pytest.mark.parametrize('act', [nn.GELU(), StarReLU(0.8, -0.1)], ids=COMPILED.keys())
@pytest.mark.parametrize('recompute_up_to', [1000, 0], ids=['hidden_recomputed', 'hidden_kept'])
def test_the_threads_plan_computes_the_first_half(compiled, recompute_up_to, act, layer_norm,
                                                  two_threads, monkeypatch):
    """The expansion alone (no fc2: the output is the activation, fc1's width) through the compiled
    loop: the Python loop's output and gradients to fp32 rounding (with bf16 products, where the CPU
    has them: its output exactly, its gradients as close to fp32), and in float64 ``gradcheck``'s."""
    for chunks in ('THREAD_CHUNK_BYTES', 'CHUNK_BYTES'):  # (chunks of 7 rows in both loops)
        monkeypatch.setattr(mlp_kernel, chunks, 7 * 48 * 4)
    monkeypatch.setattr(mlp_kernel, 'RECOMPUTE_HIDDEN_UP_TO', recompute_up_to)
    modules = threads_branch(act=copy.deepcopy(act), layer_norm=layer_norm)
    x = (torch.randn(2, 12, 5, 9) * 2 + 1).contiguous(memory_format=torch.channels_last)
    ours, names = threads_step(x, modules, 'threads', first_half=True)
    assert names.count('mmpoolformer.mlp_forward') == 1 and names.count('mmpoolformer.mlp_backward') == 1
    assert ours[0].shape == (2, 48, 5, 9)
    python_loop, names = threads_step(x, modules, 'blas', first_half=True)
    assert 'mmpoolformer.mlp_forward' not in names
    for a, b in zip(ours, python_loop):
        assert max_rel_err(a, b) <= 1e-6
    if kernels.dispatch.native_low_precision(x.device, torch.bfloat16):  # (bf16 products: as rounded)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low, names = threads_step(x, modules, 'threads', dtype=torch.bfloat16, first_half=True)
            low_loop, _ = threads_step(x, modules, 'blas', dtype=torch.bfloat16, first_half=True)
        assert 'mmpoolformer.mlp_backward' in names and low[0].dtype == torch.float32
        assert torch.equal(low[0], low_loop[0])
        for a, b, r in zip(low, low_loop, ours):
            assert max_rel_err(a, r) <= 1.25 * max_rel_err(b, r) + 1e-6
    norm, fc1, act = (copy.deepcopy(m).double() for m in modules[:3])

    def expand(x):
        with kernels.forced(kernels.Plan(backend='threads', dtype=torch.float64)):
            return kernels.norm_linear_act(x, norm, fc1, act, plain=lambda x: pytest.fail('plain'))

    # (fast mode on a smaller map, 24 rows in two chunks: each evaluation is a parallel region,
    # which under the suite's workers, two threads each on two cores, takes milliseconds)
    x = torch.randn(2, 12, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(expand, [x.requires_grad_()], fast_mode=True)


@pytest.mark.parametrize('chunk_rows, height, c', [(16, 5, 12), (90, 10, 13)],
                         ids=['16_rows', '90_rows_13_channels'])
@pytest.mark.parametrize('layer_norm', [False, True], ids=['group_norm', 'layer_norm'])
def test_the_threads_plan_under_bf16_autocast(compiled, layer_norm, chunk_rows, height, c,
                                              two_threads, monkeypatch):
    """bf16 products (the rows, residual and sums in fp32): as close to fp32 as the Python loop with
    bf16 products, in every output and gradient; the normalisation, output and input gradient are
    the Python loop's (per row, the same roundings). Chunks of 16 rows, and of 90 (the bias
    gradients' column sums over more than one block of 64 rows; 13 and 52 channels, the weights' 676
    values: tails after the vectors), the Python loop's alike (each chunk's bf16 products of the
    weights' gradients rounded, in both)."""
    monkeypatch.setattr(mlp_kernel, 'THREAD_CHUNK_BYTES', chunk_rows * 4 * c * 2)
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', chunk_rows * 4 * c * 2)
    modules = threads_branch(c=c, res_scale=True, layer_norm=layer_norm)
    x = (torch.randn(2, c, height, 9) * 2 + 1).contiguous(memory_format=torch.channels_last)
    factors = torch.full((2, 1, 1, 1), 0.8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ours, names = threads_step(x, modules, 'threads', factors, torch.bfloat16)
        python_loop, _ = threads_step(x, modules, 'blas', factors, torch.bfloat16)
    assert 'mmpoolformer.mlp_backward' in names
    reference, _ = threads_step(x, modules, 'blas', factors)
    for a, b, r in zip(ours, python_loop, reference):
        assert a.dtype == r.dtype
        assert max_rel_err(a, r) <= 1.25 * max_rel_err(b, r) + 1e-6
    for a, b in zip(ours[:2], python_loop[:2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_the_onednn_plans_backward_copies_no_weight_element_by_element(compiled, dtype):
    """oneDNN's linear takes (out, in) weights: backward's products by the transposed weights take fp32
    ones turned by the compiled transposition (PyTorch's copy of a transposed matrix reads it element
    by element: as long as the product, for a stage-3 weight) and bf16 ones as they lie, through
    torch.mm (oneDNN's matmul); every gradient as the BLAS plan's."""
    if 'onednn' not in kernels.dispatch.backends(torch.device('cpu'), dtype) or not (
            kernels.dispatch.native_low_precision(torch.device('cpu'), dtype)):
        pytest.skip(f'no oneDNN products in {dtype} here')
    modules = threads_branch()
    x = (torch.randn(2, 12, 5, 9) * 2 + 1).contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        with OpLog() as log:  # (with the sizes of what each operator made)
            ours, names = threads_step(x, modules, 'onednn', dtype=dtype)
        blas, _ = threads_step(x, modules, 'blas', dtype=dtype)
    assert 'mkldnn._linear_pointwise' in names
    assert names.count('mmpoolformer.transpose_affine') == (2 if dtype == torch.float32 else 0)
    assert ('aten.clone', 12 * 48) not in log.ops  # (no weight copied by PyTorch's .contiguous())
    for a, b in zip(ours, blas):
        assert max_rel_err(a, b) <= (1e-6 if dtype == torch.float32 else 1e-2)


def kept_for_backward(step):
    """``step()``'s result, and the (dtype, shape) of every tensor autograd saved for backward."""
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return step(), saved


@pytest.mark.parametrize('first_half', [False, True], ids=['mlp', 'first_half'])
@pytest.mark.parametrize('act', [nn.GELU(), StarReLU(0.8, -0.1)], ids=COMPILED.keys())
@pytest.mark.parametrize('backend', ['threads', 'blas'])
def test_fp32_products_under_bf16_autocast_keep_the_hidden_map_in_bf16(compiled, backend, act,
                                                                       first_half, two_threads,
                                                                       monkeypatch):
    """Where bf16 products are slower than fp32 ones, the branch runs in fp32 under bf16 autocast, and
    keeps fc1's output for backward in bf16 all the same, as the modules under autocast keep it
    (kept whole in fp32 it cost 0.61-0.66x of the peers' bf16 training memory, past the goal). The
    output is that of fp32 outside autocast, bit for bit; the gradients, from the rounded map, within
    bf16's rounding of fp32's (for an output gradient whose sums do not cancel: a sum that cancels
    to a fraction of its terms loses as many digits under autocast's modules); the compiled loop
    and the Python one alike (chunks of 7 rows)."""
    for chunks in ('THREAD_CHUNK_BYTES', 'CHUNK_BYTES'):
        monkeypatch.setattr(mlp_kernel, chunks, 7 * 48 * 4)
    monkeypatch.setattr(mlp_kernel, 'RECOMPUTE_HIDDEN_UP_TO', 0)
    modules = threads_branch(res_scale=True, act=copy.deepcopy(act))
    x = (torch.randn(2, 12, 5, 9) * 2 + 1).contiguous(memory_format=torch.channels_last)

    def step(backend):
        return threads_step(x, modules, backend, dtype=torch.float32, first_half=first_half,
                            positive=True)  # (StarReLU's scale gradient: 4320 terms that do not cancel)

    (fp32, _), kept_fp32 = kept_for_backward(lambda: step(backend))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        (ours, names), kept = kept_for_backward(lambda: step(backend))
        other, _ = step('blas' if backend == 'threads' else 'threads')
    assert ('mmpoolformer.mlp_backward' in names) == (backend == 'threads')
    # (rows of fc1's width: the hidden map, whole or in chunks; fc2's weight is (12, 48))
    hidden = lambda saved: [(dtype, shape) for dtype, shape in saved  # noqa: E731
                            if len(shape) == 2 and shape[1] == 48 and shape != (12, 48)]
    assert {dtype for dtype, _ in hidden(kept_fp32)} == {torch.float32}
    assert {dtype for dtype, _ in hidden(kept)} == {torch.bfloat16}
    assert sum(shape[0] for _, shape in hidden(kept)) == 90  # (every row, once)
    assert ours[0].dtype == torch.float32 and torch.equal(ours[0], fp32[0])
    for a, b, r in zip(ours[1:], other[1:], fp32[1:]):
        assert max_rel_err(a, r) <= 1e-2
        assert max_rel_err(a, b) <= 1e-6
    assert max_rel_err(ours[1], fp32[1]) > 0  # (the input's, through the rounded map)


@pytest.mark.parametrize('layer_norm', [False, True], ids=['group_norm', 'layer_norm'])
@pytest.mark.parametrize('act', [nn.GELU(), StarReLU(0.8, -0.1)], ids=COMPILED.keys())
def test_the_threads_plan_gradients_are_exact(compiled, act, layer_norm, two_threads, monkeypatch):
    """float64 ``gradcheck`` of the branch with its compiled chunk loop, every parameter included
    (StarReLU's scale and bias too)."""
    monkeypatch.setattr(mlp_kernel, 'THREAD_CHUNK_BYTES', 5 * 24 * 8)
    norm, fc1, act, fc2, layer_scale, res = threads_branch(c=6, res_scale=True, dtype=torch.float64,
                                                           act=copy.deepcopy(act), layer_norm=layer_norm)
    # the parameters, which the tensors gradcheck differentiates take the place of
    slots = [(m, name) for m in (norm, fc1, fc2, act) for name, _ in m.named_parameters()]
    params = [getattr(m, name).detach().clone() for m, name in slots]
    for module, name in slots:
        delattr(module, name)

    def branch(x, layer_scale, res, *params):
        for (module, name), value in zip(slots, params):
            setattr(module, name, value)
        with kernels.forced(kernels.Plan(backend='threads', dtype=torch.float64)):
            return kernels.norm_mlp_residual(x, norm, fc1, act, fc2, layer_scale, res, None,
                                             plain=lambda x: pytest.fail('plain'))

    x = torch.randn(2, 6, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    inputs = [t.detach().requires_grad_() for t in [x, layer_scale, res] + params]
    with OpLog() as log:
        branch(*inputs)
    assert ('mmpoolformer.mlp_forward', ) in {(name, ) for name, _ in log.ops}
    assert torch.autograd.gradcheck(branch, inputs)


def test_the_threads_plan_leaves_unequal_factors_to_the_python_loop(compiled, two_threads,
                                                                   monkeypatch):
    """Stochastic depth gives each sample its own factor (0: dropped), which the compiled loop's
    chunks across samples do not take: with its plan chosen, such a call computes as the Python loop."""
    monkeypatch.setattr(mlp_kernel, 'THREAD_CHUNK_BYTES', 7 * 48 * 4)
    modules = threads_branch()
    x = torch.randn(2, 12, 5, 9).contiguous(memory_format=torch.channels_last)
    factors = torch.tensor([0., 1.25]).view(2, 1, 1, 1)
    ours, names = threads_step(x, modules, 'threads', factors)
    assert not any(name.startswith('mmpoolformer.mlp_') for name in names)
    for a, b in zip(ours, threads_step(x, modules, 'blas', factors)[0]):
        assert torch.equal(a, b)


def test_the_threads_plan_is_offered_where_it_computes(compiled, monkeypatch):
    """On several threads, for GroupNorm or channel LayerNorm with the exact GELU or StarReLU, fp32 or
    fp64 maps."""
    modules = threads_branch()
    x = torch.randn(2, 12, 5, 9)
    offered = lambda x, norm=modules[0], act=modules[2]: mlp_kernel._threads_plan(x, norm, act)  # noqa
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert offered(x) == [kernels.Plan(backend='threads', dtype=torch.float32)]
        assert offered(x.double()) == [kernels.Plan(backend='threads', dtype=torch.float64)]
        assert offered(x, act=nn.GELU(approximate='tanh')) == []
        assert offered(x, norm=LayerNorm2d(12)) == offered(x, act=StarReLU()) == offered(x)
        assert offered(x, norm=nn.BatchNorm2d(12)) == []
        with torch.autocast('cpu', dtype=torch.bfloat16):  # (bf16 products where native)
            low = [torch.bfloat16] if kernels.dispatch.native_low_precision(x.device, torch.bfloat16) else []
            assert offered(x) == [kernels.Plan(backend='threads', dtype=d) for d in low + [torch.float32]]
        torch.set_num_threads(1)
        assert offered(x) == []
    finally:
        torch.set_num_threads(before)


def pool_step(x, norm, layer_scale, res_scale, pool_size):
    with kernels.forced(kernels.Plan()):
        y = kernels.norm_pool_residual(x, norm, pool_size, layer_scale, None,
                                       plain=lambda x: pytest.fail('plain'), res_scale=res_scale)
    params = [norm.weight, norm.bias, layer_scale] + ([] if res_scale is None else [res_scale])
    return [y] + list(torch.autograd.grad(y, [x] + params, torch.randn_like(y)))


@pytest.mark.parametrize('shape, pool_size, with_res_scale', [
    ((2, 19, 5, 7), 3, False),  # channels not a multiple of a vector: a scalar tail
    ((2, 64, 9, 6), 5, True),  # a wider window, ResScale (PoolFormerV2's last stages)
    ((1, 33, 1, 4), 3, False),  # a map narrower than the window
    ((2, 48, 16, 16), 3, True),
])
def test_the_pooling_kernel_takes_the_compiled_passes_and_gives_pytorchs_numbers(
        compiled, shape, pool_size, with_res_scale, threads):
    """Forward is one compiled pass and backward two, in place of avg_pool2d, its backward and the
    element-wise operators around them; the output and every gradient are as close to float64 as
    with PyTorch's operators, windows cut by every edge of the map."""
    torch.manual_seed(0)
    c = shape[1]
    norm = nn.GroupNorm(1, c)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.uniform_(norm.bias, -1, 1)
    layer_scale = nn.Parameter(torch.rand(c) + 0.5)
    res_scale = nn.Parameter(torch.rand(c) + 0.5) if with_res_scale else None
    x = (torch.randn(shape) * 3 + 2).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()

    def step(dtype, compiled_ops):
        torch.manual_seed(1)  # (the same output gradient)
        modules = [copy.deepcopy(m) for m in (norm, layer_scale, res_scale)]
        modules = [m.to(dtype) if isinstance(m, nn.Module) else None if m is None else
                   nn.Parameter(m.detach().to(dtype)) for m in modules]
        with OpLog() as log:
            out = pool_step(x.detach().to(dtype).requires_grad_(), *modules, pool_size)
        names = [name for name, _ in log.ops]
        assert any(name.startswith('mmpoolformer.') for name in names) == compiled_ops
        return out, names

    ours, names = step(torch.float32, True)
    assert names.count('mmpoolformer.pool_mix') == 1
    assert names.count('mmpoolformer.pool_mix_adjoint') == 1
    assert names.count('mmpoolformer.pool_mix_input_grad') == 1
    assert 'aten.avg_pool2d' not in names and 'aten.avg_pool2d_backward' not in names
    reference, _ = step(torch.float64, False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, 'takes', lambda *tensors, **kwargs: False)
        pytorchs, _ = step(torch.float32, False)
    for name, a, b, r in zip(('output', 'x', 'weight', 'bias', 'layer_scale', 'res_scale'), ours,
                             pytorchs, reference):
        if name == 'bias':  # (cancelled by the difference: exactly zero either way)
            assert not a.any() and not b.any()
            continue
        assert max_rel_err(a, r) <= max(2 * max_rel_err(b, r), 1e-6), name


def test_the_compiled_pooling_refuses_what_it_does_not_compute(compiled):
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    out, scale = torch.empty_like(x), torch.ones(2, 8)
    with pytest.raises(RuntimeError, match='channels-last'):
        compiled.pool_mix(x.contiguous(), scale, None, out, 3)
    with pytest.raises(RuntimeError, match='odd pool size'):
        compiled.pool_mix(x, scale, None, out, 4)
    with pytest.raises(RuntimeError, match=r'coefficients of shape \[2, 8\]'):
        compiled.pool_mix(x, torch.ones(8), None, out, 3)
    with pytest.raises(RuntimeError, match=r'coefficients of shape \[8\]'):
        compiled.pool_mix(x, scale, torch.ones(2, 8), out, 3)
    with pytest.raises(RuntimeError, match='one shape'):
        compiled.pool_mix_adjoint(torch.empty(2, 8, 4, 5, memory_format=torch.channels_last), x, out, 3)


@pytest.mark.parametrize('shape, groups, channels_last, compiled_ops', [
    ((2, 64, 32, 32), 1, True, True),  # PoolFormer's GroupNorm(1, C) on a channels-last map
    ((2, 64, 33, 17), 4, False, True),  # NCHW: every group one block; a tail after the vectors
    ((3, 5, 1, 1), 1, True, True),  # shorter than a vector
    ((2, 64, 8, 8), 4, True, False),  # channels-last with several groups: strided, PyTorch's
])
def test_group_statistics_compiled_where_each_group_is_one_block(compiled, shape, groups,
                                                                  channels_last, compiled_ops,
                                                                  threads):
    """One reading pass where each group is contiguous in memory (blocks merged exactly), within a
    rounding of float64 where the mean is large against the spread (PyTorch's float sums: a few)."""
    from mmpoolformer.kernels.group_norm import group_stats
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.1 + 30
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with OpLog() as log:
        mean, rstd = group_stats(x, groups, 1e-5)
    assert ('mmpoolformer.row_stats' in [name for name, _ in log.ops]) == compiled_ops
    grouped = x.double().reshape(shape[0], groups, -1)
    reference_mean = grouped.mean(-1)
    reference_rstd = (grouped.var(-1, unbiased=False) + 1e-5).rsqrt()
    assert mean.shape == rstd.shape == (shape[0], groups) and mean.dtype == torch.float32
    # compiled: within a rounding of the mean (an ulp of 30 is 1.9e-6); PyTorch's sums: a few
    assert (mean.double() - reference_mean).abs().max() <= (2e-6 if compiled_ops else 1e-5)
    assert max_rel_err(rstd, reference_rstd) <= (1e-6 if compiled_ops else 1e-5)


@pytest.mark.parametrize('shape', [(2, 64, 48), (3, 37, 19), (1, 5, 3), (2, 16, 33)],
                         ids=['tiles', 'tails_both_ways', 'under_a_tile', 'column_tail'])
def test_transpose_affine_turns_each_sample_and_maps_its_rows(compiled, shape, threads):
    """(N, R, S) into (N, S, R): exactly the transposed values without a map, and with one each
    output row's ``a * x + b`` (one fused rounding), whatever the tails of a tile each way."""
    n, rows, cols = shape
    draw = torch.Generator().manual_seed(0)
    src, a, b = (torch.randn(s, generator=draw) for s in (shape, (n, cols), (n, cols)))
    plain, mapped = torch.full((n, cols, rows), float('nan')), torch.full((n, cols, rows), float('nan'))
    compiled.transpose_affine(src, None, None, plain)
    compiled.transpose_affine(src, a, b, mapped)
    assert torch.equal(plain, src.transpose(1, 2))
    exact = (src.double() * a.double()[:, None] + b.double()[:, None]).transpose(1, 2)
    assert (mapped.double() - exact).abs().max() <= 2 ** -24 * exact.abs().max()


@pytest.mark.parametrize('width', [64, 19, 320], ids=['vectors', 'tail', 'wide'])
def test_compiled_layer_norm_rows_match_float64(compiled, width, threads):
    """Channel LayerNorm over rows (the MLP kernel's chunks): forward into fp32, and into bf16 as the
    fp32 result rounded to nearest even, from fp32 rows and from bf16 ones; backward with the
    weight's and bias's gradients added to what their tensors hold; all as close to float64 as
    PyTorch's LayerNorm, on rows far from zero too (a mean of 100, where summing squares instead of
    deviations loses the variance)."""
    draw = torch.Generator().manual_seed(width)
    rows = 203  # (several threads' shares, none a multiple of another)
    x = torch.randn(rows, width, generator=draw) * 3 + 100 * (torch.arange(rows)[:, None] % 2)
    weight, bias, grad = (torch.randn(shape, generator=draw) for shape in (width, width, (rows, width)))
    out, out16 = torch.full_like(x, float('nan')), torch.empty(rows, width, dtype=torch.bfloat16)
    mean, rstd = torch.empty(rows, 1), torch.empty(rows, 1)
    compiled.layer_norm_rows(x, weight, bias, 1e-6, out16, mean, rstd)
    compiled.layer_norm_rows(x, weight, bias, 1e-6, out, mean, rstd)
    grad_x, grad_weight, grad_bias = torch.full_like(x, float('nan')), torch.ones(width), torch.ones(width)
    compiled.layer_norm_rows_backward(grad, x, mean, rstd, weight, grad_x, grad_weight, grad_bias)
    assert torch.equal(out16, out.bfloat16())
    # bf16 rows (a bf16 map under autocast): exactly the float32 rows of their values, either output
    widened = x.bfloat16().float()
    for into in (torch.empty_like(x), torch.empty_like(out16)):
        expected, from_bf16 = torch.empty_like(into), torch.full_like(into, float('nan'))
        stats = torch.empty(rows, 1), torch.empty(rows, 1)
        compiled.layer_norm_rows(widened, weight, bias, 1e-6, expected, *stats)
        compiled.layer_norm_rows(x.bfloat16(), weight, bias, 1e-6, from_bf16, mean, rstd)
        assert torch.equal(from_bf16, expected) and torch.equal(torch.cat([mean, rstd]), torch.cat(stats))

    def layer_norm(dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
        y = F.layer_norm(inputs[0], (width, ), inputs[1], inputs[2], 1e-6)
        return [y] + list(torch.autograd.grad(y, inputs, grad.to(dtype)))

    exact, pytorchs = layer_norm(torch.float64), layer_norm(torch.float32)
    for ours, theirs, reference in zip([out, grad_x, grad_weight - 1, grad_bias - 1], pytorchs, exact):
        assert max_rel_err(ours, reference) <= max(2 * max_rel_err(theirs, reference), 1e-6)


@pytest.mark.parametrize('bias', [True, False], ids=['bias', 'no_bias'])
def test_channel_layer_norm_alone_takes_the_compiled_rows(compiled, bias, threads):
    """``LayerNorm2d`` on a channels-last fp32 map (the Baselines' norms outside the MLP): forward
    and backward by the compiled rows, a channels-last output, and output and every gradient as
    close to float64 as PyTorch's LayerNorm."""
    torch.manual_seed(0)
    norm = LayerNorm2d(19, eps=1e-6, bias=bias)
    nn.init.normal_(norm.weight)
    if bias:
        nn.init.normal_(norm.bias)
    x = (torch.randn(2, 19, 7, 5) * 3 + 10).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape)
    params = [p for p in norm.parameters()]
    results = {}
    for plan in (kernels.Plan(), kernels.PLAIN):
        xr = x.clone().requires_grad_()
        with kernels.forced(plan), OpLog() as log:
            y = norm(xr)
            grads = torch.autograd.grad(y, [xr] + params, grad)
        names = [name for name, _ in log.ops]
        assert names.count('mmpoolformer.layer_norm_rows') == (1 if plan.fused else 0)
        assert names.count('mmpoolformer.layer_norm_rows_backward') == (1 if plan.fused else 0)
        assert y.is_contiguous(memory_format=torch.channels_last)
        results[plan.fused] = (y, *grads)
    exact_norm = copy.deepcopy(norm).double()
    xd = x.double().requires_grad_()
    exact = exact_norm(xd)
    exact = (exact, *torch.autograd.grad(exact, [xd] + list(exact_norm.parameters()), grad.double()))
    for ours, pytorchs, reference in zip(results[True], results[False], exact):
        assert max_rel_err(ours, reference) <= max(2 * max_rel_err(pytorchs, reference), 1e-6)


def test_channel_layer_norm_alone_on_a_bf16_map(compiled, threads):
    """``LayerNorm2d`` on a channels-last bf16 map under bf16 autocast (the Baselines' stages 0-1,
    ahead of a downsampling or an output), by the compiled rows from its bf16 values: in inference a
    bf16 channels-last output as close to float64 as PyTorch's; in training also its backward, each
    gradient (the map's in bf16, the parameters' in fp32) as close to float64 as PyTorch's."""
    torch.manual_seed(0)
    norm = LayerNorm2d(40, eps=1e-6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (torch.randn(2, 40, 7, 5) * 3 + 10).bfloat16().contiguous(memory_format=torch.channels_last)
    weights = torch.randn(2, 40, 7, 5)  # (of the output in the loss)
    results, grads = {}, {}
    for plan in (kernels.Plan(), kernels.PLAIN):
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16), kernels.forced(plan), \
                OpLog() as log:
            results[plan.fused] = norm(x)
        assert [name for name, _ in log.ops].count('mmpoolformer.layer_norm_rows') == int(plan.fused)
        xt = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16), kernels.forced(plan), OpLog() as log:
            y = norm(xt)
            (y.float() * weights).sum().backward()
        names = [name for name, _ in log.ops]
        assert names.count('mmpoolformer.layer_norm_rows_backward') == int(plan.fused)
        assert xt.grad.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
        grads[plan.fused] = [xt.grad, norm.weight.grad, norm.bias.grad]
        norm.zero_grad(set_to_none=True)
    exact_norm, xd = copy.deepcopy(norm).double(), x.double().requires_grad_()
    exact = exact_norm(xd)
    (exact * weights.double()).sum().backward()
    assert results[True].dtype == results[False].dtype == torch.bfloat16
    assert results[True].is_contiguous(memory_format=torch.channels_last)
    assert max_rel_err(results[True], exact) <= 1.5 * max_rel_err(results[False], exact)
    for ours, pytorchs, want in zip(grads[True], grads[False],
                                    [xd.grad, exact_norm.weight.grad, exact_norm.bias.grad]):
        assert max_rel_err(ours, want) <= max(1.5 * max_rel_err(pytorchs, want), 1e-5)


def test_compiled_layer_norm_rows_refuse_what_they_do_not_compute(compiled):
    x, stats = torch.randn(4, 8), torch.empty(4)
    with pytest.raises(RuntimeError, match='float32 or bfloat16'):
        compiled.layer_norm_rows(x, None, None, 1e-6, x.half(), stats, stats.clone())
    with pytest.raises(RuntimeError, match='one per row'):
        compiled.layer_norm_rows(x, None, None, 1e-6, torch.empty_like(x), torch.empty(3), stats)
    with pytest.raises(RuntimeError, match='one shape'):
        compiled.layer_norm_rows(x, torch.ones(7), None, 1e-6, torch.empty_like(x), stats, stats.clone())
    with pytest.raises(RuntimeError, match='contiguous float32'):
        compiled.layer_norm_rows_backward(x.double(), x, stats, stats, None, x, None, None)


@pytest.mark.parametrize('backend', ['blas', 'threads'])
def test_the_mlp_kernel_normalises_its_layer_norm_chunks_with_the_compiled_rows(
        compiled, backend, two_threads):
    """fp32 chunks after a channel LayerNorm: normalised forward and back by the compiled rows (not
    PyTorch's LayerNorm), and every output and gradient as close to float64 as the plain branch."""
    modules = threads_branch(layer_norm=True)
    x = torch.randn(2, 12, 9, 7).contiguous(memory_format=torch.channels_last)
    ours, names = threads_step(x, modules, backend)
    mlp_op = 'mmpoolformer.mlp_forward' in names
    assert mlp_op == (backend == 'threads')
    if not mlp_op:
        assert 'mmpoolformer.layer_norm_rows' in names and 'mmpoolformer.layer_norm_rows_backward' in names
    assert not any('native_layer_norm' in name for name in names)

    def plain(x, modules):
        norm, fc1, act, fc2, layer_scale, res = modules
        x = x.detach().requires_grad_()
        y = add_residual(x, fc2(act(fc1(norm(x)))), layer_scale, res, None)
        params = [x] + [p for m in modules if m is not None for p in
                        (m.parameters() if isinstance(m, nn.Module) else [m])]
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        return [y, *torch.autograd.grad(y, params, grad.to(y.dtype))]

    exact = plain(x.double(), [None if m is None else copy.deepcopy(m).double() for m in modules])
    for a, b, reference in zip(ours, plain(x, modules), exact):
        assert max_rel_err(a, reference) <= max(2 * max_rel_err(b, reference), 1e-6)


@pytest.mark.skipif(not kernels.dispatch.native_low_precision(torch.device('cpu'), torch.bfloat16),
                    reason='bf16 products are emulated on this CPU')
def test_a_bf16_maps_chunks_are_normalised_by_the_compiled_rows(compiled):
    """Under bf16 autocast, a bf16 map (the residual stream where no fp32 factor has met it:
    ConvFormer's stages 0-1) in the MLP kernel's chunks: normalised from its bf16 values by the
    compiled rows (not PyTorch's bf16 LayerNorm and a copy), as close to float64 as the branch as
    written."""
    norm, fc1, act, fc2, _, _ = threads_branch(layer_norm=True, act=StarReLU(0.8, -0.1))
    x = (torch.randn(2, 12, 9, 7) * 2 + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        with kernels.forced(kernels.Plan(backend='blas', dtype=torch.bfloat16)), OpLog() as log:
            ours = kernels.norm_mlp_residual(x, norm, fc1, act, fc2, None, None, None,
                                             plain=lambda x: pytest.fail('plain'))
        as_written = x + fc2(act(fc1(norm(x))))
    with torch.no_grad():
        exact = x.double() + nn.Sequential(*(copy.deepcopy(m).double() for m in (norm, fc1, act, fc2)))(
            x.double())
    names = [name for name, _ in log.ops]
    assert 'mmpoolformer.layer_norm_rows' in names
    assert not any('native_layer_norm' in name for name in names)
    assert ours.dtype == as_written.dtype == torch.bfloat16
    assert max_rel_err(ours, exact) <= 1.5 * max_rel_err(as_written, exact)


@pytest.mark.skipif(not kernels.dispatch.native_low_precision(torch.device('cpu'), torch.bfloat16),
                    reason='bf16 products are emulated on this CPU')
@pytest.mark.parametrize('first_half', [False, True], ids=['mlp', 'expansion'])
def test_a_bf16_maps_chunks_are_normalised_back_by_the_compiled_rows(compiled, first_half):
    """The same in training: the chunks' norm's backward from their bf16 rows by the compiled rows
    (not PyTorch's bf16 LayerNorm backward and a copy): the norm's weight and bias gradients as close
    to float64 as the branch as written or within two units of bf16's rounding, every gradient within
    bf16 products' tracking of it."""
    norm, fc1, act, fc2, _, _ = threads_branch(layer_norm=True, act=StarReLU(0.8, -0.1))
    x = (torch.randn(2, 12, 9, 7) * 2 + 1).bfloat16().contiguous(memory_format=torch.channels_last)
    modules = (norm, fc1, act) if first_half else (norm, fc1, act, fc2)
    params = [p for m in modules for p in m.parameters()]

    def written(m, x):
        y = m[2](m[1](m[0](x)))
        return y if first_half else x + m[3](y)

    def loss(y):
        return (y.float() * torch.linspace(-1, 1, y.shape[1]).view(1, -1, 1, 1)).square().sum()

    grads = {}
    for fused in (True, False):
        xt = x.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16), OpLog() as log:
            if fused:
                with kernels.forced(kernels.Plan(backend='blas', dtype=torch.bfloat16)):
                    y = (kernels.norm_linear_act(xt, norm, fc1, act, plain=lambda x: pytest.fail('plain'))
                         if first_half else kernels.norm_mlp_residual(
                             xt, norm, fc1, act, fc2, None, None, None, plain=lambda x: pytest.fail('plain')))
            else:
                y = written(modules, xt)
            grads[fused] = torch.autograd.grad(loss(y), [xt] + params)
        if fused:
            names = [name for name, _ in log.ops]
    exact_modules = [copy.deepcopy(m).double() for m in modules]
    xd = x.double().requires_grad_()
    exact = torch.autograd.grad(loss(written(exact_modules, xd)).double(),
                                [xd] + [p for m in exact_modules for p in m.parameters()])
    assert 'mmpoolformer.layer_norm_rows_backward' in names
    assert not any('native_layer_norm' in name for name in names)
    assert all(max_rel_err(ours, want) <= 2e-2 for ours, want in zip(grads[True], exact))
    for ours, as_written, want in list(zip(grads[True], grads[False], exact))[1:3]:  # (the norm's)
        assert max_rel_err(ours, want) <= max(1.5 * max_rel_err(as_written, want), 2 ** -7)


@pytest.mark.parametrize('shape', [(2, 64, 32, 32), (2, 19, 5, 7), (1, 3, 1, 2)],
                         ids=['tiles', 'tails', 'tiny'])
def test_layout_turns_maps_either_way_exactly(compiled, shape):
    """``layout.nchw`` / ``layout.channels_last``: the values of ``.contiguous()`` in each format, by
    the compiled transposition for fp32 maps, by PyTorch's copy for others."""
    from mmpoolformer.kernels import layout
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    for dtype, turned in ((torch.float32, 1), (torch.float64, 0)):
        with OpLog() as log:
            y = layout.nchw(x.to(dtype))
            z = layout.channels_last(y)
        assert y.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, x.to(dtype)) and torch.equal(z, x.to(dtype))
        names = [name for name, _ in log.ops]
        assert names.count('mmpoolformer.transpose_affine') == 2 * turned or x.is_contiguous()


def test_transpose_affine_refuses_what_it_does_not_compute(compiled):
    src = torch.randn(2, 4, 6)
    with pytest.raises(RuntimeError, match='into \\(N, S, R\\)'):
        compiled.transpose_affine(src, None, None, torch.empty(2, 4, 6))
    with pytest.raises(RuntimeError, match='a and b together'):
        compiled.transpose_affine(src, torch.ones(2, 6), None, torch.empty(2, 6, 4))
    with pytest.raises(RuntimeError, match='contiguous float32'):
        compiled.transpose_affine(src.double(), None, None, torch.empty(2, 6, 4))
    with pytest.raises(RuntimeError, match='one shape'):
        compiled.transpose_affine(src, torch.ones(2, 4), torch.ones(2, 4), torch.empty(2, 6, 4))


@pytest.mark.parametrize('shape', [(2, 64, 32, 32), (2, 19, 5, 7)], ids=['tiles', 'tails'])
def test_output_norm_writes_the_nchw_map_as_it_normalises(compiled, shape):
    """A backbone's output norm on a channels-last fp32 map: the compiled transposing map forward and
    backward (the gradient turned channels-last), an NCHW output, and output and every gradient as
    close to float64 as PyTorch's GroupNorm followed by ``.contiguous()``."""
    from mmpoolformer.models.layers import GroupNorm
    torch.manual_seed(0)
    norm = GroupNorm(1, shape[1])
    norm.contiguous_output = True
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (torch.randn(shape) * 3 + 1).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(shape)
    results = {}
    for plan in (kernels.Plan(), kernels.PLAIN):
        with kernels.forced(plan), OpLog() as log:
            y = norm(x)
            grads = torch.autograd.grad(y, [x, norm.weight, norm.bias], grad)
        assert y.is_contiguous() and y.dtype == torch.float32
        names = [name for name, _ in log.ops]
        assert names.count('mmpoolformer.transpose_affine') == (2 if plan.fused else 0)
        results[plan.fused] = (y, *grads)
    exact = F.group_norm(x.double(), 1, norm.weight.double(), norm.bias.double())
    exact_grads = torch.autograd.grad(exact, [x, norm.weight, norm.bias], grad.double())
    for ours, pytorchs, reference in zip(results[True], results[False], (exact, *exact_grads)):
        assert max_rel_err(ours, reference) <= max_rel_err(pytorchs, reference) + 1e-6


@pytest.mark.parametrize('shape', [(2, 64, 32, 32), (2, 19, 5, 7)], ids=['tiles', 'tails'])
def test_emitted_maps_after_a_layer_norm_are_turned_by_the_compiled_transposition(compiled, shape):
    """``to_nchw`` of a channel LayerNorm's channels-last output (the Baselines' output norms): the
    compiled transposition forward and back (the gradient turned channels-last for the norm's
    backward), exactly the values and gradients of ``.contiguous()``."""
    torch.manual_seed(0)
    norm = LayerNorm2d(shape[1], eps=1e-6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(shape)
    results = {}
    for plan in (kernels.Plan(), kernels.PLAIN):
        with kernels.forced(kernels.PLAIN):  # (the norm as PyTorch computes it, in both)
            normed = norm(x)
        with kernels.forced(plan), OpLog() as log:
            y = kernels.to_nchw(normed)
            grads = torch.autograd.grad(y, [x, norm.weight, norm.bias], grad)
        assert y.is_contiguous() and grads[0].is_contiguous(memory_format=torch.channels_last)
        names = [name for name, _ in log.ops]
        assert names.count('mmpoolformer.transpose_affine') == (2 if plan.fused else 0)
        results[plan.fused] = (y, *grads)
    for ours, pytorchs in zip(results[True], results[False]):
        assert torch.equal(ours, pytorchs)


def test_the_backbone_output_norms_emit_nchw_maps():
    """Only the output norms write NCHW maps (the blocks' norms keep the stages channels-last)."""
    from mmpoolformer.models import PoolFormer
    model = PoolFormer('s12', out_indices=(0, 1, 2, 3))
    assert all(getattr(model, f'norm{2 * i}').contiguous_output for i in range(4))
    assert not any(getattr(m, 'contiguous_output', False) for name, m in model.named_modules()
                   if name.startswith('network'))
    outs = model(torch.randn(1, 3, 64, 96))
    assert all(out.is_contiguous() for out in outs)
    from mmpoolformer.models import ConvFormer  # (channel LayerNorms: then turned by to_nchw)
    with OpLog() as log:
        outs = ConvFormer('s18', out_indices=(0, 1, 2, 3))(torch.randn(1, 3, 64, 96))
    assert all(out.is_contiguous() for out in outs)
    assert [name for name, _ in log.ops].count('mmpoolformer.transpose_affine') == 4 or not BUILDABLE


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


def test_kernels_first_used_inside_an_activation_checkpoint_leave_it_intact(compiled, two_threads):
    """The load check (autograd of its own) runs where the kernels are first used, which may be a
    checkpointed block's forward (``with_cp`` in a fresh process): none of its saved tensors may
    count as the block's, or the recomputation differs and backward fails."""
    import torch.utils.checkpoint as checkpoint
    norm, fc1, act = threads_branch(layer_norm=True, act=StarReLU())[:3]
    x = torch.randn(2, 12, 5, 9).contiguous(memory_format=torch.channels_last).requires_grad_()

    def expand(x):
        with kernels.forced(kernels.Plan(backend='threads')):
            return kernels.norm_linear_act(x, norm, fc1, act, plain=lambda x: pytest.fail('plain'))

    native.ops.cache_clear()  # (as in a fresh process: loaded and checked on first use, below)
    try:
        checkpoint.checkpoint(expand, x, use_reentrant=False).sum().backward()
    finally:
        native.ops.cache_clear()
    assert x.grad is not None


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


def test_the_load_check_is_not_the_callers_work(compiled):
    """First used inside a dispatch mode (a FLOP counter's, a test's OpLog), the kernels' check
    against PyTorch's operators is not recorded as work of the caller's; first used in inference
    mode or under autocast, it checks as anywhere else."""
    native.ops.cache_clear()
    try:
        with OpLog() as log:
            assert native.ops() is not None
        assert log.ops == []
        # nor do the caller's inference mode and autocast reach it (the MLP's check uses autograd)
        native.ops.cache_clear()
        with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
            assert native.ops() is not None
    finally:
        native.ops.cache_clear()


class _Off:
    """The compiled kernels with one of them wrong by about 1e-4."""

    def __init__(self, ops, name):
        self._ops, self._name = ops, name

    def __getattr__(self, name):
        kernel = getattr(self._ops, name)
        if name != self._name:
            return kernel

        def wrong(*args):
            result = kernel(*args)
            if name == 'row_stats':
                return result[0], result[1] * 1.0001
            out = args[{'gelu': 1, 'gelu_value_and_grad': 1, 'star_relu': 1, 'star_relu_backward': 1,
                        'pool_mix': 3, 'pool_mix_adjoint': 2, 'pool_mix_input_grad': 0,
                        'mlp_forward': 15, 'mlp_backward': 15, 'transpose_affine': 3,
                        'attention': 4, 'bias_gelu': 2, 'affine_rows': 3,
                        'sep_conv_forward': 18, 'depthwise_weight_grad': 2}[name]]
            out[(0, ) * out.dim()] += 1e-3
            return result
        return wrong


@pytest.mark.parametrize('kernel', ['gelu', 'gelu_value_and_grad', 'star_relu', 'star_relu_backward',
                                    'pool_mix', 'pool_mix_adjoint', 'pool_mix_input_grad',
                                    'row_stats', 'transpose_affine', 'mlp_forward',
                                    'mlp_backward', 'attention', 'bias_gelu', 'affine_rows',
                                    'sep_conv_forward', 'depthwise_weight_grad'])
def test_the_load_check_refuses_a_wrong_kernel(compiled, kernel):
    """Each kernel is checked against PyTorch's operators when loaded: one off by a small error
    is refused (and PyTorch's operators then do its work)."""
    assert native._check(compiled) is None
    assert native._check(_Off(compiled, kernel)) is not None


@pytest.mark.parametrize('width', [64, 320, 19], ids=['vectors', 'wide', 'tail'])
def test_compiled_affine_rows_is_addcmul_in_fp32_and_bf16(compiled, width, threads):
    """GroupNorm's per-sample map of token rows, ``a * x + b``: PyTorch's ``addcmul`` exactly, into
    fp32 and rounded once into bf16, on every row and thread share (the scalar tail too)."""
    draw = torch.Generator().manual_seed(width)
    x, a, b = (torch.randn(shape, generator=draw) for shape in ((300, width), (width, ), (width, )))
    expected = torch.addcmul(b, x, a)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((300, width), float('nan'), dtype=dtype)
        compiled.affine_rows(x, a, b, out)
        assert torch.equal(out, expected.to(dtype))


@pytest.mark.parametrize('width', [256, 1280, 19], ids=['vectors', 'wide', 'tail'])
def test_compiled_bias_gelu_adds_fc1s_bias_and_activates(compiled, width, threads):
    """fc1's output plus its bias kept in place (what backward reads), GELU of it into the output
    (which may be fc1's output itself): the same numbers as adding the bias and then the compiled
    GELU where rows are whole vectors, and as close to float64 as PyTorch's GELU everywhere."""
    draw = torch.Generator().manual_seed(width)
    h, bias = torch.randn(37, width, generator=draw) * 3, torch.randn(width, generator=draw)
    ours, out = h.clone(), torch.full((37, width), float('nan'))
    compiled.bias_gelu(ours, bias, out)
    assert torch.equal(ours, h + bias)
    alias = h.clone()  # (inference: the activation written over fc1's output)
    compiled.bias_gelu(alias, bias, alias)
    assert torch.equal(alias, out)
    if width % 16 == 0:
        separate = torch.empty_like(out)
        compiled.gelu(h + bias, separate)
        assert torch.equal(out, separate)
    exact = F.gelu((h + bias).double())
    assert max_rel_err(out, exact) <= max(2 * max_rel_err(F.gelu(h + bias), exact), 1e-6)


def projected_heads(n, heads, length, keys, dim, spread, draw, projected_heads=None):
    """Queries, keys and values as the model has them: strided views of one projection's output
    (of ``projected_heads`` heads, the first ``heads`` taken)."""
    qkv = torch.randn(n, max(length, keys), 3, projected_heads or heads, dim, generator=draw) * spread
    q, k, v = qkv[:, :, :, :heads].permute(2, 0, 3, 1, 4)
    return q[:, :, :length], k[:, :, :keys], v[:, :, :keys]


@pytest.mark.parametrize('n, heads, length, keys, dim, projected', [
    (2, 3, 37, 45, 16, None), (1, 2, 64, 64, 32, None), (1, 1, 5, 300, 64, None),
    (2, 2, 70, 7, 32, None), (2, 2, 40, 300, 32, 40), (1, 1, 40, 2100, 32, None)],
    ids=['tails', 'blocks', 'one_block_many_keys', 'fewer_keys', 'rows_far_apart', 'smaller_blocks'])
@pytest.mark.parametrize('spread', [1., 8.], ids=['even', 'peaked'])
def test_compiled_attention_matches_float64(compiled, n, heads, length, keys, dim, projected, spread,
                                            threads):
    """Blocks of queries with a tail (its scores in tiles of two vectors and of one), keys that leave
    a tail to the register tiles and to the values' prefetching, every supported head dimension, keys
    whose rows spread over more than 4 MiB (copied together per head), more than 2048 keys (blocks of
    32 queries); scores far apart too (most weights then underflow to zero): as close to float64 as
    PyTorch's attention, written (N, L, heads, head_dim)."""
    draw = torch.Generator().manual_seed(length)
    q, k, v = projected_heads(n, heads, length, keys, dim, spread, draw, projected)
    assert (keys * k.stride(2) * 4 > 4 << 20) == (projected is not None)
    out = torch.full((n, length, heads, dim), float('nan'))
    compiled.attention(q, k, v, dim ** -0.5, out)
    weights = (q.double() @ k.double().transpose(-1, -2) * dim ** -0.5).softmax(-1)
    exact = (weights @ v.double()).transpose(1, 2)
    pytorchs = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert max_rel_err(out, exact) <= max(2 * max_rel_err(pytorchs, exact), 1e-6)


def test_compiled_attention_refuses_what_it_does_not_compute(compiled):
    q = torch.randn(1, 2, 8, 32)
    out = torch.empty(1, 8, 2, 32)
    with pytest.raises(RuntimeError, match='float32 CPU tensors'):
        compiled.attention(q.double(), q, q, 1., out)
    with pytest.raises(RuntimeError, match='last dimension is contiguous'):
        compiled.attention(q.transpose(2, 3), q, q, 1., out)
    with pytest.raises(RuntimeError, match="the queries' batch, heads and head_dim"):
        compiled.attention(q, q[:, :1], q[:, :1], 1., out)
    with pytest.raises(RuntimeError, match='contiguous float32 tensor'):
        compiled.attention(q, q, q, 1., out.transpose(1, 2))
    odd = torch.randn(1, 2, 8, 24)
    with pytest.raises(RuntimeError, match='a head_dim of 1, 2, 4 or 8 vectors'):
        compiled.attention(odd, odd, odd, 1., torch.empty(1, 8, 2, 24))


@pytest.mark.parametrize('sr_ratio', [1, 2])
def test_attention_in_inference_takes_the_compiled_kernel(compiled, sr_ratio):
    """The ``Attention`` mixer: without gradients (evaluation) by the compiled kernel when it is the
    plan, its output as PyTorch's to 1e-5; where a gradient is needed by PyTorch's, whatever the
    plan, so training is unchanged."""
    from mmpoolformer.models.token_mixers import Attention
    torch.manual_seed(0)
    mixer = Attention(64, sr_ratio=sr_ratio).eval()
    x = torch.randn(2, 64, 11, 7)
    outputs = {}
    for plan in (kernels.Plan(), kernels.PLAIN):
        with torch.no_grad(), kernels.forced(plan), OpLog() as log:
            outputs[plan.fused] = mixer(x)
        names = [name for name, _ in log.ops]
        assert names.count('mmpoolformer.attention') == (1 if plan.fused else 0)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-5, atol=1e-5)
    with kernels.forced(kernels.Plan()), OpLog() as log:
        y = mixer(x)
    assert 'mmpoolformer.attention' not in [name for name, _ in log.ops] and y.requires_grad


@pytest.fixture
def bf16_backward(compiled):
    from mmpoolformer.kernels import attention
    if not attention.bf16_backward_available():
        pytest.skip('no compiled bf16 attention backward here (it needs AVX-512 with avx512_bf16)')
    return compiled


def attention_grads(q, k, v, grad):
    """float64 attention's gradients of bf16 inputs, and flash attention's in bf16."""
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    torch.autograd.backward(F.scaled_dot_product_attention(*exact), grad.double())
    flash = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    torch.autograd.backward(F.scaled_dot_product_attention(*flash), grad)
    return [t.grad for t in exact], [t.grad for t in flash]


@pytest.mark.parametrize('n, heads, length, keys, dim', [
    (2, 3, 37, 45, 16), (1, 2, 128, 128, 32), (2, 2, 70, 7, 64), (1, 2, 9, 1, 32),
    (1, 1, 33, 2100, 32)],
    ids=['tails', 'blocks', 'fewer_keys', 'one_key', 'smaller_blocks'])
@pytest.mark.parametrize('spread', [1., 8.], ids=['even', 'peaked'])
def test_compiled_attention_backward_matches_float64(bf16_backward, n, heads, length, keys, dim,
                                                     spread, threads):
    """bf16 gradients of queries, keys and values (strided views of one projection): odd numbers of
    queries (a padding row in the last pair) and of keys (a padding column in the pairs), tails after
    the vectors, blocks of 64 queries and of 32 (more than 2048 keys), one key, every supported head
    dimension, heads split into runs of blocks (fewer than 4 heads a thread), scores far apart: each
    gradient as close to float64 as flash attention's, or within two units of bf16's rounding (2^-8
    relative) of its largest value: the weights and their gradient enter the last products rounded
    to bf16. A second call gives the same bits."""
    draw = torch.Generator().manual_seed(length + keys)
    q, k, v = (t.bfloat16() for t in projected_heads(n, heads, length, keys, dim, spread, draw))
    grad = torch.randn(n, length, heads, dim, generator=draw).bfloat16().transpose(1, 2)
    exact, flash = attention_grads(q, k, v, grad)
    grads = [torch.full(t.shape, float('nan'), dtype=torch.bfloat16) for t in (q, k, v)]
    bf16_backward.attention_backward(q, k, v, grad, dim ** -0.5, *grads)
    again = [torch.empty_like(t) for t in grads]
    bf16_backward.attention_backward(q, k, v, grad, dim ** -0.5, *again)
    assert all(torch.equal(a, b) for a, b in zip(grads, again))
    for ours, want, pytorchs in zip(grads, exact, flash):
        err = (ours.double() - want).abs().max().item()
        assert err <= max(1.5 * (pytorchs.double() - want).abs().max().item(),
                          2 ** -7 * want.abs().max().item(), 1e-6)


@pytest.mark.parametrize('n, length', [(0, 8), (2, 0)], ids=['no_samples', 'no_queries'])
def test_compiled_attention_backward_of_nothing_is_zero(bf16_backward, n, length):
    """An empty batch, or no queries: the keys' and values' gradients are zero (written), not a
    fault."""
    q, grad = (torch.randn(n, 2, length, 32).bfloat16() for _ in '12')
    k, v = (torch.randn(n, 2, 8, 32).bfloat16() for _ in '12')
    grads = [torch.empty_like(q)] + [torch.full_like(t, float('nan')) for t in (k, v)]
    bf16_backward.attention_backward(q, k, v, grad, 0.2, *grads)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


def test_compiled_attention_backward_refuses_what_it_does_not_compute(bf16_backward):
    q = torch.randn(1, 2, 8, 32).bfloat16()
    grads = [torch.empty_like(q) for _ in 'qkv']
    with pytest.raises(RuntimeError, match='bfloat16 CPU tensors'):
        bf16_backward.attention_backward(q.float(), q, q, q, 1., *grads)
    with pytest.raises(RuntimeError, match='last dimension is contiguous'):
        bf16_backward.attention_backward(q.transpose(2, 3), q, q, q, 1., *grads)
    with pytest.raises(RuntimeError, match="the queries' batch, heads and \\(even\\) head_dim"):
        bf16_backward.attention_backward(q, q[:, :1], q[:, :1], q, 1., *grads)
    odd = torch.randn(1, 2, 8, 15).bfloat16()
    with pytest.raises(RuntimeError, match='even'):
        bf16_backward.attention_backward(odd, odd, odd, odd, 1., *[torch.empty_like(odd)] * 3)


@pytest.mark.parametrize('sr_ratio', [1, 2])
def test_attention_under_bf16_autocast_trains_with_the_compiled_backward(bf16_backward, sr_ratio):
    """The ``Attention`` mixer in a bf16 training step: with the kernel's plan its backward is the
    compiled one (once), and the gradients of the input and of both projections agree with flash
    attention's to bf16's rounding."""
    from mmpoolformer.models.token_mixers import Attention
    torch.manual_seed(0)
    mixer = Attention(64, sr_ratio=sr_ratio)
    x = torch.randn(2, 64, 11, 7)
    grads = {}
    for plan in (kernels.Plan(), kernels.PLAIN):
        xt = x.clone().requires_grad_()
        with kernels.forced(plan), torch.autocast('cpu', dtype=torch.bfloat16), OpLog() as log:
            y = mixer(xt)
            y.float().square().sum().backward()
        names = [name for name, _ in log.ops]
        assert names.count('mmpoolformer.attention_backward') == (1 if plan.fused else 0)
        grads[plan.fused] = [xt.grad] + [p.grad for p in mixer.parameters()]
        mixer.zero_grad(set_to_none=True)
    for ours, flash in zip(grads[True], grads[False]):
        assert max_rel_err(ours, flash) <= 2e-2


@pytest.mark.filterwarnings('ignore:TF32 acceleration on top of oneDNN')  # (mkldnn.flags' own)
def test_bf16_attention_trains_with_pytorchs_backward_where_onednn_is_switched_off(bf16_backward):
    """The compiled backward multiplies on oneDNN's micro-kernel: with oneDNN switched off (after the
    plan was chosen, too) a training step takes PyTorch's attention, and the kernel is not called."""
    from mmpoolformer.models.token_mixers import Attention
    torch.manual_seed(0)
    mixer, x = Attention(64), torch.randn(2, 64, 11, 7, requires_grad=True)
    with kernels.forced(kernels.Plan()), torch.autocast('cpu', dtype=torch.bfloat16), \
            torch.backends.mkldnn.flags(enabled=False), OpLog() as log:
        mixer(x).float().square().sum().backward()
    assert 'mmpoolformer.attention_backward' not in [name for name, _ in log.ops]
    assert x.grad is not None


def test_the_bf16_attention_backward_is_first_checked_inside_an_activation_checkpoint(bf16_backward):
    """The once-a-process check of the bf16 backward runs on the first training step that needs it,
    which may be inside an activation checkpoint (``with_cp``): it saves nothing there, so the
    recomputation saves as many tensors as the forward pass did."""
    from torch.utils.checkpoint import checkpoint

    from mmpoolformer.kernels import attention
    from mmpoolformer.models.token_mixers import Attention
    torch.manual_seed(0)
    mixer, x = Attention(64), torch.randn(2, 64, 11, 7, requires_grad=True)
    attention.bf16_backward_available.cache_clear()
    with kernels.forced(kernels.Plan()), torch.autocast('cpu', dtype=torch.bfloat16), OpLog() as log:
        checkpoint(mixer, x, use_reentrant=False).float().square().sum().backward()
    assert [name for name, _ in log.ops].count('mmpoolformer.attention_backward') == 1
    assert x.grad is not None


def test_a_wrong_compiled_attention_backward_is_refused(bf16_backward, monkeypatch):
    """The bf16 backward is checked against float64 attention once a process: one whose gradient is
    off by 5% is refused with a warning, and training keeps flash attention's."""
    from mmpoolformer.kernels import attention

    class Off:
        def __getattr__(self, name):
            return getattr(bf16_backward, name)

        def attention_backward(self, *args):
            bf16_backward.attention_backward(*args)
            args[5].mul_(1.05)

    monkeypatch.setattr(native, 'ops', lambda: Off())
    attention.bf16_backward_available.cache_clear()
    try:
        with pytest.warns(UserWarning, match='disagrees'):
            assert not attention.bf16_backward_available()
    finally:
        monkeypatch.undo()
        attention.bf16_backward_available.cache_clear()
    assert attention.bf16_backward_available()


# (samples, channels, height, width, filter side): ConvFormer's 7x7 over vectors of channels, a tail
# of channels, a map narrower and one smaller than the filter, 3x3 / 5x5, a 9x9 (any side)
DEPTHWISE_GEOMETRIES = dict(vectors=(2, 32, 9, 11, 7), tail=(2, 35, 9, 4, 7), small=(1, 19, 3, 3, 7),
                            three=(3, 40, 6, 7, 3), five=(2, 24, 5, 13, 5), nine=(2, 21, 6, 12, 9))


@pytest.mark.parametrize('geometry', DEPTHWISE_GEOMETRIES.values(), ids=DEPTHWISE_GEOMETRIES.keys())
def test_compiled_depthwise_weight_gradient_matches_float64_on_any_threads(compiled, geometry):
    """The weight gradient of a depthwise convolution (stride 1, the padding that keeps the size) over
    channels-last fp32 maps: within fp32's error of float64 PyTorch on every geometry, and bit for bit
    the same on 1, 2 or 3 threads (the threads share out the channels)."""
    n, c, h, w, k = geometry
    torch.manual_seed(0)
    x, grad = (torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last) for _ in '12')
    expected = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), torch.zeros(c, 1, k, k, dtype=torch.float64), None, (1, 1),
        (k // 2, k // 2), (1, 1), False, (0, 0), c, [False, True, False])[1]
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = torch.full((c, 1, k, k), float('nan'))
            compiled.depthwise_weight_grad(x, grad, out)
            results.append(out)
    finally:
        torch.set_num_threads(before)
    assert max_rel_err(results[0], expected) <= 2e-6
    assert all(torch.equal(out, results[0]) for out in results[1:])


@pytest.mark.parametrize('geometry', [DEPTHWISE_GEOMETRIES[name] for name in ('vectors', 'tail', 'nine')],
                         ids=['vectors', 'tail', 'nine'])
def test_compiled_depthwise_weight_gradient_of_bf16_maps_is_the_fp32_one_of_their_values(compiled, geometry):
    """bf16 maps (under bf16 autocast) are widened exactly as they are read: the fp32 gradient of
    their values, bit for bit, and so as close to float64."""
    n, c, h, w, k = geometry
    torch.manual_seed(0)
    x, grad = (torch.randn(n, c, h, w).bfloat16().contiguous(memory_format=torch.channels_last)
               for _ in '12')
    out, out32 = torch.full((c, 1, k, k), float('nan')), torch.full((c, 1, k, k), float('nan'))
    compiled.depthwise_weight_grad(x, grad, out)
    compiled.depthwise_weight_grad(x.float(), grad.float(), out32)
    assert torch.equal(out, out32)
    expected = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), torch.zeros(c, 1, k, k, dtype=torch.float64), None, (1, 1),
        (k // 2, k // 2), (1, 1), False, (0, 0), c, [False, True, False])[1]
    assert max_rel_err(out, expected) <= 2e-6


def test_compiled_depthwise_weight_gradient_refuses_what_it_does_not_compute(compiled):
    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match='in channels-last'):
        compiled.depthwise_weight_grad(x.contiguous(), x, torch.empty(8, 1, 3, 3))
    with pytest.raises(RuntimeError, match='tensors of one shape'):
        compiled.depthwise_weight_grad(x, x[:1], torch.empty(8, 1, 3, 3))
    with pytest.raises(RuntimeError, match='both of one dtype'):
        compiled.depthwise_weight_grad(x, x.bfloat16(), torch.empty(8, 1, 3, 3))
    with pytest.raises(RuntimeError, match='float32 or bfloat16'):
        compiled.depthwise_weight_grad(x.double(), x.double(), torch.empty(8, 1, 3, 3))
    for out in (torch.empty(8, 1, 4, 4), torch.empty(7, 1, 3, 3), torch.empty(8, 3, 3)):
        with pytest.raises(RuntimeError, match=r'a contiguous float32 \(C, 1, k, k\) weight'):
            compiled.depthwise_weight_grad(x, x, out)
