"""The paths CUDA devices take around two of PyTorch's CUDA kernels: GroupNorm from statistics spread
over the device (``kernels.group_norm``), and the pooling's backward computed on NCHW maps where the
channels-last one is wrong (``kernels.pooling``). Each is checked on the CPU in float64 by calling or
forcing it there, and on a CUDA device where there is one."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpoolformer import kernels
from mmpoolformer.kernels import group_norm as gn
from mmpoolformer.kernels import pooling
from mmpoolformer.models import ConvFormer, PoolFormer, PoolFormerV2
from mmpoolformer.models.layers import GroupNorm
from mmpoolformer.models.token_mixers import Pooling
from mmpoolformer.testing import max_rel_err, randomize_weights

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
LAYOUTS = dict(contiguous=torch.contiguous_format, channels_last=torch.channels_last)
AFFINE = dict(weight_bias=(True, True), weight_only=(True, False), none=(False, False))


def norm_and_input(groups, affine, layout, device='cpu', dtype=torch.float64):
    torch.manual_seed(0)
    weight, bias = AFFINE[affine]
    norm = nn.GroupNorm(groups, 8, affine=weight).to(device, dtype)
    if weight:
        nn.init.normal_(norm.weight, 1, 0.3)
        nn.init.normal_(norm.bias, 0, 0.3)
        if not bias:
            norm.bias = None
    # a mean far from zero against the spread, as residual streams have
    x = (torch.randn(3, 8, 7, 5, dtype=dtype) * 2 + 3).to(device).contiguous(memory_format=layout)
    return norm, x


@pytest.mark.parametrize('layout', LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize('affine', AFFINE, ids=AFFINE.keys())
@pytest.mark.parametrize('groups', [1, 2])
def test_group_norm_backward_by_sums_equals_autograd(groups, affine, layout):
    """The backward CUDA devices take, on the CPU: every gradient as autograd's through
    ``F.group_norm`` to 1e-12, the input's in the input's layout."""
    norm, x = norm_and_input(groups, affine, layout)
    grad = torch.randn(x.shape, dtype=x.dtype).contiguous(memory_format=layout)
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    x.requires_grad_()
    expected = torch.autograd.grad(F.group_norm(x, groups, norm.weight, norm.bias, norm.eps),
                                   [x, *params], grad)
    mean, rstd = gn.group_stats(x.detach(), groups, norm.eps)
    needs = (True, norm.weight is not None, norm.bias is not None)
    got = gn.backward_by_sums(grad, x.detach(), mean, rstd, norm.weight, needs)
    got = [t for t in got if t is not None]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert max_rel_err(a, b) < 1e-12
    assert got[0].is_contiguous(memory_format=layout)


def test_group_norm_backward_by_sums_of_a_bf16_map_is_computed_in_fp32():
    """A bf16 map (the MLP kernel's under bf16 autocast): computed in fp32 and rounded once, as the
    CPU's backward does it: the two equal but where fp32's different summation orders round to
    neighbouring bf16 values (computed in bf16 they differed in 41% of the elements)."""
    norm, x = norm_and_input(1, 'weight_bias', torch.channels_last, dtype=torch.float32)
    x = x.bfloat16()
    grad = torch.randn(x.shape).bfloat16().contiguous(memory_format=torch.channels_last)
    mean, rstd = gn.group_stats(x, 1, norm.eps)
    needs = (True, True, True)
    by_sums = gn.backward_by_sums(grad, x, mean, rstd, norm.weight, needs)
    cpu = gn.group_norm_backward(grad, x, mean, rstd, norm.weight, needs)
    assert by_sums[0].dtype == torch.bfloat16
    assert max_rel_err(by_sums[0], cpu[0]) <= 2**-8
    assert (by_sums[0] != cpu[0]).float().mean() < 0.02
    for a, b in zip(by_sums[1:], cpu[1:]):
        assert max_rel_err(a, b) < 1e-5


@pytest.mark.parametrize('by_sums', [False, True], ids=['native_backward', 'by_sums'])
@pytest.mark.parametrize('layout', LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize('groups', [1, 2])
def test_group_norm_function_gradients_are_exact(groups, layout, by_sums, monkeypatch):
    """The function's float64 gradcheck, with either backward, and its output equal to PyTorch's."""
    if by_sums:
        monkeypatch.setattr(gn, 'group_norm_backward', gn.backward_by_sums)
    norm, x = norm_and_input(groups, 'weight_bias', layout)
    x.requires_grad_()
    y = gn._GroupNorm.apply(x, norm.weight, norm.bias, groups, norm.eps)
    assert max_rel_err(y, F.group_norm(x, groups, norm.weight, norm.bias, norm.eps)) < 1e-13
    assert torch.autograd.gradcheck(
        lambda x, w, b: gn._GroupNorm.apply(x, w, b, groups, norm.eps), (x, norm.weight, norm.bias))


def test_group_norm_module_is_pytorchs_on_the_cpu():
    """On a CPU the module is ``nn.GroupNorm`` exactly (PyTorch's kernel there uses every core)."""
    norm, x = norm_and_input(1, 'weight_bias', torch.channels_last, dtype=torch.float32)
    ours = GroupNorm(1, 8)
    ours.load_state_dict(norm.state_dict())
    assert torch.equal(ours(x), norm(x))
    assert isinstance(PoolFormer('s12').norm0, GroupNorm)


@pytest.mark.parametrize('cls', [PoolFormer, PoolFormerV2, ConvFormer], ids=lambda c: c.__name__)
def test_a_backbone_with_the_gpu_group_norm_equals_it_without(cls, monkeypatch):
    """End to end on the CPU in float64, the GroupNorm plan CUDA devices are offered forced in (the
    suite's deterministic mode takes every first candidate), with CUDA's backward, and the fused
    branches off, so that every norm is the module: outputs and every gradient as with PyTorch's
    GroupNorm, to 1e-10."""
    from mmpoolformer.kernels import mlp
    from mmpoolformer.models import token_mixers
    monkeypatch.setattr(mlp, '_fused_plans', lambda *args, **kwargs: None)
    monkeypatch.setattr(token_mixers, 'norm_pool_residual',
                        lambda x, norm, size, layer_scale, factors, plain, res_scale: plain(x))
    model = randomize_weights(cls(arch=next(iter(cls.arch_zoo)), out_indices=(0, 1, 2, 3))).double()
    calls = []
    forward = gn._GroupNorm.forward
    monkeypatch.setattr(gn._GroupNorm, 'forward', staticmethod(
        lambda *args: calls.append(1) or forward(*args)))
    monkeypatch.setattr(gn, 'group_norm_backward', gn.backward_by_sums)  # (CUDA's backward)
    x = torch.randn(2, 3, 45, 37, dtype=torch.float64)
    results = []
    for offered in (False, True):
        monkeypatch.setattr(gn, 'offered_on', lambda device: offered)
        model.zero_grad()
        xi = x.clone().requires_grad_()
        outs = model(xi)
        sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype)).sum()
            for i, o in enumerate(outs)).backward()
        results.append([*outs, xi.grad, *(p.grad for p in model.parameters())])
    plain, ours = results
    assert len(calls) == sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    for a, b in zip(ours, plain):
        # (or both rounding noise: PoolFormer's norm1.bias, which pooling minus identity cancels)
        assert max_rel_err(a, b) < 1e-10 or (a - b).abs().max() < 1e-13


def pool_gradient(x, pool_fn):
    x = x.detach().requires_grad_()
    weights = torch.linspace(-1, 2, x.numel(), dtype=x.dtype).view(x.shape).to(x.device)
    (pool_fn(x) * weights).sum().backward()
    return x.grad


@pytest.mark.parametrize('kernel', [3, 5])
def test_the_pooling_adjoint_on_nchw_copies_equals_pytorchs(kernel, monkeypatch):
    """Forced as on a device whose channels-last backward is wrong: the Pooling mixer's gradient on a
    channels-last map as PyTorch's on an NCHW one, to rounding, and in the map's layout; and the
    fused branch's too."""
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    expected = pool_gradient(x, nn.AvgPool2d(kernel, 1, kernel // 2, count_include_pad=False))
    monkeypatch.setattr(pooling, 'channels_last_adjoint_is_right', lambda device_type: False)
    mixer = Pooling(6, kernel)
    grad = pool_gradient(x.contiguous(memory_format=torch.channels_last), lambda x: mixer(x) + x)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    assert max_rel_err(grad, expected) < 1e-14
    adjoint = pooling.pool_adjoint(torch.randn(2, 6, 9, 7, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last), kernel)
    assert adjoint.is_contiguous(memory_format=torch.channels_last)


def test_the_fused_pooling_branch_takes_the_adjoint_on_nchw_copies(monkeypatch):
    """The fused branch's plain-operator backward (where no compiled kernel runs) goes through the
    same adjoint: float64 gradcheck with the workaround forced."""
    monkeypatch.setattr(pooling, 'channels_last_adjoint_is_right', lambda device_type: False)
    calls = []
    adjoint = pooling.pool_adjoint
    monkeypatch.setattr(pooling, 'pool_adjoint', lambda *a: calls.append(1) or adjoint(*a))
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = (torch.rand(2, 4, dtype=torch.float64) + 0.5).requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: pooling._NormPoolResidual.apply(x, w, None, None, 1, 1e-5, 3, None), (x, weight))
    assert calls


# ----------------------------------------------------------------------------------- on CUDA
@cuda
def test_the_channels_last_check_answers_for_this_device():
    """The check agrees with a direct comparison on a map of real size (2x64x61x45)."""
    grad = torch.randn(2, 64, 61, 45, device='cuda')
    args = ([3] * 2, [1] * 2, [1] * 2, False, False, None)
    nchw = torch.ops.aten.avg_pool2d_backward(grad, grad, *args)
    nhwc = torch.ops.aten.avg_pool2d_backward(*[grad.contiguous(memory_format=torch.channels_last)] * 2,
                                              *args)
    assert pooling.channels_last_adjoint_is_right('cuda') == bool(torch.allclose(nchw, nhwc, 1e-5, 1e-6))


@cuda
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['fp64', 'fp32'])
def test_the_pooling_mixers_gradient_on_cuda_channels_last(dtype):
    """The Pooling mixer's gradient on a CUDA channels-last map against float64 on the CPU."""
    x = torch.randn(2, 64, 61, 45, dtype=torch.float64)
    expected = pool_gradient(x, nn.AvgPool2d(3, 1, 1, count_include_pad=False))
    mixer = Pooling(64)
    got = pool_gradient(x.to('cuda', dtype).contiguous(memory_format=torch.channels_last),
                        lambda x: mixer(x) + x)
    assert max_rel_err(got.cpu(), expected) < (1e-12 if dtype == torch.float64 else 1e-6)


@cuda
@pytest.mark.parametrize('layout', LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize('groups', [1, 2])
def test_group_norm_on_cuda_equals_pytorchs(groups, layout):
    """The GroupNorm module on CUDA, forced to our plan: float64 output and every gradient as
    PyTorch's on the CPU to 1e-10; fp32 within 1e-5; under bf16 autocast an fp32 output, as PyTorch's
    GroupNorm gives there."""
    norm, x = norm_and_input(groups, 'weight_bias', layout)
    ours = GroupNorm(groups, 8)
    ours.load_state_dict(norm.state_dict())
    grad = torch.randn(x.shape, dtype=x.dtype)
    expected_x = x.clone().requires_grad_()
    expected_y = norm(expected_x)
    expected = [expected_y, *torch.autograd.grad(expected_y, [expected_x, *norm.parameters()], grad)]
    for dtype, bound in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        ours = ours.to('cuda', dtype)
        xc = x.to('cuda', dtype).contiguous(memory_format=layout).requires_grad_()
        with kernels.forced(kernels.Plan()):
            y = ours(xc)
        got = [y, *torch.autograd.grad(y, [xc, *ours.parameters()], grad.to('cuda', dtype))]
        for a, b in zip(got, expected):
            assert max_rel_err(a.cpu(), b) < bound
        assert got[1].is_contiguous(memory_format=layout)
    with torch.autocast('cuda', dtype=torch.bfloat16), kernels.forced(kernels.Plan()):
        assert ours.float()(x.to('cuda', torch.bfloat16)).dtype == torch.float32


def test_off_the_cpu_the_mlp_kernel_takes_every_row_in_one_chunk():
    """A GPU's products need many rows to fill it: one chunk of all ``N * HW`` token rows there; a
    CPU's chunks hold about ``CHUNK_BYTES`` of hidden activations, which stay in its cache."""
    from mmpoolformer.kernels import mlp
    tokens = dict(size=(2, 5000, 64), dtype=torch.float32)
    assert mlp._rows(256, torch.float32, torch.empty(**tokens, device='meta')) == 10000
    assert mlp._rows(256, torch.float32, torch.empty(**tokens)) == mlp.CHUNK_BYTES // (256 * 4)
