"""Evaluate a checkpoint of a detector (mmdet configs) or a segmentor (mmseg configs), as mmdet's and
mmseg's test.py.

    python tools/test.py configs/detection/retinanet_poolformer_s12.py model.pth [--out results.pkl]
    tools/dist_test.sh configs/segmentation/fpn_poolformer_s12.py model.pth 8
"""
import os

from mmpoolformer.engine import build_runner, load_config, parse_tool_args, run, run_tool, tool_parser


def parse_args(argv=None):
    parser = tool_parser('Test (and evaluate) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file (path or URL)')
    parser.add_argument(
        '--out', help='detection: a .pkl file to dump the predictions to; segmentation: a '
        'directory to save the predicted label maps in')
    parser.add_argument('--show', action='store_true', help='show the predictions in a window')
    parser.add_argument('--show-dir', help='save images with the predictions drawn in this dir')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds per shown image')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    return parse_tool_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    cfg.load_from = args.checkpoint
    task = cfg.get('default_scope')
    if task not in ('mmdet', 'mmseg'):
        raise ValueError(f'{args.config}: default_scope must be mmdet or mmseg, got {task!r}')

    if args.show or args.show_dir:
        vis = cfg.default_hooks.visualization
        vis.update(draw=True, show=args.show, wait_time=args.wait_time)
        if args.show_dir and task == 'mmdet':
            vis.test_out_dir = os.path.abspath(args.show_dir)
        elif args.show_dir:
            cfg.visualizer.save_dir = args.show_dir
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise ValueError(f'--tta: {args.config} defines no tta_model / tta_pipeline')
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
    if args.out and task == 'mmseg':
        cfg.test_evaluator.update(output_dir=args.out, keep_results=True)
    elif args.out and not args.out.endswith(('.pkl', '.pickle')):
        raise ValueError(f'--out must be a .pkl file for detection, got {args.out}')

    runner = build_runner(cfg)
    if args.out and task == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    run(runner, 'test')


if __name__ == '__main__':
    run_tool(main)
