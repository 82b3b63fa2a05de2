"""The workload that scripts/gpu_profile.sh profiles with Nsight Compute: a
few swaps, plans, applied plans and CutMix calls on inputs of the README's
tables, each warmed up outside the profiled range, so that the profile holds
one launch of every kernel per input and nothing else. Each call is an NVTX
range named after its input and op; the calls are printed in order ("call:
...") after the profiled range.
"""

import sys
from pathlib import Path

import torch

import ipsd_cuda
from ipsd_cuda._ops import apply_plan_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from cuda_timing import INPUTS as TIMED_INPUTS  # noqa: E402
from cuda_timing import batch  # noqa: E402

if not (torch.cuda.is_available() and ipsd_cuda.backends()["cuda"]):
    sys.exit("profile_swap: needs a GPU and the CUDA kernel")

# The inputs of bench/cuda_timing.py's first table, and a large batch, where
# the pairing's share of the time shows.
INPUTS = [*TIMED_INPUTS, ((4096, 3, 32, 32), 4, torch.uint8, False)]


def calls(shape, patch, dtype, channels_last):
    """The profiled calls of one input, by name."""
    images, labels = batch(shape, dtype, channels_last)
    grid = ipsd_cuda.grid_for(images, patch)
    plan = ipsd_cuda.make_plan(labels, grid, p=1.0)
    cutmix = ipsd_cuda.CutMix(10)
    return {
        "swap": lambda: ipsd_cuda.swap(images, labels, patch_size=patch, p=1.0),
        "make_plan": lambda: ipsd_cuda.make_plan(labels, grid, p=1.0),
        "apply_plan": lambda: apply_plan_kernel(images, plan.partner, plan.mask, patch, patch),
        "CutMix": lambda: cutmix(images, labels),
    }


def main():
    work = []
    for spec in INPUTS:
        shape, patch, dtype, channels_last = spec
        name = f"{'x'.join(map(str, shape))} P{patch} {str(dtype)[6:]}{' channels_last' if channels_last else ''}"
        for call, fn in calls(*spec).items():
            fn()  # warm up: the allocator and lazy module loading stay out of the profile
            work.append((f"{name}: {call}", fn))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for label, fn in work:
        torch.cuda.nvtx.range_push(label)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    for label, _ in work:
        print(f"call: {label}")


if __name__ == "__main__":
    main()
