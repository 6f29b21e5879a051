"""Write the model index that ``mim search`` / ``mim download`` read: ``configs/<folder>/metafile.yml``
for every config folder, and ``model-index.yml`` importing them.

    python tools/analysis/metafiles.py            # (re)write them
    python tools/analysis/metafiles.py --check    # fail if a config is missing or a file is stale

Parameters (the whole model) and backbone FLOPs (at the config's test input, tools/analysis/get_flops.py)
are counted here; training settings are read from each config; the paper's results and the measured
demo results are the tables below. The released COCO / ADE20K checkpoints are Google Drive pages, not
direct URLs, so no model has ``Weights`` (mim download needs a direct URL); the README links them.
"""
import argparse
import os
import os.path as osp
import sys
from typing import Optional

import yaml
from mmengine.registry import MODELS, init_default_scope

from mmpoolformer.engine import load_config

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from get_flops import count  # noqa: E402  (a sibling tool)

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
# The paper, and its code, of each collection: PoolFormer's, or the sequel's for its families.
PAPERS = {
    'MetaFormer': dict(Paper=dict(URL='https://arxiv.org/abs/2111.11418',
                                  Title='MetaFormer Is Actually What You Need for Vision'),
                       Code={'URL': 'https://github.com/sail-sg/poolformer'}),
    'MetaFormer Baselines': dict(Paper=dict(URL='https://arxiv.org/abs/2210.13452',
                                            Title='MetaFormer Baselines for Vision'),
                                 Code={'URL': 'https://github.com/sail-sg/metaformer'}),
}
BASELINES = ('PoolFormerV2', 'IdentityFormer', 'RandFormer', 'ConvFormer', 'CAFormer')

# The paper's Tables 3 and 4 (1x COCO, ADE20K 40k); the hybrid backbones have no published dense result.
PAPER_RESULTS = {
    'retinanet_poolformer_s12': {'box AP': 36.2},
    'retinanet_poolformer_s24': {'box AP': 38.9},
    'retinanet_poolformer_s36': {'box AP': 39.5},
    'mask_rcnn_poolformer_s12': {'box AP': 37.3, 'mask AP': 34.6},
    'mask_rcnn_poolformer_s24': {'box AP': 40.1, 'mask AP': 37.0},
    'mask_rcnn_poolformer_s36': {'box AP': 41.0, 'mask AP': 37.7},
    'fpn_poolformer_s12': {'mIoU': 37.2},
    'fpn_poolformer_s24': {'mIoU': 40.3},
    'fpn_poolformer_s36': {'mIoU': 42.0},
    'fpn_poolformer_m36': {'mIoU': 42.4},
    'fpn_poolformer_m48': {'mIoU': 42.7},
}
# tools/demo.sh on the 2-core development machine, trained from scratch (README, "Quick start").
DEMO_RESULTS = {
    'retinanet_poolformer_s12_shapes': {'box AP': 58.1},
    'mask_rcnn_poolformer_s12_shapes': {'box AP': 46.9, 'mask AP': 56.7},
    'fpn_poolformer_s12_shapes': {'mIoU': 87.4},
}
FOLDERS = {
    'detection': dict(collection='detection (COCO)', dataset='COCO',
                      resources='8x GPUs'),
    'segmentation': dict(collection='segmentation (ADE20K)', dataset='ADE20K',
                         resources='8x GPUs'),
    'demo': dict(collection='demo (shapes)', dataset='Shapes', resources='2 CPU cores'),
}


def configs(folder: str) -> list:
    root = osp.join(REPO, 'configs', folder)
    return sorted(f for f in os.listdir(root) if f.endswith('.py'))


def input_shape(cfg) -> tuple:
    """(height, width) of the input the config tests at: the crop for segmentation (as the paper
    counts), the test Resize for detection."""
    if cfg.default_scope == 'mmseg':
        return tuple(cfg.crop_size)
    resize = next(t for t in cfg.test_dataloader.dataset.pipeline if t.type == 'Resize')
    width, height = resize.scale
    return height, width


def architecture(cfg) -> list:
    parts = [cfg.model.backbone.type.split('.')[-1], 'FPN']  # PoolFormer, MetaFormer, CAFormer, ...
    detector = cfg.model.type
    return parts + ([detector] if detector != 'EncoderDecoder' else ['Semantic FPN'])


def entry(folder: str, name: str, known: Optional[dict] = None) -> dict:
    """The model's entry; with ``known`` (its entry in the file), its counts are taken from there
    instead of counted."""
    path = f'configs/{folder}/{name}'
    cfg = load_config(osp.join(REPO, path))
    pretrained = (cfg.model.backbone.get('init_cfg') or {}).get('checkpoint')
    shape = input_shape(cfg)
    if known is None:
        cfg.model.backbone.init_cfg = None  # the architecture only: no download
        init_default_scope(cfg.default_scope)
        model = MODELS.build(cfg.model)
        params = sum(p.numel() for p in model.parameters())
        _, flops, _ = count(model.backbone, shape)
    else:
        params, flops = (known.get('Metadata', {}).get(k) for k in ('Parameters', 'Backbone FLOPs'))

    optimizer = cfg.optim_wrapper.optimizer
    schedule = ({'Epochs': cfg.train_cfg.max_epochs} if 'max_epochs' in cfg.train_cfg else
                {'Iterations': cfg.train_cfg.max_iters})
    info = FOLDERS[folder]
    metadata = {
        'Training Data': info['dataset'],
        'Training Techniques': [optimizer.type],
        'Training Resources': info['resources'],
        'Batch Size': cfg.auto_scale_lr.base_batch_size,
        'Learning Rate': optimizer.lr,
        **schedule,
        'Architecture': architecture(cfg),
        'Parameters': params,
        'Input Size': f'{shape[0]}x{shape[1]}',
        'Backbone FLOPs': flops,
        'Pretrained': pretrained or 'none (from scratch)',
    }
    stem = osp.splitext(name)[0]
    results = PAPER_RESULTS.get(stem) or DEMO_RESULTS.get(stem)
    paper = 'MetaFormer Baselines' if architecture(cfg)[0] in BASELINES else 'MetaFormer'
    model = {'Name': stem, 'In Collection': f'{paper} {info["collection"]}', 'Config': path,
             'Metadata': metadata}
    if results:  # one entry a task, as mmdet's metafiles
        tasks = ({'mIoU': 'Semantic Segmentation'} if cfg.default_scope == 'mmseg' else
                 {'box AP': 'Object Detection', 'mask AP': 'Instance Segmentation'})
        model['Results'] = [{'Task': tasks[metric], 'Dataset': info['dataset'],
                             'Metrics': {metric: value}} for metric, value in results.items()]
    return model


def metafile(folder: str, recount: bool = True) -> str:
    """The metafile's text; without ``recount``, with the counts of the file as it is."""
    info = FOLDERS[folder]
    known = {}
    path = osp.join(REPO, 'configs', folder, 'metafile.yml')
    if not recount and osp.isfile(path):
        with open(path) as f:
            known = {m['Name']: m for m in yaml.safe_load(f)['Models']}
    models = [entry(folder, name, None if recount else known.get(osp.splitext(name)[0], {}))
              for name in configs(folder)]
    collections = sorted({m['In Collection'] for m in models})
    content = {
        'Collections': [{'Name': name, **PAPERS[name[:-len(info['collection']) - 1]],
                         'README': 'README.md'} for name in collections],
        'Models': models,
    }
    source = 'the demo, measured' if folder == 'demo' else 'the paper'
    header = ('# Written by tools/analysis/metafiles.py: parameters of the whole model, backbone FLOPs\n'
              f'# (multiply-adds) at Input Size; results: {source}.\n')
    return header + yaml.safe_dump(content, sort_keys=False, width=100)


def model_index() -> str:
    return yaml.safe_dump({'Import': [f'configs/{folder}/metafile.yml' for folder in FOLDERS]},
                          sort_keys=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--check', action='store_true',
                        help='compare with the files instead of writing them')
    parser.add_argument('--count', nargs='+', choices=sorted(FOLDERS), default=sorted(FOLDERS),
                        help='with --check: the folders whose parameters and FLOPs are counted '
                        'again (the others are checked for everything else)')
    args = parser.parse_args(argv)
    missing = sorted(set(os.listdir(osp.join(REPO, 'configs'))) - set(FOLDERS) - {'_base_'})
    if missing:
        raise SystemExit(f'config folders without an entry in FOLDERS: {missing}')
    files = {osp.join(REPO, 'model-index.yml'): model_index()}
    files.update({osp.join(REPO, 'configs', folder, 'metafile.yml'):
                  metafile(folder, recount=not args.check or folder in args.count)
                  for folder in FOLDERS})
    stale = []
    for path, text in files.items():
        if args.check:
            if not osp.isfile(path) or open(path).read() != text:
                stale.append(osp.relpath(path, REPO))
        else:
            with open(path, 'w') as f:
                f.write(text)
            print(f'wrote {osp.relpath(path, REPO)}')
    if stale:
        raise SystemExit(f'stale: {stale}; run python tools/analysis/metafiles.py')


if __name__ == '__main__':
    main()
