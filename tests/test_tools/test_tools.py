"""The tools as users run them: train, resume, test, two CPU processes through torchrun, and a config
inherited from a project outside this repository (with our tools and with mmdet's stock train.py)."""
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import textwrap

import pytest

from mmpoolformer.demo import generate

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
RETINANET_DEMO = osp.join(REPO, 'configs/demo/retinanet_poolformer_s12_shapes.py')


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    generate(str(root), {'train': 8, 'val': 4}, size=(96, 128))
    return str(root) + '/'


def det_options(data_root, epochs=1):
    """Point a detection demo config at ``data_root`` and keep the run short."""
    ann = data_root + 'annotations/instances_val.json'
    return [
        '--cfg-options', f'train_dataloader.dataset.data_root={data_root}',
        f'val_dataloader.dataset.data_root={data_root}',
        f'test_dataloader.dataset.data_root={data_root}', f'val_evaluator.ann_file={ann}',
        f'test_evaluator.ann_file={ann}', f'train_cfg.max_epochs={epochs}', 'train_cfg.val_interval=1',
        'default_hooks.checkpoint.interval=1',
        # keep every detection, so that the untrained model still produces a COCO evaluation
        'model.test_cfg.score_thr=0.0'
    ]


def run(cmd, cwd=None, env=None, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def last_metrics(work_dir):
    """The last line of metrics the newest run logged (training: vis_data/scalars.json, testing:
    <timestamp>.json)."""
    run = max(d for d in os.listdir(work_dir) if osp.isdir(osp.join(work_dir, d)))
    path = osp.join(work_dir, run, 'vis_data', 'scalars.json')
    if not osp.isfile(path):
        path = osp.join(work_dir, run, f'{run}.json')
    with open(path) as f:
        return [json.loads(line) for line in f][-1]


def test_train_resume_and_test(tiny, tmp_path):
    """On the tiny project (see tiny_project.py): the demo path trains the demo config itself."""
    work_dir = str(tmp_path / 'work')
    code, out = run(tiny.train_cmd(work_dir, '--cfg-options', 'train_cfg.max_epochs=1'), env=tiny.env())
    assert code == 0, out[-3000:]
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))

    # --resume reads mmengine's own checkpoint (HistoryBuffer, numpy) with weights-only loading
    code, out = run(tiny.train_cmd(work_dir, '--resume', '--cfg-options', 'train_cfg.max_epochs=2'),
                    env=tiny.env())
    assert code == 0, out[-3000:]
    assert 'resumed epoch: 1' in out and osp.isfile(osp.join(work_dir, 'epoch_2.pth'))

    preds = str(tmp_path / 'preds.pkl')
    code, out = run([sys.executable, osp.join(REPO, 'tools/test.py'), str(tiny.config),
                     osp.join(work_dir, 'epoch_2.pth'), '--work-dir', work_dir, '--out', preds],
                    env=tiny.env())
    assert code == 0, out[-3000:]
    assert osp.isfile(preds) and 'coco/bbox_mAP' in last_metrics(work_dir)


@pytest.mark.dist
@pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash for dist_train.sh')
def test_dist_train_two_cpu_processes_segmentation(tiny, tmp_path):
    """The tiny Semantic FPN (see tiny_project.py) in two processes; detection in two processes:
    tiny_project.py's dist_uninterrupted, and test_resume.py."""
    work_dir = str(tmp_path / 'work')
    code, out = run(tiny.dist_train_cmd(work_dir, config=tiny.seg_config), env=tiny.dist_env())
    assert code == 0, out[-3000:]
    assert 'distributed on CPU: gloo backend, 2 processes' in out
    assert '1 SyncBN layer config(s) replaced by BN' in out
    assert osp.isfile(osp.join(work_dir, 'iter_2.pth'))
    assert {'mIoU', 'mAcc', 'aAcc'} <= set(last_metrics(work_dir))


USER_CONFIG = """
_base_ = __import__('mmpoolformer').config_path('{base}')
model = dict(bbox_head=dict(num_classes={num_classes}))
"""


def test_external_project_inherits_the_real_config(tmp_path):
    project = tmp_path / 'my_project'
    project.mkdir()
    (project / 'my_retinanet.py').write_text(
        USER_CONFIG.format(base='detection/retinanet_poolformer_s12.py', num_classes=7))
    code, out = run([sys.executable, '-c', textwrap.dedent("""
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from mmdet.registry import MODELS
        cfg = Config.fromfile('my_retinanet.py')
        cfg.model.backbone.init_cfg = None
        init_default_scope(cfg.default_scope)
        model = MODELS.build(cfg.model)
        print(type(model.backbone).__name__, model.bbox_head.num_classes,
              cfg.optim_wrapper.optimizer.lr, cfg.train_cfg.max_epochs)
    """)], cwd=str(project))
    assert code == 0, out[-3000:]
    assert 'PoolFormer 7 0.0001 12' in out.splitlines()


@pytest.mark.parametrize('tool', ['ours', 'mmdet stock'])
def test_external_project_trains_with(tool, shapes, tmp_path):
    import mmdet
    project = tmp_path / 'my_project'
    project.mkdir()
    (project / 'my_shapes.py').write_text(
        USER_CONFIG.format(base='demo/retinanet_poolformer_s12_shapes.py', num_classes=3))
    train_py = (osp.join(REPO, 'tools/train.py') if tool == 'ours' else osp.join(
        osp.dirname(mmdet.__file__), '.mim', 'tools', 'train.py'))
    code, out = run([sys.executable, train_py, 'my_shapes.py', '--work-dir', 'work'] +
                    det_options(shapes), cwd=str(project))
    assert code == 0, out[-3000:]
    assert osp.isfile(project / 'work' / 'epoch_1.pth')


@pytest.mark.parametrize('argv, message', [
    (['tools/dist_train.sh', 'configs/nope.py', '2'], 'config file not found: configs/nope.py'),
    (['tools/dist_train.sh', RETINANET_DEMO, '0'], "GPUS must be a positive integer, got '0'"),
    (['env', 'MAX_RESTARTS=-1', 'tools/dist_train.sh', RETINANET_DEMO, '2'],
     "MAX_RESTARTS must be a whole number, got '-1'"),
    (['tools/dist_test.sh', RETINANET_DEMO], 'missing CHECKPOINT'),
    ([sys.executable, 'tools/train.py', 'configs/nope.py'], 'config file not found: configs/nope.py'),
    ([sys.executable, 'tools/train.py', RETINANET_DEMO, '--cfg-options', 'model.backbone'],
     "--cfg-options: expected KEY=VALUE items (e.g. train_dataloader.batch_size=4), got 'model.backbone'"),
    ([sys.executable, 'tools/train.py', RETINANET_DEMO, '--cfg-options', 'trian_cfg.max_epochs=1'],
     "--cfg-options trian_cfg.max_epochs: the config has no 'trian_cfg'; did you mean 'train_cfg'?"),
    ([sys.executable, 'tools/test.py', RETINANET_DEMO, 'x.pth', '--cfg-options',
      'model.backbone.init_cfg.checkpoint=x.pth'], '--cfg-options: init_cfg='),
    ([sys.executable, 'tools/train.py', RETINANET_DEMO, '--cfg-options',
      "model.backbone.init_cfg=dict(type='Pretrained',checkpoint='x.pth')"],
     "--cfg-options: cannot read the value of \"model.backbone.init_cfg=dict(type='Pretrained',"
     "checkpoint='x.pth')\": a value is a number, a string, None, a list [a,b] or a tuple (a,b), "
     "not a dict"),
])
def test_bad_command_lines_fail_with_one_line(argv, message):
    # (the environment's own noise aside: mmengine imports the deprecated pkg_resources, see pytest.ini)
    env = dict(os.environ, PYTHONWARNINGS='ignore:pkg_resources is deprecated:UserWarning')
    code, out = run(argv, cwd=REPO, env=env)
    assert code != 0
    assert message in out and len(out.strip().splitlines()) == 1, out


def test_wrong_backbone_key_is_named_with_the_allowed_ones(tmp_path):
    code, out = run([sys.executable, 'tools/train.py', RETINANET_DEMO, '--work-dir', str(tmp_path),
                     '--cfg-options', 'model.backbone.archh=s24'], cwd=REPO)
    assert code != 0
    assert out.strip().splitlines()[-1] == (
        "train.py: error: PoolFormer: unknown argument 'archh' (did you mean 'arch'?); allowed: arch, "
        'token_mixers, in_channels, norm_cfg, act_cfg, mlp_bias, downsample_norm_cfg, out_norm_cfg, '
        'drop_rate, drop_path_rate, use_layer_scale, pos_embed_sizes, out_indices, frozen_stages, '
        'norm_eval, with_cp, init_cfg')


@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='a CUDA device is present')
@pytest.mark.parametrize('argv, message', [
    (['--gpu'], 'has no CUDA build of PyTorch that sees a GPU (torch '),
    (['--cpu'], "unknown argument '--cpu'; allowed: --gpu"),
])
def test_setup_env_refuses_what_it_cannot_do(argv, message, tmp_path):
    """``--gpu`` on a machine without a GPU (this interpreter's PyTorch) says so before it touches
    anything: no environment made."""
    venv = tmp_path / 'venv'
    env = dict(os.environ, PYTHON=sys.executable, MMPF_VENV=str(venv), MMPF_CACHE=str(tmp_path))
    code, out = run(['bash', 'tools/setup_env.sh', *argv], cwd=REPO, env=env)
    assert code != 0
    assert message in out and len(out.strip().splitlines()) == 1, out
    assert not venv.exists()
