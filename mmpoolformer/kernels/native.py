"""Compiled CPU kernels for work that PyTorch's operators do in several passes, built for this CPU.

The MLP kernel's activations (``csrc/activations.cpp``), in one pass over a chunk each way: GELU
forward with fc1's bias added in the same pass (PyTorch's addmm writes the bias over its output in a
pass of its own: S12's forward 3.4 ms less on the Xeon of 2026-12-05), GELU's value and derivative in
backward (PyTorch's two operators spend three exponentials on them, this kernel one), StarReLU
forward and backward (as PyTorch's operators, four passes forward and six
backward); fp32 chunks, and bf16 ones under autocast (rounded by the CPU's own instruction where it
has avx512_bf16). On the Zen 3 machine (AVX2, 2 threads, 2x512x512, profiled): the GELU work of
PoolFormer-S12's backward 24-28 against 57-69 ms a training step; ConvFormer-S18's element-wise
operators around StarReLU 78-92 against 172-216 ms. On the Zen 4 machine under bf16 autocast, S12's
training step 5.5% faster with the bf16 GELU than without.

The pooling branch (``csrc/pooling.cpp``), on channels-last maps: pooling and interpolation in one pass
forward, two passes backward (PyTorch's operators: two and six). On the Zen 4 machine (AVX-512, 2
threads): S12's stage-0 branch, forward and backward, 7.0 against 12.0 ms.

The weight gradient of a depthwise convolution (``csrc/depthwise.cpp``; ConvFormer's 7x7), straight over
the channels-last maps, fp32 or bf16 (oneDNN's over NCHW copies of both: 3-10 times as long).

Multi-head attention's forward pass (``csrc/attention.cpp``): scores, softmax and weighted values a
block of queries at a time, with the products' tiles in registers (PyTorch's flash attention for CPUs:
BLAS calls on blocks and an online softmax).

Its backward pass in bf16 (``csrc/attention_backward.cpp``), on CPUs with avx512_bf16: the products on
oneDNN's bf16 micro-kernel, which PyTorch exports (``cpublas::brgemm``; AMX tiles where there are), the
softmax recomputed between them from whole rows of scores (PyTorch's flash attention for CPUs computes
its backward in fp32 tiles, as slowly in bf16 as in fp32).

GroupNorm's statistics (``csrc/group_norm.cpp``) where each group is one block of memory: one pass
that only reads, each block's deviations from its own mean summed from L1 (PyTorch's operators: four
passes, two of them writing). The backbone's emitted maps
normalised as a channels-last map is turned into an NCHW one, in tiles (PyTorch's GroupNorm and
``.contiguous()``: three passes, the last element by element).

Channel LayerNorm over rows of tokens (``csrc/layer_norm.h``, ``csrc/layer_norm.cpp``), forward and
backward, written straight where the MLP kernel's chunks read it, in their dtype (PyTorch's LayerNorm:
its own output, then a copy); forward also from bf16 rows (a bf16 map under bf16 autocast). On the
Xeon of 2026-12-04 (one thread, 1024 rows of 64 channels): forward 16 against 44 us, backward 18
against 39 us; ConvFormer-S18's forward 3.4% and its training step 5.1% faster (paired runs, 2
threads, 2x512x512, fp32), under bf16 autocast 3.1% and 2.3%.

The MLP kernel's chunk loop (``csrc/mlp.cpp``: GroupNorm or channel LayerNorm, GELU or StarReLU), its
chunks shared out among the threads, each computing its own from the normalisation to the output and
back; and ConvFormer's SepConv branch in inference, band by band of image rows (``sep_conv.py``).

The kernels are built on first use by ``torch.utils.cpp_extension`` (a C++ compiler and ninja; about
15 s on two cores), for the instruction set PyTorch's own CPU kernels use here (AVX2 or AVX-512), into
a folder of ``$MMPF_CACHE/native`` (default ``~/.cache/mmpoolformer/native``) named by what they are
built from, and loaded from there afterwards. Each build is checked against PyTorch's operators when
loaded. Where they cannot be built or fail the check, one warning says why and PyTorch's operators
do the work, as they do on other devices.
"""
import contextlib
import functools
import hashlib
import os
import os.path as osp
import warnings
from typing import Iterator, Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

CSRC = osp.join(osp.dirname(__file__), 'csrc')
SOURCES = tuple(osp.join(CSRC, name)
                for name in ('activations.cpp', 'pooling.cpp', 'group_norm.cpp', 'layer_norm.cpp',
                             'mlp.cpp', 'attention.cpp', 'attention_backward.cpp',
                             'depthwise.cpp'))
HEADERS = tuple(osp.join(CSRC, name) for name in ('common.h', 'layer_norm.h'))
# at::vec selects its instructions by these defines; the compiler needs the matching flags
CAPABILITY_FLAGS = {
    'AVX2': ['-mavx2', '-mfma', '-DCPU_CAPABILITY=AVX2', '-DCPU_CAPABILITY_AVX2'],
    'AVX512': ['-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq', '-mfma',
               '-DCPU_CAPABILITY=AVX512', '-DCPU_CAPABILITY_AVX512'],
}
# OpenMP: at::parallel_for runs on PyTorch's threads only where the pragmas are compiled (without it,
# on one thread); the libgomp this links is the one PyTorch loaded
COMPILE_FLAGS = ['-O3', '-fopenmp']
NAME = 'mmpoolformer_native'
# in the build folder: that a build finished (the library is then loaded as it is), or why it failed
# (then it is not retried)
BUILT, FAILED = 'built.txt', 'failed.txt'


def build_dir(capability: str) -> str:
    """The build's folder, named by what it is built from: PyTorch, the sources, the flags."""
    digest = hashlib.sha256(torch.__version__.encode())
    for path in SOURCES + HEADERS:
        with open(path, 'rb') as f:
            digest.update(f.read())
    digest.update(' '.join(COMPILE_FLAGS + CAPABILITY_FLAGS[capability]).encode())
    cache = os.environ.get('MMPF_CACHE') or osp.join(osp.expanduser('~'), '.cache', 'mmpoolformer')
    return osp.join(cache, 'native', f'{capability.lower()}-{digest.hexdigest()[:16]}')


@functools.lru_cache(None)
def ops():
    """``torch.ops.mmpoolformer`` with the compiled kernels, or None where they are unavailable."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in CAPABILITY_FLAGS:
        return None  # (no vector instructions worth a kernel of ours)
    folder = build_dir(capability)
    failed = osp.join(folder, FAILED)
    if osp.exists(failed):
        with open(failed) as f:
            _unavailable(f'{f.read().strip()}; delete {folder} to retry')
        return None
    try:
        if osp.exists(osp.join(folder, BUILT)):
            torch.ops.load_library(osp.join(folder, NAME + '.so'))
        else:
            _build(folder, capability)
    except Exception as error:  # no compiler, no ninja, no Python headers, a failed compilation, ...
        last_line = (str(error).strip().splitlines() or [''])[-1]
        reason = f'building or loading them failed: {type(error).__name__}: {last_line}'
        try:
            with open(failed, 'w') as f:
                f.write(reason)
        except OSError:  # (an unwritable cache: then every process tries again)
            pass
        _unavailable(reason)
        return None
    with apart():
        problem = _check(torch.ops.mmpoolformer)
    if problem:
        _unavailable(problem)
        return None
    return torch.ops.mmpoolformer


@contextlib.contextmanager
def apart() -> Iterator[None]:
    """Where a kernel's check against PyTorch's operators runs, first used inside whatever the caller
    runs: no work of a dispatch mode's (a FLOP counter's), nor of the caller's autograd, inference
    mode or autocast, nor saved for an enclosing activation checkpoint (identity saved-tensor hooks
    keep the check's own autograd out of its hooks, so its recomputation saves as many tensors)."""
    keep = lambda t: t  # noqa: E731
    with _disable_current_modes(), torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast('cpu', enabled=False), torch.autograd.graph.saved_tensors_hooks(keep, keep):
        yield


def _build(folder: str, capability: str) -> None:
    """Compile and load the kernels (``torch.utils.cpp_extension`` waits while another process
    builds the same folder, and then loads its build)."""
    from torch.utils import cpp_extension
    os.makedirs(folder, exist_ok=True)
    cpp_extension.load(name=NAME, sources=list(SOURCES), build_directory=folder,
                       extra_cflags=COMPILE_FLAGS + CAPABILITY_FLAGS[capability],
                       extra_ldflags=['-fopenmp'], is_python_module=False, verbose=False)
    with open(osp.join(folder, BUILT), 'w') as f:
        f.write(f'{NAME}.so, built for {capability} against torch {torch.__version__}\n')


def takes(*tensors: torch.Tensor, memory_format=torch.contiguous_format,
          dtypes=(torch.float32, )) -> bool:
    """Whether the compiled kernels are there and take these tensors: CPU tensors of one of
    ``dtypes``, all the same, contiguous in ``memory_format`` (what the MLP kernel's chunk buffers and
    kept hidden map are: fp32, or bf16 where its products run in bf16; channels-last: the pooling
    kernel's maps)."""
    return (all(t.device.type == 'cpu' and t.dtype in dtypes
                and t.is_contiguous(memory_format=memory_format) for t in tensors)
            and len({t.dtype for t in tensors}) == 1 and ops() is not None)


def _check(namespace) -> Optional[str]:
    """What is wrong with the loaded kernels, against PyTorch's operators, or None."""
    # every range of the formula, and a length that leaves a tail to the scalar loop
    h = torch.cat([torch.linspace(-12, 12, 2001), torch.tensor([0., 1e-30, -1e-30, 1e-4, -1e-4])])
    grad = torch.linspace(-2, 2, len(h))
    value, ours = torch.empty_like(h), grad.clone()
    namespace.gelu_value_and_grad(h, value, ours)
    reference = torch.nn.functional.gelu(h.double())
    reference_grad = torch.ops.aten.gelu_backward(grad.double(), h.double())
    forward = torch.empty_like(h)
    namespace.gelu(h, forward)
    if not (torch.allclose(value.double(), reference, rtol=1e-5, atol=1e-6)
            and torch.allclose(ours.double(), reference_grad, rtol=1e-5, atol=1e-6)
            and torch.allclose(forward.double(), reference, rtol=1e-5, atol=1e-6)):
        return "their GELU disagrees with PyTorch's"
    rows, bias, biased = h[:1995].view(105, 19).clone(), torch.linspace(-1, 1, 19), torch.empty(105, 19)
    reference = torch.nn.functional.gelu(rows.double() + bias.double())
    namespace.bias_gelu(rows, bias, biased)  # (a tail after the vectors in every row)
    if not (torch.allclose(biased.double(), reference, rtol=1e-5, atol=1e-6)
            and torch.allclose(rows.double(), h[:1995].view(105, 19).double() + bias.double())):
        return "their GELU with fc1's bias disagrees with PyTorch's"
    h16, grad16 = h.bfloat16(), grad.bfloat16()  # bf16: within half a unit of float64
    value16, ours16, forward16 = torch.empty_like(h16), grad16.clone(), torch.empty_like(h16)
    namespace.gelu_value_and_grad(h16, value16, ours16)
    namespace.gelu(h16, forward16)
    reference16 = torch.nn.functional.gelu(h16.double())
    if not (torch.allclose(value16.double(), reference16, rtol=2 ** -8, atol=2e-6)
            and torch.allclose(forward16.double(), reference16, rtol=2 ** -8, atol=2e-6)
            and torch.allclose(ours16.double(), torch.ops.aten.gelu_backward(
                grad16.double(), h16.double()), rtol=2 ** -8, atol=2e-6)):
        return "their bf16 GELU disagrees with PyTorch's"
    scale, bias = torch.tensor([0.8]), torch.tensor([-0.1])
    namespace.star_relu(h, value, scale, bias)
    relu = h.double().clamp_min(0)
    ours = grad.clone()
    sums = namespace.star_relu_backward(h, ours, None, scale, bias)
    terms = grad.double() * relu ** 2, grad.double()
    sums_ok = all((total - t.sum()).abs() <= 1e-6 * t.abs().sum() for total, t in zip(sums, terms))
    if not (torch.allclose(value.double(), 0.8 * relu ** 2 - 0.1, rtol=1e-6, atol=1e-6)
            and torch.allclose(ours.double(), grad.double() * 1.6 * relu, rtol=1e-6, atol=1e-6)
            and sums_ok):
        return "their StarReLU disagrees with PyTorch's"
    relu16, ours16 = h16.double().clamp_min(0), grad16.clone()  # bf16: within half a unit
    namespace.star_relu_backward(h16, ours16, value16, scale, bias)
    if not (torch.allclose(value16.double(), 0.8 * relu16 ** 2 - 0.1, rtol=2 ** -8, atol=1e-6)
            and torch.allclose(ours16.double(), grad16.double() * 1.6 * relu16, rtol=2 ** -8,
                               atol=1e-6)):
        return "their bf16 StarReLU disagrees with PyTorch's"
    return (_check_pooling(namespace) or _check_statistics(namespace) or _check_layer_norm(namespace)
            or _check_mlp(namespace) or _check_attention(namespace) or _check_depthwise(namespace))


def _check_pooling(namespace) -> Optional[str]:
    # a channel tail after the vectors, windows cut by every edge
    shape = (2, 19, 5, 7)
    x, grad = (torch.sin(torch.arange(2 * 19 * 35.) * k).view(shape).contiguous(
        memory_format=torch.channels_last) for k in (0.37, 0.11))
    scale = torch.linspace(0.5, 1.5, 38).view(2, 19)
    out, mixed = torch.empty_like(x), torch.empty_like(x)
    namespace.pool_mix(x, scale, None, out, 3)
    pool = torch.nn.functional.avg_pool2d(x.double(), 3, 1, 1, count_include_pad=False)
    s = scale.double()[:, :, None, None]
    reference_mixed = torch.ops.aten.avg_pool2d_backward(grad.double(), x.double(), [3, 3], [1, 1],
                                                         [1, 1], False, False, None) - grad.double()
    sums = namespace.pool_mix_adjoint(grad, x, mixed, 3)
    if not (torch.allclose(out.double(), x.double() + s * (pool - x.double()), atol=1e-6)
            and torch.allclose(mixed.double(), reference_mixed, atol=1e-6)
            and torch.allclose(sums, (reference_mixed * x.double()).sum((2, 3)), atol=1e-5)):
        return "their pooling disagrees with PyTorch's"
    namespace.pool_mix_input_grad(mixed, grad, x, scale, None, scale, scale)
    if not torch.allclose(mixed.double(), s * reference_mixed + grad.double() + s * x.double() + s,
                          atol=1e-5):
        return "their pooling's input gradient disagrees with PyTorch's"
    return None


def _check_statistics(namespace) -> Optional[str]:
    rows = torch.sin(torch.arange(3 * 1001.)).view(3, 1001) + 30  # a tail; a large mean
    mean, rstd = namespace.row_stats(rows, 1e-5)
    reference = rows.double()
    if not (torch.allclose(mean.double(), reference.mean(1), rtol=1e-6)
            and torch.allclose(rstd.double(), (reference.var(1, unbiased=False) + 1e-5).rsqrt(),
                               rtol=1e-5)):
        return "their GroupNorm statistics disagree with PyTorch's"
    # full tiles and tails both ways, with the affine map and without
    src = torch.sin(torch.arange(2 * 21 * 35.)).view(2, 21, 35)
    a, b = torch.cos(torch.arange(70.)).view(2, 35), torch.linspace(-1, 1, 70).view(2, 35)
    out, plain = torch.empty(2, 35, 21), torch.empty(2, 35, 21)
    namespace.transpose_affine(src, a, b, out)
    namespace.transpose_affine(src, None, None, plain)
    if not (torch.allclose(out, (src * a[:, None] + b[:, None]).transpose(1, 2), atol=1e-6)
            and torch.equal(plain, src.transpose(1, 2))):
        return "their GroupNorm's transposing map disagrees with PyTorch's"
    return None


def _check_layer_norm(namespace) -> Optional[str]:
    # rows with a tail after the vectors and a large mean; into float32 and bfloat16
    x = torch.sin(torch.arange(70 * 19.)).view(70, 19) * 2 + 30
    weight, bias, grad = torch.cos(torch.arange(19.)) + 1.5, torch.linspace(-1, 1, 19), torch.cos(x)
    out, out16, mean, rstd = torch.empty_like(x), x.bfloat16(), torch.empty(70), torch.empty(70)
    namespace.layer_norm_rows(x, weight, bias, 1e-6, out16, mean, rstd)
    namespace.layer_norm_rows(x, weight, bias, 1e-6, out, mean, rstd)
    xd, wd = x.double().requires_grad_(), weight.double().requires_grad_()
    bd = bias.double().requires_grad_()
    reference = torch.nn.functional.layer_norm(xd, (19, ), wd, bd, 1e-6)
    reference.backward(grad.double())
    grad_x, grad_weight, grad_bias = torch.empty_like(x), torch.ones(19), torch.ones(19)  # (added to)
    namespace.layer_norm_rows_backward(grad, x, mean, rstd, weight, grad_x, grad_weight, grad_bias)
    a, b = torch.cos(torch.arange(19.)), torch.linspace(-2, 2, 19)
    mapped, mapped16 = torch.empty_like(x), torch.empty_like(out16)
    namespace.affine_rows(x, a, b, mapped)
    namespace.affine_rows(x, a, b, mapped16)
    if not (torch.allclose(mapped, torch.addcmul(b, x, a), rtol=1e-6, atol=1e-6)
            and torch.equal(mapped16, mapped.bfloat16())):
        return "their GroupNorm's affine map of rows disagrees with PyTorch's"
    # bf16 rows (a row of vectors and a tail): the float32 values of the bf16 ones, normalised as those
    rows16 = (torch.sin(torch.arange(5 * 45.)).view(5, 45) * 2 + 30).bfloat16()
    from16, widened, bias45 = torch.empty(5, 45), torch.empty(5, 45), torch.linspace(-1, 1, 45)
    namespace.layer_norm_rows(rows16, None, bias45, 1e-6, from16, torch.empty(5), torch.empty(5))
    namespace.layer_norm_rows(rows16.float(), None, bias45, 1e-6, widened, torch.empty(5), torch.empty(5))
    if not torch.equal(from16, widened):
        return "their LayerNorm of bf16 rows disagrees with their LayerNorm"
    # and back: the float32 backward of the bf16 values, the rows' gradient rounded once
    grad16, stats = torch.cos(rows16.float()).bfloat16(), (torch.empty(5), torch.empty(5))
    namespace.layer_norm_rows(rows16, None, bias45, 1e-6, from16, *stats)
    back16, back, sums16, sums = torch.empty_like(rows16), torch.empty(5, 45), *torch.zeros(2, 45)
    namespace.layer_norm_rows_backward(grad16, rows16, *stats, None, back16, None, sums16)
    namespace.layer_norm_rows_backward(grad16.float(), rows16.float(), *stats, None, back, None, sums)
    if not (torch.equal(back16, back.bfloat16()) and torch.equal(sums16, sums)):
        return "their LayerNorm's backward of bf16 rows disagrees with their LayerNorm's backward"
    if not (torch.allclose(out.double(), reference, rtol=1e-5, atol=1e-5)
            and torch.equal(out16, out.bfloat16())
            and torch.allclose(grad_x.double(), xd.grad, rtol=1e-4, atol=1e-4)
            and torch.allclose(grad_weight.double() - 1, wd.grad, rtol=1e-4, atol=1e-4)
            and torch.allclose(grad_bias.double() - 1, bd.grad, rtol=1e-4, atol=1e-4)):
        return "their LayerNorm disagrees with PyTorch's"
    return None


def _check_mlp(namespace) -> Optional[str]:
    # chunks of 7 rows over samples of 10 (a chunk across two samples), a residual factor, a scale
    c, hidden, per_sample = 5, 12, 10
    draw = torch.Generator().manual_seed(0)  # (the process's random state is the caller's)
    x, grad, a, b, w1, b1, w2, b2, res = (
        torch.randn(shape, generator=draw) for shape in ((3 * per_sample, c), (3 * per_sample, c),
                                                         (3, c), (3, c), (hidden, c), (hidden, ),
                                                         (c, hidden), (c, ), (c, )))
    a, res = a.abs() + 0.5, res.abs() + 0.5
    tensors = [t.double().requires_grad_() for t in (x, a, b, w1, b1, w2, b2)]
    xd, ad, bd, w1d, b1d, w2d, b2d = tensors
    sample = torch.arange(len(x)) // per_sample
    hd = (ad[sample] * xd + bd[sample]) @ w1d.t() + b1d
    reference = res.double() * xd + 0.5 * (torch.nn.functional.gelu(hd) @ w2d.t() + b2d)
    out, hidden_map = torch.empty_like(x), torch.empty(len(x), hidden)
    namespace.mlp_forward(x, a, b, False, 0., w1, b1, w2, b2, res, None, None, 0.5, per_sample, 7, out,
                          hidden_map)
    if not (torch.allclose(out.double(), reference, rtol=1e-5, atol=1e-5)
            and torch.allclose(hidden_map.double(), hd, rtol=1e-5, atol=1e-5)):
        return "their MLP disagrees with PyTorch's"
    # backward to the normalised rows: autograd's through hd's input, and the weights' gradients
    normed = ad[sample] * xd + bd[sample]
    normed.retain_grad()
    (res.double() * xd + 0.5 * (torch.nn.functional.gelu(normed @ w1d.t() + b1d) @ w2d.t() + b2d)
     ).backward(grad.double())
    grad_normed = torch.empty_like(x)
    weights = [torch.full_like(t, float('nan')) for t in (w1, b1, w2, b2)]  # (written, not added to)
    namespace.mlp_backward(grad, x, a, b, False, 0., w1, b1, w2, None, None, None, 0.5, per_sample, 7,
                           grad_normed, *weights, None, None, None, None)
    expected = [normed.grad, w1d.grad, b1d.grad, w2d.grad, b2d.grad]
    if not all(torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4)
               for got, want in zip([grad_normed] + weights, expected)):
        return "their MLP's backward disagrees with PyTorch's"
    return _check_sep_conv(namespace)


def _check_sep_conv(namespace) -> Optional[str]:
    # 2 samples of 7x5 tokens in bands of 2 rows (the filter's window carried from band to band), a 3x3
    # filter, channel LayerNorm, GELU, a residual factor
    c, hidden, height, width = 5, 12, 7, 5
    draw = torch.Generator().manual_seed(0)
    x, weight, bias, w1, dw, w2, res = (
        torch.randn(shape, generator=draw) for shape in ((2, c, height, width), (c, ), (c, ),
                                                         (hidden, c), (hidden, 1, 3, 3), (c, hidden),
                                                         (c, )))
    xd = x.double()
    normed = torch.nn.functional.layer_norm(xd.permute(0, 2, 3, 1), (c, ), weight.double(),
                                            bias.double(), 1e-6).permute(0, 3, 1, 2)
    expanded = torch.nn.functional.gelu(torch.einsum('nchw,dc->ndhw', normed, w1.double()))
    filtered = torch.nn.functional.conv2d(expanded, dw.double(), padding=1, groups=hidden)
    reference = (res.double()[:, None, None] * xd + torch.einsum('nchw,dc->ndhw', filtered, w2.double())
                 ).permute(0, 2, 3, 1).reshape(-1, c)
    rows = x.permute(0, 2, 3, 1).reshape(-1, c)
    out = torch.empty_like(rows)
    namespace.sep_conv_forward(rows, weight, bias, True, 1e-6, w1, None, dw, None, w2, None, res, None,
                               None, 1., height, width, 2, out)
    if not torch.allclose(out.double(), reference, rtol=1e-5, atol=1e-5):
        return "their SepConv disagrees with PyTorch's"
    return None


def _check_attention(namespace) -> Optional[str]:
    # strided views of one projection, as the model has them; queries and keys that leave tails
    draw = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 45, 3, 2, 16, generator=draw) * 2).permute(2, 0, 3, 1, 4)
    q = q[:, :, :37]
    out = torch.empty(2, 37, 2, 16)
    namespace.attention(q, k, v, 0.25, out)
    scores = q.double() @ k.double().transpose(-1, -2) * 0.25
    reference = (scores.softmax(-1) @ v.double()).transpose(1, 2)
    if not torch.allclose(out.double(), reference, rtol=1e-5, atol=1e-5):
        return "their attention disagrees with PyTorch's"
    return None


def _check_depthwise(namespace) -> Optional[str]:
    # a vector of channels and a tail, a map narrower than the 7x7 filter, and a 3x3 one
    draw = torch.Generator().manual_seed(0)
    for shape, k in (((2, 19, 6, 5), 7), ((1, 3, 4, 9), 3)):
        x, grad = (torch.randn(shape, generator=draw).contiguous(memory_format=torch.channels_last)
                   for _ in '12')
        out = torch.empty(shape[1], 1, k, k)
        namespace.depthwise_weight_grad(x, grad, out)
        reference = torch.ops.aten.convolution_backward(
            grad.double(), x.double(), torch.zeros(out.shape, dtype=torch.double), None, [1, 1],
            [k // 2] * 2, [1, 1], False, [0, 0], shape[1], [False, True, False])[1]
        if not torch.allclose(out.double(), reference, rtol=1e-5, atol=1e-5):
            return "their depthwise convolution's weight gradient disagrees with PyTorch's"
    # bf16 maps: widened as read, the fp32 gradient of their values
    x16, grad16 = x.bfloat16(), grad.bfloat16()
    out16, widened = torch.empty_like(out), torch.empty_like(out)
    namespace.depthwise_weight_grad(x16, grad16, out16)
    namespace.depthwise_weight_grad(x16.float(), grad16.float(), widened)
    if not torch.equal(out16, widened):
        return "their depthwise convolution's weight gradient of bf16 maps disagrees with their fp32 one"
    return None


def _unavailable(reason: str) -> None:
    warnings.warn(f"mmpoolformer's compiled CPU kernels are unavailable ({reason}); PyTorch's "
                  'operators do their work instead', stacklevel=3)
