"""The backbone's fast formulations (every plan of ``mmpoolformer.kernels``: the fused branches with
each backend, and the plain one) equal the official formulation, for outputs and every gradient.

The reference is mmpretrain's PoolFormer, which runs the official formulation block by block under the
official module names, so parameters and their gradients are compared name by name. It runs in float64:
two fp32 formulations differ by their rounding (about 5e-6 each from the exact values here), so the
bound is on ours against the exact result.
"""
import pytest
import torch
from mmpretrain.models.backbones import PoolFormer as ReferencePoolFormer

from mmpoolformer import kernels
from mmpoolformer.models import MetaFormerBlock, Pooling, PoolFormer
from mmpoolformer.testing import max_rel_err, randomize_weights

# every plan this machine offers for fp32 (the dispatch picks among them at run time)
PLANS = [kernels.Plan(backend=b) for b in kernels.dispatch.backends(torch.device('cpu'), torch.float32)]
PLANS.append(kernels.PLAIN)



def randomized_pair(seed=0):
    """Ours and the reference with the same weights, far from their init (LayerScale 0.5-1, so that a
    wrong block cannot hide behind a 1e-5 scale)."""
    ref = randomize_weights(
        ReferencePoolFormer(arch='s12', out_indices=(0, 2, 4, 6), frozen_stages=-1), seed)
    ours = PoolFormer('s12')
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.double().train()
    ours.train()
    return ours, ref


def forward_backward(model, x):
    x = x.clone().requires_grad_()
    outs = model(x)
    # a loss that weighs every position differently, so no gradient cancels by symmetry
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return outs, x.grad, grads


@pytest.mark.parametrize('plan', PLANS, ids=str)
@pytest.mark.parametrize('channels_last', [False, True], ids=['contiguous', 'channels_last'])
def test_outputs_and_gradients_equal_the_official_formulation(channels_last, plan):
    ours, ref = randomized_pair()
    x = torch.randn(2, 3, 61, 45, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with kernels.forced(plan):
        outs, grad_x, grads = forward_backward(ours, x)
    ref_outs, ref_grad_x, ref_grads = forward_backward(ref, x.double())

    for a, b in zip(outs, ref_outs):
        assert a.shape == b.shape and a.is_contiguous()
        assert max_rel_err(a, b) <= 1e-5
    assert max_rel_err(grad_x, ref_grad_x) <= 1e-5
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        if name.endswith('norm1.bias'):
            # pooling cancels this shift: exactly zero in the fused kernel, rounding noise otherwise
            scale = grads[name.replace('bias', 'weight')].abs().max()
            assert ref_grads[name].abs().max() < 1e-9 * scale
            assert not g.any() if plan.fused else g.abs().max() < 1e-5 * scale
            continue
        # parameter gradients sum over every token: the fp32 formulation as written (plain) is
        # itself 1.1e-5 from the exact values on this input
        assert max_rel_err(g, ref_grads[name]) <= 2e-5, name


@pytest.mark.parametrize('plan', PLANS, ids=str)
def test_inference_equals_the_official_formulation(plan):
    """Under ``torch.no_grad()`` each block's MLP residual is written over the block's own map (the
    mixer's residual): the outputs still equal the official formulation's, and the input image is left
    as it was."""
    ours, ref = randomized_pair()
    ours.eval()
    ref.eval()
    x = torch.randn(2, 3, 61, 45, generator=torch.Generator().manual_seed(1))
    image = x.clone()
    with torch.no_grad(), kernels.forced(plan):
        outs = ours(x)
        ref_outs = ref(x.double())
    assert torch.equal(x, image)
    for a, b in zip(outs, ref_outs):
        assert max_rel_err(a, b) <= 1e-5


class _Owning(torch.nn.Module):
    """A branch that reports the ``overwrite`` it is offered, as the residual itself."""

    def __init__(self, result):
        super().__init__()
        self.result, self.offered = result, []

    def fused_residual(self, x, norm, layer_scale, res_scale, factors, plain, overwrite=False):
        self.offered.append(overwrite)
        return self.result(x)


@pytest.mark.parametrize('mixer_result, offered', [(lambda x: x + 1, True), (lambda x: x, False),
                                                   (lambda x: x[:, :], False)],
                         ids=['new_map', 'its_input', 'a_view_of_its_input'])
def test_the_block_offers_the_mlp_its_own_map_only(mixer_result, offered):
    """The MLP's residual may write over the mixer's residual where that is a map the block made,
    never over the block's input (a mixer that hands it back, or a view of it)."""
    block = MetaFormerBlock(8, _Owning(mixer_result))
    block.mlp = _Owning(lambda x: x)
    block(torch.randn(1, 8, 3, 3))
    assert block.token_mixer.offered == [False] and block.mlp.offered == [offered]


@pytest.mark.parametrize('plan', PLANS[:-1], ids=str)
def test_fused_block_equals_its_plain_formulation_with_drop_path(plan):
    """The block with drop path active: the same samples are dropped in both formulations, and the
    fused kernels see several chunks per sample."""
    torch.manual_seed(0)
    block = MetaFormerBlock(16, Pooling(16, pool_size=5), drop_path=0.5, layer_scale_init_value=0.7)
    x = torch.randn(6, 16, 91, 57).requires_grad_()
    results = []
    for p in (plan, kernels.PLAIN):
        torch.manual_seed(3)
        with kernels.forced(p):
            y = block(x)
        grads = torch.autograd.grad((y * y.detach().cos()).sum(), [x, *block.parameters()])
        results.append((y, grads))
    (fused, fused_grads), (plain, plain_grads) = results
    assert max_rel_err(fused, plain) <= 1e-6
    names = ['x'] + [n for n, _ in block.named_parameters()]
    for name, a, b in zip(names, fused_grads, plain_grads):
        if name == 'norm1.bias':  # cancelled by pooling: zero, or rounding noise as written
            assert not a.any() and b.abs().max() < 1e-5 * plain_grads[1].abs().max()
        else:
            assert max_rel_err(a, b) <= 1e-5, name
    dropped = [(y == x).all().item() for y, x in zip(plain.detach(), x.detach())]
    assert any(dropped) and not all(dropped)  # the mask is exercised both ways


@pytest.mark.parametrize('plan', PLANS + [kernels.Plan(dtype=torch.bfloat16)], ids=str)
def test_autocast_keeps_layer_scale_alive_and_statistics_finite(plan, monkeypatch):
    """Under autocast a LayerScale of 1e-6 must still scale the MLP branch (1e-6 x a weight is below
    fp16's range), and the pooling branch's statistics of a large low-precision map (a convolution's
    output under autocast) must not overflow. On every CPU as on one that multiplies fp16 (a GPU, or
    avx512_fp16, where fp16 products are offered)."""
    monkeypatch.setattr(kernels.dispatch, 'native_low_precision', lambda device, dtype: True)
    torch.manual_seed(0)
    block = MetaFormerBlock(32, Pooling(32), layer_scale_init_value=1e-6).train()
    block.norm2.eps = 1e-14  # so that a map of 1e-4 normalises as one of 1 would
    x = torch.randn(2, 32, 9, 11) * 1e-4  # the branch (~1e-6) is then far above x's rounding
    big = (torch.randn(2, 32, 9, 11) * 300).half()  # its sum of squares is beyond fp16's 65504
    with kernels.forced(kernels.PLAIN):
        expected_mlp = block.residual(x, block.norm2, block.mlp, block.layer_scale_2) - x
        expected_pool = block.residual(big.float(), block.norm1, block.token_mixer, None)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast('cpu', dtype=dtype), kernels.forced(plan):
            mlp = block.residual(x, block.norm2, block.mlp, block.layer_scale_2) - x
            pool = block.residual(big, block.norm1, block.token_mixer, None)
        assert max_rel_err(mlp, expected_mlp) <= 2e-2, dtype
        assert pool.dtype == torch.float32 and max_rel_err(pool, expected_pool) <= 1e-3, dtype


def test_bf16_autocast_training_steps_stay_finite_and_learn():
    torch.manual_seed(0)
    model = PoolFormer('s12', out_indices=(1, 3)).train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 96, 64)
    target = [torch.randn(2, 128, 12, 8), torch.randn(2, 512, 3, 2)]
    losses = []
    for _ in range(5):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            outs = model(x)
            loss = sum(((o.float() - t)**2).mean() for o, t in zip(outs, target))
        optim.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optim.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_frozen_stages_leave_the_other_gradients_unchanged():
    """Frozen parameters skip their part of the fused backward; everything else is unaffected."""
    ours, _ = randomized_pair()
    frozen = PoolFormer('s12', frozen_stages=2)
    frozen.load_state_dict(ours.state_dict())
    frozen.train()
    x = torch.randn(1, 3, 45, 37, generator=torch.Generator().manual_seed(2))
    _, _, grads = forward_backward(ours, x)
    _, _, frozen_grads = forward_backward(frozen, x)
    trained = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(('network.3.', 'network.4.', 'network.5.', 'network.6.',
                                         'norm4.', 'norm6.')) for n in trained)
    for name in trained:
        torch.testing.assert_close(frozen_grads[name], grads[name], rtol=0, atol=0)
    assert all(frozen_grads[n] is None for n in set(grads) - trained)


def test_tracing_sees_standard_ops_with_the_same_result():
    """FLOP counters and exporters trace the model; they get the plain formulation, equal to the fast."""
    ours, _ = randomized_pair()
    ours.eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        traced = torch.jit.trace(ours, x, check_trace=False)
        graph = str(traced.inlined_graph)
        for a, b in zip(traced(x), ours(x)):
            assert max_rel_err(a, b) <= 1e-5
    assert 'PythonOp' not in graph and 'avg_pool2d' in graph
