"""Where a training step's time goes on a CPU, beside the floor it is measured against.

    python tools/analysis/cpu_profile.py                     # ours, PoolFormer-S12, batch 2, 512x512
    python tools/analysis/cpu_profile.py --amp bf16 --impls ours timm --json cpu_profile.json

For each implementation (``benchmark.py``'s models, weights, input and step): the step's time
(median of unprofiled steps), and its operators by their own time on the thread that runs it
(``torch.profiler``), grouped into products (and convolutions, attention), activations, norms,
pooling, copies, other element-wise passes and sums, the compiled MLP loop's own work, and the
framework (Python, autograd, views and allocations). The profiler records the operators of that
thread only: where a compiled loop shares chunks among the threads, the others run theirs alongside
it, and an operator's other threads work inside its own time, so that thread's time is the step's.

Beside them the floor (``benchmark.product_floor``: the backbone's products and convolutions each
alone on the fastest way, and one after another): the floor goal (issue 16) asks that everything
but the products take less than 15% of it. ``rest`` below is the step's time less that of its
products, both measured here.
"""
import argparse
import json
import os.path as osp
import statistics
import sys
from typing import Dict

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import benchmark  # noqa: E402  (this folder's: the same models, weights and steps)

GOAL = 0.15  # what the floor goal allows beyond the floor, as a share of it

# names of views and allocations: the framework's bookkeeping, no pass over memory
VIEWS = {'empty', 'empty_like', 'empty_strided', 'new_empty', 'view', 'as_strided', 'narrow',
         'slice', 'select', 'reshape', 'permute', 'expand', 'flatten', 'unflatten', 'unsqueeze',
         'squeeze', 't', 'transpose', 'detach', 'alias', 'split', 'chunk', 'unbind', 'resize_',
         'contiguous', 'to', 'item', '_local_scalar_dense', 'lift_fresh', 'result_type',
         'AccumulateGrad'}
# kinds by fragments of the operator's name (after its namespace), first match wins
KINDS = (('products', ('mm', 'linear', 'conv', 'attention', 'depthwise', 'matmul')),
         ('MLP loop', ('mlp_forward', 'mlp_backward', 'sep_conv_forward')),
         ('activations', ('gelu', 'relu', 'softmax')),
         ('norms', ('norm', 'row_stats', 'affine')),
         ('pooling', ('pool', )),
         ('copies', ('copy', 'fill', 'zero', 'clone', 'cat', 'stack')))


def kind_of(name: str) -> str:
    """The kind of a profiled operator: ``aten::addmm_`` a product, ``mmpoolformer::row_stats`` a
    norm; Python's autograd functions and autograd's nodes (no namespace, or ``autograd::``) and
    views the framework; any other operator an element-wise pass or sum."""
    if '::' not in name or name.startswith('autograd::'):
        return 'framework'
    op = name.rsplit('::', 1)[1]
    if op in VIEWS:
        return 'framework'
    for kind, fragments in KINDS:
        if any(f in op for f in fragments):
            return kind
    return 'element-wise'


def profile_step(model, x, amp, steps=2, timed_steps=7) -> dict:
    """Milliseconds of a training step (median of ``timed_steps`` unprofiled) and, profiled over
    ``steps``, of each operator on the calling thread, and by kind."""
    from torch.profiler import ProfilerActivity, profile

    def step():
        model.zero_grad(set_to_none=True)
        benchmark.train_step(model, x, amp)

    for _ in range(3):  # (our kernels' plans are timed in the first steps)
        step()
    step_ms = statistics.median(benchmark.timed(step, x.device) for _ in range(timed_steps)) * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    by_thread: Dict[int, Dict[str, list]] = {}
    for event in prof.events():
        ops = by_thread.setdefault(event.thread, {})
        ms_calls = ops.setdefault(event.name, [0.0, 0])
        ms_calls[0] += event.self_cpu_time_total / 1e3 / steps
        ms_calls[1] += 1
    # the thread that ran the step: the one with the most time (the others, if any were recorded,
    # ran inside its operators)
    ops = max(by_thread.values(), key=lambda o: sum(ms for ms, _ in o.values()))
    kinds: Dict[str, float] = {}
    for name, (ms, _) in ops.items():
        kind = kind_of(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    top = sorted(((name, ms, calls // steps) for name, (ms, calls) in ops.items()),
                 key=lambda t: -t[1])[:25]
    products = kinds.get('products', 0.0)
    return dict(step_ms=step_ms, thread_ms=sum(kinds.values()), kinds=kinds, top=top,
                products_ms=products, rest_ms=step_ms - products)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--family', default='poolformer', choices=sorted(benchmark.FAMILIES))
    parser.add_argument('--arch', help="the family's size (default: its smallest)")
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, nargs=2, default=(512, 512), metavar=('H', 'W'))
    parser.add_argument('--amp', choices=['bf16'], help='the step under bf16 autocast')
    parser.add_argument('--impls', nargs='+', default=['ours'], choices=['ours', *benchmark.PEERS])
    parser.add_argument('--no-floor', action='store_true', help='skip timing the floor')
    parser.add_argument('--json', help='also write the results here')
    args = parser.parse_args(argv)
    benchmark.resolve_arch(parser, args)
    if args.batch < 1 or min(args.size) < 32:
        parser.error('--batch must be >= 1 and --size at least 32 x 32')
    for impl in args.impls:
        reason = benchmark.unavailable(impl, args.family)
        if reason:
            parser.error(f'{impl}: {reason}')
    device = torch.device('cpu')
    official = benchmark.shared_weights(args.family, args.arch)
    x = benchmark.bench_input(args, device)
    results = dict(machine=benchmark.machine(device), args=vars(args), profiles={})
    precision = 'bf16 autocast' if args.amp else 'fp32'
    print(f'{benchmark.FAMILIES[args.family].__name__}-{args.arch.upper()}, batch {args.batch}, '
          f'{args.size[0]}x{args.size[1]}, {precision}, {torch.get_num_threads()} threads')
    for impl in args.impls:
        model = benchmark.build(impl, args.family, args.arch)
        benchmark.load_weights(model, impl, official)
        model.train()  # (not chained: mmpretrain's train() returns None)
        prof = results['profiles'][impl] = profile_step(model, x, args.amp)
        print(f'\n{impl}: a training step {prof["step_ms"]:.1f} ms; its thread\'s operators '
              f'{prof["thread_ms"]:.1f} ms (profiled), by kind:')
        for kind, ms in sorted(prof['kinds'].items(), key=lambda kv: -kv[1]):
            print(f'  {kind:<13}{ms:8.1f} ms')
        print('  the operators that took longest (ms, calls a step):')
        for name, ms, calls in prof['top'][:15]:
            print(f'  {ms:8.2f} {calls:5d}  {name[:100]}')
    if not args.no_floor:
        ours = benchmark.build('ours', args.family, args.arch).to(device)
        alone, in_sequence = benchmark.product_floor(ours, x, args, device)
        floor_ms = alone[1] * 1e3
        results['floor'] = dict(train_ms=floor_ms, train_in_sequence_ms=in_sequence[1] * 1e3,
                                allowed_rest_ms=GOAL * floor_ms)
        print(f'\nfloor: the products alone {floor_ms:.1f} ms a training step, one after another '
              f'{in_sequence[1] * 1e3:.1f} ms; the goal allows {GOAL * floor_ms:.1f} ms beyond it')
        for impl, prof in results['profiles'].items():
            prof['beyond_floor'] = prof['step_ms'] / floor_ms - 1
            prof['rest_share_of_floor'] = prof['rest_ms'] / floor_ms
            print(f'{impl}: {prof["beyond_floor"]:+.0%} beyond the floor; its products '
                  f'{prof["products_ms"]:.1f} ms in the step, the rest {prof["rest_ms"]:.1f} ms = '
                  f'{prof["rest_share_of_floor"]:.0%} of the floor')
    print(f'\nmachine: {results["machine"]}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == '__main__':
    main()
