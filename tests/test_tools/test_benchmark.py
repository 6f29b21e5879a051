"""tools/analysis/benchmark.py, at a size that runs in seconds: it checks that the implementations
agree before it times them, and reports every row, the floor and the machine."""
import json
import os.path as osp

import pytest

from mmpoolformer import kernels

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
QUICK = ['--size', '64', '64', '--repeats', '1', '--warmup', '0', '--no-memory']


@pytest.fixture(scope='module')
def benchmark(analysis_tool):
    return analysis_tool('benchmark')


@pytest.mark.parametrize('family, arch, impls', [
    ('poolformer', 's12', ['ours', 'ours+cp', 'timm', 'mmpretrain']),
    ('poolformerv2', 's12', ['ours', 'ours+cp', 'timm']),  # mmpretrain has no Baselines
    ('caformer', 's18', ['ours', 'ours+cp', 'timm']),  # (the floor with attention's products)
])
def test_reports_every_implementation_the_floor_and_the_machine(benchmark, family, arch, impls,
                                                                timed_choices, tmp_path, capsys,
                                                                quick_rates):
    import torch
    for peer in ('timm', 'mmpretrain')[:len(impls) - 2]:  # (test extras)
        pytest.importorskip(peer)
    out = tmp_path / 'bench.json'
    benchmark.main(['--family', family, *QUICK, '--json', str(out)])
    result = json.loads(out.read_text())
    assert (result['family'], result['arch'], result['size']) == (family, arch, [64, 64])
    rows = {row['impl']: row for row in result['backbones']}
    assert list(rows) == impls + ['floor']
    for impl in impls:  # the same maps (checked in fp32 before timing), timed (one run each: on a
        # busy machine a forward pass can take longer than a training step, so no order is asserted)
        assert rows[impl]['max_rel_err'] <= 1e-4 and rows[impl]['train_s'] > 0 < rows[impl]['forward_s']
    assert 0 < rows['floor']['forward_s'] < rows['floor']['train_s']  # (train: forward + backward)
    # the same products one after another
    assert 0 < rows['floor']['forward_in_sequence_s'] < rows['floor']['train_in_sequence_s']
    assert result['kernel_timings']  # the plans were timed, and each input kept the preferred one
    for key, times in result['kernel_timings'].items():
        assert result['kernel_plans'][key] == kernels.dispatch.preferred(times)
    assert set(result['machine']['cpu_flags']) <= {'avx2', 'avx512f', 'avx512_bf16', 'avx512_fp16',
                                                   'amx_bf16', 'amx_fp16'}
    assert {'cpu', 'cpu_family_model', 'cpu_caches', 'threads'} <= set(result['machine'])
    rates = result['machine']['rates']  # (products and a copy, at the test's small sizes)
    assert rates['product_gflops_float32'] > 0 < rates['copy_gb_s']
    native_bf16 = kernels.dispatch.native_low_precision(torch.device('cpu'), torch.bfloat16)
    assert ('product_gflops_bfloat16' in rates) == native_bf16
    ours, peers = rows['ours'], [rows[p] for p in impls if p in benchmark.PEERS]
    assert all(len(rows[impl]['train_runs_s']) == 1 for impl in impls)  # --repeats 1
    # round by round: the faster peer's time of the round over ours'
    expected = min(p['forward_runs_s'][0] for p in peers) / ours['forward_runs_s'][0]
    assert ours['paired_speedup']['forward'] == pytest.approx([expected] * 3)
    assert f'{benchmark.FAMILIES[family].__name__}-{arch.upper()} backbone' in capsys.readouterr().out


def test_the_machine_names_the_limits_a_run_held_the_libraries_to(benchmark, monkeypatch, quick_rates):
    """A run that emulates another CPU (oneDNN held below AMX, PyTorch's code to AVX2) says so in its
    record; a run without limits records none."""
    import torch
    for name in benchmark.ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    assert 'isa_limits' not in benchmark.machine(torch.device('cpu'))
    monkeypatch.setenv('ONEDNN_MAX_CPU_ISA', 'AVX512_CORE_BF16')
    monkeypatch.setenv('ATEN_CPU_CAPABILITY', 'avx2')
    assert benchmark.machine(torch.device('cpu'))['isa_limits'] == {
        'ONEDNN_MAX_CPU_ISA': 'AVX512_CORE_BF16', 'ATEN_CPU_CAPABILITY': 'avx2'}


@pytest.mark.parametrize('ratio, keys', [(1, 48), (2, 12)])
def test_the_floor_times_attention_s_products_and_its_split_projections(benchmark, ratio, keys):
    """An ``Attention`` mixer of 2 heads on 2 maps of 8x6 tokens: as products, the scores and the
    weighted values forward (2x2 heads of 48 queries by ``keys``) and their four gradients backward;
    or fused, attention forward and flash attention's backward; with a spatial reduction also the
    query and key / value projections it computes from split weights. The floor takes the faster."""
    import torch

    from mmpoolformer.models.token_mixers import Attention
    from mmpoolformer.testing import OpLog
    attention = Attention(64, sr_ratio=ratio)
    args = (attention, (2, 64, 8, 6), torch.float32, torch.device('cpu'))
    parts = benchmark.attention_ways(*args)
    assert len(parts) == (1 if ratio == 1 else 3)

    def products(fn):
        fn()  # (the first call of the fused attention times its plans)
        with OpLog() as log:
            fn()
        return [(op, size) for op, size in log.ops if op in (
            'aten.bmm', 'aten.mm', 'aten.addmm', 'mkldnn._linear_pointwise', 'mmpoolformer.attention')
            or 'flash_attention' in op]

    scores, weighted = 4 * 48 * keys, 4 * 48 * 32  # (2 maps x 2 heads)
    (forward, backward) = parts[0]
    assert products(forward['bmm']) == [('aten.bmm', scores), ('aten.bmm', weighted)]
    assert sorted(products(backward['bmm'])) == sorted(
        [('aten.bmm', scores), ('aten.bmm', 4 * keys * 32), ('aten.bmm', weighted),
         ('aten.bmm', 4 * keys * 32)])
    [(op, _)] = products(forward['fused'])  # (ours writes into a tensor it is given)
    assert op in ('mmpoolformer.attention', 'aten._scaled_dot_product_flash_attention_for_cpu')
    assert [op for op, _ in products(backward['fused'])] == [
        'aten._scaled_dot_product_flash_attention_for_cpu_backward']
    assert 'compiled' not in backward  # (fp32: flash attention's backward only)
    for (forward, backward), rows in zip(parts[1:], (2 * 48 * 64, 2 * keys * 128)):
        # each projection forward, and its input's and weight's gradients
        assert products(forward['blas']) == [('aten.mm', rows)]
        assert len(products(backward['blas'])) == 2
    (forward_s, _), (backward_s, _) = benchmark.attention_times(*args, repeats=1, functions=True)
    assert 0 < forward_s and 0 < backward_s


def test_attention_in_bf16_may_also_be_timed_with_the_compiled_backward(benchmark):
    """In bf16, where the CPU has the compiled backward (``kernels.attention``), the floor may take
    it for attention's backward: one call of it."""
    import torch

    from mmpoolformer.kernels import attention as attention_kernels
    from mmpoolformer.models.token_mixers import Attention
    from mmpoolformer.testing import OpLog
    args = (Attention(64), (2, 64, 8, 6), torch.bfloat16, torch.device('cpu'))
    [(_, backward)] = benchmark.attention_ways(*args)
    if not attention_kernels.bf16_backward_available():
        assert 'compiled' not in backward
        pytest.skip('no compiled bf16 attention backward here (it needs AVX-512 with avx512_bf16)')
    with OpLog() as log:
        backward['compiled']()
    assert [op for op, _ in log.ops] == ['mmpoolformer.attention_backward']


def test_an_arch_of_another_family_is_refused_with_the_family_s(benchmark, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(['--family', 'convformer', '--arch', 's12'])
    assert '--arch s12: convformer has s18, s36, m36, b36' in capsys.readouterr().err


def test_the_paired_speedup_compares_runs_of_the_same_round(benchmark):
    """Round r: the faster peer's run r over ours' run r (not medians over all rounds, which mix
    moments of a machine whose speed drifts)."""
    ours = [1., 2., 1., 1.]
    peers = [[2., 2., 2., 2.], [1., 4., 1.5, 3.]]  # faster peer per round: 1, 2, 1.5, 2
    q1, median, q3 = benchmark.paired_speedup(ours, peers)
    assert median == pytest.approx(1.25) and q1 <= 1. and q3 >= 1.5
    assert benchmark.paired_speedup([2.], [[1.], [3.]]) == [0.5] * 3


def test_the_memory_run_reports_the_plans_its_own_process_chose(benchmark):
    """The peak of a training step comes from a process of its own, which times the plans anew: it
    reports them, since a plan that keeps more for backward moves the peak."""
    peaks, plans = benchmark.peak_step_memory('ours', benchmark.parse_args(['--size', '64', '64']))
    assert len(peaks) == 2 and all(p > 0 for p in peaks)
    assert plans and all(' train ' in key for key in plans)  # (that process ran training steps only)


def test_own_processes_time_each_implementation_in_a_process_of_its_own(benchmark, tmp_path):
    """``--own-processes``: every implementation runs its rounds in a process of its own, and the
    kernel plans reported are those of ours' process (it times them anew), consistent with their
    trials' times; the outputs are still checked here first."""
    pytest.importorskip('timm')
    out = tmp_path / 'bench.json'
    benchmark.main([*QUICK, '--repeats', '2', '--impls', 'ours', 'timm', '--own-processes',
                    '--json', str(out)])
    result = json.loads(out.read_text())
    rows = {row['impl']: row for row in result['backbones']}
    assert list(rows) == ['ours', 'timm', 'floor']
    for impl in ('ours', 'timm'):
        assert rows[impl]['max_rel_err'] <= 1e-4 and len(rows[impl]['train_runs_s']) == 2
        assert all(t > 0 for t in rows[impl]['train_runs_s'] + rows[impl]['forward_runs_s'])
    assert rows['timm']['timing_plans'] == {}  # (no kernels of ours there)
    plans = rows['ours']['timing_plans']
    assert result['kernel_plans'] == plans and any(' train ' in key for key in plans)
    for key, times in result['kernel_timings'].items():
        assert plans[key] == kernels.dispatch.preferred(times)


def test_a_timing_process_that_stops_is_reported_with_its_error(benchmark):
    with pytest.raises(SystemExit, match=r'(?s)timing process of ours stopped.*no-such-device'):
        benchmark.ApartProcess('ours', benchmark.parse_args(['--device', 'no-such-device']))


def test_whole_models_with_our_backbone_and_mmpretrains_in_its_place(benchmark, tmp_path):
    """``--configs`` with ``--config-backbones ours mmpretrain``: a row for each, the second model
    built with mmpretrain's PoolFormer; under ``--amp`` through the AMP optimizer wrapper."""
    pytest.importorskip('mmpretrain')
    out = tmp_path / 'bench.json'
    config = osp.join(REPO, 'configs/demo/fpn_poolformer_s12_shapes.py')
    benchmark.main(['--impls', 'ours', *QUICK, '--amp', 'bf16', '--configs', config,
                    '--config-backbones', 'ours', 'mmpretrain', '--config-batch', '1',
                    '--json', str(out)])
    rows = json.loads(out.read_text())['configs']
    assert [r['backbone'] for r in rows] == ['ours', 'mmpretrain']
    assert rows[0]['backbone_class'] == 'mmpoolformer.models.metaformer.PoolFormer'
    assert rows[1]['backbone_class'].startswith('mmpretrain.models.backbones')
    for row in rows:
        assert row['train_iter_s'] > 0 < row['inference_s'] and row['train_peak_mib'] is None
