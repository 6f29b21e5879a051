import os
import os.path as osp
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


# What OpenMMLab packages ship in <package>/.mim: mim finds the model index, the configs and the
# train / test tools there (mim search, mim train, mim test), and so does mmpoolformer.config_path.
MIM_FILES = ('configs', 'tools', 'model-index.yml')


class BuildPyWithMimFiles(build_py):
    """Copy MIM_FILES into a (non-editable) wheel as mmpoolformer/.mim/; an editable install reads
    them from the checkout."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            return
        mim = osp.join(self.build_lib, 'mmpoolformer', '.mim')
        for name in MIM_FILES:
            target = osp.join(mim, name)
            if osp.isdir(name):
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(name, target, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
            else:
                os.makedirs(mim, exist_ok=True)
                shutil.copy2(name, target)


def readme():
    with open('README.md', encoding='utf-8') as f:
        return f.read()


def version():
    scope = {}
    with open('mmpoolformer/version.py', encoding='utf-8') as f:
        exec(f.read(), scope)
    return scope['__version__']


setup(
    name='mmpoolformer',
    version=version(),
    description='PoolFormer and the MetaFormer family as OpenMMLab 2.0 backbones for detection and '
    'segmentation',
    long_description=readme(),
    long_description_content_type='text/markdown',
    license='Apache License 2.0',
    packages=find_packages(include=['mmpoolformer', 'mmpoolformer.*']),
    # the compiled CPU kernels' sources, built on first use (mmpoolformer/kernels/native.py)
    package_data={'mmpoolformer.kernels': ['csrc/*.cpp', 'csrc/*.h']},
    python_requires='>=3.8',
    install_requires=[
        'torch>=2.0',
        'torchvision>=0.15',
        'mmengine>=0.10.0,<1.0.0',
        # mmdet 3.3 and mmseg 1.2 refuse mmcv >= 2.2 at import time.
        'mmcv>=2.0.0,<2.2.0',
        'mmdet>=3.0.0,<3.4.0',
        'mmsegmentation>=1.0.0,<1.3.0',
        'pycocotools>=2.0.6',
        # imported by mmseg without being declared by it
        'ftfy',
        'regex',
        # mmengine 0.10 imports pkg_resources at run time (to resolve mmdet:: / mmseg:: bases), which
        # setuptools dropped in release 82
        'setuptools<82',
    ],
    extras_require={
        # timm and mmpretrain serve only as independent oracles in the tests; pytest-xdist runs them
        # in parallel (worksteal needs 3.2); openmim answers mim search / train / test from a wheel of
        # ours, built without build isolation (hence wheel); onnx, onnxscript (the dynamo exporter)
        # and onnxruntime check the exported backbone.
        'tests': ['pytest>=7', 'pytest-xdist>=3.2', 'timm>=0.9,<2', 'mmpretrain>=1.0.0,<1.3.0',
                  'openmim>=0.3.9', 'wheel', 'onnx>=1.16', 'onnxscript>=0.2', 'onnxruntime>=1.18'],
    },
    cmdclass={'build_py': BuildPyWithMimFiles},
    zip_safe=False,
)
