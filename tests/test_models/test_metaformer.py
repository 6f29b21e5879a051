import itertools

import pytest
import torch
import torch.nn as nn

from mmpoolformer.models import MetaFormer, PoolFormer

# A four-stage MetaFormer small enough to run many times per test.
TINY = dict(depths=[1, 1, 2, 1], embed_dims=[8, 16, 24, 32])

# Whole-backbone parameter counts of the official dense models (all four output norms).
OFFICIAL_PARAMS = {
    's12': 11_403_200,
    's24': 20_876_992,
    's36': 30_350_784,
    'm36': 55_404_864,
    'm48': 72_705_792,
}


def count(model):
    return sum(p.numel() for p in model.parameters())


def conv_out(size, kernel, stride, pad):
    return (size + 2 * pad - kernel) // stride + 1


@pytest.mark.parametrize('arch', sorted(OFFICIAL_PARAMS))
def test_param_count_matches_official(arch):
    assert count(PoolFormer(arch)) == OFFICIAL_PARAMS[arch]


@pytest.mark.parametrize('arch', sorted(OFFICIAL_PARAMS))
def test_shapes_at_odd_input_size(arch):
    model = PoolFormer(arch).eval()
    h, w = 67, 45
    with torch.no_grad():
        outs = model(torch.randn(1, 3, h, w))
    h, w = conv_out(h, 7, 4, 2), conv_out(w, 7, 4, 2)
    expected = []
    for i, dim in enumerate(PoolFormer.arch_zoo[arch]['embed_dims']):
        if i > 0:
            h, w = conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)
        expected.append((1, dim, h, w))
    assert [tuple(o.shape) for o in outs] == expected


def test_arch_table_is_the_papers():
    zoo = PoolFormer.arch_zoo
    assert zoo['s12']['depths'] == [2, 2, 6, 2] and zoo['m48']['depths'] == [8, 8, 24, 8]
    assert zoo['s36']['embed_dims'] == [64, 128, 320, 512]
    assert zoo['m36']['embed_dims'] == [96, 192, 384, 768]
    model = PoolFormer('s24')
    assert torch.all(model.network[4][0].layer_scale_1 == 1e-5)
    assert torch.all(PoolFormer('m36').network[6][5].layer_scale_2 == 1e-6)
    assert model.network[0][0].mlp.fc1.out_channels == 4 * 64


def test_out_indices_select_and_truncate():
    model = MetaFormer(arch=TINY, out_indices=(1, ))
    outs = model(torch.randn(2, 3, 64, 64))
    assert len(outs) == 1 and outs[0].shape == (2, 16, 8, 8)
    # stages after the last emitted one are not built, and only emitted maps have a norm
    assert len(model.network) == 3
    assert hasattr(model, 'norm2') and not hasattr(model, 'norm0')


@pytest.mark.parametrize('out_indices', [
    c for r in range(1, 5) for c in itertools.combinations(range(4), r)])
def test_every_parameter_gets_a_gradient(out_indices):
    """What DDP without find_unused_parameters needs, for every subset of outputs."""
    torch.manual_seed(0)
    model = MetaFormer(arch=TINY, out_indices=out_indices)
    model.train()
    outs = model(torch.randn(2, 3, 37, 53))
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # The pooling mixer cancels the shift of the norm before it, so that bias's gradient is exactly 0.
    idle = [n for n, p in model.named_parameters() if not p.grad.any()]
    assert idle and all(n.endswith('norm1.bias') for n in idle)


def test_frozen_stages_get_no_gradient_and_stay_in_eval():
    model = MetaFormer(arch=TINY, frozen_stages=2, norm_cfg=dict(type='BN'))
    model.train()
    outs = model(torch.randn(2, 3, 32, 32))
    sum(o.sum() for o in outs).backward()
    frozen = ['patch_embed.', 'network.0.', 'network.1.', 'network.2.', 'norm0.', 'norm2.']
    for name, p in model.named_parameters():
        if name.startswith(tuple(frozen)):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None, name
    assert not model.network[2].training and model.network[4].training
    # a frozen BatchNorm must not update its running statistics
    mean = model.network[0][0].norm1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(mean, model.network[0][0].norm1.running_mean)


def test_frozen_stem_only():
    model = MetaFormer(arch=TINY, frozen_stages=0)
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert all(p.requires_grad for p in model.network.parameters())


def test_norm_eval_keeps_batchnorm_in_eval():
    model = MetaFormer(arch=TINY, norm_cfg=dict(type='BN'), norm_eval=True)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.training


def test_with_cp_gives_same_outputs_and_gradients():
    torch.manual_seed(0)
    ref = MetaFormer(arch=TINY)
    ckpt = MetaFormer(arch=TINY, with_cp=True)
    ckpt.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 41, 29)
    results = []
    for model in (ref, ckpt):
        model.train()
        outs = model(x)
        sum((o * o).sum() for o in outs).backward()
        results.append((outs, {n: p.grad for n, p in model.named_parameters()}))
    (outs_ref, grads_ref), (outs_cp, grads_cp) = results
    for o_ref, o_cp in zip(outs_ref, outs_cp):
        torch.testing.assert_close(o_cp, o_ref, rtol=0, atol=0)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_cp[name], g, rtol=1e-6, atol=1e-9)


def test_drop_path_is_linear_over_all_blocks():
    model = MetaFormer(arch=TINY, drop_path_rate=0.4, out_indices=(0, 1))
    rates = [getattr(b.drop_path, 'drop_prob', 0.) for stage in model.network[0::2] for b in stage]
    # 5 blocks in the full arch: 0, .1, .2, .3, .4; only stages 0 and 1 (2 blocks) are built
    assert rates[0] == 0 and rates[1] == pytest.approx(0.1)


def test_autocast_bf16_forward_is_finite():
    model = PoolFormer('s12').eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(torch.randn(1, 3, 96, 80))
    assert all(torch.isfinite(o.float()).all() for o in outs)


def test_custom_arch_and_token_mixers_per_stage():
    model = MetaFormer(
        arch=dict(depths=[1, 1, 1, 1], embed_dims=[8, 8, 16, 16], mlp_ratios=[2, 2, 4, 4],
                  layer_scale_init_value=None),
        token_mixers=[dict(type='Pooling', pool_size=5), dict(type='Identity'),
                      dict(type='Pooling'), dict(type='Identity')])
    assert model.network[0][0].token_mixer.pool_size == 5
    assert type(model.network[2][0].token_mixer).__name__ == 'Identity'
    assert model.network[0][0].mlp.fc1.out_channels == 16
    assert not any('layer_scale' in n for n, _ in model.named_parameters())
    assert [o.shape[1] for o in model(torch.randn(1, 3, 32, 32))] == [8, 8, 16, 16]


@pytest.mark.parametrize('kwargs, message', [
    (dict(arch='s13'), "valid: ['m36', 'm48', 's12', 's24', 's36']"),
    (dict(arch=dict(depths=[2, 2])), "missing keys ['embed_dims']"),
    (dict(arch=dict(TINY, width=3)), "unknown keys ['width']"),
    (dict(arch=dict(depths=[1, 1], embed_dims=[8])), 'one entry per stage'),
    (dict(out_indices=(4, )), 'from [0, 1, 2, 3]'),
    (dict(out_indices=()), 'non-empty'),
    (dict(out_indices=(1, 1)), 'distinct'),
    (dict(frozen_stages=5), 'frozen_stages must be an int in [-1, 4]'),
    (dict(drop_path_rate=1.0), 'drop_path_rate must be in [0, 1)'),
    (dict(token_mixers=[dict(type='Pooling')] * 3), 'list of 4 such dicts'),
    (dict(norm_cfg=dict(type='LN')), "allowed: ['BN', 'GN', 'LN2d', 'SyncBN']"),
    (dict(act_cfg=dict(type='Tanh')), "allowed: ['GELU', 'ReLU', 'SiLU', 'StarReLU']"),
    (dict(token_mixers=dict(type='Pooling', pool_size=4)), 'pool_size must be a positive odd int'),
    (dict(token_mixers=dict(type='Poolng')),
     "unknown token mixer 'Poolng'; registered in mmpoolformer.registry.TOKEN_MIXERS: "
     "['Attention', 'DepthwiseConv', 'Identity', 'Pooling', 'RandomMixing', 'SepConv', 'SpatialFc']"),
    (dict(use_layer_scale='yes'), "use_layer_scale must be bool, got str 'yes'"),
    (dict(pos_embed_sizes=[None, (14, 14)]), 'pos_embed_sizes must be a list of 4 entries'),
    (dict(pos_embed_sizes=[None, None, 14, None]), 'each None or a token grid (h, w)'),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError, KeyError)) as info:
        PoolFormer(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize('norm_cfg, norm_type', [
    (dict(type='GN', num_groups=1), nn.GroupNorm), (dict(type='LN2d'), nn.LayerNorm),
    (dict(type='BN'), nn.BatchNorm2d)])
@pytest.mark.parametrize('act', ['GELU', 'ReLU', 'SiLU'])
def test_ablation_norm_and_activation(norm_cfg, norm_type, act):
    model = MetaFormer(arch=TINY, norm_cfg=norm_cfg, act_cfg=dict(type=act))
    block = model.network[4][1]
    for norm in (block.norm1, block.norm2, model.norm6):
        assert isinstance(norm, norm_type)
    if norm_type is nn.GroupNorm:
        assert block.norm1.num_groups == 1  # the modified LayerNorm: over channels and space
    assert type(block.mlp.act).__name__ == act
    x = torch.randn(2, 3, 33, 47)
    # a channel LayerNorm normalises each position over the channels; GroupNorm(1, C) the whole map
    h = torch.randn(2, 24, 5, 7) * 3 + 1
    normed = block.norm1.eval()(h)
    if norm_type is nn.LayerNorm:
        torch.testing.assert_close(normed.mean(1), torch.zeros(2, 5, 7), atol=1e-5, rtol=0)
    elif norm_type is nn.GroupNorm:
        torch.testing.assert_close(normed.mean((1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
        assert normed.mean(1).abs().max() > 0.1
    model.train()
    sum(o.sum() for o in model(x)).backward()


def test_ablation_layer_scale_off_is_layer_scale_one():
    torch.manual_seed(0)
    with_ls = MetaFormer(arch=TINY, token_mixers=dict(type='Pooling', pool_size=7)).eval()
    without = MetaFormer(arch=TINY, token_mixers=dict(type='Pooling', pool_size=7),
                         use_layer_scale=False).eval()
    assert not any('layer_scale' in n for n in without.state_dict())
    assert without.network[2][0].token_mixer.pool_size == 7
    with torch.no_grad():
        for name, p in with_ls.named_parameters():
            if 'layer_scale' in name:
                p.fill_(1.)
    without.load_state_dict(with_ls.state_dict(), strict=False)
    x = torch.randn(1, 3, 40, 36)
    with torch.no_grad():
        for a, b in zip(without(x), with_ls(x)):
            torch.testing.assert_close(a, b)
    # and LayerScale does change the result when it is not 1
    with torch.no_grad():
        with_ls.network[0][0].layer_scale_1.fill_(0.3)
        assert not torch.allclose(with_ls(x)[0], without(x)[0])
