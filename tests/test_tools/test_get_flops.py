"""tools/analysis/get_flops.py: parameters and FLOPs of a backbone given by config, name or dict."""
import os.path as osp
import re
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
GET_FLOPS = osp.join(REPO, 'tools', 'analysis', 'get_flops.py')
TINY = "'type': 'MetaFormer', 'arch': {'depths': [1, 1, 2, 1], 'embed_dims': [8, 16, 24, 32]}"


def get_flops(*args):
    proc = subprocess.run([sys.executable, GET_FLOPS, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    params = int(re.search(r'^params: .* \((\d+)\)$', proc.stdout, re.M)[1])
    flops = int(re.search(r'^FLOPs: .* \((\d+) multiply-adds\)$', proc.stdout, re.M)[1])
    return params, flops, proc.stdout


def test_attention_costs_its_projections_and_its_token_products():
    """Swapping identity for attention in stage 2 adds, per block, the projections (4 N C^2) and the
    two token-by-token products (2 N^2 C), and nothing else: the tool counts attention exactly."""
    mixers = "'token_mixers': [{'type': 'Pooling'}, {'type': 'Pooling'}, %s, {'type': 'Identity'}]"
    identity = get_flops('{%s, %s}' % (TINY, mixers % "{'type': 'Identity'}"), '--shape', '64')
    attention = get_flops('{%s, %s}' % (TINY, mixers % "{'type': 'Attention', 'head_dim': 8}"),
                          '--shape', '64', '64')
    n, c, blocks = (64 // 16)**2, 24, 2
    assert attention[0] - identity[0] == blocks * (4 * c * c + c)  # qkv without bias, proj with
    assert attention[1] - identity[1] == blocks * (4 * n * c * c + 2 * n * n * c)
    assert 'not counted: ' in identity[2] and 'aten::avg_pool2d x2' in identity[2]


def test_config_and_release_name():
    params, flops, out = get_flops('configs/detection/retinanet_metaformer_id_s12.py', '--shape', '96',
                                   '128')
    assert 'backbone: retinanet_metaformer_id_s12.py' in out and 'input: 1x3x96x128' in out
    assert params == 11_403_200 - 2 * 64  # PoolFormer-S12's count, without the stage-0 output norm
    same = get_flops('metaformer_id_s12', '--shape', '96', '128', '--cfg-options', 'out_indices=[1,2,3]')
    assert same[:2] == (params, flops)


@pytest.mark.parametrize('args, message', [
    (['ResNet'], "'ResNet' is not an mmpoolformer backbone; registered: ["),
    (['{"type": MetaFormer}'], 'MODEL looks like a dict literal but is not one'),
    (['{"arch": "s12"}'], 'a backbone given as a dict needs a "type" key'),
    (['PoolFormer', '--shape', '1', '2', '3'], '--shape takes a height and a width'),
])
def test_bad_arguments_fail_with_one_line(args, message):
    proc = subprocess.run([sys.executable, GET_FLOPS, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    lines = [ln for ln in proc.stderr.strip().splitlines() if 'Warning' not in ln and 'import' not in ln]
    assert proc.returncode != 0 and message in proc.stderr and len(lines) == 1, proc.stderr
