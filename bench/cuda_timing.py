"""CUDA timings that pytest-benchmark cannot take: many calls between two CUDA
events, with no synchronisation inside, and the kernel launches of one call.

    python bench/cuda_timing.py [--calls 200] [--json out.json]

For each input: the whole ``swap`` per call, eager and replayed from a CUDA
graph, a copy of the batch for reference (``dst.copy_(src)``), the kernel
launches of one eager ``swap`` (from ``torch.profiler``), and the bandwidth
of applying a fixed plan (the bytes the swap must move over the time) against
the copy's. Then the same for ``ipsd_cuda.CutMix`` (a box per pair, soft
targets included), and the swap's scaling in the batch size N (3x32x32 P4
uint8, N = 64 ... 8192): the whole swap, replayed from a graph, beside its
stages timed alone (drawing the keys, drawing a plan without data, applying a
fixed plan), so that where the time goes shows without hardware counters.
Prints three Markdown tables.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import ipsd_cuda
from ipsd_cuda._ops import apply_plan_kernel
from ipsd_cuda.plan import KEY_BITS

sys.path.insert(0, str(Path(__file__).parent))
from test_bench_swap import moved_bytes  # noqa: E402

INPUTS = [
    # (shape, patch, dtype, channels_last)
    ((256, 3, 32, 32), 4, torch.uint8, False),
    ((256, 3, 32, 32), 4, torch.float32, False),
    ((256, 3, 32, 32), 4, torch.float32, True),
    ((128, 3, 224, 224), 16, torch.float32, False),
    ((128, 3, 224, 224), 16, torch.float32, True),
    ((128, 3, 224, 224), 16, torch.bfloat16, True),
]


# The scaling table's batch sizes, at 3x32x32 P4 uint8.
SCALING_N = [64, 256, 1024, 4096, 8192]

CUTMIX_INPUTS = [
    # (shape, dtype, channels_last)
    ((256, 3, 32, 32), torch.uint8, False),
    ((256, 3, 32, 32), torch.float32, False),
    ((128, 3, 224, 224), torch.float32, False),
    ((128, 3, 224, 224), torch.bfloat16, True),
]


def per_call(fn, calls):
    """Seconds per call of ``fn``, timed by CUDA events around ``calls`` calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def launches(fn):
    """Kernels one call of ``fn`` launches (memory copies and sets not counted)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(
        1
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    )


def batch(shape, dtype, channels_last):
    """Images of ``dtype`` (values 0-255) and labels of 10 classes, on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g, device="cuda").to(dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 10, shape[:1], generator=g, device="cuda")


def captured(fn):
    """A CUDA graph of one call of ``fn``, warmed up on a side stream first."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        fn()
    return graph


def measure(shape, patch, dtype, channels_last, calls):
    images, labels = batch(shape, dtype, channels_last)
    dst = torch.empty_like(images)
    swap = lambda: ipsd_cuda.swap(images, labels, patch_size=patch, p=1.0)  # noqa: E731
    plan = ipsd_cuda.make_plan(labels, ipsd_cuda.grid_for(images, patch), p=1.0)
    apply = lambda: apply_plan_kernel(images, plan.partner, plan.mask, patch, patch)  # noqa: E731
    graph = captured(swap)

    copy_s = per_call(lambda: dst.copy_(images), calls)
    apply_s = per_call(apply, calls)
    copy_bw = 2 * images.numel() * images.element_size() / copy_s
    return dict(
        input=f"{'x'.join(map(str, shape))} P{patch} {str(dtype)[6:]} {'channels_last' if channels_last else 'contiguous'}",
        swap_us=per_call(swap, calls) * 1e6,
        graph_us=per_call(graph.replay, calls) * 1e6,
        copy_us=copy_s * 1e6,
        launches=launches(swap),
        apply_share_of_copy=moved_bytes(images, plan, patch) / apply_s / copy_bw,
    )


def measure_cutmix(shape, dtype, channels_last, calls):
    images, labels = batch(shape, dtype, channels_last)
    dst = torch.empty_like(images)
    cutmix = ipsd_cuda.CutMix(10)
    mix = lambda: cutmix(images, labels)  # noqa: E731
    graph = captured(mix)
    return dict(
        input=f"{'x'.join(map(str, shape))} {str(dtype)[6:]} {'channels_last' if channels_last else 'contiguous'}",
        eager_us=per_call(mix, calls) * 1e6,
        graph_us=per_call(graph.replay, calls) * 1e6,
        copy_us=per_call(lambda: dst.copy_(images), calls) * 1e6,
        launches=launches(mix),
    )


def measure_scaling(n, calls):
    images, labels = batch((n, 3, 32, 32), torch.uint8, False)
    grid = ipsd_cuda.grid_for(images, 4)
    swap = lambda: ipsd_cuda.swap(images, labels, patch_size=4, p=1.0)  # noqa: E731
    plan = ipsd_cuda.make_plan(labels, grid, p=1.0)
    return dict(
        n=n,
        graph_us=per_call(captured(swap).replay, calls) * 1e6,
        swap_us=per_call(swap, calls) * 1e6,
        keys_us=per_call(captured(lambda: torch.randint(0, 1 << KEY_BITS, (n + n // 2,), device="cuda")).replay, calls)
        * 1e6,
        plan_us=per_call(captured(lambda: ipsd_cuda.make_plan(labels, grid, p=1.0)).replay, calls) * 1e6,
        apply_us=per_call(lambda: apply_plan_kernel(images, plan.partner, plan.mask, 4, 4), calls) * 1e6,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and ipsd_cuda.backends()["cuda"]):
        sys.exit("cuda_timing: needs a GPU and the CUDA kernel")
    rows = [measure(*spec, args.calls) for spec in INPUTS]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.calls} calls per timing\n")
    print("| input | swap (eager) | swap (graph replay) | copy of the batch | swap ÷ copy | launches | apply ÷ copy bandwidth |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['input']} | {r['swap_us']:.1f} µs | {r['graph_us']:.1f} µs | {r['copy_us']:.1f} µs | "
            f"{r['swap_us'] / r['copy_us']:.1f} | {r['launches']} | {r['apply_share_of_copy']:.0%} |"
        )
    cutmix_rows = [measure_cutmix(*spec, args.calls) for spec in CUTMIX_INPUTS]
    print("\nCutMix, a box per pair, soft targets included (alpha 1, every pair)\n")
    print("| input | eager | graph replay | copy of the batch | launches |")
    print("|---|---|---|---|---|")
    for r in cutmix_rows:
        print(f"| {r['input']} | {r['eager_us']:.1f} µs | {r['graph_us']:.1f} µs | {r['copy_us']:.1f} µs | "
              f"{r['launches']} |")
    scaling_rows = [measure_scaling(n, args.calls) for n in SCALING_N]
    base = next(r["graph_us"] for r in scaling_rows if r["n"] == 256)
    print("\nScaling in N, Nx3x32x32 P4 uint8 (graph replay, but eager swap and apply)\n")
    print("| N | swap (graph) | ÷ N = 256 | swap (eager) | keys alone | plan alone | apply alone |")
    print("|---|---|---|---|---|---|---|")
    for r in scaling_rows:
        print(f"| {r['n']} | {r['graph_us']:.1f} µs | {r['graph_us'] / base:.2f} | {r['swap_us']:.1f} µs | "
              f"{r['keys_us']:.1f} µs | {r['plan_us']:.1f} µs | {r['apply_us']:.1f} µs |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"swap": rows, "cutmix": cutmix_rows, "scaling": scaling_rows}, indent=1)
        )


if __name__ == "__main__":
    main()
