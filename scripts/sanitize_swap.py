"""Small CUDA swaps for compute-sanitizer: every unit width, partial cells, both layouts,
and every path of the plan kernels.

Each case is checked against the PyTorch fallback, so a run under
``compute-sanitizer --tool memcheck`` (or initcheck) proves both that no
access strays and that the results are right: ``apply_plan`` with every unit
width, then the whole ``swap`` (the plan kernels, fused with the exchange)
over every pairing and region, per-pair cell counts and box sizes,
mismatched halves, batches larger than one block of the pairing kernel and
an empty image, and each plan's exchanged share against the CPU's. Exits
non-zero on any mismatch.
"""

import sys

import torch

import ipsd_cuda
from ipsd_cuda import _ops
from ipsd_cuda._fallback import apply_plan_torch, make_plan_torch
from ipsd_cuda.plan import draw_keys, patch_pair

if not ipsd_cuda.backends()["cuda"]:
    sys.exit("sanitize_swap: the CUDA kernel is not built")

CASES = [
    # (shape, dtype, channels_last, patch, storage offset): the offsets and
    # odd sizes force every unit width from 1 to 16 bytes.
    ((7, 3, 13, 11), torch.uint8, False, 4, 0),
    ((7, 3, 13, 11), torch.uint8, True, (3, 5), 1),
    ((6, 3, 32, 32), torch.uint8, False, 4, 0),
    ((6, 3, 32, 32), torch.float16, True, 8, 0),
    ((5, 2, 9, 10), torch.bfloat16, False, 2, 3),
    ((8, 3, 64, 64), torch.float32, False, 16, 0),
    ((8, 3, 64, 64), torch.float32, True, 16, 0),
    ((8, 3, 30, 30), torch.float64, False, 7, 1),
    ((9, 1, 17, 19), torch.float32, True, 32, 0),
    ((4, 5, 6, 6), torch.int64, False, (1, 6), 0),
]

# (N, labels' classes, dtype of labels, image (C, H, W), patch, plan arguments)
SWAPS = [
    (6, 2, torch.int64, (3, 8, 8), 4, dict(p=1.0)),
    (7, 3, torch.int32, (3, 13, 11), (3, 5), dict(alpha=1.0)),
    (600, 5, torch.int64, (1, 6, 6), 2, dict(p=0.5)),
    (8, 2, torch.int64, (2, 9, 9), 3, dict(pairing="halves", p=1.0)),
    (5, 2, torch.int64, (1, 64, 64), 1, dict(p=1.0)),
    (4, 1, torch.int64, (0, 8, 8), 4, dict(p=1.0)),
    # Mismatched halves: those pairs stay unpaired, the error names the first.
    (8, 4, torch.int32, (2, 9, 9), 3, dict(pairing="halves", swap_ratio=0.2)),
    # Across classes, one box per pair: pixel boxes with per-pair sizes, boxes
    # of partial cells, an odd batch larger than one block, a one-column grid.
    (9, 3, torch.int64, (3, 13, 11), 1, dict(pairing="any", region="box", alpha=1.0, p=1.0)),
    (7, 3, torch.int32, (2, 13, 11), (3, 5), dict(pairing="any", region="box", swap_ratio=0.9)),
    (601, 7, torch.int64, (1, 6, 6), 2, dict(pairing="any", region="box")),
    (8, 2, torch.int64, (2, 9, 3), 3, dict(pairing="halves", region="box", p=1.0)),
    (6, 2, torch.int64, (1, 8, 8), 4, dict(pairing="any", p=1.0)),
]

failures = 0


def report(ok, what):
    global failures
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {what}")


for shape, dtype, channels_last, patch, offset in CASES:
    g = torch.Generator(device="cuda").manual_seed(0)
    numel = torch.Size(shape).numel()
    base = torch.randint(0, 100, (numel + offset,), device="cuda", generator=g).to(dtype)
    n, c, h, w = shape
    x = base[offset:]
    # A view into a larger buffer, so the offset shifts the alignment.
    x = x.view(n, h, w, c).permute(0, 3, 1, 2) if channels_last else x.view(shape)
    labels = torch.randint(0, 3, (shape[0],), device="cuda", generator=g)
    plan = ipsd_cuda.make_plan(labels, ipsd_cuda.grid_for(x, patch), generator=g)
    expected = x.clone()
    ipsd_cuda.apply_plan(expected, plan, patch_size=patch, backend="torch")
    ipsd_cuda.apply_plan(x, plan, patch_size=patch, backend="kernel")
    torch.cuda.synchronize()
    report(torch.equal(x, expected), f"apply {tuple(shape)} {dtype} channels_last={channels_last} patch={patch} offset={offset}")

for n, classes, label_dtype, image, patch, kwargs in SWAPS:
    g = torch.Generator(device="cuda").manual_seed(1)
    labels = torch.randint(0, classes, (n,), device="cuda", generator=g, dtype=label_dtype)
    if kwargs.get("pairing") == "halves" and classes == 2:
        labels[n // 2 :] = labels[: n // 2]
    x = torch.randint(0, 256, (n, *image), device="cuda", generator=g, dtype=torch.uint8)
    grid = ipsd_cuda.grid_for(x, patch)
    ph, pw = patch_pair(patch)
    arguments = dict(swap_ratio=0.5, alpha=None, p=0.5, pairing="random", region="cells") | kwargs
    # The op layer directly: a swap would raise for the mismatched halves of
    # one case on the next call, before comparing.
    draw = draw_keys(labels, grid[0] * grid[1], **arguments, generator=g)
    y = x.clone()
    sizes = (draw.keys, draw.pair_size, draw.size, draw.threshold)
    got = _ops.swap_kernel(y, labels, *sizes, ph, pw, draw.pairing, draw.region)
    want = make_plan_torch(labels, *sizes, grid, draw.pairing, draw.region)
    expected = x.clone()
    apply_plan_torch(expected, want[0], want[1], ph, pw)
    torch.cuda.synchronize()
    same = all(torch.equal(a, b) for a, b in zip(got, want)) and torch.equal(y, expected)
    report(same, f"swap N={n} labels {label_dtype} image {image} patch={patch} {kwargs}")
    if image[1] * image[2]:
        plan = ipsd_cuda.SwapPlan(*got[:2])
        share = plan.share(image[1:], patch)
        with_fallback = plan.to("cpu").share(image[1:], patch)
        report(torch.equal(share.cpu(), with_fallback), f"share N={n} image {image} patch={patch} {kwargs}")
sys.exit(1 if failures else 0)
