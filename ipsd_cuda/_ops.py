"""The only module that touches ``torch.ops.ipsd_cuda``: loading the extension,
what it was built with, a typed wrapper per op, and the fake (meta) kernels
that let ``torch.compile`` trace through them."""

import os
import warnings

import torch

_C = None
if os.environ.get("IPSD_FORCE_FALLBACK") != "1":
    try:
        from . import _C
    except (ImportError, OSError) as err:
        warnings.warn(
            f"ipsd_cuda: the C++/CUDA extension could not be loaded ({err}); every "
            "swap uses the pure-PyTorch fallback, which gives the same results, "
            "slower. Build it with `pip install --no-build-isolation .` "
            "(set IPSD_FORCE_FALLBACK=1 to silence this).",
            RuntimeWarning,
            stacklevel=2,
        )


def backends() -> dict:
    """Which kernels this installation has, per device type.

    Returns:
        ``{"cpu": bool, "cuda": bool}``. Both are False when the extension was
        not built, failed to load, or ``IPSD_FORCE_FALLBACK=1`` was set at
        import; the pure-PyTorch fallback is then used everywhere.

    Example:
        >>> import ipsd_cuda
        >>> ipsd_cuda.backends()  # doctest: +SKIP
        {'cpu': True, 'cuda': True}
    """
    return {"cpu": _C is not None, "cuda": _C is not None and bool(_C.WITH_CUDA)}


def apply_plan_kernel(
    x: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor, patch_h: int, patch_w: int
) -> None:
    """Run ``ipsd_cuda::apply_plan_`` (in place on ``x``) on x's device."""
    # The op reads the plan densely; a plan built by hand may be a view.
    torch.ops.ipsd_cuda.apply_plan_.default(x, partner.contiguous(), mask.contiguous(), patch_h, patch_w)


if _C is not None:

    @torch.library.register_fake("ipsd_cuda::apply_plan_")
    def _apply_plan_fake(x, partner, mask, patch_h, patch_w):
        # Mutates x in place and returns nothing: no output to describe.
        return None
