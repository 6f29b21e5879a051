"""Reading configs with ``mmdet::`` / ``mmseg::`` bases: the package lookups mmengine repeats for every
base are made once per process (mmpoolformer.configs.cache_base_lookups), and the configs read the
same as without that."""
import os
import os.path as osp

import mmengine.config.config as mmengine_config
import mmengine.config.utils as mmengine_config_utils
import yaml
from mmengine.config import Config

from mmpoolformer import config_path, configs

CONFIGS = ('detection/retinanet_poolformer_s12.py', 'detection/mask_rcnn_poolformer_s24.py',
           'segmentation/fpn_poolformer_s12.py')


def read(name):
    return Config.fromfile(config_path(name)).to_dict()


def test_each_model_index_file_is_parsed_once_and_configs_read_the_same(monkeypatch):
    configs._load_unchanged.cache_clear()
    cached = [read(name) for name in CONFIGS + CONFIGS]
    parsed = configs._load_unchanged.cache_info().misses

    # mmdet's index and the metafiles it imports, and mmseg's: each read once, whatever the bases
    index_files = 0
    for package in ('mmdet', 'mmseg'):
        root = osp.join(mmengine_config.get_installed_path(package), '.mim')
        with open(osp.join(root, 'model-index.yml')) as f:
            index_files += 1 + len(yaml.safe_load(f)['Import'])
    assert parsed == index_files

    # mmengine as it is: every base looked up again
    monkeypatch.setattr(mmengine_config_utils, 'load', configs.load)
    monkeypatch.setattr(mmengine_config, 'is_installed', configs.is_installed)
    assert [read(name) for name in CONFIGS] == cached[:len(CONFIGS)]


def test_a_changed_file_is_parsed_again(tmp_path):
    path = tmp_path / 'index.yml'
    path.write_text('Import: [a.yml]\n')
    assert configs._load_once(str(path)) == {'Import': ['a.yml']}
    path.write_text('Import: [a.yml, b.yml]\n')
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1))
    assert configs._load_once(str(path)) == {'Import': ['a.yml', 'b.yml']}
