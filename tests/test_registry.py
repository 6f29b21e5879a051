"""Configs name our modules with the ``mmpoolformer.`` scope, from mmengine, mmdet and mmseg alike.

Each case runs in a fresh interpreter: what matters is what a user's process has imported.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, cwd=None) -> str:
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_scoped_name_builds_without_importing_mmpoolformer_mmdet_or_mmseg():
    out = run_python("""
        import sys
        from mmengine.registry import MODELS
        model = MODELS.build(dict(type='mmpoolformer.PoolFormer', arch='s12', out_indices=(3, )))
        print(type(model).__module__, type(model).__name__)
        print(sorted(n for n in ('mmdet', 'mmseg') if n in sys.modules))
    """)
    assert out.split('\n')[:2] == ['mmpoolformer.models.metaformer PoolFormer', '[]']


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_config_with_custom_imports_builds_in(scope, tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(textwrap.dedent("""
        custom_imports = dict(imports=['mmpoolformer'], allow_failed_imports=False)
        default_scope = 'SCOPE'
        model = dict(type='mmpoolformer.PoolFormer', arch='s24', out_indices=(1, 2, 3))
    """).replace('SCOPE', scope))
    out = run_python(f"""
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from {scope}.registry import MODELS
        cfg = Config.fromfile({str(cfg)!r})
        init_default_scope(cfg.default_scope)
        model = MODELS.build(cfg.model)
        print(type(model).__name__, model.arch['depths'], model.out_indices)
    """)
    assert out.strip() == 'PoolFormer [4, 4, 12, 4] (1, 2, 3)'


def readme_mixer_example():
    """The README's own-mixer example: ``{file name: source}``, read from the README itself."""
    with open(os.path.join(REPO, 'README.md')) as f:
        readme = f.read()
    section = readme[readme.index('**Your own mixer, in your own project**'):]
    code = section[section.index('```python\n') + len('```python\n'):]
    code = code[:code.index('```')]
    files = re.split(r'^# my_project/(\S+)\n', code, flags=re.M)
    return dict(zip(files[1::2], files[2::2]))


def test_a_mixer_registered_outside_the_package_is_named_in_a_config(tmp_path):
    files = readme_mixer_example()
    assert sorted(files) == ['my_mixers.py', 'retinanet_maxformer.py']
    for name, source in files.items():
        (tmp_path / name).write_text(source)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), REPO] + os.environ.get('PYTHONPATH', '').split(os.pathsep)))
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent("""
        import torch
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from mmdet.registry import MODELS
        from mmdet.testing import demo_mm_inputs

        cfg = Config.fromfile('retinanet_maxformer.py')
        cfg.model.backbone.init_cfg = None
        init_default_scope(cfg.default_scope)
        model = MODELS.build(cfg.model)
        mixers = [stage[0].token_mixer for stage in model.backbone.network[0::2]]
        print([f'{type(m).__module__}.{type(m).__name__}' for m in mixers])
        mixer = mixers[0]
        x = torch.randn(1, 64, 9, 7)
        expected = torch.nn.functional.max_pool2d(x, 5, 1, 2) - x
        print('max mixing:', torch.equal(mixer(x), expected), mixer.pool.kernel_size)

        torch.manual_seed(0)
        data = demo_mm_inputs(batch_size=1, image_shapes=[(3, 96, 128)], num_items=[2], num_classes=80)
        model.train()
        loss, _ = model.parse_losses(model(**model.data_preprocessor(data, True), mode='loss'))
        loss.backward()
        stem = model.backbone.patch_embed.proj.weight.grad
        print('trains:', bool(torch.isfinite(loss)), bool(stem is not None and stem.abs().sum() > 0))
    """)], capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "['my_mixers.MaxMixer', 'my_mixers.MaxMixer', 'mmpoolformer.models.token_mixers.Pooling', "
        "'mmpoolformer.models.token_mixers.Pooling']",
        'max mixing: True 5',
        'trains: True True',
    ]


def test_an_unregistered_mixer_name_says_where_to_register(tmp_path):
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(textwrap.dedent("""
        custom_imports = dict(imports=['mmpoolformer'], allow_failed_imports=False)
        model = dict(type='mmpoolformer.MetaFormer', token_mixers=dict(type='MaxMixer'))
    """))
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(f"""
        from mmengine.config import Config
        from mmengine.registry import MODELS
        MODELS.build(Config.fromfile({str(cfg)!r}).model)
    """)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("unknown token mixer 'MaxMixer'; registered in mmpoolformer.registry.TOKEN_MIXERS: "
            "['Attention', 'DepthwiseConv', 'Identity', 'Pooling', 'RandomMixing', 'SepConv', 'SpatialFc']"
            in proc.stderr)
