"""Shared helpers: random-bit tensors, bitwise comparison, a plain-loop reference, devices."""

import os

import pytest
import torch
from hypothesis import settings

import ipsd_cuda

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=250, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

IMAGE_DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64]
TARGET_DTYPES = IMAGE_DTYPES + [torch.int64]
_INT_OF = {
    torch.uint8: torch.uint8,
    torch.int64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]


def random_bits(shape, dtype, *, generator, channels_last=False, device="cpu", storage_offset=0):
    """A tensor of random bytes (every bit pattern, NaN payloads included).

    With ``storage_offset`` it is a view into a larger random buffer, which
    shifts its alignment and leaves guard bytes on both sides (see ``guard_bytes``).
    """
    int_dtype = _INT_OF[dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for s in shape:
        numel *= s
    total = numel + 2 * storage_offset + 8
    raw = torch.randint(0, 256, (total, itemsize), dtype=torch.uint8, generator=generator)
    flat = raw.view(int_dtype).view(-1).to(device)
    if channels_last:
        n, c, h, w = shape
        view = flat.as_strided((n, c, h, w), (h * w * c, 1, w * c, c), storage_offset)
    else:
        strides, acc = [], 1
        for s in reversed(shape):
            strides.append(acc)
            acc *= s
        view = flat.as_strided(tuple(shape), tuple(reversed(strides)), storage_offset)
    return view.view(dtype)


def bits(t):
    """``t`` viewed as same-width integers, for bit-for-bit comparison."""
    return t.view(_INT_OF.get(t.dtype, t.dtype))


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a).cpu(), bits(b).cpu())


def guard_bytes(t):
    """The bytes of ``t``'s storage outside its own (dense) span: nothing may write there."""
    storage = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
    start = t.storage_offset() * t.element_size()
    end = start + t.numel() * t.element_size()
    return torch.cat([storage[:start], storage[end:]]).cpu()


def reference_apply(x, plan, patch_size):
    """The exchange written as plainly as possible: a loop over pairs and cells."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    out = x.clone()
    partner = plan.partner.tolist()
    mask = plan.mask.cpu()
    for i, j in enumerate(partner):
        if j <= i:
            continue
        for r in range(mask.shape[1]):
            for c in range(mask.shape[2]):
                if mask[i, r, c]:
                    rows = slice(r * ph, (r + 1) * ph)
                    cols = slice(c * pw, (c + 1) * pw)
                    out[i, ..., rows, cols] = x[j, ..., rows, cols]
                    out[j, ..., rows, cols] = x[i, ..., rows, cols]
    return out


def kernel_available(device):
    return ipsd_cuda.kernel_available(device)
