"""Time and memory of one attention mixer at a detection-size token grid, with and without reduction.

    python tools/analysis/attention_cost.py                          # CAFormer-S18 stage 2 at 1333x800
    python tools/analysis/attention_cost.py --dim 512 --stride 32    # its stage 3
    python tools/analysis/attention_cost.py --sr-ratios 1 2 4 --batch 2 --device cuda

CAFormer attends over all tokens of stages 2 and 3. At 1333x800 (padded to 1344x800, as mmdet's
RetinaNet and Mask R-CNN pad to 32) stage 2 holds 84x50 = 4,200 tokens, so attention's products grow
with 4,200 ** 2 per head. For each ``sr_ratio`` (1: the released attention; r: keys and values from
r x r average-pooled maps, see ``Attention``) this measures one block's mixer, the norm before it
excluded: multiply-adds, the attention matrix's size were it stored (PyTorch's scaled-dot-product
kernels do not store it), the median time of a forward pass and of a training step (forward and
backward), and the peak memory of the training step above its input (CPU: growth of the resident set;
CUDA: allocator peak).
"""
import argparse
import os
import os.path as osp
import subprocess
import sys

import torch

from mmpoolformer.models import Attention

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from benchmark import _status_bytes, machine, median_time  # noqa: E402  (a sibling tool)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--image', type=int, nargs=2, default=[800, 1344], metavar=('H', 'W'),
                        help='padded input image size (default: 800 1344, i.e. 1333x800 padded to 32)')
    parser.add_argument('--stride', type=int, default=16, help='the stage\'s stride (stage 2: 16)')
    parser.add_argument('--dim', type=int, default=320, help='the stage\'s channels (S18 stage 2: 320)')
    parser.add_argument('--head-dim', type=int, default=32)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--sr-ratios', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--memory-worker', type=int, metavar='SR_RATIO', help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def setup(args, ratio, device):
    """The mixer and its input: the stage's channels on its token grid."""
    h, w = (-(-s // args.stride) for s in args.image)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.dim, h, w, device=device, requires_grad=True)
    mixer = Attention(args.dim, head_dim=args.head_dim, proj_bias=False, sr_ratio=ratio).to(device)

    def train():
        mixer.zero_grad(set_to_none=True)
        mixer(x).float().square().mean().backward()
        x.grad = None

    return mixer, x, train


def peak_bytes(args, ratio, device) -> int:
    """Peak memory of the second training step above what is allocated before it. On a CPU in a
    fresh process whose allocator returns large blocks to the system, so that the resident set
    grows and shrinks with the tensors (as ``benchmark.py`` measures)."""
    if device.type == 'cuda':
        _, _, train = setup(args, ratio, device)
        train()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='65536')
    cmd = [sys.executable, osp.abspath(__file__), '--memory-worker', str(ratio), '--image',
           *map(str, args.image), '--stride', str(args.stride), '--dim', str(args.dim),
           '--head-dim', str(args.head_dim), '--batch', str(args.batch)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f'attention_cost: the memory run failed:\n{proc.stderr[-2000:]}')
    return int(proc.stdout.split()[-1])


def memory_worker(args) -> None:
    _, _, train = setup(args, args.memory_worker, torch.device('cpu'))
    train()  # one-time allocations (thread pools, buffers) happen here
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the peak resident size (VmHWM) to the current one
    base = _status_bytes('VmRSS')
    train()
    print(_status_bytes('VmHWM') - base)


def main(argv=None):
    args = parse_args(argv)
    if args.memory_worker is not None:
        return memory_worker(args)
    device = torch.device(args.device)
    h, w = (-(-s // args.stride) for s in args.image)
    heads = args.dim // args.head_dim
    print(f'tokens: {h}x{w} = {h * w} per image, batch {args.batch}, {heads} heads of '
          f'{args.head_dim}, on {machine(device)}')
    print(f'{"sr_ratio":>8} {"keys":>6} {"GMACs":>7} {"stored matrix MiB":>17} '
          f'{"forward ms":>10} {"train ms":>9} {"train peak MiB":>14}')
    for ratio in args.sr_ratios:
        mixer, x, train = setup(args, ratio, device)
        keys = -(-h // ratio) * -(-w // ratio)
        tokens, dim = h * w, args.dim
        # q and output projections over the tokens, k and v over the keys, the two products
        macs = args.batch * (2 * tokens * dim * dim + 2 * keys * dim * dim + 2 * tokens * keys * dim)
        stored = args.batch * heads * tokens * keys * 4 / 2**20

        def forward():
            with torch.no_grad():
                mixer(x)

        fwd = median_time(forward, device, args.repeats) * 1e3
        step = median_time(train, device, args.repeats) * 1e3
        peak = peak_bytes(args, ratio, device) / 2**20
        print(f'{ratio:>8} {keys:>6} {macs / 1e9:>7.2f} {stored:>17.0f} {fwd:>10.1f} {step:>9.1f} '
              f'{peak:>14.0f}')

if __name__ == '__main__':
    main()
