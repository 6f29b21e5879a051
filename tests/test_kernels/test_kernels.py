"""The fused kernels against their plain formulation: exact gradients (float64 ``gradcheck``), the
chunking, every activation and norm they accept, ResScale, frozen parameters, dropped samples, bf16
products."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmpoolformer import kernels
from mmpoolformer.kernels import mlp as mlp_kernel
from mmpoolformer.kernels.mlp import _NormMlpResidual, Activation, norm_rows
from mmpoolformer.kernels.pooling import _NormPoolResidual
from mmpoolformer.models.layers import LayerNorm2d, StarReLU
from mmpoolformer.testing import OpLog

BACKENDS = kernels.dispatch.backends(torch.device('cpu'), torch.float32)
# the float64 gradchecks run on a CUDA device too where there is one (its own pooling and norm kernels)
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason='no CUDA device'))]
# every activation the MLP kernel computes; StarReLU away from its initial scale 1 and bias 0
ACTIVATIONS = dict(gelu=nn.GELU(), gelu_tanh=nn.GELU(approximate='tanh'), relu=nn.ReLU(),
                   silu=nn.SiLU(), star_relu=StarReLU(0.8, -0.1))


def max_rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def plain_mlp_residual(x, norm, fc1, act, fc2, layer_scale, factors, res_scale=None):
    y = fc2(act(fc1(norm(x)))) * layer_scale.view(-1, 1, 1)
    residual = x if res_scale is None else x * res_scale.view(-1, 1, 1)
    return residual + (y if factors is None else y * factors)


def branch(dim=6, hidden=10, act=nn.GELU(), groups=1, affine=True, bias=True, dtype=torch.float64):
    """Norm, fc1, act, fc2 and LayerScale of an MLP branch; ``groups=None``: channel LayerNorm."""
    torch.manual_seed(0)
    if groups is None:
        norm = LayerNorm2d(dim, eps=1e-6, elementwise_affine=affine, bias=affine)
    else:
        norm = nn.GroupNorm(groups, dim, affine=affine)
    if affine:
        nn.init.normal_(norm.weight, 1, 0.3)
        nn.init.normal_(norm.bias, 0, 0.3)
    fc1, fc2 = nn.Conv2d(dim, hidden, 1, bias=bias), nn.Conv2d(hidden, dim, 1, bias=bias)
    layer_scale = nn.Parameter(torch.rand(dim) + 0.5)
    norm, fc1, fc2 = (m.to(dtype) for m in (norm, fc1, fc2))
    return [norm, fc1, act, fc2, layer_scale.to(dtype).detach().requires_grad_()]


def random_res_scale(dim, dtype):
    return (torch.rand(dim, dtype=dtype, generator=torch.Generator().manual_seed(2)) + 0.5
            ).requires_grad_()


SCALES = dict(per_sample=[2., 0., 1.], shared=[1.5] * 3, one=[1.] * 3, all_dropped=[0.] * 3)


def gradcheck_mlp_kernel(norm, fc1, act, fc2, scales, res_scale=None, device='cpu'):
    """float64 ``gradcheck`` of the autograd function with BLAS products (oneDNN has no float64; its
    plans are checked in fp32 below): per-sample factors give three chunks per sample (the last one
    short) and one dropped sample; one factor for all (1: no scaling at all), chunks of 16 rows
    across the 35-token samples; every sample dropped (the weights' gradients then have no share
    from any chunk, and are zero)."""
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    args = [x, norm.weight, norm.bias, fc1.weight.flatten(1), fc1.bias, fc2.weight.flatten(1), fc2.bias,
            res_scale, *act.parameters()]
    grad_args = [a.detach().to(device).requires_grad_() if a is not None else None for a in args]

    def fn(*args):
        return _NormMlpResidual.apply(*args[:8], norm_rows(norm), Activation(act), scales,
                                      kernels.Plan(backend='blas'), True, False, *args[8:])

    assert torch.autograd.gradcheck(fn, grad_args, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize('recompute_up_to', [1000, 0], ids=['hidden_recomputed', 'hidden_kept'])
@pytest.mark.parametrize('scales', SCALES.values(), ids=SCALES.keys())
@pytest.mark.parametrize('act', ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
def test_mlp_kernel_gradients_are_exact(act, scales, recompute_up_to, monkeypatch):
    """Either way of getting the hidden map back in backward: recomputed, or kept from forward."""
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', 16 * 10 * 8)  # 16 rows of 10 float64
    monkeypatch.setattr(mlp_kernel, 'RECOMPUTE_HIDDEN_UP_TO', recompute_up_to)
    norm, fc1, act, fc2, _ = branch(act=copy.deepcopy(act).double())
    gradcheck_mlp_kernel(norm, fc1, act, fc2, scales)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('scales', SCALES.values(), ids=SCALES.keys())
@pytest.mark.parametrize('res_scale', [False, True], ids=['', 'res_scale'])
@pytest.mark.parametrize('groups', [1, None], ids=['group_norm', 'layer_norm'])
def test_mlp_kernel_gradients_are_exact_with_either_norm_and_res_scale(groups, res_scale, scales,
                                                                      device, monkeypatch):
    """The MetaFormer Baselines' MLPs: channel LayerNorm (ConvFormer, CAFormer) or GroupNorm
    (PoolFormerV2), StarReLU, and ResScale on the residual (their last two stages)."""
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', 16 * 10 * 8)
    norm, fc1, act, fc2, _ = branch(act=StarReLU(0.8, -0.1).double(), groups=groups)
    gradcheck_mlp_kernel(norm, fc1, act, fc2, scales,
                         random_res_scale(6, torch.float64) if res_scale else None, device)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('groups, affine, bias', [(1, True, True), (3, True, True), (2, False, False),
                                                  (None, True, True), (None, False, False)],
                         ids=['gn1', 'gn3', 'gn_no_affine_no_bias', 'ln', 'ln_no_affine_no_bias'])
@pytest.mark.parametrize('frozen', [False, True], ids=['', 'fc1_frozen'])
@pytest.mark.parametrize('factors', [(2., .5), None], ids=['per_sample', 'none'])
@pytest.mark.parametrize('res_scale', [False, True], ids=['', 'res_scale'])
def test_mlp_kernel_equals_the_branch_as_written(groups, affine, bias, frozen, factors, res_scale,
                                                 backend, monkeypatch):
    """fp32 against the modules in float64: outputs and the gradients of every tensor taking part,
    over several chunks (within each sample where samples have factors of their own, across samples
    otherwise); a frozen parameter gets no gradient and changes nothing else."""
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', 100 * 24 * 4)
    modules = branch(dim=12, hidden=24, groups=groups, affine=affine, bias=bias, dtype=torch.float32)
    ref_modules = [copy.deepcopy(m).double() if isinstance(m, nn.Module) else m for m in modules]
    ref_modules[-1] = modules[-1].detach().double().requires_grad_()
    rs = random_res_scale(12, torch.float32) if res_scale else None
    ref_rs = rs.detach().double().requires_grad_() if res_scale else None
    x = torch.randn(2, 12, 23, 17, requires_grad=True)
    if factors is not None:
        factors = torch.tensor(factors).view(2, 1, 1, 1)

    def trained(norm, fc1, act, fc2, ls, rs):
        fc1.weight.requires_grad_(not frozen)
        return [p for p in (*norm.parameters(), *fc1.parameters(), *fc2.parameters(), ls, rs)
                if p is not None and p.requires_grad]

    params, ref_params = trained(*modules, rs), trained(*ref_modules, ref_rs)
    with kernels.forced(kernels.Plan(backend=backend)):
        y = kernels.norm_mlp_residual(x, *modules, rs, factors, plain=lambda x: pytest.fail('plain'))
    ref = plain_mlp_residual(x.double(), *ref_modules, None if factors is None else factors.double(),
                             ref_rs)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, [x] + params, g)
    ref_grads = torch.autograd.grad(ref, [x] + ref_params, g.double())
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert max_rel_err(y, ref) <= 1e-6
    assert len(grads) == len(ref_grads) == 1 + 2 * affine + 2 * (1 + bias) + 1 - frozen + res_scale
    for a, b in zip(grads, ref_grads):
        assert max_rel_err(a, b) <= 1e-5


@pytest.mark.parametrize('backend', BACKENDS)
def test_mlp_kernel_with_star_relu_equals_the_branch_as_written(backend, monkeypatch):
    """The MetaFormer Baselines' MLP (PoolFormerV2's in stages 0-1): GroupNorm without a bias, fc1 and
    fc2 without biases, StarReLU; fp32 against the modules in float64, the activation's learned scale
    and bias among the gradients."""
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', 100 * 24 * 4)
    norm, fc1, act, fc2, _ = branch(dim=12, hidden=24, act=StarReLU(0.8, -0.1), bias=False,
                                    dtype=torch.float32)
    norm.bias = None
    modules = (norm, fc1, act, fc2)
    refs = [copy.deepcopy(m).double() for m in modules]
    x = torch.randn(2, 12, 23, 17, requires_grad=True)
    with kernels.forced(kernels.Plan(backend=backend)):
        y = kernels.norm_mlp_residual(x, *modules, None, None, None,
                                      plain=lambda x: pytest.fail('plain'))
    xd = x.detach().double().requires_grad_()
    ref = xd + refs[3](refs[2](refs[1](refs[0](xd))))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    params = [p for m in modules for p in m.parameters()]
    assert len(params) == 5  # norm.weight, fc1.weight, scale, bias, fc2.weight
    grads = torch.autograd.grad(y, [x] + params, g)
    ref_grads = torch.autograd.grad(ref, [xd] + [p for m in refs for p in m.parameters()], g.double())
    assert max_rel_err(y, ref) <= 1e-6
    for a, b in zip(grads, ref_grads):
        assert max_rel_err(a, b) <= 1e-5


def low_products_against_fp32(groups, low, layer_scale=True):
    """The MLP kernel's output and gradients (x, fc1's and fc2's weights) under ``low`` autocast with
    products in ``low``, and their largest relative errors against the same with fp32 products."""
    norm, fc1, act, fc2, ls = branch(dim=16, hidden=64, groups=groups, dtype=torch.float32)
    ls = ls if layer_scale else None
    x = torch.randn(2, 16, 20, 20, requires_grad=True)
    results = []
    for dtype in (torch.float32, low):
        with torch.autocast('cpu', dtype=low), kernels.forced(kernels.Plan(dtype=dtype)):
            assert mlp_kernel._fused_plans(x, norm, act)[0].dtype == low  # (offered, the first)
            y = kernels.norm_mlp_residual(x, norm, fc1, act, fc2, ls, None, None, plain=None)
        assert y.dtype == torch.float32
        results.append((y, torch.autograd.grad(y.square().sum(), [x, fc1.weight, fc2.weight])))
    (y32, g32), (y_low, g_low) = results
    return max_rel_err(y_low, y32), [max_rel_err(a, b) for a, b in zip(g_low, g32)]


@pytest.mark.parametrize('groups', [1, None], ids=['group_norm', 'layer_norm'])
def test_mlp_kernel_with_bf16_products_tracks_fp32(groups, monkeypatch):
    monkeypatch.setattr(kernels.dispatch, 'native_low_precision', lambda device, dtype: True)
    out_err, grad_errs = low_products_against_fp32(groups, torch.bfloat16)
    assert 0 < out_err <= 1e-2
    assert all(err <= 3e-2 for err in grad_errs)


@pytest.mark.parametrize('groups', [1, None], ids=['group_norm', 'layer_norm'])
def test_mlp_kernel_with_fp16_products_tracks_fp32_where_the_device_has_them(groups, monkeypatch):
    """fp16 products, offered where the device multiplies fp16 natively (CUDA: what ``--amp`` gives
    there, a CPU with avx512_fp16; here the CPU made to say so) and no LayerScale is folded into
    fc2's weight: the output fp32 and within fp16's bounds of fp32 (tighter than bf16's); without
    native fp16 they are not offered."""
    norm, _, act, _, _ = branch(dim=16, hidden=64, groups=groups, dtype=torch.float32)
    x = torch.randn(2, 16, 20, 20)
    with torch.autocast('cpu', dtype=torch.float16):
        offered = mlp_kernel._fused_plans(x, norm, act)
        assert offered and all(plan.dtype != torch.float16 for plan in offered) or \
            kernels.dispatch.native_low_precision(x.device, torch.float16)
    monkeypatch.setattr(kernels.dispatch, 'native_low_precision', lambda device, dtype: True)
    with torch.autocast('cpu', dtype=torch.float16):  # (a folded LayerScale: fp32 products only)
        assert {p.dtype for p in mlp_kernel._fused_plans(x, norm, act, scaled_weight=True)} == {
            torch.float32}
    out_err, grad_errs = low_products_against_fp32(groups, torch.float16, layer_scale=False)
    # (measured: 1.5e-4 and at most 5e-4, a tenth of bf16's 1.5e-3 and 6e-3)
    assert 0 < out_err <= 5e-4
    assert all(err <= 1.5e-3 for err in grad_errs)


def gradcheck_first_half(norm, fc1, act, device='cpu'):
    """float64 ``gradcheck`` of the kernel without fc2: ``act(fc1(norm(x)))``, in chunks of 16 rows."""
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    args = [x, norm.weight, norm.bias, fc1.weight.flatten(1), fc1.bias, *act.parameters()]
    grad_args = [a.detach().to(device).requires_grad_() if a is not None else None for a in args]

    def fn(x, norm_weight, norm_bias, w1, b1, *act_params):
        return _NormMlpResidual.apply(x, norm_weight, norm_bias, w1, b1, None, None, None,
                                      norm_rows(norm), Activation(act), [1.] * 3,
                                      kernels.Plan(backend='blas'), True, False, *act_params)

    assert torch.autograd.gradcheck(fn, grad_args, eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('recompute_up_to', [1000, 0], ids=['hidden_recomputed', 'hidden_kept'])
@pytest.mark.parametrize('act', [StarReLU(0.8, -0.1), nn.GELU()], ids=['star_relu', 'gelu'])
@pytest.mark.parametrize('groups', [1, None], ids=['group_norm', 'layer_norm'])
def test_first_half_gradients_are_exact(groups, act, recompute_up_to, device, monkeypatch):
    """SepConv's expansion (ConvFormer: channel LayerNorm, StarReLU), either way of getting the
    hidden map back in backward."""
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', 16 * 10 * 8)
    monkeypatch.setattr(mlp_kernel, 'RECOMPUTE_HIDDEN_UP_TO', recompute_up_to)
    norm, fc1, act, _, _ = branch(act=copy.deepcopy(act).double(), groups=groups)
    gradcheck_first_half(norm, fc1, act, device)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('training', [True, False], ids=['train', 'infer'])
@pytest.mark.parametrize('groups', [1, None], ids=['group_norm', 'layer_norm'])
def test_norm_linear_act_equals_the_modules(groups, training, backend, monkeypatch):
    """fp32 against the modules in float64, over several chunks: the channels-last expanded map and
    the gradients of every tensor taking part; in inference (oneDNN: its activation in the product)."""
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', 100 * 24 * 4)
    norm, fc1, act, _, _ = branch(dim=12, hidden=24, act=StarReLU(0.8, -0.1), groups=groups,
                                  dtype=torch.float32)
    modules = (norm, fc1, act)
    refs = [copy.deepcopy(m).double() for m in modules]
    x = torch.randn(2, 12, 23, 17, requires_grad=training)
    with torch.set_grad_enabled(training), kernels.forced(kernels.Plan(backend=backend)):
        y = kernels.norm_linear_act(x, norm, fc1, act, plain=lambda x: pytest.fail('plain'))
    xd = x.detach().double().requires_grad_()
    ref = refs[2](refs[1](refs[0](xd)))
    assert y.shape == (2, 24, 23, 17) and y.is_contiguous(memory_format=torch.channels_last)
    assert max_rel_err(y, ref) <= 1e-6
    if not training:
        return
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    params = [p for m in modules for p in m.parameters()]
    grads = torch.autograd.grad(y, [x] + params, g)
    ref_grads = torch.autograd.grad(ref, [xd] + [p for m in refs for p in m.parameters()], g.double())
    assert len(grads) == 1 + 2 + 2 + 2
    for a, b in zip(grads, ref_grads):
        assert max_rel_err(a, b) <= 1e-5


def test_norm_linear_act_with_bf16_products_tracks_fp32():
    """Under autocast the expanded map stays fp32, its products in either precision."""
    norm, fc1, act, _, _ = branch(dim=16, hidden=32, groups=None, act=StarReLU(0.8, -0.1),
                                  dtype=torch.float32)
    x = torch.randn(2, 16, 20, 20, requires_grad=True)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast('cpu', dtype=torch.bfloat16), kernels.forced(kernels.Plan(dtype=dtype)):
            y = kernels.norm_linear_act(x, norm, fc1, act, plain=None)
        assert y.dtype == torch.float32
        results.append((y, torch.autograd.grad(y.square().sum(), [x, fc1.weight, act.scale])))
    (y32, g32), (y16, g16) = results
    assert 0 < max_rel_err(y16, y32) <= 2e-2
    assert all(max_rel_err(a, b) <= 3e-2 for a, b in zip(g16, g32))


@pytest.mark.parametrize('first_half', [False, True], ids=['mlp', 'expansion'])
@pytest.mark.parametrize('groups', [1, None], ids=['group_norm', 'layer_norm'])
def test_a_bf16_map_under_bf16_autocast_takes_the_kernel(groups, first_half, monkeypatch):
    """Under bf16 autocast a stage's residual stream is itself bf16 where no fp32 factor meets it
    (ConvFormer's and CAFormer's stages without ResScale, as in timm's model): the kernel takes such a
    map, with bf16 products, over several chunks; its output is bf16 (the MLP's as the modules'; the
    modules' expansion is fp32 where StarReLU's fp32 scale promotes it, and the depthwise convolution
    after it takes bf16 under autocast either way), and output and every gradient track fp32 as the
    kernel's bf16 products do on an fp32 map (above). Outside autocast a bf16 map is left to the
    plain formulation."""
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', 100 * 64 * 2)
    norm, fc1, act, fc2, _ = branch(dim=16, hidden=64, groups=groups, act=StarReLU(0.8, -0.1),
                                    dtype=torch.float32)
    params = [*norm.parameters(), *fc1.parameters(), *act.parameters()] + (
        [] if first_half else list(fc2.parameters()))

    def written(x):
        y = act(fc1(norm(x)))
        return y if first_half else x + fc2(y)

    def kernel(x, plain=lambda x: pytest.fail('plain')):
        if first_half:
            return kernels.norm_linear_act(x, norm, fc1, act, plain=plain)
        return kernels.norm_mlp_residual(x, norm, fc1, act, fc2, None, None, None, plain=plain)

    def step(fn, x, autocast=True):
        x = x.detach().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            y = fn(x)
        return [y] + list(torch.autograd.grad(y.float().square().sum(), [x] + params))

    x = torch.randn(2, 16, 20, 20).contiguous(memory_format=torch.channels_last).bfloat16()
    with kernels.forced(kernels.Plan(dtype=torch.bfloat16)):
        ours = step(kernel, x)
    assert ours[0].dtype == torch.bfloat16
    assert first_half or step(written, x)[0].dtype == torch.bfloat16
    fp32 = step(written, x.float(), autocast=False)
    assert 0 < max_rel_err(ours[0], fp32[0]) <= 1e-2
    assert all(max_rel_err(a, b) <= 3e-2 for a, b in zip(ours[1:], fp32[1:]))
    taken = []
    kernel(x, plain=lambda x: taken.append(x) or x)  # (no autocast)
    assert len(taken) == 1


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('res_scale', [False, True], ids=['', 'res_scale'])
@pytest.mark.parametrize('groups', [1, 3])
@pytest.mark.parametrize('channels_last', [False, True], ids=['contiguous', 'channels_last'])
def test_pooling_kernel_gradients_are_exact(groups, channels_last, res_scale, device):
    """float64 ``gradcheck``, the norm's statistics included, with and without ResScale (PoolFormerV2's
    last stages). Channels-last on CUDA: ``avg_pool2d``'s backward with padding was wrong there in
    some PyTorch releases (pytorch#188344), which a comparison of two formulations on the same
    device, both using it, would not see."""
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(2, 6, dtype=torch.float64, device=device) + 0.5
    shift = torch.randn(6, dtype=torch.float64, device=device)
    args = [t.requires_grad_() for t in (x, weight, shift)]
    args.append(random_res_scale(6, torch.float64).detach().to(device).requires_grad_()
                if res_scale else None)
    assert torch.autograd.gradcheck(lambda *a: _NormPoolResidual.apply(*a, groups, 1e-5, 3, None), args,
                                    rtol=1e-6)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('groups', [1, 4])
@pytest.mark.parametrize('channels_last', [False, True], ids=['contiguous', 'channels_last'])
def test_group_statistics_keep_their_accuracy_where_the_mean_dwarfs_the_spread(channels_last, groups,
                                                                              dtype):
    """Mean and ``rstd`` of every (sample, group) against float64, on maps whose mean is 300 times
    their spread: ``E[x^2] - E[x]^2`` in fp32 loses the variance's first digits there (its error is
    about 1e-7 times the squared ratio); deviations from the mean lose nothing."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 8, 24, 20, generator=g) + 300 * torch.rand(2, 1, 1, 1, generator=g) + 150)
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, rstd = kernels.group_norm.group_stats(x, groups, eps=1e-6)
    rows = x.double().reshape(2, groups, -1)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (2, groups)
    assert max_rel_err(mean, rows.mean(2)) <= 1e-6
    assert max_rel_err(rstd, (rows.var(2, correction=0) + 1e-6).rsqrt()) <= 1e-5


def test_the_kernels_step_aside_for_what_they_do_not_compute():
    """Another norm, activation or dtype: the plain formulation, which the kernel is handed."""
    norm, fc1, act, fc2, ls = branch(dtype=torch.float32)
    x = torch.randn(1, 6, 4, 4)
    taken = []
    plain = lambda x: taken.append(True) or x  # noqa: E731
    kernels.norm_mlp_residual(x, nn.BatchNorm2d(6), fc1, act, fc2, ls, None, None, plain)
    kernels.norm_mlp_residual(x, norm, fc1, nn.Tanh(), fc2, ls, None, None, plain)
    kernels.norm_mlp_residual(x.half(), norm, fc1, act, fc2, ls, None, None, plain)
    kernels.norm_pool_residual(x, nn.LayerNorm(6), 3, ls, None, plain)
    kernels.norm_linear_act(x, nn.BatchNorm2d(6), fc1, act, plain)
    kernels.norm_linear_act(x, norm, fc1, nn.Tanh(), plain)
    assert taken == [True] * 6


class _StarReluOperands(TorchDispatchMode):
    """Records, for each compiled StarReLU run inside it, whether it wrote over its input."""

    def __init__(self):
        super().__init__()
        self.over_input = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket._qualified_op_name == 'mmpoolformer::star_relu':
            h, out = args[:2]
            self.over_input.append(h.data_ptr() == out.data_ptr())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('backend', ['blas', 'onednn'])
@pytest.mark.parametrize('grad', [False, True], ids=['inference', 'training'])
def test_the_activation_writes_over_fc1s_output_where_that_is_not_kept(backend, grad, monkeypatch):
    """One hidden-width buffer in cache, not two: in inference fc1's output is read once, by the
    activation, which writes over it; in training (fc1's output kept for backward) into a buffer of
    its own. The chunk loops in Python; the compiled loop's threads are outside dispatch modes."""
    if kernels.native.ops() is None:
        pytest.skip('no compiled kernels here')
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', 100 * 24 * 4)
    monkeypatch.setattr(mlp_kernel, 'RECOMPUTE_HIDDEN_UP_TO', 0)
    norm, fc1, _, fc2, ls = branch(dim=12, hidden=24, dtype=torch.float32)
    act = StarReLU()  # (oneDNN applies GELU in its product in inference)
    x = torch.randn(2, 12, 23, 17, requires_grad=grad)
    with torch.set_grad_enabled(grad), kernels.forced(kernels.Plan(backend=backend)), \
            _StarReluOperands() as seen:
        kernels.norm_mlp_residual(x, norm, fc1, act, fc2, ls, None, None, plain=None)
    assert len(seen.over_input) > 2 and all(over is not grad for over in seen.over_input)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('act', ACTIVATIONS.values(), ids=ACTIVATIONS.keys())
def test_mlp_kernel_in_inference_equals_the_branch_as_written(act, backend, monkeypatch):
    """Without autograd (``torch.no_grad()``, the parameters still requiring grad, as in a model's
    inference) the kernel keeps no hidden map, and oneDNN applies the activation itself."""
    monkeypatch.setattr(mlp_kernel, 'CHUNK_BYTES', 100 * 24 * 4)
    monkeypatch.setattr(mlp_kernel, 'RECOMPUTE_HIDDEN_UP_TO', 0)  # training would keep it here
    norm, fc1, _, fc2, ls = branch(dim=12, hidden=24, act=act, dtype=torch.float32)
    x = torch.randn(2, 12, 23, 17)
    with torch.no_grad(), kernels.forced(kernels.Plan(backend=backend)), OpLog() as log:
        y = kernels.norm_mlp_residual(x, norm, fc1, act, fc2, ls, None, None, plain=None)
    ref = plain_mlp_residual(x.double(), *(m.double() for m in (norm, fc1)), act, fc2.double(),
                             ls.double(), None)
    assert max_rel_err(y, ref) <= 1e-6
    assert max(numel for _, numel in log.ops) < 2 * 23 * 17 * 24  # no whole hidden map
    activations = {'aten.gelu', 'mmpoolformer.gelu', 'mmpoolformer.bias_gelu', 'aten.clamp_min',
                   'aten.silu', 'mmpoolformer.star_relu'} & {
        name for name, _ in log.ops}
    assert not activations if backend == 'onednn' and type(act) is not StarReLU else activations
