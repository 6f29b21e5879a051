"""The convolutions' plans: the weight gradient as a product over patches (dense convolutions) or as a
correlation (depthwise ones), exact in float64 for any geometry, layout and chunking, and when
``conv2d`` offers which."""
import pytest
import torch
import torch.nn as nn

from mmpoolformer import kernels
from mmpoolformer.kernels import conv as conv_kernel
from mmpoolformer.kernels import native
from mmpoolformer.kernels.conv import (_OwnWeightGradConv, weight_grad_by_correlation,
                                       weight_grad_by_patches)
from mmpoolformer.models.metaformer import PatchEmbed
from mmpoolformer.testing import OpLog, max_rel_err

# (in, out, kernel, stride, padding, input size): the stem, a downsampling, and odd ones
GEOMETRIES = dict(stem=(3, 5, (7, 7), (4, 4), (2, 2), (13, 11)),
                  downsampling=(4, 6, (3, 3), (2, 2), (1, 1), (9, 10)),
                  unpadded=(2, 3, (3, 3), (1, 1), (0, 0), (6, 7)),
                  rectangular=(3, 4, (3, 1), (2, 1), (1, 0), (7, 5)))


@pytest.mark.parametrize('geometry', GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize('channels_last', [False, True], ids=['contiguous', 'channels_last'])
def test_patch_weight_gradient_is_exact(geometry, channels_last, monkeypatch):
    """float64 ``gradcheck`` of every gradient, with chunks of two output rows."""
    cin, cout, kernel, stride, padding, size = geometry
    monkeypatch.setattr(conv_kernel, 'CHUNK_BYTES', 2 * size[1] * kernel[0] * kernel[1] * cin * 8)
    x = torch.randn(2, cin, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, *kernel, dtype=torch.float64)
    bias = torch.randn(cout, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda *a: _OwnWeightGradConv.apply(*a, stride, padding, 1, 'blas'), args)


@pytest.mark.parametrize('chunk_rows', [1, 3, 100])
def test_weight_grad_by_patches_equals_pytorchs_in_any_chunking(chunk_rows, monkeypatch):
    cin, cout, kernel, stride, padding = 5, 7, (3, 3), (2, 2), (1, 1)
    monkeypatch.setattr(conv_kernel, 'CHUNK_BYTES', chunk_rows * 6 * 9 * cin * 8)
    x = torch.randn(3, cin, 11, 12, dtype=torch.float64)
    weight = torch.randn(cout, cin, *kernel, dtype=torch.float64)
    grad = torch.randn(3, cout, 6, 6, dtype=torch.float64)
    expected = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, (1, 1), False,
                                                   (0, 0), 1, [False, True, False])[1]
    assert max_rel_err(weight_grad_by_patches(grad, x, kernel, stride, padding), expected) <= 1e-13


# (channels, kernel, padding, input size): ConvFormer's 7x7, DepthwiseConv's 3x3, and odd ones
DEPTHWISE = dict(convformer=(3, (7, 7), (3, 3), (9, 11)), mixer=(4, (3, 3), (1, 1), (5, 6)),
                 unpadded=(2, (5, 5), (0, 0), (8, 7)), rectangular=(3, (3, 5), (1, 2), (6, 4)),
                 pointwise=(2, (1, 1), (0, 0), (3, 5)))


@pytest.mark.parametrize('geometry', DEPTHWISE.values(), ids=DEPTHWISE.keys())
@pytest.mark.parametrize('channels_last', [False, True], ids=['contiguous', 'channels_last'])
def test_depthwise_weight_gradient_by_correlation_is_exact(geometry, channels_last):
    """float64 ``gradcheck`` of every gradient, and the weight's against PyTorch's."""
    c, kernel, padding, size = geometry
    x = torch.randn(2, c, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, *kernel, dtype=torch.float64)
    bias = torch.randn(c, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda *a: _OwnWeightGradConv.apply(*a, (1, 1), padding, c, 'correlation'), args)
    grad = torch.randn_like(torch.nn.functional.conv2d(x, weight, padding=padding, groups=c))
    expected = torch.ops.aten.convolution_backward(grad, x, weight, None, (1, 1), padding, (1, 1), False,
                                                   (0, 0), c, [False, True, False])[1]
    assert max_rel_err(weight_grad_by_correlation(grad, x, kernel, (1, 1), padding), expected) <= 1e-13


def test_depthwise_correlation_turns_fp32_channels_last_maps_by_the_compiled_transposition():
    """In fp32 on channels-last maps (the backbone's), the input and the gradient go NCHW through
    the compiled transposition (``layout.nchw``), not PyTorch's copy: the same weight gradient."""
    c, kernel, padding = 16, (7, 7), (3, 3)
    x, grad = (torch.randn(2, c, 9, 11).contiguous(memory_format=torch.channels_last) for _ in '12')
    with OpLog() as log:
        ours = weight_grad_by_correlation(grad, x, kernel, (1, 1), padding)
    names = [name for name, _ in log.ops]
    assert names.count('mmpoolformer.transpose_affine') == (2 if native.ops() is not None else 0)
    assert native.ops() is None or 'aten.copy_' not in names
    reference = weight_grad_by_correlation(grad.contiguous(), x.contiguous(), kernel, (1, 1), padding)
    assert torch.equal(ours, reference)


def downsampling(**kwargs):
    torch.manual_seed(0)
    return nn.Conv2d(8, 12, 3, 2, 1, **kwargs)


def computed_by(y) -> str:
    return type(y.grad_fn).__name__


def depthwise(**kwargs):
    torch.manual_seed(0)
    return nn.Conv2d(8, 8, 7, padding=3, groups=8, **kwargs)


@pytest.mark.parametrize('make', [downsampling, depthwise])
def test_conv2d_takes_our_weight_gradient_when_forced_and_computes_as_written(make):
    conv = make()
    x = torch.randn(2, 8, 15, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    results = []
    for plan in (kernels.Plan(backend='blas'), kernels.PLAIN):
        with kernels.forced(plan):
            y = conv_kernel.conv2d(conv, x)
        grads = torch.autograd.grad(y.square().sum(), [x, *conv.parameters()])
        results.append((computed_by(y), y, grads))
    (name, y, grads), (plain_name, plain_y, plain_grads) = results
    assert (name, plain_name) == ('_OwnWeightGradConvBackward', 'ConvolutionBackward0')
    assert torch.equal(y, plain_y)
    assert all(max_rel_err(a, b) <= 1e-5 for a, b in zip(grads, plain_grads))


def test_conv2d_offers_our_weight_gradient_only_for_a_dense_or_a_depthwise_convolution(timed_choices):
    """No weight gradient (inference, frozen), a 1x1, grouped (not depthwise), strided depthwise,
    reflect-padded or bf16 convolution: the module as written, and nothing timed. A dense one gets the
    patch product, a depthwise one of stride 1 the correlation."""
    x = torch.randn(1, 8, 9, 9)
    frozen = downsampling().requires_grad_(False)
    cases = [(downsampling(), torch.no_grad()), (frozen, torch.enable_grad()),
             (nn.Conv2d(8, 12, 1), torch.enable_grad()), (downsampling(groups=4), torch.enable_grad()),
             (depthwise(stride=2), torch.enable_grad()),
             (downsampling(padding_mode='reflect'), torch.enable_grad()),
             (downsampling().to(torch.bfloat16), torch.enable_grad())]
    for conv, grad_mode in cases:
        xi = x.to(conv.weight.dtype)
        with grad_mode:
            y = conv_kernel.conv2d(conv, xi)
        assert torch.equal(y, conv(xi)) and computed_by(y) in ('NoneType', 'ConvolutionBackward0')
    assert kernels.chosen() == {}
    conv_kernel.conv2d(downsampling(), x)  # a trainable weight: timed against the plain one
    conv_kernel.conv2d(depthwise(), x)
    assert [list(t) for t in kernels.dispatch.timings().values()] == [
        ['fused/blas', 'plain'], ['fused/correlation', 'plain']]


def test_conv2d_offers_the_compiled_depthwise_weight_gradient_on_channels_last_fp32_maps(timed_choices):
    """Where the compiled kernels take the map (channels-last, fp32) and the filter (square, odd, the
    padding that keeps the size): the compiled weight gradient first, then the correlation; on an
    NCHW or float64 map, or an unpadded filter, the correlation alone."""
    compiled = ['fused/compiled'] if native.ops() is not None else []
    x = torch.randn(1, 8, 9, 9)
    cases = [(depthwise(), x.contiguous(memory_format=torch.channels_last), compiled),
             (depthwise(), x, []), (depthwise().double(), x.double().contiguous(
                 memory_format=torch.channels_last), []),
             (nn.Conv2d(8, 8, 5, groups=8), x.contiguous(memory_format=torch.channels_last), [])]
    for conv, xi, offered in cases:
        kernels.dispatch.reset()
        conv_kernel.conv2d(conv, xi)
        [names] = [list(t) for t in kernels.dispatch.timings().values()]
        assert names == offered + ['fused/correlation', 'plain']


def test_conv2d_with_the_compiled_depthwise_weight_gradient_computes_as_written():
    """Forced: computed by our backward, every gradient as PyTorch's to fp32's error."""
    if native.ops() is None:
        pytest.skip('no compiled kernels here')
    conv = depthwise()
    x = torch.randn(2, 8, 15, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    with kernels.forced(kernels.Plan(backend='compiled')), OpLog() as log:
        y = conv_kernel.conv2d(conv, x)
        grads = torch.autograd.grad(y.square().sum(), [x, *conv.parameters()])
    assert computed_by(y) == '_OwnWeightGradConvBackward'
    assert [name for name, _ in log.ops].count('mmpoolformer.depthwise_weight_grad') == 1
    y_plain = conv(x)
    expected = torch.autograd.grad(y_plain.square().sum(), [x, *conv.parameters()])
    assert torch.equal(y, y_plain)
    assert all(max_rel_err(a, b) <= 1e-5 for a, b in zip(grads, expected))


def test_conv2d_under_bf16_autocast_offers_the_compiled_depthwise_gradient_in_bf16(timed_choices,
                                                                                   monkeypatch):
    """On a CPU with bf16 instructions, a bf16 channels-last map: autocast's convolution, then ours in
    bf16 (oneDNN's bf16 forward kernel, also for the input's gradient with the filter turned; the
    compiled weight gradient), then the fp32 ones. Forced, ours in bf16 computes autocast's output
    exactly, the input's gradient in bf16 and the weight's and bias's in fp32 as fp32 does from the
    same bf16 values."""
    if native.ops() is None:
        pytest.skip('no compiled kernels here')
    monkeypatch.setattr(kernels.dispatch, 'cpu_info',
                        lambda: dict(model='x', flags=['avx2', 'avx512f', 'avx512_bf16']))
    conv = depthwise(bias=True)
    x = torch.randn(2, 8, 15, 14).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        conv_kernel.conv2d(conv, x.requires_grad_())
    assert list(list(kernels.dispatch.timings().values())[0]) == [
        'plain', 'fused/compiled/bfloat16', 'fused/compiled/float32', 'fused/correlation/float32',
        'fused/onednn/float32']
    with torch.autocast('cpu', dtype=torch.bfloat16), kernels.forced(
            kernels.Plan(backend='compiled', dtype=torch.bfloat16)):
        y = conv_kernel.conv2d(conv, x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y_autocast = conv(x)
    assert computed_by(y) == '_OwnWeightGradConvBackward' and torch.equal(y, y_autocast)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *conv.parameters()], g)
    assert grads[0].dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in grads[1:])
    # against fp32 (and float64) from the same bf16 values: the input's gradient rounded to bf16 once
    reference = [t.detach().double().requires_grad_() for t in (x, conv.weight, conv.bias)]
    rounded = [t + (t.bfloat16().double() - t).detach() for t in reference[1:]]  # (gradient unrounded)
    y64 = torch.nn.functional.conv2d(reference[0], *rounded, padding=3, groups=8)
    expected = torch.autograd.grad(y64, reference, g.double())
    assert max_rel_err(grads[0], expected[0]) <= 2 ** -8
    assert all(max_rel_err(a, b) <= 1e-5 for a, b in zip(grads[1:], expected[1:]))


@pytest.mark.parametrize('make, method', [(downsampling, 'blas'), (depthwise, 'correlation')])
def test_conv2d_under_autocast_offers_fp32_with_either_weight_gradient(make, method, timed_choices,
                                                                       monkeypatch):
    """On a CPU without bf16 instructions: fp32 with our weight gradient, fp32 as written, and the
    autocast convolution; the fp32 ones compute as fp32 does."""
    monkeypatch.setattr(kernels.dispatch, 'cpu_info', lambda: dict(model='x', flags=['avx2']))
    conv = make()
    x = torch.randn(2, 8, 15, 14, requires_grad=True)
    y32 = conv(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = conv_kernel.conv2d(conv, x)
    assert list(list(kernels.dispatch.timings().values())[0]) == [
        f'fused/{method}/float32', 'fused/onednn/float32', 'plain']
    for plan in (kernels.Plan(backend=method, dtype=torch.float32),
                 kernels.Plan(backend='onednn', dtype=torch.float32)):
        with torch.autocast('cpu', dtype=torch.bfloat16), kernels.forced(plan):
            y = conv_kernel.conv2d(conv, x)
        assert y.dtype == torch.float32 and max_rel_err(y, y32) <= 1e-6
        grads = torch.autograd.grad(y.sum(), [x, conv.weight])
        expected = torch.autograd.grad(y32.sum(), [x, conv.weight], retain_graph=True)
        assert all(max_rel_err(a, b) <= 1e-5 for a, b in zip(grads, expected))


@pytest.mark.parametrize('plan', [kernels.Plan(backend='blas'), kernels.PLAIN], ids=str)
def test_the_backbones_strided_convolutions_never_copy_their_weight(plan):
    """The stem's and the downsamplings' weights are stored channels-last, as the maps they convolve
    and the patch product's gradient are: no call copies the weight or its gradient into the other
    layout (forward, the input's gradient, the weight's gradient; up to 3.5 ms a call each)."""
    proj = PatchEmbed(32, 48, 3, 2, 1).proj
    x = torch.randn(2, 32, 15, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    with kernels.forced(plan), OpLog() as log:
        conv_kernel.conv2d(proj, x).sum().backward()
    assert proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert proj.weight.grad.stride() == proj.weight.stride()
    copies = ('aten.clone', 'aten.copy_', 'aten._to_copy')
    assert not [name for name, numel in log.ops if name in copies and numel == proj.weight.numel()]
