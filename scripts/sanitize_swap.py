"""Small CUDA swaps for compute-sanitizer: every unit width, partial cells, both layouts.

Each case is checked against the PyTorch fallback, so a run under
``compute-sanitizer --tool memcheck`` proves both that no access strays and
that the results are right. Exits non-zero on any mismatch.
"""

import sys

import torch

import ipsd_cuda

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

failures = 0
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
    ok = torch.equal(x, expected)
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {tuple(shape)} {dtype} channels_last={channels_last} patch={patch} offset={offset}")
sys.exit(1 if failures else 0)
