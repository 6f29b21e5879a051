"""Every registered token mixer: shapes and gradients at odd sizes, what each computes (against a direct
formula), how the fixed-grid mixers behave on other grids, and clear errors for bad configs."""
import pytest
import torch
import torch.nn.functional as F

from mmpoolformer.models import MetaFormer, Pooling
from mmpoolformer.models.metaformer import PositionEmbedding
from mmpoolformer.models.token_mixers import build_token_mixer, resize_token_matrix
from mmpoolformer.registry import TOKEN_MIXERS

MIXERS = [
    dict(type='Pooling', pool_size=5),
    dict(type='Identity'),
    dict(type='DepthwiseConv', kernel_size=5),
    dict(type='Attention', head_dim=8),
    dict(type='Attention', head_dim=8, sr_ratio=3, qkv_bias=True),
    dict(type='SpatialFc', spatial_shape=(4, 4)),
    dict(type='RandomMixing', spatial_shape=(4, 4)),
    dict(type='SepConv', kernel_size=5, bias=True),
]


def test_every_registered_mixer_is_tested():
    assert {c['type'] for c in MIXERS} == set(TOKEN_MIXERS.module_dict)


@pytest.mark.parametrize('cfg', MIXERS, ids=lambda c: '-'.join(map(str, c.values())))
@pytest.mark.parametrize('size', [(13, 9), (1, 1), (4, 4)])
def test_forward_and_backward_at_odd_sizes(cfg, size):
    torch.manual_seed(0)
    mixer = build_token_mixer(cfg, dim=16)
    x = torch.randn(2, 16, *size, requires_grad=True)
    out = mixer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize('cfg', MIXERS, ids=lambda c: c['type'])
def test_whole_backbone_with_the_mixer_in_the_last_two_stages(cfg):
    """In a model: odd input size (the last stages get grids of 3x2 and 2x1), every parameter trains."""
    cfg = dict(cfg)
    if 'spatial_shape' in cfg:
        cfg['spatial_shape'] = (2, 2)
    model = MetaFormer(arch=dict(depths=[1, 1, 1, 1], embed_dims=[8, 16, 32, 32]),
                       token_mixers=[dict(type='Pooling')] * 2 + [cfg] * 2,
                       pos_embed_sizes=[None, None, (2, 2), None])
    outs = model(torch.randn(2, 3, 45, 29))
    assert [tuple(o.shape[2:]) for o in outs] == [(11, 7), (6, 4), (3, 2), (2, 1)]
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # only the shift of a norm that a pooling mixer cancels has an (exactly) zero gradient
    idle = {n for n, p in model.named_parameters() if not p.grad.any()}
    pooled = {n for n, m in model.named_modules()
              if isinstance(getattr(m, 'token_mixer', None), Pooling)}
    assert idle == {f'{n}.norm1.bias' for n in pooled}


def direct_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads, sr_ratio):
    """Softmax attention written out, keys and values from the ``sr_ratio``-pooled map."""
    n, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    kv_tokens = F.avg_pool2d(x, sr_ratio, ceil_mode=True).flatten(2).transpose(1, 2)
    q = F.linear(tokens, qkv_w[:c], None if qkv_b is None else qkv_b[:c])
    k = F.linear(kv_tokens, qkv_w[c:2 * c], None if qkv_b is None else qkv_b[c:2 * c])
    v = F.linear(kv_tokens, qkv_w[2 * c:], None if qkv_b is None else qkv_b[2 * c:])
    split = lambda t: t.reshape(n, t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = (q @ k.transpose(-1, -2) / (c // heads)**0.5).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(n, h * w, c)
    return F.linear(out, proj_w, proj_b).transpose(1, 2).reshape(n, c, h, w)


@pytest.mark.parametrize('sr_ratio, qkv_bias', [(1, False), (2, True), (4, False)])
def test_attention_is_softmax_attention_over_pooled_keys(sr_ratio, qkv_bias):
    torch.manual_seed(0)
    mixer = build_token_mixer(dict(type='Attention', sr_ratio=sr_ratio, qkv_bias=qkv_bias), dim=64)
    assert mixer.num_heads == 2 and mixer.head_dim == 32  # head dim 32 by default, as the hybrids
    x = torch.randn(2, 64, 11, 7)
    expected = direct_attention(x, mixer.qkv.weight, mixer.qkv.bias, mixer.proj.weight, mixer.proj.bias,
                                heads=2, sr_ratio=sr_ratio)
    torch.testing.assert_close(mixer(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_reduction_keeps_the_parameters():
    """A checkpoint trained without reduction loads into a reduced attention."""
    full = build_token_mixer(dict(type='Attention'), dim=64)
    reduced = build_token_mixer(dict(type='Attention', sr_ratio=2), dim=64)
    reduced.load_state_dict(full.state_dict(), strict=True)
    # a map that is constant over 2x2 windows: pooling loses nothing, so the two agree
    x = torch.randn(1, 64, 4, 3).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    # the full attention sees every key 4 times, the reduced one once: softmax weights are the same
    torch.testing.assert_close(reduced(x), full(x), rtol=1e-5, atol=1e-5)


def test_depthwise_conv_is_one_filter_per_channel():
    mixer = build_token_mixer(dict(type='DepthwiseConv'), dim=6)
    assert mixer.conv.weight.shape == (6, 1, 3, 3) and mixer.conv.groups == 6
    x = torch.randn(1, 6, 5, 8)
    torch.testing.assert_close(mixer(x), F.conv2d(x, mixer.conv.weight, mixer.conv.bias, padding=1,
                                                  groups=6))


def test_sep_conv_is_expand_activate_filter_project():
    torch.manual_seed(0)
    mixer = build_token_mixer(dict(type='SepConv'), dim=6)
    assert mixer.pwconv1.weight.shape == (12, 6, 1, 1) and mixer.pwconv2.weight.shape == (6, 12, 1, 1)
    assert mixer.dwconv.weight.shape == (12, 1, 7, 7) and mixer.dwconv.groups == 12
    assert all(m.bias is None for m in (mixer.pwconv1, mixer.dwconv, mixer.pwconv2))
    with torch.no_grad():
        mixer.act1.scale.fill_(0.7)
        mixer.act1.bias.fill_(-0.2)
    x = torch.randn(2, 6, 9, 5)
    hidden = torch.einsum('oc,nchw->nohw', mixer.pwconv1.weight.flatten(1), x)
    hidden = 0.7 * hidden.clamp(min=0) ** 2 - 0.2
    hidden = F.conv2d(hidden, mixer.dwconv.weight, padding=3, groups=12)
    expected = torch.einsum('oc,nchw->nohw', mixer.pwconv2.weight.flatten(1), hidden)
    torch.testing.assert_close(mixer(x), expected, rtol=1e-5, atol=1e-5)


def test_spatial_fc_on_its_own_grid_is_the_matrix():
    mixer = build_token_mixer(dict(type='SpatialFc', spatial_shape=(3, 5)), dim=4)
    x = torch.randn(2, 4, 3, 5)
    expected = torch.einsum('ij,ncj->nci', mixer.fc.weight, x.flatten(2)).reshape(x.shape)
    torch.testing.assert_close(mixer(x), expected)


@pytest.mark.parametrize('grid', [(7, 5), (2, 3), (16, 16)])
def test_spatial_fc_on_other_grids_keeps_each_tokens_total_weight(grid):
    """The matrix is resampled to the actual grid and scaled by n_trained / n_actual: a matrix that
    averages all tokens still averages all tokens, and a constant map stays (nearly) constant."""
    mixer = build_token_mixer(dict(type='SpatialFc', spatial_shape=(4, 4)), dim=3)
    with torch.no_grad():
        mixer.fc.weight.fill_(1 / 16)
    x = torch.randn(2, 3, *grid)
    expected = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    torch.testing.assert_close(mixer(x), expected, rtol=1e-5, atol=1e-5)


def test_resize_token_matrix_moves_weights_with_the_grid():
    """The identity on a 4x4 grid, resampled to 8x8, still takes each token mostly from itself or a
    grid neighbour, and from nowhere far; the same resampling on both sides keeps it symmetric."""
    resized = resize_token_matrix(torch.eye(16), (4, 4), (8, 8))
    assert resized.shape == (64, 64)
    torch.testing.assert_close(resized, resized.t())
    rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
    source = resized.argmax(dim=1)
    assert ((rows - rows[source]).abs() <= 1).all() and ((cols - cols[source]).abs() <= 1).all()
    far = ((rows[:, None] - rows[None]).abs() > 3) | ((cols[:, None] - cols[None]).abs() > 3)
    assert resized[far].abs().max() == 0
    torch.testing.assert_close(resize_token_matrix(torch.eye(16), (4, 4), (4, 4)), torch.eye(16))


@pytest.mark.parametrize('grid', [(4, 4), (9, 6), (2, 1)])
def test_random_mixing_is_a_frozen_weighted_average(grid):
    torch.manual_seed(0)
    mixer = build_token_mixer(dict(type='RandomMixing', spatial_shape=(4, 4)), dim=3)
    assert list(mixer.parameters()) == [] and 'random_matrix' in mixer.state_dict()
    matrix = mixer.random_matrix
    assert matrix.shape == (16, 16) and (matrix > 0).all()
    torch.testing.assert_close(matrix.sum(1), torch.ones(16))
    # rows sum to one on any grid: a constant map is left as it is
    x = torch.full((1, 3, *grid), 2.5)
    torch.testing.assert_close(mixer(x), x)
    if grid == (4, 4):
        y = torch.randn(1, 3, 4, 4)
        torch.testing.assert_close(mixer(y), (y.flatten(2) @ matrix.t()).reshape(y.shape))


def test_position_embedding_is_resized_to_the_grid():
    pe = PositionEmbedding(8, (4, 4))
    with torch.no_grad():
        pe.pos_embed.normal_()
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(pe(x), x + pe.pos_embed)
    y = torch.randn(2, 8, 7, 3)
    resized = F.interpolate(pe.pos_embed, size=(7, 3), mode='bicubic', align_corners=False)
    torch.testing.assert_close(pe(y), y + resized)


@pytest.mark.parametrize('cfg, error, message', [
    (dict(type='Attention', head_dim=24), ValueError,
     "head_dim must be a positive int dividing the stage's 64 channels, got 24"),
    (dict(type='Attention', sr_ratio=0), ValueError, 'sr_ratio must be a positive int'),
    (dict(type='Attention', heads=2), TypeError, "bad token mixer config {'type': 'Attention', "
     "'heads': 2}"),
    (dict(type='DepthwiseConv', kernel_size=4), ValueError, 'kernel_size must be a positive odd int'),
    (dict(type='SpatialFc'), TypeError, "missing 1 required positional argument: 'spatial_shape'"),
    (dict(type='SpatialFc', spatial_shape=49), ValueError,
     'spatial_shape must be the (height, width) token grid its matrix is defined for'),
    (dict(type='RandomMixing', spatial_shape=(7, 0)), ValueError, 'RandomMixing: spatial_shape'),
    (dict(type='Pooling', pool_size=2), ValueError, 'pool_size must be a positive odd int'),
    (dict(type='SepConv', kernel_size=6), ValueError, 'SepConv: kernel_size must be a positive odd int'),
    (dict(type='SepConv', expansion_ratio=0), ValueError, 'expansion_ratio must be a positive number'),
    (dict(type='SepConv', act_cfg=dict(type='Tanh')), ValueError, "unknown act_cfg type 'Tanh'"),
    (dict(type='Attn'), KeyError, "unknown token mixer 'Attn'"),
])
def test_bad_mixer_configs_raise_clear_errors(cfg, error, message):
    with pytest.raises(error) as info:
        build_token_mixer(cfg, dim=64)
    assert message in str(info.value)


@pytest.mark.parametrize('token_mixers, message', [
    (['Pooling'] * 4, 'token_mixers must be a dict with a "type" key or a list of 4 such dicts'),
    ([dict(pool_size=3)] * 4, 'token_mixers must be a dict with a "type" key'),
    (dict(type='Attention'), "head_dim must be a positive int dividing the stage's 8 channels"),
])
def test_bad_token_mixers_argument_raises_clear_errors(token_mixers, message):
    with pytest.raises((ValueError, TypeError, KeyError)) as info:
        MetaFormer(arch=dict(depths=[1] * 4, embed_dims=[8, 16, 32, 64]), token_mixers=token_mixers)
    assert message in str(info.value)
