"""Where a training step's time goes on a CUDA device, and two checks of PyTorch's CUDA kernels.

    python tools/analysis/gpu_profile.py --size 800 1216 --amp bf16 --json gpu_profile.json

For each implementation (ours, timm's; the same weights, as in ``benchmark.py``): the GPU kernels of
one training step by their time (``torch.profiler``), grouped into products, normalisation, pooling,
element-wise work and copies, so that what fusing can win is read off before writing a kernel; with
``--compile`` and ``--cuda-graphs`` the step under ``torch.compile`` and replayed from CUDA graphs, the
honest alternatives to writing kernels.

The checks, on the PyTorch at hand:
- pooling: ``avg_pool2d(3, 1, 1, count_include_pad=False)``'s output and input gradient on
  channels-last maps against NCHW ones and against float64 (PyTorch issue 188344: channels-last
  backward with padding gave wrong gradients on CUDA in some versions);
- GroupNorm(1, C) at each stage's shape, PyTorch's and ours (``kernels.group_normalize``): forward
  and forward + backward time against the time of moving its bytes once at the copy bandwidth
  measured here (PyTorch's statistics use one block per sample and group, which leaves most of a
  large GPU idle at batch 2).
"""
import argparse
import json
import os.path as osp
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import benchmark  # noqa: E402  (this folder's: the same models, weights and steps)

from mmpoolformer import kernels  # noqa: E402
from mmpoolformer.models.layers import GroupNorm  # noqa: E402

# kernel-name fragments by kind, first match wins (cuBLAS / cuDNN / CUTLASS names vary by version)
KINDS = (('product', ('gemm', 'cutlass', 'conv', 'xmma', 'sm90', 'cudnn', 'wgrad', 'dgrad',
                      'nhwc', 'implicit', 'cublas', 'winograd')),
         ('norm', ('norm', 'moments', 'welford', 'rowwisemoments')),
         ('pooling', ('pool', )),
         ('copy', ('copy', 'memcpy', 'memset', 'cat', 'transpose', 'fill')),
         ('element-wise', ('elementwise', 'vectorized', 'reduce', 'gelu', 'mul', 'add')))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, fragments in KINDS:
        if any(f in low for f in fragments):
            return kind
    return 'other'


def profile_step(model, x, amp, steps=3) -> dict:
    """GPU microseconds per training step by kernel, and by kind."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        benchmark.train_step(model, x, amp)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            benchmark.train_step(model, x, amp)
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.time_range.elapsed_us() / steps
    kinds = {}
    for name, us in kernels.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + us
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:30]
    return dict(total_us=sum(kernels.values()), kinds=kinds, top=top)


def compiled_step_times(model, x, amp, steps=10) -> dict:
    """Milliseconds of a training step eager and under ``torch.compile`` (median of ``steps``), and
    the seconds the first compiled step took (compiling). Ours compiles its plain formulation: the
    kernels step aside for compilers (``kernels.dispatch.tracing``)."""
    import time

    def step(m):
        m.zero_grad(set_to_none=True)
        benchmark.train_step(m, x, amp)

    eager = event_time(lambda: step(model), steps)
    compiled = torch.compile(model)
    torch.cuda.synchronize()
    start = time.perf_counter()
    step(compiled)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    return dict(eager_ms=eager, compiled_ms=event_time(lambda: step(compiled), steps),
                compile_s=compile_s)


def graphed_step_ms(model, x, amp, steps=10) -> dict:
    """Milliseconds of a training step replayed from CUDA graphs of forward and backward
    (``torch.cuda.make_graphed_callables``: no launch overhead), or why it could not be captured.
    Captured after the eager steps, so that our kernels' plans are chosen (their timing syncs) and
    then only replayed."""
    dtype = benchmark.AMP_DTYPES[amp]
    try:
        graphed = torch.cuda.make_graphed_callables(model, (x, ))

        def step():
            model.zero_grad(set_to_none=False)  # (the graphs write into the same gradient tensors)
            with torch.autocast('cuda', dtype=dtype, enabled=dtype is not None, cache_enabled=False):
                outs = graphed(x)
                loss = sum(o.float().mean() for o in outs)
            loss.backward()

        return dict(graphed_ms=event_time(step, steps))
    except Exception as e:  # noqa: BLE001  (a report, not a failure: say why)
        return dict(graphed_error=f'{type(e).__name__}: {e}'[:500])


def event_time(fn, repeats=20) -> float:
    """Median milliseconds of ``fn`` by CUDA events, after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, read and write counted."""
    a = torch.randn(2**28, device='cuda')
    b = torch.empty_like(a)
    ms = event_time(lambda: b.copy_(a))
    return 2 * a.numel() * 4 / (ms / 1e3)


def check_pooling(shapes) -> list:
    rows = []
    for shape in shapes:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x64 = torch.randn(shape, dtype=torch.float64)
            w64 = torch.randn(shape, dtype=torch.float64)
            results = {}
            for layout in ('float64', torch.contiguous_format, torch.channels_last):
                if layout == 'float64':
                    x, w = x64.clone().requires_grad_(), w64
                else:
                    x = x64.to('cuda', dtype).contiguous(memory_format=layout).requires_grad_()
                    w = w64.to('cuda', dtype).contiguous(memory_format=layout)
                y = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
                (y * w).sum().backward()
                results[str(layout)] = (y.detach().double().cpu(), x.grad.double().cpu())
            ref_y, ref_g = results.pop('float64')

            def err(a, b):
                return ((a - b).abs().max() / b.abs().max()).item()

            for layout, (y, g) in results.items():
                rows.append(dict(shape=list(shape), dtype=str(dtype), layout=layout,
                                 out_err=err(y, ref_y), grad_err=err(g, ref_g)))
    return rows


def time_group_norm(shapes, dtype, bandwidth) -> list:
    rows = []
    for shape in shapes:
        x = torch.randn(shape, device='cuda', dtype=dtype).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        norm = torch.nn.GroupNorm(1, shape[1]).cuda().to(dtype)
        ours = GroupNorm(1, shape[1]).cuda().to(dtype)
        gy = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        # forward reads x and writes y; backward reads x and dy and writes dx: 5 passes at least
        row = dict(shape=list(shape), dtype=str(dtype), bytes_floor_train_ms=5 * nbytes / bandwidth * 1e3)
        with kernels.forced(kernels.Plan()):
            for name, module in (('pytorch', norm), ('ours', ours)):
                row[f'{name}_forward_ms'] = event_time(lambda: module(x))
                row[f'{name}_train_ms'] = event_time(
                    lambda: torch.autograd.backward(module(x), gy))
        rows.append(row)
    return rows


def checks(args, results):
    results['pooling'] = check_pooling([(2, 64, 61, 45), (2, 64, 200, 304)])
    worst = max(results['pooling'], key=lambda r: r['grad_err'] / (1e-6 if 'float32' in r['dtype']
                                                                     else 1e-2))
    print('pooling, worst gradient error against float64:', worst)
    bandwidth = results['copy_bytes_per_s'] = copy_bandwidth()
    print(f'copy bandwidth {bandwidth / 1e12:.2f} TB/s')
    h, w = (s // 4 for s in args.size)
    shapes = [(args.batch, c, h >> i, w >> i) for i, c in enumerate((64, 128, 320, 512))]
    for dtype in (torch.float32, torch.bfloat16):
        for row in time_group_norm(shapes, dtype, bandwidth):
            results.setdefault('group_norm', []).append(row)
            print('GroupNorm(1, C)', row)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--family', default='poolformer', choices=sorted(benchmark.FAMILIES))
    parser.add_argument('--arch', default=None)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, nargs=2, default=(800, 1216))
    parser.add_argument('--amp', choices=['bf16', 'fp16'])
    parser.add_argument('--impls', nargs='+', default=['ours', 'timm'])
    parser.add_argument('--compile', action='store_true',
                        help='also time each implementation under torch.compile')
    parser.add_argument('--cuda-graphs', action='store_true',
                        help='also time each implementation replayed from CUDA graphs')
    parser.add_argument('--no-checks', action='store_true',
                        help='skip the pooling and GroupNorm checks')
    parser.add_argument('--json')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit('gpu_profile: no CUDA device')
    args.arch = args.arch or next(iter(benchmark.FAMILIES[args.family].arch_zoo))
    device = torch.device('cuda')
    results = dict(machine=benchmark.machine(device), args=vars(args))

    if not args.no_checks:
        checks(args, results)

    official = benchmark.shared_weights(args.family, args.arch)
    x = benchmark.bench_input(args, device)

    def built(impl):
        model = benchmark.build(impl, args.family, args.arch)
        benchmark.load_weights(model, impl, official)
        return model.to(device).train()

    def save():  # after every measurement: what was measured survives a later crash
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(results, f, indent=1)

    for impl in args.impls:
        model = built(impl)
        prof = results.setdefault('profiles', {})[impl] = profile_step(model, x, args.amp)
        print(f'\n{impl}: {prof["total_us"] / 1e3:.2f} ms of GPU kernels a step; by kind (ms): ' +
              ', '.join(f'{k} {v / 1e3:.2f}' for k, v in sorted(prof['kinds'].items(),
                                                                 key=lambda kv: -kv[1])))
        for name, us in prof['top'][:15]:
            print(f'  {us / 1e3:7.3f} ms  {name[:110]}')
        save()
        if args.compile:
            times = results.setdefault('compiled', {})[impl] = compiled_step_times(model, x, args.amp)
            print(f'{impl} training step: eager {times["eager_ms"]:.2f} ms, torch.compile '
                  f'{times["compiled_ms"]:.2f} ms (compiled in {times["compile_s"]:.0f} s)')
            save()
        del model
        torch.cuda.empty_cache()
    # last: a capture that fails can leave the device unusable for what would follow
    for impl in args.impls if args.cuda_graphs else ():
        model = built(impl)
        for _ in range(3):  # eager steps first: our plans are chosen (timed) before the capture
            model.zero_grad(set_to_none=True)
            benchmark.train_step(model, x, args.amp)
        graphed = results.setdefault('cuda_graphs', {})[impl] = graphed_step_ms(model, x, args.amp)
        print(f'{impl} training step from CUDA graphs: '
              + (f'{graphed["graphed_ms"]:.2f} ms' if 'graphed_ms' in graphed
                 else graphed['graphed_error']))
        save()
        del model
        torch.cuda.empty_cache()

if __name__ == '__main__':
    main()
