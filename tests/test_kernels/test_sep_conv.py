"""ConvFormer's SepConv branch band by band of image rows in inference (``kernels/sep_conv.py``,
``csrc/mlp.cpp``'s ``sep_conv_forward``): its numbers against the modules as written, across every
band and every thread's run of rows, and where it leaves the branch to the composed formulation."""
import copy

import pytest
import torch
import torch.nn as nn

from mmpoolformer import kernels
from mmpoolformer.kernels import native, sep_conv
from mmpoolformer.models.baselines import CAFormer, ConvFormer
from mmpoolformer.models.layers import LayerNorm2d, StarReLU, add_residual
from mmpoolformer.models.token_mixers import SepConv
from mmpoolformer.testing import OpLog, max_rel_err

THREADS = kernels.Plan(backend='threads')
OP = 'mmpoolformer.sep_conv_forward'


@pytest.fixture
def compiled():
    if torch.backends.cpu.get_cpu_capability() not in native.CAPABILITY_FLAGS:
        pytest.skip(f'no kernels of ours for {torch.backends.cpu.get_cpu_capability()}')
    assert native.ops() is not None, 'the compiled kernels failed to build or their check (see the warning)'
    return native.ops()


@pytest.fixture(params=[1, 2, 3], ids=['1_thread', '2_threads', '3_threads'])
def threads(request):
    """Each thread takes runs of rows of one sample, a sample split where that evens out the threads'
    shares (three threads: every sample of one or two split)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def branch(layer_norm=True, act=None, kernel_size=7, bias=False, scaled=False, c=6):
    """A block's norm, a SepConv with random weights, its LayerScale and ResScale (or None)."""
    torch.manual_seed(0)
    norm = LayerNorm2d(c, eps=1e-6) if layer_norm else nn.GroupNorm(1, c)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.normal_(norm.bias)
    mixer = SepConv(c, kernel_size=kernel_size, act_cfg=act or dict(type='StarReLU'), bias=bias)
    if isinstance(mixer.act1, StarReLU):
        mixer.act1.scale.data.fill_(0.8)
        mixer.act1.bias.data.fill_(-0.1)
    scales = [nn.Parameter(torch.rand(c) + 0.5) if scaled else None for _ in range(2)]
    return norm, mixer, *scales


def as_written(x, norm, mixer, layer_scale, res_scale):
    return add_residual(x, mixer(norm(x)), layer_scale, res_scale, None)


def fused(x, norm, mixer, layer_scale, res_scale, plan=THREADS):
    with kernels.forced(plan), OpLog() as log:
        y = mixer.fused_residual(x, norm, layer_scale, res_scale, None, plain=None)
    return y, [name for name, _ in log.ops].count(OP)


@pytest.mark.parametrize('layer_norm', [True, False], ids=['layer_norm', 'group_norm'])
@pytest.mark.parametrize('act', [dict(type='StarReLU'), dict(type='GELU')], ids=['star_relu', 'gelu'])
@pytest.mark.parametrize('kernel_size, bias, scaled', [(7, False, False), (3, True, True)],
                         ids=['as_released', 'biases_and_scales'])
@pytest.mark.parametrize('band_rows', [1, 2, 64], ids=['1_row_bands', '2_row_bands', 'whole_runs'])
def test_the_banded_branch_equals_the_modules_in_float64(compiled, layer_norm, act, kernel_size, bias,
                                                         scaled, band_rows, threads, monkeypatch):
    """Bands of one and two rows (fewer than the filter reads around them: the window carried from
    band to band overlaps itself), bands of whole runs; maps shorter than the filter; one sample
    (split between the threads) and three."""
    modules = branch(layer_norm, act, kernel_size, bias, scaled)
    for shape in ((1, 6, 9, 5), (3, 6, 4, 7), (2, 6, 13, 8)):
        monkeypatch.setattr(sep_conv, 'BAND_TOKENS', band_rows * shape[3])
        double = [m.double() if m is not None else None for m in modules]
        x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ours, calls = fused(x, *double)
            reference = as_written(x, *double)
        assert calls == 1 and ours.dtype == torch.float64
        assert ours.is_contiguous(memory_format=torch.channels_last)
        assert max_rel_err(ours, reference) <= 1e-12, shape


def test_the_banded_branch_in_fp32_as_the_model_runs_it(compiled, threads):
    """ConvFormer's block as released (channel LayerNorm, StarReLU, 7x7), fp32, its default bands,
    an NCHW input: the composed formulation's numbers to fp32 rounding."""
    modules = branch(c=16)
    x = torch.randn(2, 16, 70, 45)
    with torch.no_grad():
        ours, calls = fused(x, *modules)
        composed, composed_calls = fused(x, *modules, plan=kernels.PLAIN)
        reference = as_written(x.double(), *(m.double() if m is not None else None for m in modules))
    assert calls == 1 and composed_calls == 0
    assert max_rel_err(ours, reference) <= 2 * max(max_rel_err(composed, reference), 1e-6)


@pytest.mark.skipif(not kernels.dispatch.native_low_precision(torch.device('cpu'), torch.bfloat16),
                    reason='bf16 products are emulated on this CPU')
@pytest.mark.parametrize('scaled', [False, True], ids=['bf16_map', 'fp32_map_with_scales'])
def test_the_banded_branch_under_bf16_autocast(compiled, scaled, threads):
    """Products and the filter in bf16. A bf16 map (the residual stream where no fp32 factor has met
    it) stays bf16; an fp32 map comes out fp32, as in the composed formulation. A bf16 map meeting an
    fp32 LayerScale or ResScale comes out fp32 there: the composed formulation computes it."""
    modules = branch(c=16, scaled=scaled)
    x = torch.randn(2, 16, 40, 24, dtype=torch.bfloat16 if not scaled else torch.float32)
    low = kernels.Plan(backend='threads', dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        ours, calls = fused(x, *modules, plan=low)
        composed, _ = fused(x, *modules, plan=kernels.PLAIN)
        _, calls_for_a_bf16_map = fused(x.bfloat16(), *modules, plan=low)
    with torch.no_grad():
        reference = as_written(x.double(), *(copy.deepcopy(m).double() if m is not None else None
                                            for m in modules))
    assert calls == 1 and ours.dtype == composed.dtype == x.dtype
    # (each about 2e-3 from the exact values)
    assert max_rel_err(ours, reference) <= 1.5 * max_rel_err(composed, reference)
    assert calls_for_a_bf16_map == (0 if scaled else 1)


class _Residual(nn.Module):
    def __init__(self, norm, mixer, layer_scale, res_scale):
        super().__init__()
        self.norm, self.mixer, self.layer_scale, self.res_scale = norm, mixer, layer_scale, res_scale

    def forward(self, x):
        return self.mixer.fused_residual(x, self.norm, self.layer_scale, self.res_scale, None, None)


def test_the_composed_branch_where_the_bands_do_not_apply(compiled, threads):
    """Training (autograd records: the composed branch's backward), stochastic depth's factors, a
    traced model, a filter that is not a same-size depthwise one: the composed formulation, with the
    same numbers."""
    norm, mixer, layer_scale, res_scale = branch(scaled=True)
    x = torch.randn(2, 6, 9, 7)
    with torch.no_grad():
        expected = as_written(x, norm, mixer, layer_scale, res_scale)
    y, calls = fused(x, norm, mixer, layer_scale, res_scale)  # (parameters require grad)
    assert calls == 0 and y.requires_grad and max_rel_err(y, expected) <= 1e-5
    trained = {mixer.act1.scale}  # (StarReLU's scale alone: still training)
    for p in (*norm.parameters(), *mixer.parameters(), layer_scale, res_scale):
        p.requires_grad_(p in trained)
    y, calls = fused(x, norm, mixer, layer_scale, res_scale)
    assert calls == 0 and y.requires_grad
    for p in (*norm.parameters(), *mixer.parameters(), layer_scale, res_scale):
        p.requires_grad_()
    with torch.no_grad(), kernels.forced(THREADS), OpLog() as log:
        factors = torch.ones(2, 1, 1, 1)
        mixer.fused_residual(x, norm, layer_scale, res_scale, factors, plain=None)
        torch.jit.trace(_Residual(norm, mixer, layer_scale, res_scale), x, check_trace=False)
        mixer.dwconv.dilation = (2, 2)
        mixer.dwconv.padding = (6, 6)
        dilated = mixer.fused_residual(x, norm, layer_scale, res_scale, None, plain=None)
    assert OP not in [name for name, _ in log.ops]
    assert max_rel_err(dilated, as_written(x, norm, mixer, layer_scale, res_scale)) <= 1e-5


@pytest.mark.parametrize('cls, blocks', [(ConvFormer, 18), (CAFormer, 6)], ids=['convformer', 'caformer'])
def test_every_sepconv_block_takes_the_bands_in_inference(compiled, cls, blocks, threads):
    """A whole backbone in float64 inference: each SepConv block (ConvFormer: all, CAFormer: stages
    0-1) once through the banded kernel, the outputs the plain formulation's."""
    torch.manual_seed(0)
    model = cls(arch='s18').double().eval()
    for name, p in model.named_parameters():
        if 'res_scale' in name or 'act' in name:
            p.data.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 45, 39, dtype=torch.float64)
    with torch.no_grad():
        with kernels.forced(THREADS), OpLog() as log:
            outs = model(x)
        with kernels.forced(kernels.PLAIN):
            plain = model(x)
    assert [name for name, _ in log.ops].count(OP) == blocks
    for a, b in zip(outs, plain):
        assert max_rel_err(a, b) <= 1e-10


def test_the_kernel_refuses_what_it_does_not_compute(compiled):
    """Its output over its input (a band's filter reads rows below it), rows that are not whole
    samples, an even filter, a projection of another shape: a clear error, nothing written."""
    x, w1, dw, w2 = torch.randn(2 * 4 * 3, 5), torch.randn(8, 5), torch.randn(8, 1, 3, 3), torch.randn(5, 8)

    def call(x=x, dw=dw, w2=w2, out=None, height=4):
        compiled.sep_conv_forward(x, None, None, True, 1e-6, w1, None, dw, None, w2, None, None, None,
                                  None, 1., height, 3, 2, torch.empty_like(x) if out is None else out)

    for kwargs, message in ((dict(out=x), 'writes a map of its own'),
                            (dict(out=x[:, :]), 'writes a map of its own'),
                            (dict(height=5), 'not whole samples'),
                            (dict(dw=torch.randn(8, 1, 2, 2)), 'filter of odd k'),
                            (dict(w2=torch.randn(5, 7)), 'projection')):
        before = x.clone()
        with pytest.raises(RuntimeError, match=message):
            call(**kwargs)
        assert torch.equal(x, before)
