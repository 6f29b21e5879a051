"""Predict on an image, a folder of images or a video with a detection or segmentation config, through
mmdet's DetInferencer / mmseg's MMSegInferencer, and write the predictions drawn and raw.

    python tools/infer.py demo.jpg configs/detection/retinanet_poolformer_s12.py model.pth
    python tools/infer.py images/ configs/segmentation/fpn_poolformer_s12.py fpn.pth --device cuda
    python tools/infer.py clip.mp4 configs/detection/mask_rcnn_poolformer_s12.py mrcnn.pth

Writes ``OUT_DIR/vis/`` (drawn images, or ``<video>.mp4``) and ``OUT_DIR/preds/`` (``<image>.json``
with labels, scores, boxes and RLE masks; ``<image>.png`` label maps for segmentation). The checkpoint
may be ours, converted, or in a released layout (converted while loading); one of another model is
refused with the tensors that do not fit.
"""
from mmpoolformer.engine import run_tool, tool_parser


def parse_args(argv=None):
    # (no --work-dir or --launcher: inference writes to --out-dir, in one process)
    parser = tool_parser('Predict on images or a video and draw the predictions', runner=False)
    parser.add_argument('inputs', help='an image, a folder of images, or a video')
    parser.add_argument('config', help='detection or segmentation config file')
    parser.add_argument('checkpoint', help='checkpoint file (path or URL)')
    parser.add_argument('--out-dir', default='outputs', help='where vis/ and preds/ are written')
    parser.add_argument('--device', default=None,
                        help='cpu, cuda, cuda:1, ... (default: a GPU if there is one)')
    parser.add_argument('--batch-size', type=int, default=1, help='images per forward pass')
    parser.add_argument('--pred-score-thr', type=float, default=0.3,
                        help='detection: draw the boxes and masks scored at least this')
    parser.add_argument('--no-save-vis', action='store_true', help='do not write vis/')
    parser.add_argument('--no-save-pred', action='store_true', help='do not write preds/')
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f'--batch-size must be at least 1, got {args.batch_size}')
    return args


def main(argv=None):
    args = parse_args(argv)
    from mmpoolformer.apis import build_inferencer, find_inputs, run_inference
    find_inputs(args.inputs)  # a wrong path fails before the model is built
    inferencer = build_inferencer(args.config, args.checkpoint, args.device, args.cfg_options)
    written = run_inference(inferencer, args.inputs, args.out_dir, args.batch_size,
                            args.pred_score_thr, not args.no_save_vis, not args.no_save_pred)
    print(f'wrote {len(written)} files to {args.out_dir}')


if __name__ == '__main__':
    run_tool(main)
