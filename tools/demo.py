"""The whole pipeline on the bundled shapes data, on a CPU: generate the data, evaluate the untrained
model, train with tools/train.py, evaluate with tools/test.py, and report.

    tools/demo.sh                       # RetinaNet, PoolFormer-S12 (box AP)
    tools/demo.sh --task mask_rcnn      # Mask R-CNN (box and mask AP)
    tools/demo.sh --task fpn            # Semantic FPN (mIoU)

Writes, under the work dir (default work_dirs/demo_<task>): the training logs and checkpoints,
metrics.json (untrained and trained), loss.png, and vis/ with the validation images and predictions.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TASKS = {
    'retinanet': ('configs/demo/retinanet_poolformer_s12_shapes.py',
                  ['coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75']),
    'mask_rcnn': ('configs/demo/mask_rcnn_poolformer_s12_shapes.py',
                  ['coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50']),
    'fpn': ('configs/demo/fpn_poolformer_s12_shapes.py', ['mIoU', 'mAcc', 'aAcc']),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--task', choices=sorted(TASKS), default='retinanet')
    parser.add_argument('--work-dir', help='default: work_dirs/demo_<task>')
    parser.add_argument('--data', default=osp.join(REPO, 'data', 'shapes'),
                        help='where the shapes data is (generated there if missing, incomplete or '
                        'written by an older generator)')
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='passed on to train.py and test.py, e.g. train_cfg.max_epochs=1')
    return parser.parse_args()


def data_options(task, data_root):
    root = data_root.rstrip('/') + '/'
    opts = [f'{split}_dataloader.dataset.data_root={root}' for split in ('train', 'val', 'test')]
    if task != 'fpn':
        ann = root + 'annotations/instances_val.json'
        opts += [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']
    return opts


def ensure_data(root):
    """Generate the shapes data in ``root`` unless it is there, complete and current. A folder that
    holds anything else is left alone: generating replaces files."""
    from mmpoolformer.demo import CLASSES, generate, is_generated
    if is_generated(root):
        return
    if osp.isdir(root) and os.listdir(root):
        try:  # the shapes data of an older generator, or a generation cut short
            with open(osp.join(root, 'annotations', 'instances_train.json')) as f:
                names = tuple(c['name'] for c in json.load(f)['categories'])
        except (OSError, ValueError, KeyError, TypeError):
            names = None
        if names != CLASSES:
            sys.exit(f'[demo] {root} is not empty and holds no shapes data: pass --data a new or '
                     'empty folder, or the shapes data to regenerate')
    print(f'[demo] generating the shapes dataset in {root}', flush=True)
    generate(root)


def tool(name, *args):
    cmd = [sys.executable, osp.join(REPO, 'tools', name), *args]
    print('[demo] $ ' + ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def test_metrics(work_dir, keys):
    """Metrics of the newest tools/test.py run in ``work_dir`` (its <timestamp>/<timestamp>.json).

    mmdet's COCO metric logs nothing when no prediction passes the score threshold (as for an
    untrained detector): that is an AP of 0.
    """
    run = max(d for d in os.listdir(work_dir) if osp.isdir(osp.join(work_dir, d)))
    with open(osp.join(work_dir, run, f'{run}.json')) as f:
        logged = json.loads(f.read().strip().splitlines()[-1])
    if not any(k in logged for k in keys):
        print(f'[demo] no prediction passed the score threshold in {work_dir}: AP is 0')
    return {k: logged.get(k, 0.0) for k in keys}


def save_untrained(config, options, path):
    """The model as training starts it (same seed), saved so tools/test.py can evaluate it."""
    import torch
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import set_random_seed

    from mmpoolformer.engine import load_config
    cfg = load_config(config, dict(o.split('=', 1) for o in options))
    init_default_scope(cfg.default_scope)
    set_random_seed(cfg.get('randomness', {}).get('seed', 0))
    model = MODELS.build(cfg.model)
    model.init_weights()
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)


def plot_losses(work_dir, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    runs = sorted(d for d in os.listdir(work_dir)
                  if osp.isfile(osp.join(work_dir, d, 'vis_data', 'scalars.json')))
    steps, logs = [], {}
    with open(osp.join(work_dir, runs[-1], 'vis_data', 'scalars.json')) as f:
        for line in f:
            row = json.loads(line)
            if 'loss' in row:
                steps.append(row['iter'] if 'iter' in row else row['step'])
                for k, v in row.items():
                    if k.startswith(('loss', 'decode.loss')):
                        logs.setdefault(k, []).append(v)
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, v in logs.items():
        ax.plot(steps[:len(v)], v, label=k, lw=2 if k == 'loss' else 1)
    ax.set_xlabel('iteration')
    ax.set_ylabel('loss')
    ax.set_title(osp.basename(work_dir.rstrip('/')))
    ax.legend()
    ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    args = parse_args()
    config, keys = TASKS[args.task]
    config = osp.join(REPO, config)
    work_dir = osp.abspath(args.work_dir or osp.join(REPO, 'work_dirs', f'demo_{args.task}'))
    os.makedirs(work_dir, exist_ok=True)

    ensure_data(args.data)
    options = data_options(args.task, args.data) + args.cfg_options

    print('[demo] evaluating the untrained model', flush=True)
    untrained = osp.join(work_dir, 'untrained.pth')
    save_untrained(config, options, untrained)
    tool('test.py', config, untrained, '--work-dir', osp.join(work_dir, 'untrained'),
         '--cfg-options', *options)
    before = test_metrics(osp.join(work_dir, 'untrained'), keys)

    print('[demo] training', flush=True)
    tool('train.py', config, '--work-dir', work_dir, '--cfg-options', *options)
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()

    print('[demo] evaluating the trained model', flush=True)
    tool('test.py', config, checkpoint, '--work-dir', osp.join(work_dir, 'trained'), '--show-dir',
         osp.join(work_dir, 'vis'), '--cfg-options', *options)
    after = test_metrics(osp.join(work_dir, 'trained'), keys)

    plot_losses(work_dir, osp.join(work_dir, 'loss.png'))
    results = {'task': args.task, 'config': osp.relpath(config, REPO), 'checkpoint': checkpoint,
               'untrained': before, 'trained': after}
    with open(osp.join(work_dir, 'metrics.json'), 'w') as f:
        json.dump(results, f, indent=2)

    width = max(len(k) for k in keys)
    print(f'\n[demo] {args.task} on the shapes validation split ({osp.relpath(config, REPO)})')
    print(f'  {"metric":<{width}}  untrained  trained')
    for k in keys:
        print(f'  {k:<{width}}  {before[k]:>9.3f}  {after[k]:>7.3f}')
    # mmseg's visualizer keeps its pictures in a backend folder under the save dir
    drawn = osp.join(work_dir, 'vis', *(('vis_data', 'vis_image') if args.task == 'fpn' else ()))
    print(f'[demo] metrics: {osp.join(work_dir, "metrics.json")}; loss curve: '
          f'{osp.join(work_dir, "loss.png")}; predictions drawn: {drawn}')


if __name__ == '__main__':
    main()
