"""The MetaFormer Baselines families reproduce timm's models, from timm's and sail-sg's files.

The oracle is timm's ``MetaFormer`` (``forward_intermediates``: the raw stage outputs, which ours emit
with ``out_norm_cfg=None``). timm registers PoolFormerV2, ConvFormer and CAFormer; IdentityFormer and
RandFormer are its ``MetaFormer`` class with sail-sg's mixers for them. sail-sg's layout is made from
timm's state dict by the inverse of timm's own conversion, which the tests check against
``checkpoint_filter_fn``.
"""
import collections
import re

import pytest
import torch
import torch.nn as nn

from mmpoolformer.kernels import PLAIN, Plan, forced
from mmpoolformer.models import CAFormer, ConvFormer, IdentityFormer, PoolFormerV2, RandFormer
from mmpoolformer.models.weights import load_pretrained
from mmpoolformer.testing import max_rel_err, randomize_weights

timm = pytest.importorskip('timm')
timm_metaformer = pytest.importorskip('timm.models.metaformer')

FAMILIES = {  # ours -> (timm's name prefix or None, its sizes)
    PoolFormerV2: ('poolformerv2', ['s12', 's24', 's36', 'm36', 'm48']),
    ConvFormer: ('convformer', ['s18', 's36', 'm36', 'b36']),
    CAFormer: ('caformer', ['s18', 's36', 'm36', 'b36']),
    IdentityFormer: (None, ['s12', 's24', 's36', 'm36', 'm48']),
    RandFormer: (None, ['s12', 's24', 's36', 'm36', 'm48']),
}


class SailRandomMixing(nn.Module):
    """sail-sg's RandomMixing (a frozen softmax of uniform noise over ``num_tokens`` tokens), NCHW."""

    def __init__(self, dim, num_tokens=196, **kwargs):
        super().__init__()
        self.random_matrix = nn.Parameter(torch.rand(num_tokens, num_tokens).softmax(-1),
                                          requires_grad=False)

    def forward(self, x):
        n, c, h, w = x.shape
        return torch.einsum('mn,bcn->bcm', self.random_matrix, x.reshape(n, c, h * w)).reshape(x.shape)


class SailRandomMixing49(SailRandomMixing):  # stage 3's, on the 7x7 grid

    def __init__(self, dim, **kwargs):
        super().__init__(dim, num_tokens=49)


class SailIdentity(nn.Module):

    def __init__(self, dim, **kwargs):
        super().__init__()

    def forward(self, x):
        return x


def timm_model(cls, arch):
    """timm's model of this family and size, as built for ImageNet (with its classifier)."""
    name, _ = FAMILIES[cls]
    if name is not None:
        return timm.create_model(f'{name}_{arch}')
    size = PoolFormerV2.arch_zoo[arch]
    mixers = SailIdentity
    if cls is RandFormer:
        mixers = [SailIdentity, SailIdentity, SailRandomMixing, SailRandomMixing49]
    return timm_metaformer.MetaFormer(
        depths=size['depths'], dims=size['embed_dims'], token_mixers=mixers,
        norm_layers=timm_metaformer.GroupNorm1NoBias, use_mlp_head=False)


def to_sail_layout(timm_state):
    """timm's state dict in sail-sg/metaformer's names and shapes (linear pointwise layers)."""
    out = {}
    for k, v in timm_state.items():
        k = re.sub(r'^stem\.conv\.', 'downsample_layers.0.conv.', k)
        k = re.sub(r'^stem\.norm\.', 'downsample_layers.0.post_norm.', k)
        k = re.sub(r'^stages\.(\d+)\.downsample\.conv\.', r'downsample_layers.\1.conv.', k)
        k = re.sub(r'^stages\.(\d+)\.downsample\.norm\.', r'downsample_layers.\1.pre_norm.', k)
        k = re.sub(r'^stages\.(\d+)\.blocks\.', r'stages.\1.', k)
        k = re.sub(r'^head\.norm\.', 'norm.', k)
        k = re.sub(r'^head\.fc\.', 'head.', k)
        if re.search(r'(mlp\.fc[12]|pwconv[12])\.weight$', k):
            v = v.flatten(1)
        out[k] = v
    return out


@pytest.mark.parametrize('cls', list(FAMILIES))
def test_parameter_counts_equal_timms_backbone(cls):
    """Ours without output norms has exactly the parameters of timm's model without its head, for
    every size (built on the meta device: nothing is allocated). RandFormer's frozen matrices are
    parameters that do not train in sail-sg's model, buffers in ours: only what trains is counted."""
    for arch in FAMILIES[cls][1]:
        with torch.device('meta'):
            ours = cls(arch=arch, out_norm_cfg=None)
            theirs = timm_model(cls, arch)
        expected = sum(p.numel() for k, p in theirs.named_parameters()
                       if not k.startswith('head.') and p.requires_grad)
        assert sum(p.numel() for p in ours.parameters()) == expected, (cls.__name__, arch)
        # the default output norms: a channel LayerNorm with bias per emitted stage
        with torch.device('meta'):
            normed = cls(arch=arch)
        dims = cls.arch_zoo[arch]['embed_dims']
        assert sum(p.numel() for p in normed.parameters()) == expected + 2 * sum(dims)


@pytest.mark.parametrize('layout', ['timm', 'sail-sg/metaformer'])
@pytest.mark.parametrize('cls', list(FAMILIES))
def test_stage_outputs_equal_timm(cls, layout, tmp_path):
    """Same weights, from a file in timm's or sail-sg's layout: our four raw stage outputs equal timm's
    ``forward_intermediates`` within 1e-5 relative, in fp32, on an odd input size (223x225 gives
    RandFormer the 14x14 and 7x7 grids its matrices are drawn for)."""
    arch = FAMILIES[cls][1][0]
    torch.manual_seed(0)
    theirs = randomize_weights(timm_model(cls, arch)).eval()
    state = theirs.state_dict()
    if layout != 'timm':
        state = to_sail_layout(state)
        assert timm_metaformer.checkpoint_filter_fn(state, theirs).keys() == theirs.state_dict().keys()
    torch.save(state, tmp_path / 'weights.pth')

    ours = cls(arch=arch, out_norm_cfg=None)
    report = load_pretrained(ours, str(tmp_path / 'weights.pth'))
    ours.eval()
    assert report.layout == layout
    assert not report.missing and not report.unexpected
    assert report.dropped and all(k.startswith(('head.', 'norm.')) for k in report.dropped)

    x = torch.randn(1, 3, 223, 225) if cls is RandFormer else torch.randn(2, 3, 97, 75)
    with torch.no_grad():
        expected = theirs.forward_intermediates(x, intermediates_only=True)
        got = ours(x)
    assert len(got) == 4
    for a, b in zip(got, expected):
        assert a.shape == b.shape and max_rel_err(a, b) <= 1e-5, (a.shape, max_rel_err(a, b))


def test_output_norms():
    """Default: a channel LayerNorm with bias on each emitted map; ``out_norm_cfg=None``: the raw map;
    PoolFormer keeps the blocks' GroupNorm."""
    from mmpoolformer.models import PoolFormer
    from mmpoolformer.models.layers import LayerNorm2d
    model = ConvFormer(arch='s18', out_indices=(1, 3)).eval()
    assert isinstance(model.norm2, LayerNorm2d) and model.norm2.bias is not None
    assert model.norm2.eps == 1e-6 and not hasattr(model, 'norm0')
    raw = ConvFormer(arch='s18', out_indices=(1, 3), out_norm_cfg=None).eval()
    assert not any(n.startswith('norm') for n, _ in raw.named_children())
    raw.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        normed, plain = model(x), raw(x)
        torch.testing.assert_close(normed[1], model.norm6(plain[1]))
    assert isinstance(PoolFormer(out_indices=(0, )).norm0, nn.GroupNorm)
    gn = PoolFormer(out_indices=(0, ), out_norm_cfg=dict(type='LN2d'))
    assert isinstance(gn.norm0, LayerNorm2d)


def test_family_parts():
    """The Baselines' settings, each where the paper puts it."""
    model = CAFormer(arch='s18')
    block0, block2 = model.network[0][0], model.network[4][0]
    assert type(block0.token_mixer).__name__ == 'SepConv' and block0.token_mixer.dwconv.kernel_size == (7, 7)
    assert type(block2.token_mixer).__name__ == 'Attention' and block2.token_mixer.proj.bias is None
    assert type(block0.mlp.act).__name__ == 'StarReLU' and block0.mlp.fc1.bias is None
    assert block0.norm1.bias is None and block0.norm1.eps == 1e-6
    assert not block0.use_res_scale and block2.use_res_scale and not block2.use_layer_scale
    assert model.patch_embed.post_norm is not None and model.network[1].pre_norm is not None
    pool = PoolFormerV2(arch='s12').network[0][0]
    assert isinstance(pool.norm1, nn.GroupNorm) and pool.norm1.bias is None
    # a stage's mixer is still the config's choice
    mixed = CAFormer(arch='s18', token_mixers=[dict(type='SepConv')] * 2 + [
        dict(type='Attention', proj_bias=False, sr_ratio=2), dict(type='Attention', proj_bias=False)])
    assert mixed.network[4][0].token_mixer.sr_ratio == 2
    assert mixed.state_dict().keys() == model.state_dict().keys()
    # the norms around the downsampling convolutions freeze with their stage
    frozen = CAFormer(arch='s18', frozen_stages=2)
    assert not frozen.patch_embed.post_norm.weight.requires_grad
    assert not frozen.network[1].pre_norm.weight.requires_grad and not frozen.norm2.weight.requires_grad
    assert frozen.network[3].pre_norm.weight.requires_grad and frozen.norm4.weight.requires_grad


@pytest.mark.parametrize('cls', list(FAMILIES))
def test_one_training_step(cls):
    arch = FAMILIES[cls][1][0]
    torch.manual_seed(0)
    model = cls(arch=arch, drop_path_rate=0.1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    outs = model(torch.randn(2, 3, 96, 64))
    assert [o.shape[1] for o in outs] == cls.arch_zoo[arch]['embed_dims']
    loss = sum(o.square().mean() for o in outs)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    # RandFormer's matrices are buffers, frozen; every parameter of every family trains
    assert not unused
    optimizer.step()
    assert torch.isfinite(loss)


def autograd_nodes(tensor) -> collections.Counter:
    """How many of each autograd function computed ``tensor``, by name."""
    names, todo, seen = collections.Counter(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names[type(node).__name__] += 1
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


# the fused branches each family takes, in every block: PoolFormerV2's pooling (GroupNorm) kernel
# (with ResScale in stages 2-3); the MLP kernel everywhere, after
# GroupNorm or channel LayerNorm, with ResScale in stages 2-3; the stem and the three downsampling
# convolutions with their weight gradients by patches; in the SepConv mixers (ConvFormer: every
# block, CAFormer: stages 0-1) the MLP kernel's first half and the depthwise convolution with its
# weight gradient by correlation
FUSED_BLOCKS = {PoolFormerV2: dict(_NormPoolResidualBackward=12, _NormMlpResidualBackward=12,
                                   _OwnWeightGradConvBackward=4),
                ConvFormer: dict(_NormMlpResidualBackward=18 + 18, _OwnWeightGradConvBackward=4 + 18),
                CAFormer: dict(_NormMlpResidualBackward=18 + 6, _OwnWeightGradConvBackward=4 + 6)}


@pytest.mark.parametrize('cls', FUSED_BLOCKS, ids=lambda cls: cls.__name__)
def test_fused_branches_match_the_formula_in_float64(cls):
    """The fused branches compute outputs and every gradient as written (float64, all four stages)."""
    torch.manual_seed(0)
    model = randomize_weights(cls(arch=next(iter(cls.arch_zoo)))).double().train()
    x = torch.randn(2, 3, 45, 39, dtype=torch.float64)

    def run(plan):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        with forced(plan):
            outs = model(xi)
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
            for o in outs).backward()
        return outs, xi.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    fused, plain = run(Plan()), run(PLAIN)
    nodes = autograd_nodes(fused[0][-1])
    assert {name: nodes[name] for name in FUSED_BLOCKS[cls]} == FUSED_BLOCKS[cls]
    assert not set(FUSED_BLOCKS[cls]) & set(autograd_nodes(plain[0][-1]))
    for a, b in zip(fused[0], plain[0]):
        assert max_rel_err(a, b) <= 1e-10
    assert max_rel_err(fused[1], plain[1]) <= 1e-10
    for name, g in fused[2].items():
        assert max_rel_err(g, plain[2][name]) <= 1e-10, name


def test_timm_safetensors_and_the_converter(tmp_path):
    """timm's Hugging Face files are safetensors: they load through ``init_cfg`` as its pickles do.
    The converter maps sail-sg's file onto our names once (converting again changes nothing), and the
    result loads into the backbone with only the output norms left as initialised."""
    safetensors = pytest.importorskip('safetensors.torch')
    from mmpoolformer.models.weights import convert_state_dict
    theirs = randomize_weights(timm.create_model('convformer_s18')).eval()
    safetensors.save_file(theirs.state_dict(), str(tmp_path / 'model.safetensors'))
    ours = ConvFormer(arch='s18', out_norm_cfg=None,
                      init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'model.safetensors')))
    ours.init_weights()
    x = torch.randn(1, 3, 61, 83)
    with torch.no_grad():
        for a, b in zip(ours.eval()(x), theirs.forward_intermediates(x, intermediates_only=True)):
            assert max_rel_err(a, b) <= 1e-5

    converted, dropped, layout = convert_state_dict(to_sail_layout(theirs.state_dict()))
    assert layout == 'sail-sg/metaformer' and sorted(dropped) == sorted(
        k for k in to_sail_layout(theirs.state_dict()) if k.startswith(('head.', 'norm.')))
    again, dropped_again, _ = convert_state_dict(converted)
    assert dropped_again == [] and again.keys() == converted.keys()
    assert all(torch.equal(again[k], v) for k, v in converted.items())
    result = ConvFormer(arch='s18').load_state_dict(converted, strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(f'norm{i}.{p}' for i in (0, 2, 4, 6)
                                                 for p in ('weight', 'bias'))


def test_recomputed_blocks_give_the_same_gradients():
    """``with_cp`` (and ``out_indices``) as for PoolFormer: the same outputs and gradients."""
    torch.manual_seed(0)
    plain = randomize_weights(CAFormer(arch='s18', out_indices=(1, 2))).train()
    recomputed = CAFormer(arch='s18', out_indices=(1, 2), with_cp=True).train()
    recomputed.load_state_dict(plain.state_dict())
    assert not hasattr(plain, 'norm0') and len(plain.network) == 5  # stage 3 is not built
    x = torch.randn(1, 3, 70, 58)
    grads = []
    for model in (plain, recomputed):
        sum(o.square().mean() for o in model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert max_rel_err(grads[1][name], g) <= 1e-5, name
