"""The official hybrid MetaFormer releases load as backbones and reproduce the official model.

The oracle is a test-local re-statement of the official formulation (sail-sg/poolformer,
``models/metaformer.py``), with its module names: blocks of ``norm1 / token_mixer / norm2 / mlp`` and
LayerScale, the position embedding as its own ``network`` entry before its stage, attention over the
flattened tokens with an explicit softmax, the spatial FC as a linear layer over the flattened tokens,
channel LayerNorm written out. Checkpoints are its state dicts, in the ImageNet release's wrapping (a raw
state dict with the classifier's ``norm`` and ``head``), loaded through ``init_cfg``.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS

from mmpoolformer.models.weights import load_pretrained
from mmpoolformer.testing import max_rel_err, randomize_weights

DEPTHS, DIMS = [2, 2, 6, 2], [64, 128, 320, 512]
OUTPUT_NORMS = [f'norm{i}.{p}' for i in (0, 2, 4, 6) for p in ('weight', 'bias')]
CLASSIFIER = ['head.bias', 'head.weight', 'norm.bias', 'norm.weight']


class RefLayerNormChannel(nn.Module):

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.weight[:, None, None] + self.bias[:, None, None]


def ref_group_norm(dim):
    return nn.GroupNorm(1, dim)


class RefPooling(nn.Module):

    def __init__(self, dim):
        super().__init__()
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x):
        return self.pool(x) - x


class RefAttention(nn.Module):

    def __init__(self, dim):
        super().__init__()
        self.heads = dim // 32
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(-2, -1)
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.heads, 32).permute(2, 0, 3, 1, 4)
        attn = ((q * 32**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = self.proj((attn @ v).transpose(1, 2).reshape(b, h * w, c))
        return x.transpose(-2, -1).reshape(b, c, h, w)


class RefSpatialFc(nn.Module):

    def __init__(self, dim, n):
        super().__init__()
        self.fc = nn.Linear(n, n, bias=False)

    def forward(self, x):
        return self.fc(x.flatten(2)).reshape(x.shape)


class RefPosEmb(nn.Module):

    def __init__(self, dim, side):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, side, side))

    def forward(self, x):
        return x + self.pos_embed


class RefConv(nn.Module):
    """The official PatchEmbed: a conv named ``proj``."""

    def __init__(self, cin, cout, k, s, p):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, k, s, p)

    def forward(self, x):
        return self.proj(x)


class RefMlp(nn.Module):

    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):

    def __init__(self, dim, mixer, norm):
        super().__init__()
        self.norm1, self.token_mixer, self.norm2, self.mlp = norm(dim), mixer(dim), norm(dim), RefMlp(dim)
        self.layer_scale_1 = nn.Parameter(1e-5 * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x):
        x = x + self.layer_scale_1[:, None, None] * self.token_mixer(self.norm1(x))
        return x + self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x))


class RefMetaFormer(nn.Module):
    """The official hybrid MetaFormer (classification model): ``forward`` returns the stage outputs."""

    def __init__(self, mixers, norm, pos_embs):
        super().__init__()
        self.patch_embed = RefConv(3, DIMS[0], 7, 4, 2)
        network = []
        for i, (depth, dim) in enumerate(zip(DEPTHS, DIMS)):
            if pos_embs[i]:
                network.append(RefPosEmb(dim, pos_embs[i]))
            network.append(nn.Sequential(*[RefBlock(dim, mixers[i], norm) for _ in range(depth)]))
            if i < 3:
                network.append(RefConv(dim, DIMS[i + 1], 3, 2, 1))
        self.network = nn.ModuleList(network)
        self.norm = norm(DIMS[-1])
        self.head = nn.Linear(DIMS[-1], 1000)

    def forward(self, x):
        x, outs = self.patch_embed(x), []
        for module in self.network:
            x = module(x)
            if isinstance(module, nn.Sequential):
                outs.append(x)
        return outs


def spatial_fc(side):
    return lambda dim: RefSpatialFc(dim, side * side)


P, A, Id = RefPooling, RefAttention, nn.Identity
# What the official code builds for each release: mixers per stage, norm, position embedding per stage.
OFFICIAL = {
    'metaformer_id_s12': ([Id] * 4, ref_group_norm, [None] * 4),
    'metaformer_pppa_s12_224': ([P, P, P, A], RefLayerNormChannel, [None, None, None, 7]),
    'metaformer_ppaa_s12_224': ([P, P, A, A], RefLayerNormChannel, [None, None, 14, None]),
    'metaformer_pppf_s12_224': ([P, P, P, spatial_fc(7)], ref_group_norm, [None] * 4),
    'metaformer_ppff_s12_224': ([P, P, spatial_fc(14), spatial_fc(7)], ref_group_norm, [None] * 4),
}


def randomize(model, seed=0):
    randomize_weights(model, seed).eval()  # not chained: mmpretrain's train() returns None
    return model


def official(name, seed=0):
    mixers, norm, pos_embs = OFFICIAL[name]
    return randomize(RefMetaFormer(mixers, norm, pos_embs), seed)


def output_norm(norm, x):
    """Our output norms start as identity-affine norms of the released model's kind."""
    if isinstance(norm, nn.GroupNorm):
        return F.group_norm(x, 1, norm.weight, norm.bias, eps=1e-5)
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], norm.weight, norm.bias,
                        eps=1e-5).permute(0, 3, 1, 2)



@pytest.fixture
def release_file(tmp_path):
    def write(name, seed=0):
        ref = official(name, seed)
        path = tmp_path / f'{name}.pth.tar'
        torch.save(ref.state_dict(), path)
        return ref, str(path)

    return write


@pytest.mark.parametrize('name', sorted(OFFICIAL))
def test_release_key_layout_loads_strictly(name, release_file):
    ref, path = release_file(name)
    ours = MODELS.build(dict(type=f'mmpoolformer.{name}'))
    assert set(ours.state_dict()) == (set(ref.state_dict()) - set(CLASSIFIER)) | set(OUTPUT_NORMS)
    report = load_pretrained(ours, path)
    assert report.layout == 'official'
    assert report.missing == OUTPUT_NORMS and report.unexpected == []
    assert sorted(report.dropped) == CLASSIFIER


@pytest.mark.parametrize('name', sorted(OFFICIAL))
def test_stage_outputs_match_the_official_model_at_224(name, release_file):
    ref, path = release_file(name, seed=sum(map(ord, name)))
    ours = MODELS.build(dict(type=f'mmpoolformer.{name}',
                             init_cfg=dict(type='Pretrained', checkpoint=path)))
    ours.init_weights()
    ours.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
        outs = ours(x)
    assert len(outs) == 4
    for i, (a, b) in enumerate(zip(outs, expected)):
        b = output_norm(getattr(ours, f'norm{2 * i}'), b)
        assert a.shape == b.shape and max_rel_err(a, b) <= 1e-5, (i, max_rel_err(a, b))


def test_a_wrong_norm_would_be_caught():
    """The parity above can fail: the spatial-FC release with channel LayerNorm (same keys, another
    model) does not match the official one."""
    ref = official('metaformer_pppf_s12_224')
    ours = MODELS.build(dict(type='mmpoolformer.metaformer_pppf_s12_224', norm_cfg=dict(type='LN2d')))
    ours.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert max_rel_err(ours.eval()(x)[3], output_norm(ours.norm6, ref(x)[3])) > 1e-2


def test_position_embedding_sits_before_its_stage_in_network():
    ours = MODELS.build(dict(type='mmpoolformer.metaformer_ppaa_s12_224', out_indices=(1, 2, 3)))
    assert ours.stage_entries == [[0], [1, 2], [3, 4, 5], [6, 7]]
    assert ours.network[4].pos_embed.shape == (1, 320, 14, 14)
    assert type(ours.network[5][0].token_mixer).__name__ == 'Attention'


def test_frozen_stages_freeze_the_position_embedding():
    ours = MODELS.build(dict(type='mmpoolformer.metaformer_pppa_s12_224', frozen_stages=4))
    assert not any(p.requires_grad for p in ours.parameters())
    ours = MODELS.build(dict(type='mmpoolformer.metaformer_ppaa_s12_224', frozen_stages=3))
    assert not ours.network[4].pos_embed.requires_grad and not ours.network[5][0].norm1.weight.requires_grad
    assert ours.network[6].proj.weight.requires_grad and ours.network[7][0].norm1.weight.requires_grad


@pytest.mark.parametrize('name', sorted(OFFICIAL))
def test_releases_run_at_detection_sizes(name):
    """Off 224x224, the position embeddings and spatial-FC matrices are resized to the actual grid."""
    ours = MODELS.build(dict(type=f'mmpoolformer.{name}', out_indices=(1, 2, 3)))
    randomize(ours)
    outs = ours(torch.randn(1, 3, 136, 200))
    assert [tuple(o.shape[1:]) for o in outs] == [(128, 17, 25), (320, 9, 13), (512, 5, 7)]
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())
