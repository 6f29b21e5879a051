"""Train a detector (mmdet configs) or a segmentor (mmseg configs), as mmdet's and mmseg's train.py.

    python tools/train.py configs/detection/retinanet_poolformer_s12.py [--work-dir DIR] [--amp]
    tools/dist_train.sh configs/detection/retinanet_poolformer_s12.py 8     # torchrun, 8 processes

Also runs distributed on machines without GPUs (gloo, DDP over CPU modules, SyncBN replaced by BN).
A run restarted by torchrun (MAX_RESTARTS=N tools/dist_train.sh ...) or requeued by slurm resumes from
the last complete checkpoint by itself.
"""
import signal

import torch

from mmpoolformer.engine import (build_runner, load_config, parse_tool_args, resume_after_restart, run,
                                 run_tool, tool_parser)


def parse_args(argv=None):
    parser = tool_parser('Train a detector or a segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision (fp16 on GPU, bf16 on CPU)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate with the total batch size')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from this checkpoint, or without a path from the latest in the work dir')
    return parse_tool_args(parser, argv)


def exit_before_training(signum, frame):
    """SIGTERM before the first iteration: nothing trained, nothing to save (once training starts,
    ResumableCheckpointHook saves on SIGTERM)."""
    raise SystemExit(0)


def main(argv=None):
    signal.signal(signal.SIGTERM, exit_before_training)
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)

    if args.amp:  # mmengine's AmpOptimWrapper, also on CPU (see mmpoolformer/engine/amp.py)
        cfg.optim_wrapper.type = 'mmpoolformer.AmpOptimWrapper'
        if torch.cuda.is_available():
            cfg.optim_wrapper.loss_scale = 'dynamic'
        else:
            cfg.optim_wrapper.dtype = 'bfloat16'
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            raise ValueError(f'--auto-scale-lr: {args.config} has no auto_scale_lr.base_batch_size')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    resume_after_restart(cfg)

    # fine-tuning from load_from may replace a head; resuming must fit exactly
    run(build_runner(cfg, strict_checkpoint=bool(cfg.get('resume'))), 'train')


if __name__ == '__main__':
    run_tool(main)
