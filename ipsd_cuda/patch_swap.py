"""The in-place intra-class patch swap: check everything, draw a plan, apply it."""

from typing import Optional, Sequence, Union

import torch

from . import _ops
from ._fallback import apply_plan_torch
from .plan import (
    PatchSize,
    SwapPlan,
    check_labels,
    grid_for,
    make_plan,
    patch_pair,
)

IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
TARGET_DTYPES = IMAGE_DTYPES + (torch.int64,)
BACKENDS = ("auto", "kernel", "torch")

Targets = Union[None, torch.Tensor, Sequence[torch.Tensor]]


_RANK_NAMES = {4: "(N, C, H, W)", 3: "(N, H, W)"}


def _check_swappable(name: str, t, dtypes, ranks=(3, 4), shape=None, device=None) -> None:
    """Raise unless ``t`` can be swapped in place: of a rank in ``ranks``, of
    an accepted dtype, dense, not requiring grad; ``shape`` = (N, H, W)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.dim() not in ranks:
        expected = " or ".join(_RANK_NAMES[r] for r in sorted(ranks))
        raise ValueError(f"{name} must be {expected}, got shape {tuple(t.shape)}")
    if shape is not None and (t.shape[0], t.shape[-2], t.shape[-1]) != shape:
        raise ValueError(
            f"{name} must have N, H, W = {shape} like the images, got shape {tuple(t.shape)}"
        )
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on the images' device {device}, got {t.device}")
    if t.requires_grad:
        raise ValueError(f"{name} requires grad; an in-place swap would break autograd: pass it detached")
    if not (t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))):
        raise ValueError(
            f"{name} must be contiguous or channels_last to be swapped in place "
            f"(strides {t.stride()} are overlapping or not dense): pass {name}.contiguous()"
        )


def _check_disjoint(named) -> None:
    """Raise if two of the (dense) tensors to be written share memory."""
    if torch.compiler.is_compiling():
        # Traced tensors have no address; the eager call checks this.
        return
    spans = []
    for name, t in named:
        start = t.data_ptr()
        spans.append((start, start + t.numel() * t.element_size(), name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{first} and {second} share memory; they cannot be swapped in place together")


def _as_list(targets: Targets) -> list:
    if targets is None:
        return []
    if isinstance(targets, torch.Tensor):
        return [targets]
    if isinstance(targets, (list, tuple)):
        return list(targets)
    raise TypeError(f"targets must be a tensor, a sequence of tensors or None, got {type(targets).__name__}")


def _clip_patch(ph: int, pw: int, h: int, w: int):
    """The patch size clipped to the image: the same grid and cells, and sizes
    the kernel's 64-bit arithmetic cannot overflow on."""
    return min(ph, max(h, 1)), min(pw, max(w, 1))


def _resolve(backend: str, device: torch.device):
    """The function that applies a plan on ``device`` for ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return apply_plan_torch
    built = _ops.backends().get(device.type, False)
    if built:
        return _ops.apply_plan_kernel
    if backend == "kernel":
        raise RuntimeError(
            f"backend='kernel' but ipsd_cuda has no {device.type} kernel "
            f"(built: {_ops.backends()}); reinstall with `pip install --no-build-isolation .`"
            + (" on a machine with nvcc, or FORCE_CUDA=1" if device.type == "cuda" else "")
        )
    return apply_plan_torch


def swap(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    patch_size: PatchSize,
    swap_ratio: float = 0.5,
    alpha: Optional[float] = None,
    p: float = 0.5,
    pairing: str = "random",
    targets: Targets = None,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> SwapPlan:
    """Pair samples of the same class and exchange a random set of patches, in place.

    Draws a plan with :func:`make_plan` and applies it to ``images`` and to
    every tensor in ``targets``, on their own device. Labels never change:
    both members of a pair share the class. Every argument is checked before
    any memory is touched.

    Args:
        images: ``(N, C, H, W)`` uint8/float16/bfloat16/float32/float64,
            contiguous or channels_last (it keeps its layout).
        labels: ``(N,)`` int32/int64 on the same device.
        patch_size: ``P`` or ``(ph, pw)``; the grid is ``ceil(H/ph) x ceil(W/pw)``
            cells, the last row and column possibly partial.
        swap_ratio: fraction of the cells a pair exchanges (default 0.5).
        alpha: if given, the fraction is drawn per pair from ``Beta(alpha, alpha)``.
        p: probability that a pair exchanges anything (default 0.5, which
            trained better than 1.0 in the README's comparison).
        pairing: ``"random"`` (default) or ``"halves"`` (``i`` with ``i + N/2``,
            for :class:`IntraClassPairSampler` batches).
        targets: a tensor or sequence of tensors that get the same exchange,
            e.g. segmentation masks ``(N, H, W)`` or ``(N, K, H, W)``; any
            image dtype or int64.
        generator: a ``torch.Generator`` on the tensors' device (default:
            torch's default generator of that device).
        backend: ``"auto"`` (kernel where built, else fallback), ``"kernel"``
            or ``"torch"``.

    Returns:
        the :class:`SwapPlan` that was applied (its ``partner`` feeds
        :func:`ips_loss`).

    Example:
        >>> import torch, ipsd_cuda
        >>> x = torch.rand(8, 3, 32, 32)
        >>> y = torch.tensor([0, 1, 0, 1, 2, 2, 3, 4])
        >>> plan = ipsd_cuda.swap(x, y, patch_size=8)
        >>> plan.mask.shape
        torch.Size([8, 4, 4])
    """
    _check_swappable("images", images, IMAGE_DTYPES, ranks=(4,))
    n, _, h, w = images.shape
    check_labels(labels, n, images.device)
    written = [("images", images)]
    for index, target in enumerate(_as_list(targets)):
        name = f"targets[{index}]"
        _check_swappable(name, target, TARGET_DTYPES, shape=(n, h, w), device=images.device)
        written.append((name, target))
    _check_disjoint(written)
    ph, pw = patch_pair(patch_size)
    apply = _resolve(backend, images.device)
    # make_plan checks the remaining arguments; nothing is written before.
    plan = make_plan(
        labels,
        grid_for(images, (ph, pw)),
        swap_ratio=swap_ratio,
        alpha=alpha,
        p=p,
        pairing=pairing,
        generator=generator,
    )
    ph, pw = _clip_patch(ph, pw, h, w)
    for _, t in written:
        apply(t, plan.partner, plan.mask, ph, pw)
    return plan


def _check_plan(plan: SwapPlan, n: int, grid, device: torch.device) -> None:
    if not isinstance(plan, SwapPlan):
        raise TypeError(f"plan must be a SwapPlan, got {type(plan).__name__}")
    partner, mask = plan.partner, plan.mask
    if partner.dtype != torch.int64 or tuple(partner.shape) != (n,):
        raise ValueError(f"plan.partner must be int64 of shape ({n},), got {partner.dtype} {tuple(partner.shape)}")
    if mask.dtype != torch.bool or tuple(mask.shape) != (n, *grid):
        raise ValueError(
            f"plan.mask must be bool of shape {(n, *grid)} for this tensor and patch size, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if partner.device != device or mask.device != device:
        raise ValueError(f"plan must be on the tensor's device {device}: use plan.to({str(device)!r})")
    if n == 0:
        return
    # A plan from outside make_plan is trusted only once it is a valid
    # involution with a symmetric mask: otherwise backends would disagree.
    pos = torch.arange(n, device=device)
    in_range = (partner >= -1) & (partner < n) & (partner != pos)
    mate = torch.where(in_range & (partner >= 0), partner, pos)  # unpaired: itself
    moves = mask.flatten(1)
    valid = (
        in_range
        & (mate[mate] == pos)
        & (moves == moves[mate]).all(dim=1)
        & ((partner >= 0) | ~moves.any(dim=1))
    )
    invalid = (~valid).nonzero()
    if invalid.numel():
        i = int(invalid[0, 0])
        raise ValueError(
            f"plan is not a valid swap plan at sample {i} (partner {int(partner[i])}): partner must be "
            "an involution into [-1, N) without fixed points, the mask equal within a pair and empty "
            "for unpaired samples"
        )


def apply_plan(
    tensor: torch.Tensor, plan: SwapPlan, *, patch_size: PatchSize, backend: str = "auto"
) -> None:
    """Apply an existing plan to ``tensor``, in place.

    Replays a plan, e.g. on a tensor that was not passed to :func:`swap`.
    The plan is checked first (shape, device, a valid involution with a
    symmetric mask), which costs one device synchronisation.

    Args:
        tensor: ``(N, H, W)`` or ``(N, C, H, W)``, any image dtype or int64,
            contiguous or channels_last, on the plan's device.
        plan: a :class:`SwapPlan` whose grid matches ``tensor`` and ``patch_size``.
        patch_size: ``P`` or ``(ph, pw)``, as for the plan.
        backend: ``"auto"``, ``"kernel"`` or ``"torch"``.

    Example:
        >>> import torch, ipsd_cuda
        >>> x = torch.rand(4, 3, 16, 16)
        >>> seg = torch.randint(0, 5, (4, 16, 16))
        >>> plan = ipsd_cuda.swap(x, torch.tensor([0, 0, 1, 1]), patch_size=4)
        >>> ipsd_cuda.apply_plan(seg, plan, patch_size=4)
    """
    _check_swappable("tensor", tensor, TARGET_DTYPES)
    ph, pw = patch_pair(patch_size)
    _check_plan(plan, tensor.shape[0], grid_for(tensor, (ph, pw)), tensor.device)
    apply = _resolve(backend, tensor.device)
    apply(tensor, plan.partner, plan.mask, *_clip_patch(ph, pw, *tensor.shape[-2:]))
