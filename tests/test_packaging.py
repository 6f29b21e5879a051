"""A wheel of ours, installed (not editable) into a fresh virtual environment, carries what mim needs:
the model index, the configs and the tools. ``mim search`` answers from it and ``mim test`` runs the
wheel's own test tool; the model index covers every config and is up to date."""
import os
import os.path as osp
import shutil
import subprocess
import sys
import sysconfig

import pytest

from mmpoolformer.kernels import native

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run(cmd, **kwargs):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600,
                          **kwargs)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope='module')
def fresh_env(tmp_path_factory):
    """A virtual environment with our wheel installed, and the rest of this environment's packages
    (torch, mmengine, mmdet, openmim, ...) visible after its own: the checkout is nowhere on its path."""
    root = tmp_path_factory.mktemp('packaging')
    source, wheels, venv = root / 'source', root / 'wheels', root / 'venv'
    # the files a clone has (not this checkout's build/ or .venv/)
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        '.git', '.venv', 'build', 'dist', '*.egg-info', 'work_dirs', 'data', '__pycache__',
        '.pytest_cache'))
    run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
         wheels, source])
    wheel, = wheels.iterdir()
    run([sys.executable, '-m', 'venv', '--without-pip', venv])
    python = venv / 'bin' / 'python'
    run([sys.executable, '-m', 'pip', '--python', python, 'install', '-q', '--no-deps', wheel])
    site = run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']).strip()
    with open(osp.join(site, 'outer_environment.pth'), 'w') as f:
        f.write(sysconfig.get_paths()['purelib'] + '\n')
    return python, site, root


def test_the_wheel_ships_configs_tools_and_the_model_index(fresh_env):
    python, site, root = fresh_env
    out = run([python, '-c', 'import mmpoolformer; print(mmpoolformer.__file__); '
               'print(mmpoolformer.config_path("detection/retinanet_poolformer_s12.py"))'],
              cwd=root)
    package = osp.join(site, 'mmpoolformer')
    assert out.split() == [osp.join(package, '__init__.py'), osp.join(
        package, '.mim', 'configs', 'detection', 'retinanet_poolformer_s12.py')]
    for path in ('model-index.yml', 'configs/detection/metafile.yml', 'tools/train.py',
                 'tools/test.py', 'tools/infer.py', 'tools/dist_train.sh'):
        assert osp.isfile(osp.join(package, '.mim', path)), path
    # and the sources of the CPU kernels it builds on first use
    for source in native.SOURCES + native.HEADERS:
        name = osp.basename(source)
        assert osp.isfile(osp.join(package, 'kernels', 'csrc', name)), name


def test_mim_search_answers_from_the_wheel(fresh_env):
    python, _, root = fresh_env
    out = run([python, '-m', 'mim', 'search', 'mmpoolformer', '--field', 'config', 'box_ap',
               'miou', 'parameters'], cwd=root, env=dict(os.environ, COLUMNS='200'))
    for name in ('retinanet_poolformer_s12', 'mask_rcnn_metaformer_ppaa_s12', 'fpn_poolformer_m48',
                 'fpn_poolformer_s12_shapes', 'retinanet_caformer_s18', 'fpn_poolformerv2_s36'):
        assert name in out
    # one block a config: "config id: NAME", then a "field  value" line each
    block = out.split('config id: retinanet_poolformer_s24\n')[1].split('config id:')[0]
    fields = dict(line.split(None, 1) for line in block.splitlines() if line.strip('- '))
    assert fields['coco/box_ap'] == '38.9'  # the paper's
    assert fields['parameters'] == '31126836'  # ours, counted (the paper: 31.1M)


def test_mim_test_runs_the_wheels_tool(fresh_env, tiny, det_checkpoint):
    python, site, root = fresh_env
    out = run([python, '-m', 'mim', 'test', 'mmpoolformer', tiny.config, '--checkpoint',
               det_checkpoint, '--work-dir', root / 'mim_test'], cwd=root, env=tiny.env())
    assert f'{site}/mmpoolformer/.mim/tools/test.py' in out
    assert 'coco/bbox_mAP: ' in out


def test_model_index_covers_every_config_and_is_current():
    # (the counts are compared for the small demo configs only: counting all takes minutes)
    run([sys.executable, osp.join(REPO, 'tools', 'analysis', 'metafiles.py'), '--check',
         '--count', 'demo'], cwd=REPO)
