"""Parameters and FLOPs of a backbone at one input size, counted by mmengine.analysis.

    python tools/analysis/get_flops.py configs/detection/retinanet_metaformer_ppaa_s12.py
    python tools/analysis/get_flops.py metaformer_ppaa_s12_224 --shape 800 1333
    python tools/analysis/get_flops.py "{'type': 'MetaFormer', 'token_mixers': {'type': 'DepthwiseConv'}}"

MODEL is a config file (its ``model.backbone`` is measured), the name of a registered mmpoolformer
backbone (``PoolFormer``, ``MetaFormer``, a release such as ``metaformer_ppaa_s12_224``), or a backbone
config as a Python dict literal; ``--cfg-options`` overrides the config, or the backbone's arguments.
The input is one image of ``--shape`` (default 512x512).

FLOPs are multiply-adds (mmengine.analysis's convention, as the paper's MACs) of convolutions, linear
layers, matrix products, norms and attention; element-wise operations (pooling, activations, additions)
are not counted and are listed as such.
"""
import ast
import os.path as osp

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape

from mmpoolformer.engine import parse_tool_args, run_tool, tool_parser
from mmpoolformer.registry import MODELS


def parse_args(argv=None):
    parser = tool_parser(__doc__.split('\n')[0])
    parser.add_argument('model', help='a config file, a registered backbone name, or a backbone '
                        'config as a Python dict literal')
    parser.add_argument('--shape', type=int, nargs='+', default=[512, 512],
                        help='input height and width (one number: a square)')
    return parse_tool_args(parser, argv)


def backbone_cfg(model: str, cfg_options) -> dict:
    if model.endswith('.py'):
        from mmpoolformer.engine import load_config
        cfg = load_config(model, cfg_options).model.backbone.to_dict()
        cfg['init_cfg'] = None  # the architecture only: no download
    else:
        if model.lstrip().startswith('{'):
            try:
                cfg = ast.literal_eval(model)
            except (ValueError, SyntaxError) as e:
                raise ValueError(f'MODEL looks like a dict literal but is not one ({e}): {model}')
            if not isinstance(cfg, dict) or 'type' not in cfg:
                raise ValueError(f'a backbone given as a dict needs a "type" key, got {model}')
        else:
            cfg = dict(type=model)
        cfg.update(cfg_options or {})
    # the configs name our backbones with the scope prefix, which our own registry does not need
    cfg['type'] = cfg['type'].split('.', 1)[-1] if isinstance(cfg['type'], str) else cfg['type']
    if cfg['type'] not in MODELS.module_dict:
        raise ValueError(f'{cfg["type"]!r} is not an mmpoolformer backbone; registered: '
                         f'{sorted(MODELS.module_dict)}')
    return cfg


def attention_flops(inputs, outputs) -> int:
    """``scaled_dot_product_attention(q, k, v)``: ``q @ k^T`` and ``weights @ v``, as multiply-adds."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch_heads = q[0] * (q[1] if len(q) == 4 else 1)
    return batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])


def count(backbone: torch.nn.Module, shape) -> tuple:
    """Parameters, FLOPs, and the operators that were not counted (name -> calls)."""
    backbone.eval()
    with torch.no_grad():
        analyzer = FlopAnalyzer(backbone, torch.zeros(1, 3, *shape))
        analyzer.set_op_handle('aten::scaled_dot_product_attention', attention_flops)
        analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analyzer.tracer_warnings('none')
        flops = analyzer.total()
        skipped = dict(analyzer.unsupported_ops())
    return sum(p.numel() for p in backbone.parameters()), flops, skipped


def main(argv=None):
    args = parse_args(argv)
    if len(args.shape) not in (1, 2) or min(args.shape) < 1:
        raise ValueError(f'--shape takes a height and a width (or one side), got {args.shape}')
    shape = tuple(args.shape) * (3 - len(args.shape))
    cfg = backbone_cfg(args.model, args.cfg_options)
    params, flops, skipped = count(MODELS.build(cfg), shape)
    name = osp.basename(args.model) if args.model.endswith('.py') else cfg['type']
    print(f'backbone: {name}')
    print(f'input: 1x3x{shape[0]}x{shape[1]}')
    print(f'params: {params / 1e6:.2f} M ({params})')
    print(f'FLOPs: {flops / 1e9:.2f} G ({flops} multiply-adds)')
    if skipped:
        print('not counted: ' + ', '.join(f'{op} x{n}' for op, n in sorted(skipped.items())))


if __name__ == '__main__':
    run_tool(main)
