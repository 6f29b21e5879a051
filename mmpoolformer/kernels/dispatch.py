"""Choosing, at run time, how a branch is computed on the device at hand.

A fused kernel pays on one machine and not on another: the matrix products it hands to the BLAS are
slower than oneDNN's on some CPUs, bf16 products are fast where the CPU has bf16 instructions and six
times slower than fp32 where it has not. So every fused branch offers :class:`Plan` candidates (always
including the plain formulation) and :func:`choose` times each once on the first real input of a kind
(shape class, dtype, autocast, training or not), then keeps the fastest for the process. Nothing for
users to set.

With ``torch.use_deterministic_algorithms(True)`` (mmengine's ``randomness.deterministic``) the first
candidate is taken without timing, so that two runs (an interrupted one and its resumption) compute
bit for bit alike. :func:`forced` pins a plan, for tests and benchmarks.
"""
import contextlib
import functools
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

BACKENDS = ('blas', 'onednn')
TRIALS = 3  # timed runs of each candidate
# Within this fraction of the fastest, the kind of plan listed first (the kernel's own, which keeps the
# least memory for backward) wins: a trial reruns one branch at once, so it reuses the memory it just
# freed, while in the network a plan that keeps more pays for fresh pages and evicted cache too (the
# MLP of PoolFormer-S12's stages 2-3 timed within 3% of the plain one, and forcing the kernel there
# made the whole training step 5% faster). Plans of one kind (:func:`kind`: they differ only in who
# multiplies) keep the same tensors and compete on time alone: at S12's stage 2 oneDNN's products
# were 4-7% faster than the BLAS's listed before them (Zen 4), which a tie had kept.
TIE = 0.05
# A candidate whose warm-up took this many times the fastest warm-up, and this many seconds, is not
# timed again: it can only lose, and its trials would hold the first step for minutes (fp16
# convolutions' backward on a CPU with avx512_fp16: PyTorch-S12's stem 200 times slower than fp32).
HOPELESS, HOPELESS_S = 20, 0.1


@dataclass(frozen=True)
class Plan:
    """How one branch computes.

    Args:
        fused (bool): The branch's own kernel (for a convolution under autocast: the convolution in
            ``dtype``), or the plain formulation (the modules as written).
        backend (str): Who multiplies in the fused kernel: ``'blas'`` (``torch.addmm``: MKL or
            OpenBLAS) or ``'onednn'``; for a convolution's weight gradient, ``'blas'`` (over patches)
            or ``'correlation'`` / ``'compiled'`` (depthwise; ``kernels/conv.py``); for the pooling
            branch on CUDA, ``'triton'`` (``kernels/triton_ops.py``) or ``'blas'`` (PyTorch's
            operators).
        dtype (torch.dtype, optional): The fused kernel's product dtype; None: the input's. Under
            autocast a low-precision candidate and an fp32 one compete.
    """
    fused: bool = True
    backend: str = 'blas'
    dtype: Optional[torch.dtype] = None

    def __str__(self) -> str:
        if not self.fused:
            return 'plain'
        dtype = '' if self.dtype is None else '/' + str(self.dtype).replace('torch.', '')
        return f'fused/{self.backend}{dtype}'


PLAIN = Plan(fused=False)

_chosen: Dict[tuple, Plan] = {}
_timings: Dict[tuple, Dict[str, float]] = {}
_forced: List[Plan] = []


@contextlib.contextmanager
def forced(plan: Plan) -> Iterator[None]:
    """Compute every branch with ``plan`` inside the block (where the branch supports it)."""
    _forced.append(plan)
    try:
        yield
    finally:
        _forced.pop()


def chosen() -> Dict[str, str]:
    """What :func:`choose` decided so far in this process, ``{key: plan}``, for reports."""
    return {' '.join(map(str, key)): str(plan) for key, plan in _chosen.items()}


def timings() -> Dict[str, Dict[str, float]]:
    """The seconds each candidate took when it was timed, ``{key: {plan: s}}``."""
    return {' '.join(map(str, key)): dict(t) for key, t in _timings.items()}


def reset() -> None:
    """Forget every choice (tests; a benchmark that changes threads)."""
    _chosen.clear()
    _timings.clear()


def size_class(numel: int) -> int:
    """Inputs within a factor of two share a choice."""
    return int(math.log2(max(numel, 1)))


def choose(key: tuple, candidates: Sequence[Plan], run: Callable[[Plan], None]) -> Plan:
    """The plan for ``key``: forced, the first candidate (deterministic mode), or the fastest.

    ``run(plan)`` computes the branch once with ``plan`` on the real input, as the caller would
    (forward, or forward and backward in training); each candidate runs once to warm up, then
    :data:`TRIALS` times, and its fastest run counts (a :data:`HOPELESS` one: its warm-up);
    :func:`preferred` keeps one.
    """
    if _forced:
        return _closest(_forced[-1], candidates)
    if len(candidates) == 1 or torch.are_deterministic_algorithms_enabled():
        return candidates[0]
    plan = _chosen.get(key)
    if plan is None:
        times = {}
        for candidate in candidates:  # warm-up: first-call allocations, oneDNN primitive creation
            times[candidate] = _timed(key, run, candidate)
        fastest = min(times.values())
        timed = [c for c in candidates if not (times[c] > HOPELESS * fastest and times[c] > HOPELESS_S)]
        times.update((candidate, float('inf')) for candidate in timed)
        for _ in range(TRIALS):  # interleaved, the best of each: a busy core slows one run
            for candidate in timed:
                times[candidate] = min(times[candidate], _timed(key, run, candidate))
        _timings[key] = {str(p): t for p, t in times.items()}
        kept = preferred(_timings[key])
        plan = _chosen[key] = next(c for c in candidates if str(c) == kept)
    return plan


def _timed(key: tuple, run: Callable[[Plan], None], plan: Plan) -> float:
    start = time.perf_counter()
    run(plan)
    _synchronize(key)
    return time.perf_counter() - start


def kind(plan: str) -> str:
    """What a plan (by its name) keeps for backward: ``'plain'``, or the kernel's own with its
    product dtype (``'fused'``, ``'fused/bfloat16'``); plans of one kind differ in who multiplies."""
    parts = plan.split('/')
    return '/'.join(parts[:1] + parts[2:])


def preferred(times: Dict[str, float]) -> str:
    """The plan kept from its candidates' times (``{plan name: seconds}``, in order of preference):
    the fastest of each :func:`kind`, and of those the first within :data:`TIE` of the fastest."""
    best: Dict[str, str] = {}  # (kinds in the order they first come)
    for plan, seconds in times.items():
        if kind(plan) not in best or seconds < times[best[kind(plan)]]:
            best[kind(plan)] = plan
    fastest = min(times.values())
    return next(plan for plan in best.values() if times[plan] <= fastest * (1 + TIE))


def _closest(plan: Plan, candidates: Sequence[Plan]) -> Plan:
    """The candidate that agrees with ``plan`` on everything it sets (dtype None: any), else on
    being fused or not, else the first."""
    for matches in (lambda c: c.fused == plan.fused and c.backend == plan.backend and plan.dtype in
                    (None, c.dtype), lambda c: c.fused == plan.fused):
        for candidate in candidates:
            if matches(candidate):
                return candidate
    return candidates[0]


def tracing() -> bool:
    """Tracers and compilers (FLOP counters, ONNX export, ``torch.compile``) get the plain
    formulation: standard operators, which they can count, export or fuse themselves. Kernels ask
    before they list their plans, since listing queries the backend (an operator a tracer records)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def run(key: tuple, candidates: Sequence[Plan], compute: Callable, x: torch.Tensor,
        params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``compute(plan, x)`` with the plan :func:`choose` picks for this kind of input.

    The kind is ``key`` (the branch and its shapes) with the device, dtype, autocast, whether autograd
    records (then forward and backward are timed together) and the size class of ``x``. Trials run on
    detached copies of ``x`` and leave no gradient behind; identity saved-tensor hooks keep them out of
    an enclosing activation checkpoint.
    """
    training = records(x, params)
    name = lambda dtype: str(dtype).replace('torch.', '')  # noqa: E731
    key = (x.device.type, ) + tuple(key) + (name(x.dtype), 'autocast:' + name(autocast_dtype(
        x.device)), 'train' if training else 'infer', size_class(x.numel()))

    def trial(plan):
        keep = lambda t: t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(keep, keep), torch.set_grad_enabled(training):
            xt = x.detach().requires_grad_(x.requires_grad)
            outer, _trials.running = getattr(_trials, 'running', False), True
            try:
                y = compute(plan, xt)
            finally:  # (a branch may try another's plans inside its own trial)
                _trials.running = outer
            if training:
                inputs = [t for t in (xt, *params) if t.requires_grad]
                torch.autograd.grad(y, inputs, torch.ones_like(y), allow_unused=True)

    return compute(choose(key, candidates, trial), x)


_trials = threading.local()  # whether this thread is running a trial


def records(x: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    """Whether autograd records a branch of input ``x`` and parameters ``params`` (training, or
    anything that asks for a gradient): then its plans are timed forward and backward, and no kernel
    may write over a tensor that backward could need."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def may_overwrite(x: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    """Whether a branch whose caller owns ``x`` (a temporary nobody else holds) may write its
    result over it: where nothing records (inference) and outside :func:`choose`'s trials, which
    run every candidate on the same input."""
    return not (getattr(_trials, 'running', False) or records(x, params))


def _synchronize(key: tuple) -> None:
    if key and key[0] == 'cuda':
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ what the CPU offers
CPU_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'avx512_fp16', 'amx_bf16', 'amx_fp16')


@functools.lru_cache(None)
def cpu_info() -> dict:
    """The CPU's model name, which of :data:`CPU_FLAGS` it has, its family and model numbers (a
    virtual machine's model name may say no more than "AMD EPYC") and its L2 / L3 cache sizes (Linux;
    'unknown' or empty elsewhere)."""
    info = dict(model='unknown', flags=[], family_model='unknown', caches={})
    try:
        with open('/proc/cpuinfo') as f:
            lines = f.read().splitlines()
    except OSError:
        return info
    fields = {}
    for line in lines:
        field, _, value = line.partition(':')
        field = field.strip()
        fields.setdefault(field, value.strip())
        if field == 'flags':  # the first processor's fields are all read
            break
    info['model'] = fields.get('model name', 'unknown')
    info['flags'] = [f for f in CPU_FLAGS if f in set(fields.get('flags', '').split())]
    if 'cpu family' in fields and 'model' in fields:
        info['family_model'] = f"family {fields['cpu family']} model {fields['model']}"
    for index in range(4):
        try:
            with open(f'/sys/devices/system/cpu/cpu0/cache/index{index}/level') as f:
                level = f.read().strip()
            with open(f'/sys/devices/system/cpu/cpu0/cache/index{index}/size') as f:
                size = f.read().strip()
        except OSError:
            continue
        if level in ('2', '3'):
            info['caches'][f'L{level}'] = size
    return info


def native_low_precision(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` computes ``dtype`` faster than fp32: always on CUDA; on a CPU, bf16 with
    AVX-512 / AMX instructions for it (without them oneDNN emulates bf16, several times slower than
    fp32), fp16 with AMX's (with avx512_fp16 alone, on a Xeon with AMX for bf16 only, fp16 products
    took as long as fp32's, convolutions 1.3 times as long forward and 200 times backward)."""
    if device.type != 'cpu':
        return True
    flags = set(cpu_info()['flags'])
    if dtype == torch.bfloat16:
        return bool(flags & {'avx512_bf16', 'amx_bf16'})
    if dtype == torch.float16:
        return 'amx_fp16' in flags
    return True


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast gives products on ``device`` now, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def product_dtypes(device: torch.device, dtype: torch.dtype) -> List[torch.dtype]:
    """Product dtypes worth trying for inputs of ``dtype`` on ``device``, the default first: under
    autocast its low precision where native and fp32 otherwise, then the other one."""
    low = autocast_dtype(device)
    if low is None or low == dtype:
        return [dtype]
    return [low, dtype] if native_low_precision(device, low) else [dtype, low]


def backends(device: torch.device, dtype: torch.dtype) -> List[str]:
    """Who can multiply ``dtype`` on ``device`` in the fused kernels, the default first (oneDNN has
    no bf16 products on CPUs without AVX-512)."""
    if device.type != 'cpu' or not torch.backends.mkldnn.is_available():
        return ['blas']
    if dtype == torch.float32 or (dtype == torch.bfloat16
                                  and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return list(BACKENDS)
    return ['blas']
