"""Configs name our modules with the ``mmpoolformer.`` scope, from mmengine, mmdet and mmseg alike.

Each case runs in a fresh interpreter: what matters is what a user's process has imported.
"""
import subprocess
import sys
import textwrap

import pytest


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
