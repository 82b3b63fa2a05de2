"""The only module that touches ``torch.ops.ipsd_cuda``: loading the extension,
what it was built with, a typed wrapper per op, and the fake (meta) kernels
that let ``torch.compile`` trace through them."""

import importlib
import os
import warnings
from types import ModuleType
from typing import Optional, Union

import torch

# Imported by name so that a type checker, which has no stub for the compiled
# module, sees an optional module rather than a missing attribute.
_C: Optional[ModuleType] = None
if os.environ.get("IPSD_FORCE_FALLBACK") != "1":
    try:
        _C = importlib.import_module("._C", __package__)
    except (ImportError, OSError) as err:
        warnings.warn(
            f"ipsd_cuda: the C++/CUDA extension could not be loaded ({err}); every "
            "swap uses the pure-PyTorch fallback, which gives the same results, "
            "slower. Build it with `pip install --no-build-isolation .` "
            "(set IPSD_FORCE_FALLBACK=1 to silence this).",
            RuntimeWarning,
            stacklevel=2,
        )

# What backends() reports, read once: every swap consults it.
_BUILT = {"cpu": _C is not None, "cuda": _C is not None and bool(_C.WITH_CUDA)}


def backends() -> dict:
    """Which kernels were compiled into this installation, per device type.

    ``"cuda": True`` means the CUDA kernel was built, not that it can run
    here: the machine may have no GPU, or a driver too old for the toolkit
    it was built with. :func:`kernel_available` says whether a swap on a
    given device will use a kernel.

    Returns:
        ``{"cpu": bool, "cuda": bool}``. Both are False when the extension was
        not built, failed to load, or ``IPSD_FORCE_FALLBACK=1`` was set at
        import; the pure-PyTorch fallback is then used everywhere.

    Example:
        >>> import ipsd_cuda
        >>> ipsd_cuda.backends()  # doctest: +SKIP
        {'cpu': True, 'cuda': True}
    """
    return dict(_BUILT)


def kernel_available(device: Union[torch.device, str, int, torch.Tensor]) -> bool:
    """Whether a swap of tensors on ``device`` runs a kernel (else the fallback).

    True when the kernel for the device's type was built (:func:`backends`)
    and the device exists: for CUDA, torch must see a GPU with that index.
    A GPU whose architecture the build left out of ``TORCH_CUDA_ARCH_LIST``
    still counts as available; its first swap then fails with CUDA's "no
    kernel image is available for execution on the device".

    Args:
        device: a ``torch.device``, a string such as ``"cpu"`` or
            ``"cuda:1"``, or a tensor (its device).

    Example:
        >>> import ipsd_cuda
        >>> ipsd_cuda.kernel_available("cpu") == ipsd_cuda.backends()["cpu"]
        True
    """
    device = device.device if isinstance(device, torch.Tensor) else torch.device(device)
    if not backends().get(device.type, False):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return True


BACKENDS = ("auto", "kernel", "torch")


def use_kernel(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` runs the extension's kernel on ``device`` (else the fallback)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if _BUILT.get(device.type, False):
        return True
    if backend == "kernel":
        raise RuntimeError(
            f"backend='kernel' but ipsd_cuda has no {device.type} kernel "
            f"(built: {backends()}); reinstall with `pip install --no-build-isolation .`"
            + (
                " with a CUDA build of torch and the CUDA toolkit (nvcc) installed; FORCE_CUDA=1 "
                "makes a missing toolkit a build error instead of a CPU-only build"
                if device.type == "cuda"
                else ""
            )
        )
    return False


def make_plan_kernel(labels, keys, pair_size, size: int, threshold: int, grid, pairing: int, region: int):
    """Run ``ipsd_cuda::make_plan``: ``(partner, mask, error)`` on the labels' device."""
    return torch.ops.ipsd_cuda.make_plan.default(
        labels.contiguous(), keys, pair_size, size, threshold, grid[0], grid[1], pairing, region
    )


def swap_kernel(x, labels, keys, pair_size, size: int, threshold: int, patch_h: int, patch_w: int, pairing: int,
                region: int):
    """Run ``ipsd_cuda::swap_``: draw the plan and apply it to ``x`` in place;
    returns ``(partner, mask, error)``."""
    return torch.ops.ipsd_cuda.swap_.default(
        x, labels.contiguous(), keys, pair_size, size, threshold, patch_h, patch_w, pairing, region
    )


def exchanged_pixels_kernel(mask: torch.Tensor, height: int, width: int, patch_h: int, patch_w: int) -> torch.Tensor:
    """Run ``ipsd_cuda::exchanged_pixels``: the pixels of each sample's masked cells, (N,) int64."""
    return torch.ops.ipsd_cuda.exchanged_pixels.default(mask.contiguous(), height, width, patch_h, patch_w)


def apply_plan_kernel(
    x: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor, patch_h: int, patch_w: int
) -> None:
    """Run ``ipsd_cuda::apply_plan_`` (in place on ``x``) on x's device."""
    # The op reads the plan densely; a plan built by hand may be a view.
    torch.ops.ipsd_cuda.apply_plan_.default(x, partner.contiguous(), mask.contiguous(), patch_h, patch_w)


if _C is not None:
    # The fakes check what the kernels' own checks would, as far as shapes,
    # dtypes and devices go, so that misuse fails when tracing too.

    def _check_plan_inputs(labels, keys, pair_size, device):
        n = labels.shape[0]
        torch._check(labels.dim() == 1 and labels.dtype in (torch.int32, torch.int64),
                     lambda: f"labels must be (N,) int32/int64, got {labels.dtype} {tuple(labels.shape)}")
        torch._check(keys.dtype == torch.int64 and tuple(keys.shape) == (n + n // 2,),
                     lambda: f"keys must be ({n + n // 2},) int64, got {keys.dtype} {tuple(keys.shape)}")
        torch._check(pair_size is None or (pair_size.dtype == torch.int64 and tuple(pair_size.shape) == (n // 2,)),
                     lambda: "pair_size must be (N // 2,) int64")
        torch._check(labels.device == device and keys.device == device,
                     lambda: f"labels and keys must be on {device}")

    def _plan_outputs(labels, grid_h, grid_w):
        n = labels.shape[0]
        return (
            labels.new_empty((n,), dtype=torch.int64),
            labels.new_empty((n, grid_h, grid_w), dtype=torch.bool),
            labels.new_empty((), dtype=torch.int64),
        )

    @torch.library.register_fake("ipsd_cuda::apply_plan_")
    def _apply_plan_fake(x, partner, mask, patch_h, patch_w):
        n = x.shape[0]
        grid = (-(-x.shape[-2] // patch_h), -(-x.shape[-1] // patch_w))
        torch._check(partner.dtype == torch.int64 and tuple(partner.shape) == (n,),
                     lambda: f"partner must be ({n},) int64")
        torch._check(mask.dtype == torch.bool and tuple(mask.shape) == (n, *grid),
                     lambda: f"mask must be {(n, *grid)} bool")
        # Mutates x in place and returns nothing: no output to describe.
        return None

    @torch.library.register_fake("ipsd_cuda::exchanged_pixels")
    def _exchanged_pixels_fake(mask, height, width, patch_h, patch_w):
        grid = (-(-height // patch_h), -(-width // patch_w))
        torch._check(mask.dtype == torch.bool and mask.dim() == 3 and tuple(mask.shape[1:]) == grid,
                     lambda: f"mask must be (N, {grid[0]}, {grid[1]}) bool")
        return mask.new_empty((mask.shape[0],), dtype=torch.int64)

    @torch.library.register_fake("ipsd_cuda::make_plan")
    def _make_plan_fake(labels, keys, pair_size, size, threshold, grid_h, grid_w, pairing, region):
        _check_plan_inputs(labels, keys, pair_size, labels.device)
        return _plan_outputs(labels, grid_h, grid_w)

    @torch.library.register_fake("ipsd_cuda::swap_")
    def _swap_fake(x, labels, keys, pair_size, size, threshold, patch_h, patch_w, pairing, region):
        _check_plan_inputs(labels, keys, pair_size, x.device)
        torch._check(labels.shape[0] == x.shape[0], lambda: "labels must have one label per sample")
        return _plan_outputs(labels, -(-x.shape[-2] // patch_h), -(-x.shape[-1] // patch_w))
