"""The in-place intra-class patch swap: check everything, draw a plan, apply it."""

import warnings
from typing import Optional, Sequence, Union

import torch

from . import _ops
from ._fallback import apply_plan_torch, make_plan_torch
from .plan import (
    PatchSize,
    SwapPlan,
    cell_grid,
    check_generator,
    check_labels,
    check_plan_args,
    defer_error,
    draw_keys,
    partner_mates,
    patch_pair,
    raise_deferred,
)

IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
TARGET_DTYPES = IMAGE_DTYPES + (torch.int64,)

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
            f"(strides {t.stride()} are overlapping or not dense). {name}.contiguous() is a copy: "
            "swap the copy and use it, since the swap will not reach the original"
        )


def check_layout(images: torch.Tensor, fix: str) -> None:
    """Raise if ``images``, meant as ``(N, C, H, W)``, look like ``(N, H, W, C)``.

    The likely case only: a last size of 1, 3 or 4 (gray, RGB, RGBA) with
    the two sizes before it both more than 4 times larger, as in
    ``(N, 32, 32, 3)``. Channels-first batches such as ``(N, 3, 32, 32)``,
    ``(N, 64, 4, 4)`` or tiny ``(N, 8, 8, 3)`` ones pass: where a batch
    could be either, it is taken as given. ``fix`` says what to do instead.
    """
    _, c, h, w = images.shape
    if w in (1, 3, 4) and min(c, h) > 4 * w:
        raise ValueError(
            f"images of shape {tuple(images.shape)} look like (N, H, W, C) with {w} channels of "
            f"{c} x {h} pixels, but swap takes (N, C, H, W) and would exchange patches across "
            f"channels: {fix}. If they really are {c} channels of {h} x {w} pixels, draw the plan "
            "with make_plan and apply it with apply_plan, which take the layout as given"
        )


def _warn_if_one_cell(patch_size, h: int, w: int, grid) -> None:
    """Warn when the patch covers the whole image: one cell, nothing can swap."""
    if tuple(grid) == (1, 1):
        # stacklevel 3 is the caller of swap: under Python's default warning
        # filter this shows once per calling line, not once per batch.
        warnings.warn(
            f"patch_size={patch_size!r} covers the whole {h} x {w} image: the grid has one cell, "
            "and a pair exchanges at most G - 1 of its G cells, so nothing is swapped. "
            "Use a patch smaller than the image.",
            UserWarning,
            stacklevel=3,
        )


def _check_disjoint(named) -> None:
    """Raise if two of the (dense) tensors to be written share memory."""
    if len(named) < 2 or torch.compiler.is_compiling():
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


def swap(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    patch_size: PatchSize,
    swap_ratio: float = 0.5,
    alpha: Optional[float] = None,
    p: float = 0.5,
    pairing: str = "random",
    region: str = "cells",
    targets: Targets = None,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> SwapPlan:
    """Pair samples of the same class and exchange a random set of patches, in place.

    Draws a plan with :func:`make_plan` and applies it to ``images`` and to
    every tensor in ``targets``, on their own device. Labels never change:
    both members of a pair share the class. Every argument is checked before
    any memory is touched. The swap writes into the tensors' memory: a view
    of a data set (``data[:64]``) swaps the data set itself.

    Args:
        images: ``(N, C, H, W)`` uint8/float16/bfloat16/float32/float64,
            contiguous or channels_last (it keeps its layout). A batch that
            looks like ``(N, H, W, C)``, e.g. ``(N, 32, 32, 3)``, is an error
            (pass ``images.permute(0, 3, 1, 2)``).
        labels: ``(N,)`` int32/int64 on the same device.
        patch_size: ``P`` or ``(ph, pw)``; the grid is ``ceil(H/ph) x ceil(W/pw)``
            cells, the last row and column possibly partial. A patch that
            covers the whole image leaves one cell and nothing to swap: a
            ``UserWarning`` says so.
        swap_ratio: fraction of the cells a pair exchanges (default 0.5).
        alpha: if given, the fraction is drawn per pair from ``Beta(alpha, alpha)``.
        p: probability that a pair exchanges anything (default 0.5, which
            trained better than 1.0 in the README's comparison).
        pairing: ``"random"`` (default) or ``"halves"`` (``i`` with ``i + N/2``,
            for :class:`IntraClassPairSampler` batches), both within a class;
            ``"any"`` pairs the whole batch at random, whatever the labels
            (CutMix: weigh the labels with :meth:`SwapPlan.share`).
        region: ``"cells"`` (default): the cells are drawn anywhere in the
            grid; ``"box"``: they form one rectangle (at ``patch_size=1``,
            CutMix's box, one for every pair).
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
    check_layout(images, "pass images.permute(0, 3, 1, 2), a channels_last view of the same memory")
    n, _, h, w = images.shape
    # Read once: each read of .device builds a new object.
    device = images.device
    check_labels(labels, n, device)
    written = [("images", images)]
    for index, target in enumerate(_as_list(targets)):
        name = f"targets[{index}]"
        _check_swappable(name, target, TARGET_DTYPES, shape=(n, h, w), device=device)
        written.append((name, target))
    _check_disjoint(written)
    ph, pw = patch_pair(patch_size)
    check_plan_args(swap_ratio, alpha, p, pairing, region)
    check_generator(generator, device)
    kernel = _ops.use_kernel(backend, device)
    raise_deferred()
    grid = cell_grid(h, w, ph, pw)
    _warn_if_one_cell(patch_size, h, w, grid)
    draw = draw_keys(labels, grid[0] * grid[1], swap_ratio, alpha, p, pairing, generator, region)
    ph, pw = _clip_patch(ph, pw, h, w)
    args = (draw.keys, draw.pair_size, draw.size, draw.threshold)
    if kernel:
        # Plan and images in one call (one kernel on CUDA), then the targets.
        partner, mask, error = _ops.swap_kernel(images, labels, *args, ph, pw, draw.pairing, draw.region)
        for _, t in written[1:]:
            _ops.apply_plan_kernel(t, partner, mask, ph, pw)
    else:
        partner, mask, error = make_plan_torch(labels, *args, grid, draw.pairing, draw.region)
        for _, t in written:
            apply_plan_torch(t, partner, mask, ph, pw)
    defer_error(error, draw, n)
    return SwapPlan(partner, mask)


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
    if n == 0 or torch.compiler.is_compiling():
        # What follows depends on the plan's values, which a traced graph
        # cannot branch on. Every backend moves only mutual pairs, with the
        # lower member's mask, so an inconsistent plan is still memory-safe
        # and gives the same bits everywhere.
        return
    # A plan from outside make_plan is checked eagerly, to say what is wrong
    # with it rather than apply what the backends make of it.
    valid, mate = partner_mates(partner)
    moves = mask.flatten(1)
    valid &= (moves == moves[mate]).all(dim=1) & ((partner >= 0) | ~moves.any(dim=1))
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
    The plan is checked first: shape, dtype and device always; eagerly also
    that it is a valid involution with a symmetric mask, which costs one
    device synchronisation. Under ``torch.compile`` that second check is left
    out (it depends on the plan's values): every backend then moves only the
    mutual pairs of ``plan.partner``, each with its lower member's mask.

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
    _check_plan(plan, tensor.shape[0], cell_grid(tensor.shape[-2], tensor.shape[-1], ph, pw), tensor.device)
    apply = _ops.apply_plan_kernel if _ops.use_kernel(backend, tensor.device) else apply_plan_torch
    apply(tensor, plan.partner, plan.mask, *_clip_patch(ph, pw, *tensor.shape[-2:]))
