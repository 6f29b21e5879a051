"""The run-time choice of plans: the fastest is kept per kind of input, deterministic mode and
tracing get fixed formulations, and trials leave nothing behind."""
import re

import pytest
import torch

from mmpoolformer import kernels
from mmpoolformer.kernels import dispatch
from mmpoolformer.models import MetaFormerBlock, Pooling


def test_the_fastest_candidate_is_kept_per_key(timed_choices, monkeypatch):
    slow, fast = dispatch.Plan(backend='blas'), dispatch.Plan(backend='onednn')
    clock = iter(range(100))
    monkeypatch.setattr(dispatch.time, 'perf_counter', lambda: next(clock))
    runs = []

    def run(plan):  # the slow plan "takes" 5 ticks, the fast one 1
        runs.append(plan)
        if plan == slow:
            for _ in range(4):
                next(clock)

    monkeypatch.setattr(dispatch, 'TRIALS', 2)
    assert dispatch.choose(('k', 1), [slow, fast], run) == fast
    assert runs == [slow, fast] * 3  # a warm-up, then the timed runs, interleaved
    assert dispatch.choose(('k', 1), [slow, fast], run) == fast and len(runs) == 6  # kept
    assert dispatch.chosen() == {'k 1': 'fused/onednn'}
    assert dispatch.timings()['k 1'] == {'fused/blas': 5, 'fused/onednn': 1}


def test_a_hopeless_candidate_runs_once(timed_choices, monkeypatch):
    """A candidate whose warm-up took HOPELESS times the fastest's and HOPELESS_S seconds is not
    timed again (an emulated fp16 convolution's backward: seconds a run); a slow but quick one is."""
    fast, quick, slow = dispatch.Plan(), dispatch.Plan(backend='onednn'), dispatch.PLAIN
    seconds = {fast: 0.004, quick: 0.09, slow: 0.15}  # 22.5x (under HOPELESS_S) and 37.5x
    now, runs = [0.], []
    monkeypatch.setattr(dispatch.time, 'perf_counter', lambda: now[0])

    def run(plan):
        runs.append(plan)
        now[0] += seconds[plan]

    assert dispatch.choose(('k', ), [fast, quick, slow], run) == fast
    assert runs == [fast, quick, slow] + [fast, quick] * dispatch.TRIALS
    assert dispatch.timings()['k'] == pytest.approx(
        {'fused/blas': 0.004, 'fused/onednn': 0.09, 'plain': 0.15})
    seconds[slow] = 0.07  # 17.5x: timed
    runs.clear()
    dispatch.reset()
    assert dispatch.choose(('k', ), [fast, quick, slow], run) == fast
    assert runs == [fast, quick, slow] * (1 + dispatch.TRIALS)


def test_a_tie_goes_to_the_candidate_listed_first(timed_choices, monkeypatch):
    """Within ``TIE`` of the fastest, the kernel's own plan (listed first) is kept; beyond, not."""
    first, other = dispatch.Plan(), dispatch.PLAIN
    for first_ticks, kept in ((104, first), (106, other)):
        clock = iter(range(0, 10 ** 6, 1))
        ticks = {first: first_ticks, other: 100}
        monkeypatch.setattr(dispatch.time, 'perf_counter', lambda: next(clock))

        def run(plan):
            for _ in range(ticks[plan] - 1):
                next(clock)

        dispatch.reset()
        assert dispatch.choose(('k', ), [first, other], run) == kept


def test_plans_of_one_kind_compete_on_time_alone():
    """Backends of one kind of plan keep the same tensors: the fastest wins however little faster;
    the tie goes to the kind listed first (the kernel's own over the plain formulation, bf16 products
    over fp32 ones), each represented by its fastest plan."""
    assert [dispatch.kind(p) for p in ('fused/blas/float32', 'fused/threads', 'plain')] == [
        'fused/float32', 'fused', 'plain']
    preferred = dispatch.preferred
    assert preferred({'fused/blas/float32': 1.03, 'fused/onednn/float32': 1.0, 'plain': 0.99}) == \
        'fused/onednn/float32'
    assert preferred({'fused/blas/float32': 1.03, 'fused/onednn/float32': 1.1, 'plain': 0.99}) == \
        'fused/blas/float32'
    assert preferred({'fused/blas/float32': 1.2, 'fused/onednn/float32': 1.1, 'plain': 1.0}) == 'plain'
    assert preferred({'fused/blas/bfloat16': 1.04, 'fused/onednn/bfloat16': 1.03,
                      'fused/blas/float32': 1.0, 'plain': 1.2}) == 'fused/onednn/bfloat16'


def test_deterministic_mode_and_forced_plans_skip_the_timing(timed_choices):
    candidates = [dispatch.Plan(), dispatch.PLAIN]
    fail = lambda plan: pytest.fail('timed')  # noqa: E731
    torch.use_deterministic_algorithms(True)
    assert dispatch.choose(('k', ), candidates, fail) == dispatch.Plan()
    torch.use_deterministic_algorithms(False)
    with kernels.forced(kernels.PLAIN):
        assert dispatch.choose(('k', ), candidates, fail) == dispatch.PLAIN
    with kernels.forced(kernels.Plan(backend='onednn')):  # not offered here: the closest, fused
        assert dispatch.choose(('k', ), candidates, fail) == dispatch.Plan()
    assert dispatch.chosen() == {}


def test_a_block_times_its_plans_once_per_kind_of_input_and_leaves_no_gradients(timed_choices):
    block = MetaFormerBlock(8, Pooling(8)).train()
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    y = block(x)
    keys = dispatch.chosen()
    assert sorted(k.split()[1] for k in keys) == ['mlp', 'pool']
    assert all(' train ' in k for k in keys)
    assert all(p.grad is None for p in block.parameters()) and x.grad is None
    y.sum().backward()
    assert x.grad is not None
    block(torch.randn(2, 8, 16, 16))  # same kind: no new choice
    with torch.no_grad():
        block(x)  # inference is another kind
    assert len(dispatch.chosen()) == 4
    block(torch.randn(2, 8, 64, 64))  # another size class
    assert len(dispatch.chosen()) == 6


def test_a_branch_timed_inside_anothers_trial_leaves_it_a_trial(timed_choices):
    """A branch whose plain formulation is itself a timed branch (SepConv's bands against its
    composed formulation) times the inner one inside its own trials; after each, the outer trial is
    still a trial (no kernel may write over its input there), and the final call is not."""
    x, seen = torch.ones(3), []

    def outer(plan, x):
        if not plan.fused:
            dispatch.run(('inner', ), [dispatch.Plan(), dispatch.PLAIN], lambda plan, x: x + 1, x, ())
        seen.append(dispatch.may_overwrite(x, ()))
        return x * 2

    dispatch.run(('outer', ), [dispatch.Plan(), dispatch.PLAIN], outer, x, ())
    assert len(seen) == 2 * (1 + dispatch.TRIALS) + 1
    assert not any(seen[:-1]) and seen[-1]


def test_timing_inside_an_activation_checkpoint(timed_choices):
    """The first call of a kind may come inside ``torch.utils.checkpoint``: its trials run outside the
    checkpoint's saved-tensor hooks, and the gradients equal those without checkpointing."""
    block = MetaFormerBlock(8, Pooling(8)).train()
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    (g, ) = torch.autograd.grad(y.square().sum(), x)
    (ref, ) = torch.autograd.grad(block(x).square().sum(), x)
    torch.testing.assert_close(g, ref)


def test_cpu_info_names_the_model_and_flags():
    info = kernels.cpu_info()
    assert info['model'] and set(info['flags']) <= set(dispatch.CPU_FLAGS)
    if info['model'] != 'unknown':  # Linux: the family and model numbers, and the caches' sizes
        assert re.fullmatch(r'family \d+ model \d+', info['family_model'])
        assert set(info['caches']) <= {'L2', 'L3'}
        assert all(re.fullmatch(r'\d+[KMG]', size) for size in info['caches'].values())


def test_low_precision_is_preferred_only_where_the_cpu_has_it(monkeypatch):
    cpu = torch.device('cpu')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        monkeypatch.setattr(dispatch, 'cpu_info', lambda: dict(model='x', flags=['avx2']))
        assert dispatch.product_dtypes(cpu, torch.float32) == [torch.float32, torch.bfloat16]
        monkeypatch.setattr(dispatch, 'cpu_info', lambda: dict(model='x', flags=['avx512_bf16']))
        assert dispatch.product_dtypes(cpu, torch.float32) == [torch.bfloat16, torch.float32]
    assert dispatch.product_dtypes(cpu, torch.float32) == [torch.float32]
    # fp16: with AMX's instructions for it; avx512_fp16 alone computed it no faster than fp32
    with torch.autocast('cpu', dtype=torch.float16):
        monkeypatch.setattr(dispatch, 'cpu_info', lambda: dict(model='x', flags=['avx512_fp16']))
        assert dispatch.product_dtypes(cpu, torch.float32) == [torch.float32, torch.float16]
        monkeypatch.setattr(dispatch, 'cpu_info', lambda: dict(model='x', flags=['amx_fp16']))
        assert dispatch.product_dtypes(cpu, torch.float32) == [torch.float16, torch.float32]


def test_tracing_takes_the_plain_formulation(timed_choices):
    """Tracers (FLOP counters, exporters) see standard operators, and no plan is timed for them."""
    block = MetaFormerBlock(8, Pooling(8)).eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        traced = torch.jit.trace(block, torch.randn(1, 8, 8, 8), check_trace=False)
    assert 'PythonOp' not in str(traced.inlined_graph) and dispatch.chosen() == {}
