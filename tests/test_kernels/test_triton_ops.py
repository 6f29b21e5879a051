"""The Triton kernels of the pooling branch (``kernels/triton_ops.py``), which CUDA devices are offered.

Without a GPU they run under Triton's interpreter, on CPU tensors: Triton reads ``TRITON_INTERPRET``
when it is first imported, so the tests marked ``interpreted`` run in a process of their own, started
by :func:`test_the_interpreted_tests_pass_in_a_process_of_their_own`. On a CUDA device the ``cuda``
tests compile them and compare them with float64 on maps of real size.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpoolformer import kernels
from mmpoolformer.kernels import triton_ops
from mmpoolformer.testing import max_rel_err

triton = triton_ops.triton

INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'
interpreted = pytest.mark.skipif(not INTERPRETED, reason='run by the test that sets TRITON_INTERPRET')
cuda = pytest.mark.skipif(not torch.cuda.is_available() or triton_ops.triton is None,
                          reason='no CUDA device with Triton')
CHANNELS_LAST = dict(memory_format=torch.channels_last)
pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)


INTERPRETED_TESTS = ('test_each_pass_equals_float64', 'test_the_check_passes_and_catches_a_wrong_kernel',
                     'test_the_branch_with_the_triton_plan_equals_float64')


@pytest.mark.skipif(INTERPRETED or triton_ops.triton is None, reason='(the runner) / no Triton')
def test_the_interpreted_tests_pass_in_a_process_of_their_own():
    env = dict(os.environ, TRITON_INTERPRET='1')
    run = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rA', '-p', 'no:cacheprovider',
                          '-k', ' or '.join(INTERPRETED_TESTS), __file__],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    for name in INTERPRETED_TESTS:
        assert any(line.startswith('PASSED') and f'::{name}' in line for line in lines), name
    assert not any(line.startswith(('SKIPPED', 'FAILED')) for line in lines), run.stdout[-2000:]


def references(x, grad, scale, res_scale, kernel):
    """float64: the branch's output and the two backward passes, as PyTorch's operators give them."""
    x, grad = x.double(), grad.double()
    s = scale.double()[:, :, None, None]
    r = 1 if res_scale is None else res_scale.double()[:, None, None]
    pad = kernel // 2
    pooled = F.avg_pool2d(x, kernel, 1, pad, count_include_pad=False)
    mixed = torch.ops.aten.avg_pool2d_backward(grad, x, [kernel] * 2, [1] * 2, [pad] * 2, False,
                                               False, None) - grad
    return r * x + s * (pooled - x), mixed, (mixed * x).sum((2, 3)), s, r


def random_inputs(shape, res_scale, device='cpu'):
    torch.manual_seed(0)
    n, c = shape[:2]
    x, grad = ((torch.randn(shape) * 3 + 2).to(device).contiguous(**CHANNELS_LAST) for _ in range(2))
    scale = (torch.rand(n, c) + 0.5).to(device)
    res = (torch.rand(c) + 0.5).to(device) if res_scale else None
    return x, grad, scale, res


def check_passes(shape, kernel, res_scale, device):
    x, grad, scale, res = random_inputs(shape, res_scale, device)
    out, mixed = torch.empty_like(x), torch.empty_like(x)
    triton_ops.pool_mix(x, scale, res, out, kernel)
    sums = triton_ops.pool_mix_adjoint(grad, x, mixed, kernel)
    expected_out, expected_mixed, expected_sums, s, r = references(x.cpu(), grad.cpu(), scale.cpu(),
                                                                   None if res is None else res.cpu(),
                                                                   kernel)
    assert max_rel_err(out.cpu(), expected_out) < 1e-6
    assert max_rel_err(mixed.cpu(), expected_mixed) < 1e-6
    assert max_rel_err(sums.cpu(), expected_sums) < 1e-5
    assert out.is_contiguous(**CHANNELS_LAST) and sums.shape == scale.shape
    coef, shift = -scale * 0.3, scale * 0.7
    triton_ops.pool_mix_input_grad(mixed, grad, x, scale, res, coef, shift)
    expected = (s * expected_mixed + r * grad.cpu().double() + coef.cpu().double()[:, :, None, None]
                * x.cpu().double() + shift.cpu().double()[:, :, None, None])
    assert max_rel_err(mixed.cpu(), expected) < 1e-6


# ------------------------------------------------------------------- under Triton's interpreter
@interpreted
@pytest.mark.parametrize('shape, kernel, res_scale', [
    ((2, 70, 5, 19), 3, True),  # a channel tail after a block; a row longer than a block
    ((1, 33, 1, 4), 3, False),  # a map narrower than the window
    ((2, 5, 6, 7), 5, True),  # a wider window; fewer channels than a block
    ((2, 130, 3, 17), 3, False),  # three channel blocks
])
def test_each_pass_equals_float64(shape, kernel, res_scale):
    """Forward, the adjoint with its per-channel sums, and the input's gradient, each against
    PyTorch's operators in float64, windows cut by every edge."""
    check_passes(shape, kernel, res_scale, 'cpu')


@interpreted
def test_the_check_passes_and_catches_a_wrong_kernel():
    assert triton_ops.check(triton_ops.OPS, torch.device('cpu')) is None
    wrong = copy.copy(triton_ops.OPS)
    wrong.pool_mix = lambda x, scale, res_scale, out, kernel: triton_ops.pool_mix(x, scale, None, out,
                                                                                  kernel)
    assert triton_ops.check(wrong, torch.device('cpu')) == "their pooling disagrees with PyTorch's"


@interpreted
@pytest.mark.parametrize('res_scale', [False, True], ids=['', 'res_scale'])
@pytest.mark.parametrize('groups', [1, 2])
def test_the_branch_with_the_triton_plan_equals_float64(groups, res_scale, monkeypatch):
    """The pooling branch with its Triton plan (made available on the CPU): the kernels run, once
    each, and the output and every gradient are float64's, to fp32 rounding."""
    calls = []

    def counted(name):
        return lambda *args: calls.append(name) or getattr(triton_ops, name)(*args)

    ops = type(triton_ops.OPS)(**{name: counted(name) for name in vars(triton_ops.OPS)})
    monkeypatch.setattr(triton_ops, 'ops', lambda device: ops)
    torch.manual_seed(0)
    c = 12
    norm = nn.GroupNorm(groups, c)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    layer_scale = nn.Parameter(torch.rand(c) + 0.5)
    res = nn.Parameter(torch.rand(c) + 0.5) if res_scale else None
    x = (torch.randn(2, c, 9, 21) * 3 + 2).contiguous(**CHANNELS_LAST)
    grad = torch.randn(x.shape)

    def step(dtype, plan):
        modules = [None if m is None else copy.deepcopy(m).to(dtype) for m in (norm, layer_scale, res)]
        xi = x.to(dtype).requires_grad_()
        n, ls, r = modules

        def plain(x):
            normed = n(x)
            branch = ls.view(-1, 1, 1) * (pool(normed) - normed)
            return x + branch if r is None else r.view(-1, 1, 1) * x + branch

        with kernels.forced(plan):
            y = kernels.norm_pool_residual(xi, n, 3, ls, None, plain, res_scale=r)
        params = [xi, n.weight, ls] + ([] if r is None else [r])
        return [y] + list(torch.autograd.grad(y, params, grad.to(dtype)))

    ours = step(torch.float32, kernels.Plan(backend='triton'))
    assert calls == ['pool_mix', 'pool_mix_adjoint', 'pool_mix_input_grad']
    reference = step(torch.float64, kernels.PLAIN)
    for a, b in zip(ours, reference):
        assert max_rel_err(a, b) < 1e-5


# ------------------------------------------------------------------------- in this process
def test_the_kernels_refuse_what_they_do_not_compute():
    x = torch.randn(2, 8, 5, 5).contiguous(**CHANNELS_LAST)
    out, scale = torch.empty_like(x), torch.ones(2, 8)
    for args, what in (((x.contiguous(), scale, None, out, 3), 'channels-last'),
                       ((x.double(), scale, None, out.double(), 3), 'float32'),
                       ((x, scale, None, out, 4), 'odd pool size'),
                       ((x, scale, None, out[:, :, :4], 3), 'of one shape')):
        with pytest.raises(ValueError, match=what):
            triton_ops.pool_mix(*args)


def test_on_a_cpu_the_triton_plan_is_not_offered(timed_choices):
    assert triton_ops.ops(torch.device('cpu')) is None
    norm, ls = nn.GroupNorm(1, 8), torch.ones(8)
    x = torch.randn(2, 8, 6, 6).contiguous(**CHANNELS_LAST)
    plain = lambda x: x + ls.view(-1, 1, 1) * (pool(norm(x)) - norm(x))  # noqa: E731
    kernels.norm_pool_residual(x, norm, 3, ls, None, plain)
    timings, = kernels.dispatch.timings().values()
    assert set(timings) == {'fused/blas', 'plain'}


@pytest.mark.skipif(triton_ops.triton is None, reason='no Triton')
@pytest.mark.parametrize('arch', [80, 90], ids=['sm_80', 'sm_90'])
def test_the_kernels_compile_for_the_gpus_without_one(arch, tmp_path, monkeypatch):
    """Triton's whole pipeline down to the GPU's machine code (cubin) needs no GPU: what the
    interpreter does not check (types, layouts, what the compiler supports) is checked here for the
    A100's and the H100's / H200's architectures, with each variant the launchers use."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    monkeypatch.setenv('TRITON_CACHE_DIR', str(tmp_path))  # (compiled here, not taken from a cache)
    variants = dict(pool_mix=[dict(PAD=1, HAS_RES=True), dict(PAD=2, HAS_RES=False)],
                    pool_mix_adjoint=[dict(PAD=1)],
                    pool_mix_input_grad=[dict(HAS_RES=True, BLOCK_P=16), dict(HAS_RES=False, BLOCK_P=1)])
    for name, settings in variants.items():
        fn = getattr(triton_ops, '_' + name)
        for setting in settings:
            consts = dict(dict(BLOCK_W=triton_ops.BLOCK_W, BLOCK_C=64), **setting)
            signature = {arg: ('constexpr' if arg in consts else '*fp32' if arg.endswith('_ptr') else 'i32')
                         for arg in fn.arg_names}
            consts = {(fn.arg_names.index(k), ): v for k, v in consts.items() if k in fn.arg_names}
            compiled = triton.compile(ASTSource(fn, signature, constexprs=consts),
                                      target=GPUTarget('cuda', arch, 32))
            assert compiled.asm['cubin'], (name, setting)


# ----------------------------------------------------------------------------------- on CUDA
@cuda
@pytest.mark.parametrize('shape, res_scale', [((2, 64, 200, 304), False), ((2, 320, 50, 76), True)])
def test_the_kernels_on_cuda_equal_float64(shape, res_scale):
    """Compiled for the device, at the sizes of S12's stages 0 and 2 at 2x800x1216."""
    check_passes(shape, 3, res_scale, 'cuda')


@cuda
def test_on_cuda_the_triton_plan_is_offered_and_is_right():
    """The kernels pass their check on this device, and the branch computes with them as with
    PyTorch's operators, gradients included."""
    assert triton_ops.ops(torch.device('cuda')) is triton_ops.OPS
    torch.manual_seed(0)
    norm = nn.GroupNorm(1, 64).cuda()
    ls = nn.Parameter(torch.rand(64, device='cuda') + 0.5)
    x = (torch.randn(2, 64, 61, 45, device='cuda') * 3 + 2).contiguous(**CHANNELS_LAST)
    results = []
    for plan in (kernels.Plan(backend='triton'), kernels.Plan()):
        xi = x.clone().requires_grad_()
        with kernels.forced(plan):
            y = kernels.norm_pool_residual(xi, norm, 3, ls, None, lambda x: pytest.fail('plain'))
        grads = torch.autograd.grad(y, [xi, norm.weight, ls], torch.ones_like(y))
        results.append([y, *grads])
    for a, b in zip(*results):
        assert max_rel_err(a, b) < 1e-5
