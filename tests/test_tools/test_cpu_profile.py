"""tools/analysis/cpu_profile.py: a training step's time by kind of operator, beside the floor."""
import json

import pytest
import torch


@pytest.fixture(scope='module')
def cpu_profile(analysis_tool):
    return analysis_tool('cpu_profile')


@pytest.fixture
def benchmark(cpu_profile):  # (the module cpu_profile imported: the one quick_rates shrinks)
    return cpu_profile.benchmark


@pytest.mark.parametrize('name, kind', [
    ('aten::mm', 'products'), ('aten::addmm_', 'products'), ('aten::convolution_backward', 'products'),
    ('mkldnn::_linear_pointwise', 'products'), ('aten::mkldnn_convolution', 'products'),
    ('aten::_scaled_dot_product_flash_attention_for_cpu', 'products'),
    ('mmpoolformer::mlp_backward', 'MLP loop'), ('mmpoolformer::gelu_value_and_grad', 'activations'),
    ('aten::native_group_norm_backward', 'norms'), ('mmpoolformer::pool_mix', 'pooling'),
    ('aten::copy_', 'copies'), ('aten::fill_', 'copies'), ('aten::add_', 'element-wise'),
    ('aten::sum', 'element-wise'), ('aten::as_strided', 'framework'), ('aten::empty', 'framework'),
    ('_NormMlpResidualBackward', 'framework'), ('torch::autograd::AccumulateGrad', 'framework'),
    ('autograd::engine::evaluate_function: MulBackward0', 'framework'),
])
def test_operators_are_grouped_by_what_they_do(cpu_profile, name, kind):
    assert cpu_profile.kind_of(name) == kind


def test_every_compiled_kernel_has_a_kind_of_its_own(cpu_profile):
    """The compiled kernels are not counted among the generic element-wise passes: a kernel added
    without a kind fails here."""
    from mmpoolformer.kernels import native
    if native.ops() is None:
        pytest.skip('no compiled kernels here')
    ours = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith('mmpoolformer::')]
    assert len(ours) >= 20
    assert [name for name in ours if cpu_profile.kind_of(name) == 'element-wise'] == []


def test_reports_the_step_by_kind_and_the_rest_against_the_floor(cpu_profile, quick_rates, tmp_path,
                                                                  capsys):
    out = tmp_path / 'profile.json'
    cpu_profile.main(['--size', '64', '64', '--batch', '1', '--json', str(out)])
    result = json.loads(out.read_text())
    prof = result['profiles']['ours']
    assert prof['kinds']['products'] > 0 and prof['kinds']['framework'] > 0
    assert sum(prof['kinds'].values()) == pytest.approx(prof['thread_ms'])
    assert prof['products_ms'] == prof['kinds']['products']
    assert prof['rest_ms'] == pytest.approx(prof['step_ms'] - prof['products_ms'])
    names = [name for name, _, _ in prof['top']]
    assert 'aten::mm' in names or 'aten::addmm_' in names  # (the MLP's products)
    floor = result['floor']
    assert 0 < floor['train_ms'] and 0 < floor['train_in_sequence_ms']
    assert floor['allowed_rest_ms'] == pytest.approx(0.15 * floor['train_ms'])
    assert prof['rest_share_of_floor'] == pytest.approx(prof['rest_ms'] / floor['train_ms'])
    assert prof['beyond_floor'] == pytest.approx(prof['step_ms'] / floor['train_ms'] - 1)
    printed = capsys.readouterr().out
    assert 'the goal allows' in printed and 'machine:' in printed


def test_an_arch_of_another_family_is_refused(cpu_profile, capsys):
    with pytest.raises(SystemExit):
        cpu_profile.main(['--family', 'convformer', '--arch', 's12', '--no-floor'])
    assert 'convformer has s18' in capsys.readouterr().err
