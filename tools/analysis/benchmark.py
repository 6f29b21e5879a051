"""Time our backbones against timm's and mmpretrain's, and our detectors and segmentors.

    python tools/analysis/benchmark.py                       # PoolFormer-S12, batch 2, 512x512
    python tools/analysis/benchmark.py --amp                 # the same under bf16 autocast
    python tools/analysis/benchmark.py --arch m36 --device cuda --json bench.json
    python tools/analysis/benchmark.py --family convformer   # a MetaFormer Baselines family (S18)
    python tools/analysis/benchmark.py --impls ours ours+cp --configs \\
        configs/detection/retinanet_poolformer_s12.py configs/segmentation/fpn_poolformer_s12.py

Backbones: every implementation gets the same weights (timm's, mapped by our converter) and the same
input, and must produce the same four normalised stage maps before any time is reported (timm's
``features_only`` model gets our output norms). The MetaFormer Baselines families (``--family``) are
compared with timm's only: mmpretrain has none of them. Runs alternate between implementations, in a
new order each round; the table gives medians. By default all share this process; with
``--own-processes`` each runs in a process of its own (its own heap and kernel plans, as in a user's
training process), and the rounds still take turns between them. "train" is forward plus backward of
the four maps; peak memory is that of one training step above what the model and input already hold
(CUDA: the allocator's peak; CPU: the peak resident size of a fresh process during its second step,
with glibc returning every large block to the system at once so that it follows the live tensors),
with the gradients allocated during the step ("peak MiB") and with them kept from the step before
("kept grads": activations and backward scratch only).

The floor is the time of the backbone's convolutions and matrix products alone (forward; forward and
backward), each timed in isolation on the fastest way this machine offers: oneDNN's convolution, or
the BLAS or oneDNN's linear for a 1x1 convolution (the product over channels-last tokens) and for
attention's projections, or the convolution with our weight gradient (``kernels.conv``: a product
over patches, or a depthwise correlation); attention's own two products (scores, weighted values)
and their gradients as batched products, or the fused attention where that is faster (its time then
includes the softmax); in fp32 and, under ``--amp``, in the low precision.
What ours takes beyond it is everything that is not a product. The same products are also timed
run one after another as the backbone runs them (``forward_in_sequence_s``, ``train_in_sequence_s``):
there their inputs come from memory rather than a warm cache, and their outputs, maps of up to tens
of megabytes, are allocated afresh, as they are in the backbone. The machine's record gives the two
rates that place the floor (``machine.rates``): a square product's GFLOP/s (fp32, and bf16 where the
device has it) and a large copy's GB/s; the passes between the products run at the second.

Configs: one training iteration (``train_step``: preprocessing, forward, backward, optimizer step) and
one inference (``test_step``) of the whole model on synthetic inputs of the config's training size.
"""
import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpoolformer import kernels
from mmpoolformer.kernels.conv import backward_own, own_weight_grads
from mmpoolformer.models import CAFormer, ConvFormer, PoolFormer, PoolFormerV2
from mmpoolformer.models.token_mixers import Attention
from mmpoolformer.models.weights import convert_backbone_state_dict
from mmpoolformer.testing import randomize_weights

PEERS = ('timm', 'mmpretrain')  # the implementations ours is compared with
IMPLS = ('ours', 'ours+cp') + PEERS
# our backbone classes by timm's model-name prefix
FAMILIES = {'poolformer': PoolFormer, 'poolformerv2': PoolFormerV2, 'convformer': ConvFormer,
            'caformer': CAFormer}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--family', default='poolformer', choices=sorted(FAMILIES))
    parser.add_argument('--arch', help="the family's size (default: its smallest, s12 or s18)")
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, nargs=2, default=(512, 512), metavar=('H', 'W'))
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, help='torch CPU threads (default: torch\'s choice)')
    parser.add_argument('--amp', nargs='?', const='auto', choices=['auto', 'bf16', 'fp16'],
                        help='time under autocast (auto: bf16 on CPU, fp16 on CUDA); outputs are '
                        'checked in fp32 first')
    parser.add_argument('--impls', nargs='+', default=list(IMPLS), choices=IMPLS,
                        help='backbones to compare; peers that are not installed are skipped')
    parser.add_argument('--repeats', type=int, default=7, help='timed runs per implementation')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory runs')
    parser.add_argument('--own-processes', action='store_true',
                        help='time each implementation in a process of its own (default: all in '
                        'this one); the rounds still alternate between them')
    parser.add_argument('--configs', nargs='*', default=[],
                        help='mmdet / mmseg configs whose whole-model iteration to time')
    parser.add_argument('--config-batch', type=int, default=2)
    parser.add_argument('--config-backbones', nargs='+', default=['ours'], choices=['ours', 'mmpretrain'],
                        help="the configs' backbone: ours, or mmpretrain's PoolFormer of the same arch "
                        'and stages in its place (PoolFormer configs only)')
    parser.add_argument('--json', help='also write the results here')
    parser.add_argument('--memory-worker', help=argparse.SUPPRESS)  # internal: one impl, one step
    parser.add_argument('--timing-worker', help=argparse.SUPPRESS)  # internal: one impl, --own-processes
    args = parser.parse_args(argv)
    resolve_arch(parser, args)
    if args.amp == 'auto':
        args.amp = 'fp16' if args.device.startswith('cuda') else 'bf16'
    if args.batch < 1 or args.repeats < 1 or min(args.size) < 32:
        parser.error('--batch and --repeats must be >= 1 and --size at least 32 x 32')
    return args


def resolve_arch(parser: argparse.ArgumentParser, args) -> None:
    """``args.arch``: the family's smallest where none was given; one of another family refused."""
    zoo = FAMILIES[args.family].arch_zoo
    args.arch = args.arch or next(iter(zoo))
    if args.arch not in zoo:
        parser.error(f'--arch {args.arch}: {args.family} has {", ".join(zoo)}')


# ---------------------------------------------------------------------------------- implementations
class TimmWithNorms(nn.Module):
    """timm's ``features_only`` model plus the output norms the official dense models (ours and
    mmpretrain's) apply, so that all compute the same maps."""

    def __init__(self, features: nn.Module, norms: nn.ModuleList):
        super().__init__()
        self.features, self.norms = features, norms

    def forward(self, x):
        return tuple(norm(f) for norm, f in zip(self.norms, self.features(x)))


def build(impl: str, family: str, arch: str) -> nn.Module:
    if impl == 'mmpretrain':
        from mmpretrain.models.backbones import PoolFormer as MMPretrainPoolFormer
        return MMPretrainPoolFormer(arch, out_indices=(0, 2, 4, 6), frozen_stages=-1)
    ours = FAMILIES[family](arch, with_cp=impl == 'ours+cp')
    if impl == 'timm':  # with our output norms
        import timm
        features = timm.create_model(f'{family}_{arch}', features_only=True)
        return TimmWithNorms(features, nn.ModuleList(copy.deepcopy(getattr(ours, name))
                                                     for name in OUT_NORMS))
    return ours


OUT_NORMS = ('norm0', 'norm2', 'norm4', 'norm6')  # ours, emitting stages 0-3 (official layout)


def unavailable(impl: str, family: str) -> str:
    """Why ``impl`` cannot be timed here ('' where it can)."""
    if impl == 'mmpretrain' and family != 'poolformer':
        return f'no {family}'
    if impl not in PEERS:  # (each peer is the package of its name)
        return ''
    try:
        __import__(impl)
        return ''
    except ImportError as e:
        return f'not importable ({e})'


def shared_weights(family: str, arch: str, seed: int = 0) -> dict:
    """Official-layout weights far from their init, so that every block matters to the check."""
    return randomize_weights(FAMILIES[family](arch), seed).state_dict()


def load_weights(model: nn.Module, impl: str, official: dict) -> None:
    if impl != 'timm':
        model.load_state_dict(official, strict=True)
        return
    # timm's names, found by converting timm's own state dict with our converter (tested both ways)
    timm_sd = {k.replace('stages_', 'stages.'): v for k, v in model.features.state_dict().items()}
    converted, _, _ = convert_backbone_state_dict(timm_sd)
    by_storage = {v.data_ptr(): k for k, v in timm_sd.items()}
    to_timm = {ours: by_storage[v.data_ptr()] for ours, v in converted.items()}
    model.features.load_state_dict(  # (timm's linear layers are our 1x1 convolutions)
        {to_timm[k].replace('stages.', 'stages_', 1): v.reshape(timm_sd[to_timm[k]].shape)
         for k, v in official.items() if k in to_timm}, strict=True)
    for name, norm in zip(OUT_NORMS, model.norms):
        norm.load_state_dict({k: official[f'{name}.{k}'] for k in norm.state_dict()})


# ---------------------------------------------------------------------------------- measurements
def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


AMP_DTYPES = {None: None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def autocast(x, amp):
    return torch.autocast(x.device.type, dtype=AMP_DTYPES[amp], enabled=amp is not None)


def train_step(model, x, amp=None):
    with autocast(x, amp):
        outs = model(x)
        loss = sum(o.float().mean() for o in outs)
    loss.backward()


def forward(model, x, amp=None):
    with torch.no_grad(), autocast(x, amp):
        model(x)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_input(args, device) -> torch.Tensor:
    """The input every implementation is timed on (the same in every process)."""
    return torch.randn(args.batch, 3, *args.size,
                       generator=torch.Generator().manual_seed(0)).to(device)


def time_round(model, x, args, device) -> list:
    """Seconds of a forward pass and of a training step (the step's gradients allocated anew)."""
    forward_s = timed(lambda: forward(model, x, args.amp), device)
    model.zero_grad(set_to_none=True)
    return [forward_s, timed(lambda: train_step(model, x, args.amp), device)]


def worker_args(args) -> list:
    """The options a worker process (memory, timing) needs to build and run what this one does."""
    argv = ['--family', args.family, '--arch', args.arch, '--batch', str(args.batch),
            '--size', *map(str, args.size), '--device', args.device]
    if args.threads:
        argv += ['--threads', str(args.threads)]
    if args.amp:
        argv += ['--amp', args.amp]
    return argv


WORKER_MARK = '@benchmark '  # (a timing worker's answers, among whatever else it prints)


class ApartProcess:
    """An implementation timed in a process of its own (``--own-processes``): the process builds it
    and runs a round whenever asked, so that the rounds alternate between implementations as in one
    process, while each has its own heap and kernel plans, as a user's process does (in a shared
    process a step also pays for the state the others leave: on the Zen 4 machine ours' fp32 step
    took 0.88-0.96 s there and 0.78-0.93 s alone, in one hour)."""

    def __init__(self, impl: str, args):
        self.impl, self.errors = impl, tempfile.TemporaryFile(mode='w+')
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), '--timing-worker', impl, *worker_args(args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True)
        # ready (imported, built) before the next one starts: a process starting beside another's
        # first steps would slow the trials that choose its kernel plans
        self._answer()

    def ask(self, command: str):
        """``round`` (its seconds, as :func:`time_round`) or ``plans`` (the kernel plans it chose and
        their trials' times; it then ends)."""
        try:
            self.proc.stdin.write(command + '\n')
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        return self._answer()

    def _answer(self):
        for line in self.proc.stdout:
            if line.startswith(WORKER_MARK):
                return json.loads(line[len(WORKER_MARK):])
        self.proc.wait()
        self.errors.seek(0)
        sys.exit(f'benchmark: the timing process of {self.impl} stopped (exit status '
                 f'{self.proc.returncode}):\n{self.errors.read()[-2000:]}')

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.errors.close()


def timing_worker(args) -> None:
    """The process of one implementation under ``--own-processes``: commands on stdin, answers on
    stdout (:class:`ApartProcess`)."""
    device = torch.device(args.device)
    impl = args.timing_worker
    model = build(impl, args.family, args.arch)
    load_weights(model, impl, shared_weights(args.family, args.arch))
    model.to(device).train()
    x = bench_input(args, device)
    print(WORKER_MARK + json.dumps('ready'), flush=True)
    for command in sys.stdin:
        if command.strip() == 'round':
            print(WORKER_MARK + json.dumps(time_round(model, x, args, device)), flush=True)
            continue
        # 'plans', the last command
        answer = dict(plans=kernels.chosen(), timings=kernels.dispatch.timings())
        print(WORKER_MARK + json.dumps(answer), flush=True)
        return


@contextlib.contextmanager
def without_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_same_outputs(models: dict, x) -> dict:
    """Max relative error of each implementation's maps against ours; refuses to go on if any
    differs by more than fp32 rounding. TF32 is off for the check: CUDA's convolutions take it by
    default and its products not, and its 10-bit rounding is a choice of speed, not a difference."""
    with torch.no_grad(), without_tf32():
        ref = models['ours'](x) if 'ours' in models else next(iter(models.values()))(x)
        errors = {}
        for name, model in models.items():
            outs = model(x)
            errors[name] = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                               for a, b in zip(outs, ref))
    bad = {k: v for k, v in errors.items() if v > 1e-4}
    if bad:
        sys.exit(f'benchmark: implementations disagree (max relative error {bad}); no timing reported')
    return errors


def peak_step_memory(impl, args) -> tuple:
    """Peak bytes of one training step above the model and input, with the gradients allocated in
    the step and with them kept (see the module docstring), and the kernel plans that step took (on
    CPUs measured in a process of its own, which chooses them anew: a plan that keeps more for
    backward, taken where its trial was faster, shows in the peak)."""
    if args.device.startswith('cuda'):
        device = torch.device(args.device)
        model = build(impl, args.family, args.arch).to(device)
        model.train()
        x = torch.randn(args.batch, 3, *args.size, device=device)
        train_step(model, x, args.amp)  # as on CPU: measure the second step
        peaks = []
        for _ in range(2):  # gradients allocated during the step; kept from the step before
            if not peaks:
                model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            train_step(model, x, args.amp)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
        return peaks, kernels.chosen()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='65536')
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-worker', impl, *worker_args(args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f'benchmark: the memory run of {impl} failed:\n{proc.stderr[-2000:]}')
    *_, plans, peaks = proc.stdout.strip().splitlines()
    return [float(v) for v in peaks.split()], json.loads(plans)


def _status_bytes(field: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))


def memory_worker(args) -> None:
    model = build(args.memory_worker, args.family, args.arch)
    model.train()
    x = torch.randn(args.batch, 3, *args.size)
    train_step(model, x, args.amp)  # one-time allocations (thread pools, GEMM buffers) happen here
    model.zero_grad(set_to_none=True)
    peaks = []
    for _ in range(2):  # gradients allocated during the step, then kept from the step before
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset the peak resident size (VmHWM) to the current one
        base = _status_bytes('VmRSS')
        train_step(model, x, args.amp)
        peaks.append(_status_bytes('VmHWM') - base)
    print(json.dumps(kernels.chosen()))
    print(*peaks)


def bench_backbones(args, device) -> list:
    reasons = {impl: unavailable(impl, args.family) for impl in args.impls}
    impls = [impl for impl in args.impls if not reasons[impl]]
    for impl in args.impls:
        if reasons[impl]:
            print(f'{impl} skipped: {reasons[impl]}')
    official = shared_weights(args.family, args.arch)
    models = {}
    for impl in impls:
        model = build(impl, args.family, args.arch)
        load_weights(model, impl, official)
        model.to(device).train()  # not chained: mmpretrain's train() returns None
        models[impl] = model
    x = bench_input(args, device)
    errors = check_same_outputs(models, x)
    apart = {}
    run_round = (lambda impl: apart[impl].ask('round')) if args.own_processes else (
        lambda impl: time_round(models[impl], x, args, device))

    times = {impl: {'forward': [], 'train': []} for impl in impls}
    try:
        if args.own_processes:  # from here each lives in a process of its own
            models.clear()
            for impl in impls:
                apart[impl] = ApartProcess(impl, args)
        for _ in range(args.warmup):
            for impl in impls:
                run_round(impl)
        shuffle = random.Random(0).sample
        for _ in range(args.repeats):
            # a new order each round: rotating a fixed one would give each the same predecessor
            # every time, whose freed memory it reuses or must fault in again (timm's step frees
            # 600 MiB), or whose data it left in the caches
            for impl in shuffle(impls, len(impls)):
                for kind, seconds in zip(('forward', 'train'), run_round(impl)):
                    times[impl][kind].append(seconds)
        plans = {impl: process.ask('plans') for impl, process in apart.items()}
    finally:
        for process in apart.values():
            process.close()
    rows = []
    for impl in impls:
        fwd, train = (statistics.median(times[impl][k]) for k in ('forward', 'train'))
        rows.append(dict(impl=impl, forward_s=fwd, train_s=train,
                         train_images_per_s=args.batch / train, max_rel_err=errors[impl],
                         forward_runs_s=times[impl]['forward'], train_runs_s=times[impl]['train']))
        if impl in plans:  # (its own process's: this one ran no step of it)
            rows[-1]['timing_plans'], rows[-1]['timing_plan_times'] = (
                plans[impl]['plans'], plans[impl]['timings'])
    peers = [impl for impl in impls if impl in PEERS]
    if 'ours' in times and peers:
        rows[impls.index('ours')]['paired_speedup'] = {
            k: paired_speedup(times['ours'][k], [times[p][k] for p in peers]) for k in times['ours']}
    if not args.no_memory:
        for row in rows:
            peaks, row['train_peak_plans'] = peak_step_memory(row['impl'], args)
            row['train_peak_mib'], row['train_peak_kept_grads_mib'] = (p / 2**20 for p in peaks)
    ours = models.get('ours') or build('ours', args.family, args.arch).to(device)
    floor, in_sequence = product_floor(ours, x, args, device)
    rows.append(dict(impl='floor', forward_s=floor[0], train_s=floor[1],
                     train_images_per_s=args.batch / floor[1], max_rel_err=float('nan'),
                     forward_in_sequence_s=in_sequence[0], train_in_sequence_s=in_sequence[1]))
    return rows


def product_floor(model, x, args, device) -> tuple:
    """Seconds of the model's convolutions and products alone, forward and forward + backward (module
    docstring): each timed on its own, summed; and all of them run one after another as the backbone
    runs them (forward in order, backward in reverse), each the way that was fastest alone."""
    calls = []
    record = lambda m, i, o=None: calls.append((m, i[0].shape))  # noqa: E731
    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    # (attention's products entered as the mixer starts, before its projections)
    hooks += [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, Attention)]
    with torch.no_grad(), kernels.forced(kernels.PLAIN):
        model(x)
    for hook in hooks:
        hook.remove()
    # the low precision competes where the device computes it natively (emulated, it never wins)
    low = AMP_DTYPES[args.amp]
    native = low is not None and kernels.dispatch.native_low_precision(device, low)
    dtypes = [torch.float32] + ([low] if native else [])
    forward_s = backward_s = 0.
    forwards, backwards = [], []
    for i, (module, shape) in enumerate(calls):
        if isinstance(module, nn.Conv2d):
            times = functools.partial(conv_times, module, shape, input_grad=i > 0)
        elif isinstance(module, nn.Linear):
            times = functools.partial(linear_times, module, shape)
        else:
            times = functools.partial(attention_times, module, shape)
        # per pass (forward, backward) the fastest (seconds, function) over dtypes and ways
        fastest = [min(pair, key=lambda t: t[0]) for pair in zip(*(
            times(dtype=d, device=device, functions=True) for d in dtypes))]
        forward_s += fastest[0][0]
        backward_s += fastest[1][0]
        forwards.append(fastest[0][1])
        backwards.append(fastest[1][1])
    forward_seq = median_time(lambda: [f() for f in forwards], device, 5)
    backward_seq = median_time(lambda: [f() for f in reversed(backwards)], device, 5)
    return (forward_s, forward_s + backward_s), (forward_seq, forward_seq + backward_seq)


def fastest_ways(forward: dict, backward: dict, device, repeats: int, functions: bool) -> tuple:
    """(forward, backward) seconds of the fastest of each pass's ways (``{name: function}``); with
    ``functions``, each as ``(seconds, the function that took them)``."""
    fastest = tuple(min(((median_time(fn, device, repeats), fn) for fn in fns.values()),
                        key=lambda t: t[0]) for fns in (forward, backward))
    return fastest if functions else tuple(seconds for seconds, _ in fastest)


def product_ways(x, w, b, g, input_grad=True):
    """The ways of ``x @ w.T + b`` over rows of tokens, forward and backward (gradient ``g``; with
    ``input_grad``, also ``x``'s): the BLAS, and oneDNN's linear forward on a CPU."""
    def backward():
        if input_grad:
            torch.mm(g, w)
        torch.mm(g.t(), x)
        if b is not None:
            g.sum(0)

    forward = {'blas': lambda: F.linear(x, w, b)}
    if x.device.type == 'cpu':
        forward['onednn'] = lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, 'none', [], '')
    return forward, {'blas': backward}


def linear_times(linear, shape, dtype, device, repeats=5, functions=False):
    """(forward, backward) seconds of ``linear`` on an input of ``shape`` (attention's qkv and output
    projections), each the faster of the BLAS and oneDNN (forward); as ``fastest_ways``."""
    x = torch.randn(shape, device=device, dtype=dtype).reshape(-1, shape[-1])
    w = linear.weight.detach().to(dtype)
    b = None if linear.bias is None else linear.bias.detach().to(dtype)
    g = torch.randn(len(x), len(w), device=device, dtype=dtype)
    return fastest_ways(*product_ways(x, w, b, g), device, repeats, functions)


def attention_times(attention, shape, dtype, device, repeats=5, functions=False):
    """(forward, backward) seconds of the products of an ``Attention`` mixer whose input map is of
    ``shape`` (``attention_ways``), each part the fastest of its ways; as ``fastest_ways``."""
    forward, backward = zip(*(fastest_ways(*ways, device, repeats, True)
                              for ways in attention_ways(attention, shape, dtype, device)))
    fastest = tuple((sum(t for t, _ in pass_), lambda fns=[f for _, f in pass_]: [f() for f in fns])
                    for pass_ in (forward, backward))
    return fastest if functions else tuple(seconds for seconds, _ in fastest)


def attention_ways(attention, shape, dtype, device) -> list:
    """The parts of an ``Attention`` mixer's products, each as its ways ``(forward, backward)``, on an
    input map of ``shape``: the scores (queries by keys) and the weighted values, forward and their
    four gradients, either as products alone (batched) or as the fused attention (ours or PyTorch's
    flash attention forward, whichever ``kernels.attend`` takes; flash attention's backward, or in
    bf16 on a CPU with bf16 products our compiled one), whose time includes the softmax: apart, the
    products write and read the whole matrix of scores, which took longer than the fused pass. With
    ``sr_ratio`` > 1 also its query and key / value projections, which it computes from split
    weights, not as the ``qkv`` module (the output projection is timed as its own module)."""
    n, channels, h, w = shape
    length, ratio = h * w, attention.sr_ratio
    keys = length if ratio == 1 else -(-h // ratio) * -(-w // ratio)
    draw = functools.partial(torch.randn, device=device, dtype=dtype)
    heads = (n, attention.num_heads)
    q, k, v, out_grad = (draw(*heads, rows, attention.head_dim)
                         for rows in (length, keys, keys, length))
    weights, scores_grad = draw(*heads, length, keys), draw(*heads, length, keys)
    q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
    fused = F.scaled_dot_product_attention(q_, k_, v_)
    parts = [({'bmm': lambda: (torch.matmul(q, k.transpose(-1, -2)), torch.matmul(weights, v)),
               'fused': lambda: kernels.attend(q, k, v)},
              {'bmm': lambda: (torch.matmul(out_grad, v.transpose(-1, -2)),
                               torch.matmul(weights.transpose(-1, -2), out_grad),
                               torch.matmul(scores_grad, k),
                               torch.matmul(scores_grad.transpose(-1, -2), q)),
               'fused': lambda: torch.autograd.grad(fused, (q_, k_, v_), out_grad, retain_graph=True)})]
    if kernels.attention.compiled_backward_takes(q, k, v):  # (ours: bf16 where the CPU has its products)
        grads = [torch.empty_like(t) for t in (q, k, v)]
        parts[0][1]['compiled'] = lambda: kernels.native.ops().attention_backward(
            q, k, v, out_grad, attention.head_dim ** -0.5, *grads)
    if ratio > 1:
        weight = attention.qkv.weight.detach().to(dtype)
        bias = None if attention.qkv.bias is None else attention.qkv.bias.detach().to(dtype)
        for rows, part in ((n * length, slice(0, channels)), (n * keys, slice(channels, None))):
            parts.append(product_ways(draw(rows, channels), weight[part],
                                      None if bias is None else bias[part],
                                      draw(rows, len(weight[part]))))
    return parts


def conv_times(conv, shape, dtype, input_grad, device, repeats=5, functions=False):
    """(forward, backward) seconds of ``conv`` on an input of ``shape``, each the faster of oneDNN
    (or cuDNN), the BLAS for 1x1 (the product over tokens) and, in backward, our weight gradient
    where ours offers it (``kernels.conv``); with ``functions``, each as ``(seconds, the function
    that took them)``."""
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = conv.weight.detach().to(dtype)
    b = None if conv.bias is None else conv.bias.detach().to(dtype)
    geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
    y = F.conv2d(x, w, b, *geometry)
    g = torch.randn_like(y)
    args = (conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups)
    forward = {'conv': lambda: F.conv2d(x, w, b, *geometry)}
    backward = {'conv': lambda: torch.ops.aten.convolution_backward(
        g, x, w, None if b is None else [w.shape[0]], *args, [input_grad, True, b is not None])}
    for method in own_weight_grads(conv, x) if x.dtype == conv.weight.dtype else []:  # where ours
        backward[method] = functools.partial(  # offers them too
            backward_own, g, x, w, conv.stride, conv.padding, conv.groups, method,
            [input_grad, True, b is not None])
    if conv.kernel_size == (1, 1) and conv.groups == 1:  # (the product over channels-last tokens)
        tokens, grads = (t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in (x, g))
        ways = product_ways(tokens, w.flatten(1), b, grads, input_grad)
        for passes, more in zip((forward, backward), ways):
            passes.update(more)
    return fastest_ways(forward, backward, device, repeats, functions)


def median_time(fn, device, repeats):
    fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def bench_configs(args, device) -> list:
    """One training iteration and one inference of each config's whole model, with each backbone of
    ``--config-backbones``; under ``--amp`` through our ``AmpOptimWrapper`` (mmengine's on a GPU).
    On CUDA also the allocator's peak during the training iteration."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope

    rows = []
    for path in args.configs:
        for backbone in args.config_backbones:
            cfg = Config.fromfile(path)
            cfg.model.backbone.init_cfg = None  # random weights: no download
            if backbone == 'mmpretrain':
                if not cfg.model.backbone.type.endswith('.PoolFormer'):
                    print(f'{path}: mmpretrain has no {cfg.model.backbone.type}, skipped')
                    continue
                __import__('mmpretrain.models')  # (its registry's entries)
                ours = cfg.model.backbone
                # mmpretrain numbers the network's entries: stage i is entry 2 i
                cfg.model.backbone = dict(type='mmpretrain.PoolFormer', arch=ours.arch,
                                          out_indices=tuple(2 * i for i in ours.out_indices),
                                          frozen_stages=-1)
            if args.amp:
                cfg.optim_wrapper = dict(cfg.optim_wrapper, type='mmpoolformer.AmpOptimWrapper',
                                         dtype=AMP_DTYPES[args.amp])
            init_default_scope(cfg.get('default_scope', 'mmdet'))
            model = MODELS.build(cfg.model).to(device)
            optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
            data = synthetic_batch(cfg, args.config_batch)
            train, infer, peaks = [], [], []
            for i in range(args.warmup + args.repeats):
                model.train()
                if device.type == 'cuda':
                    torch.cuda.reset_peak_memory_stats(device)
                t_train = timed(functools.partial(model.train_step, data, optim_wrapper), device)
                if device.type == 'cuda':
                    peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
                model.eval()
                t_infer = timed(functools.partial(model.test_step, data), device)
                if i >= args.warmup:
                    train.append(t_train)
                    infer.append(t_infer)
            rows.append(dict(config=os.path.relpath(path), backbone=backbone,
                             backbone_class=f'{type(model.backbone).__module__}.'
                             f'{type(model.backbone).__name__}',
                             train_iter_s=statistics.median(train),
                             train_images_per_s=args.config_batch / statistics.median(train),
                             inference_s=statistics.median(infer), batch=args.config_batch,
                             image_size=list(data['inputs'][0].shape[1:]),
                             train_peak_mib=max(peaks) if peaks else None))
            del model, optim_wrapper
    return rows


def synthetic_batch(cfg, batch: int) -> dict:
    """Images of the config's training size, with boxes (and masks) or label maps."""
    if cfg.get('default_scope') == 'mmseg':
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        h, w = cfg.crop_size
        classes = cfg.model.decode_head.num_classes
        inputs, samples = [], []
        for _ in range(batch):
            inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
            sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w)))
            sample.gt_sem_seg = PixelData(data=torch.randint(0, classes, (1, h, w)))
            samples.append(sample)
        return dict(inputs=inputs, data_samples=samples)
    from mmdet.testing import demo_mm_inputs
    w, h = next(t['scale'] for t in cfg.train_pipeline if t['type'] == 'Resize')
    head = cfg.model.get('bbox_head') or cfg.model.roi_head.bbox_head
    return demo_mm_inputs(batch_size=batch, image_shapes=[(3, h, w)] * batch, num_items=[5] * batch,
                          num_classes=head.num_classes, with_mask='roi_head' in cfg.model)


# ---------------------------------------------------------------------------------- report
# what holds PyTorch's, oneDNN's and MKL's code below the CPU's own instruction sets
ISA_LIMITS = ('ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA', 'DNNL_MAX_CPU_ISA', 'MKL_ENABLE_INSTRUCTIONS')


# what the machine's rates are measured on: square products of this size, a copy of this many MiB
RATE_PRODUCT_SIZE = 2048
RATE_COPY_MIB = 512


def machine_rates(device) -> dict:
    """The two rates between which the floor and everything beyond it fall: the products' (GFLOP/s of
    a square matrix product, fp32 and, where the device computes it natively, bf16) and memory's (GB/s
    read and written by a copy far larger than the caches): the passes between the products are bound
    by the second, so the share they take of the floor grows with the ratio of the two."""
    n = RATE_PRODUCT_SIZE
    dtypes = [torch.float32] + ([torch.bfloat16] if kernels.dispatch.native_low_precision(
        device, torch.bfloat16) else [])
    rates = {}
    for dtype in dtypes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        rates[f'product_gflops_{str(dtype).replace("torch.", "")}'] = round(
            2 * n ** 3 / median_time(lambda: torch.mm(a, b), device, 5) / 1e9, 1)
    source = torch.ones(RATE_COPY_MIB << 18, device=device)  # (4-byte floats)
    target = torch.empty_like(source)
    seconds = median_time(lambda: target.copy_(source), device, 5)
    rates['copy_gb_s'] = round(2 * source.numel() * source.element_size() / seconds / 1e9, 1)
    return rates


def machine(device) -> dict:
    info = dict(torch=torch.__version__, python=platform.python_version(), device=str(device),
                threads=torch.get_num_threads())
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    else:
        cpu = kernels.cpu_info()
        info.update(cpu=cpu['model'], cpu_family_model=cpu['family_model'], cpu_flags=cpu['flags'],
                    cpu_caches=cpu['caches'], cpu_capability=torch.backends.cpu.get_cpu_capability())
        # a run with the libraries held below what the CPU has (another CPU's instructions emulated)
        limits = {name: os.environ[name] for name in ISA_LIMITS if os.environ.get(name)}
        if limits:
            info['isa_limits'] = limits
    info['rates'] = machine_rates(device)
    return info


def paired_speedup(ours, peers) -> list:
    """Quartiles (25%, median, 75%) over rounds of the faster peer's time that round over ours': on a
    machine whose speed drifts, runs of one round ran at the same speed, while the medians of the
    table compare runs of different moments."""
    ratios = [min(round_) / mine for mine, round_ in zip(ours, zip(*peers))]
    if len(ratios) < 2:
        return [ratios[0]] * 3
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return [q1, median, q3]


def print_backbones(rows, args):
    precision = f'{args.amp} autocast' if args.amp else 'fp32'
    print(f'\n{FAMILIES[args.family].__name__}-{args.arch.upper()} backbone, batch {args.batch}, '
          f'{args.size[0]}x{args.size[1]}, {precision}; median of {args.repeats}')
    peers = [r for r in rows if r['impl'] in PEERS]
    best = {k: min(r[k] for r in peers) for k in ('forward_s', 'train_s')} if peers else None
    if peers and 'train_peak_mib' in peers[0]:
        best['memory'] = min(r['train_peak_mib'] for r in peers)
        best['memory_kept'] = min(r['train_peak_kept_grads_mib'] for r in peers)
    header = (f'{"impl":<11}{"forward s":>10}{"train s":>9}{"img/s":>7}{"peak MiB":>10}'
              f'{"kept grads":>11}{"max rel err":>13}')
    if best:
        header += f'{"fwd x":>7}{"train x":>9}{"mem x":>7}{"kept x":>8}'
    print(header)
    nan = float('nan')
    for r in rows:
        line = (f'{r["impl"]:<11}{r["forward_s"]:>10.3f}{r["train_s"]:>9.3f}'
                f'{r["train_images_per_s"]:>7.2f}{r.get("train_peak_mib", nan):>10.0f}'
                f'{r.get("train_peak_kept_grads_mib", nan):>11.0f}{r["max_rel_err"]:>13.1e}')
        if best:
            line += (f'{best["forward_s"] / r["forward_s"]:>7.2f}'
                     f'{best["train_s"] / r["train_s"]:>9.2f}')
            if 'memory' in best and 'train_peak_mib' in r:
                line += (f'{r["train_peak_mib"] / best["memory"]:>7.2f}'
                         f'{r["train_peak_kept_grads_mib"] / best["memory_kept"]:>8.2f}')
        print(line)
    floor = next((r for r in rows if r['impl'] == 'floor'), None)
    ours = next((r for r in rows if r['impl'] == 'ours'), None)
    if best:
        print(f'x: speed-up over the faster peer ({", ".join(PEERS)}); mem x: memory relative to the '
              'smaller peer')
    if ours and 'paired_speedup' in ours:
        fwd, train = (ours['paired_speedup'][k] for k in ('forward', 'train'))
        print(f'round by round, ours against the faster peer of the round: forward {fwd[1]:.2f}x '
              f'(quartiles {fwd[0]:.2f}-{fwd[2]:.2f}), train {train[1]:.2f}x '
              f'({train[0]:.2f}-{train[2]:.2f})')
    if floor and ours:
        print(f'floor: the convolutions and products alone; ours spends '
              f'{ours["forward_s"] / floor["forward_s"] - 1:+.0%} (forward) and '
              f'{ours["train_s"] / floor["train_s"] - 1:+.0%} (train) beyond it')
        print(f'the same products run one after another as the backbone runs them: '
              f'{floor["forward_in_sequence_s"]:.3f} / {floor["train_in_sequence_s"]:.3f} s; ours '
              f'{ours["forward_s"] / floor["forward_in_sequence_s"] - 1:+.0%} / '
              f'{ours["train_s"] / floor["train_in_sequence_s"] - 1:+.0%} beyond them')


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        return memory_worker(args)
    if args.timing_worker:
        return timing_worker(args)
    device = torch.device(args.device)
    results = dict(machine=machine(device), family=args.family, arch=args.arch, batch=args.batch,
                   size=list(args.size), amp=args.amp)
    results['backbones'] = bench_backbones(args, device)
    print_backbones(results['backbones'], args)
    if args.configs:
        results['configs'] = bench_configs(args, device)
        print(f'\nWhole models, batch {args.config_batch}, median of {args.repeats}')
        print(f'{"config":<52}{"backbone":>11}{"size":>11}{"train iter s":>14}{"img/s":>8}'
              f'{"inference s":>13}{"peak MiB":>10}')
        for r in results['configs']:
            size = 'x'.join(map(str, r['image_size']))
            peak = 'n/a' if r['train_peak_mib'] is None else f'{r["train_peak_mib"]:.0f}'
            print(f'{r["config"]:<52}{r["backbone"]:>11}{size:>11}{r["train_iter_s"]:>14.3f}'
                  f'{r["train_images_per_s"]:>8.2f}{r["inference_s"]:>13.3f}{peak:>10}')
    # (with --own-processes: those of ours' own process)
    ours = next((r for r in results['backbones'] if r['impl'] == 'ours' and 'timing_plans' in r), None)
    results['kernel_plans'] = ours['timing_plans'] if ours else kernels.chosen()
    # seconds of each candidate, to audit
    results['kernel_timings'] = ours['timing_plan_times'] if ours else kernels.dispatch.timings()
    print(f'\nkernel plans chosen at run time: {results["kernel_plans"]}')
    print(f'\nmachine: {results["machine"]}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)


if __name__ == '__main__':
    main()
