"""The workload that scripts/gpu_profile.sh profiles with Nsight Compute: a
few swaps, plans, applied plans and CutMix calls on inputs of the README's
tables, each warmed up outside the profiled range, so that the profile holds
one launch of every kernel per input and nothing else. Each call is an NVTX
range named after its input and op; the calls are printed in order ("call:
...") after the profiled range.
"""

import sys

import torch

import ipsd_cuda
from ipsd_cuda._ops import apply_plan_kernel

if not (torch.cuda.is_available() and ipsd_cuda.backends()["cuda"]):
    sys.exit("profile_swap: needs a GPU and the CUDA kernel")

INPUTS = [
    # (shape, patch, dtype, channels_last)
    ((256, 3, 32, 32), 4, torch.uint8, False),
    ((256, 3, 32, 32), 4, torch.float32, False),
    ((4096, 3, 32, 32), 4, torch.uint8, False),
    ((128, 3, 224, 224), 16, torch.float32, False),
    ((128, 3, 224, 224), 16, torch.bfloat16, True),
]


def batch(shape, dtype, channels_last):
    g = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g, device="cuda").to(dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 10, shape[:1], generator=g, device="cuda")


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
