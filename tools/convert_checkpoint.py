"""Convert a released PoolFormer checkpoint to the layout our configs load strictly.

    python tools/convert_checkpoint.py SRC DST [--config CFG]

SRC may be an ImageNet backbone (official ``poolformer_s12.pth.tar``, timm, mmpretrain), an official
COCO detector (mmdet 2.x) or ADE20K segmentor (mmseg 0.x), or an mmseg 1.x / mmpretrain port. Detection
and segmentation checkpoints keep their neck and heads; ImageNet ones become a backbone state dict for
``model.backbone.init_cfg``. With ``--config`` the result is checked against that config's model: keys
the model does not have (e.g. the stage-0 output norm, which our RetinaNet does not build) are dropped
and reported, and anything the model lacks or whose shape differs is reported too. The file is read
weights-only and written atomically; converting a converted file changes nothing.
"""
import os
import os.path as osp

import torch

from mmpoolformer.engine import parse_tool_args, run_tool, tool_parser
from mmpoolformer.models.weights import (CheckpointError, convert_state_dict, read_checkpoint,
                                         unwrap_state_dict)


def parse_args(argv=None):
    parser = tool_parser(__doc__.split('\n')[0])
    parser.add_argument('src', help='released checkpoint (path or URL)')
    parser.add_argument('dst', help='where to write the converted checkpoint')
    parser.add_argument('--config', help='check (and trim) the result against this config\'s model')
    return parse_tool_args(parser, argv)


def model_state_dict(config, cfg_options):
    from mmengine.registry import MODELS, init_default_scope

    from mmpoolformer.engine import load_config
    cfg = load_config(config, cfg_options)
    cfg.model.backbone.init_cfg = None
    init_default_scope(cfg.get('default_scope'))
    return MODELS.build(cfg.model).state_dict()


def fit_to_model(state_dict, own):
    """Trim ``state_dict`` to the keys of ``own`` (a model's state dict, or its backbone's for a
    backbone checkpoint) and report what does not fit."""
    backbone_only = not any(k.startswith('backbone.') for k in state_dict)
    if backbone_only:
        own = {k[len('backbone.'):]: v for k, v in own.items() if k.startswith('backbone.')} or own
    mismatched = [f'{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state_dict.items()
                  if k in own and v.shape != own[k].shape]
    if mismatched:
        raise CheckpointError('shapes differ from the config\'s model (another arch?):\n  ' +
                              '\n  '.join(mismatched))
    extra = [k for k in state_dict if k not in own]
    missing = [k for k in own if k not in state_dict]
    for k in extra:
        del state_dict[k]
    return extra, missing


def main(argv=None):
    args = parse_args(argv)
    checkpoint = read_checkpoint(args.src)
    state_dict, dropped, layout = convert_state_dict(unwrap_state_dict(checkpoint))
    print(f'{args.src}: {layout} layout, {len(state_dict)} tensors kept')
    if dropped:
        print(f'dropped (not part of the model): {dropped}')
    if args.config:
        extra, missing = fit_to_model(state_dict, model_state_dict(args.config, args.cfg_options))
        if extra:
            print(f'dropped (not in {osp.basename(args.config)}\'s model): {extra}')
        if missing:
            print(f'not in the checkpoint, so left as initialised by {osp.basename(args.config)}: '
                  f'{missing}')

    meta = checkpoint.get('meta') if isinstance(checkpoint.get('meta'), dict) else {}
    meta.setdefault('converted_from', layout)
    tmp = f'{args.dst}.tmp'
    os.makedirs(osp.dirname(osp.abspath(args.dst)), exist_ok=True)
    torch.save({'state_dict': state_dict, 'meta': meta}, tmp)
    os.replace(tmp, args.dst)
    print(f'wrote {args.dst}')


if __name__ == '__main__':
    run_tool(main)
