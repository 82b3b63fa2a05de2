"""The plan of a patch swap: which samples are paired, which cells they exchange.

All the random decisions of a swap are made here, once, as a small value
(:class:`SwapPlan`); applying it is pure data movement, identical on every
backend. A plan can be inspected, stored, moved between devices and replayed.
"""

import math
from dataclasses import dataclass
from numbers import Real
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union, cast

import torch

from ._fallback import (
    HALF_BITS,
    PAIR_ANY,
    PAIR_CLASSES,
    PAIR_HALVES,
    REGION_BOX,
    REGION_CELLS,
    SCALE_ONE,
    make_plan_torch,
)
from ._ops import exchanged_pixels_kernel, make_plan_kernel, use_kernel

PatchSize = Union[int, Tuple[int, int]]

# The public names of the ops' pairing and region codes.
PAIRINGS = {"random": PAIR_CLASSES, "halves": PAIR_HALVES, "any": PAIR_ANY}
REGIONS = {"cells": REGION_CELLS, "box": REGION_BOX}
KEY_BITS = 62


@dataclass(frozen=True)
class SwapPlan:
    """Which samples are paired and which cells each pair exchanges.

    Attributes:
        partner: ``(N,)`` int64. ``partner[i]`` is the sample paired with
            ``i``, or ``-1``. An involution (``partner[partner[i]] == i``)
            between samples of the same label (of any labels with
            ``pairing="any"``).
        mask: ``(N, gh, gw)`` bool, the cells exchanged. ``mask[i] ==
            mask[partner[i]]``; all False for unpaired samples and for pairs
            that were not selected.

    Example:
        >>> import torch, ipsd_cuda
        >>> plan = ipsd_cuda.make_plan(torch.tensor([0, 1, 0, 1]), (2, 2), p=1.0)
        >>> plan.partner.tolist()
        [2, 3, 0, 1]
        >>> int(plan.mask.sum(dim=(1, 2))[0])  # p=1: every pair swaps round(0.5 * 4) cells
        2
    """

    partner: torch.Tensor
    mask: torch.Tensor

    @property
    def grid(self) -> Tuple[int, int]:
        """The ``(gh, gw)`` cell grid the mask is drawn on."""
        gh, gw = self.mask.shape[1:]
        return (gh, gw)

    def to(self, device: torch.types.Device) -> "SwapPlan":
        """The same plan with its tensors on ``device``."""
        return SwapPlan(self.partner.to(device), self.mask.to(device))

    def share(self, image_size: Tuple[int, int], patch_size: "PatchSize") -> torch.Tensor:
        """The share of each sample's pixels that the plan exchanges.

        Counts the pixels of the exchanged cells, a partial cell at the
        right or bottom edge by the pixels it has (timm's ``correct_lam``),
        over ``H * W``. Computed on the plan's device without a host
        synchronisation. It weighs the partner's label in soft targets
        (:func:`mix_targets`, :func:`mix_cross_entropy`).

        Args:
            image_size: ``(H, W)`` of the images the plan was applied to.
            patch_size: ``P`` or ``(ph, pw)``, as for the swap.

        Returns:
            ``(N,)`` float32 in ``[0, 1]``; for a plan from :func:`swap` or
            :func:`make_plan`, 0 for unpaired samples and pairs that
            exchanged nothing, the same for both members of a pair.

        Example:
            >>> import torch, ipsd_cuda
            >>> x = torch.rand(4, 3, 10, 10)  # a 3 x 3 grid of 4-pixel cells, the last ones 2 pixels wide
            >>> g = torch.Generator().manual_seed(1)
            >>> plan = ipsd_cuda.swap(x, torch.tensor([0, 1, 0, 1]), patch_size=4, p=1.0, region="box",
            ...                       swap_ratio=0.1, generator=g)  # a box of one cell per pair
            >>> plan.mask[0].nonzero().tolist(), plan.mask[1].nonzero().tolist()
            ([[0, 0]], [[2, 1]])
            >>> plan.share((10, 10), 4)  # a whole cell, 16 of 100 pixels; one of the last row, 4 x 2
            tensor([0.1600, 0.0800, 0.1600, 0.0800])
        """
        size = tuple(image_size) if isinstance(image_size, (tuple, list, torch.Size)) else (image_size,)
        if len(size) != 2 or not all(type(v) is int for v in size):
            raise TypeError(f"image_size must be a pair of ints (H, W), got {image_size!r}")
        h, w = size
        if min(h, w) < 0:
            raise ValueError(f"image_size must be >= 0, got {image_size!r}")
        ph, pw = patch_pair(patch_size)
        grid = cell_grid(h, w, ph, pw)
        if grid != self.grid:
            raise ValueError(
                f"the plan's grid {self.grid} is not that of {h} x {w} images with patch size "
                f"{patch_size!r}, {grid}"
            )
        if h * w == 0:
            return torch.zeros(self.mask.shape[0], dtype=torch.float32, device=self.mask.device)
        ph, pw = min(ph, h), min(pw, w)
        mask = self.mask
        if use_kernel("auto", mask.device):
            pixels = exchanged_pixels_kernel(mask, h, w, ph, pw)
        else:
            # Every cell has ph * pw pixels but those of the last row and
            # column, which lack (ph - last_h) rows and (pw - last_w) columns.
            last_h, last_w = h - (grid[0] - 1) * ph, w - (grid[1] - 1) * pw
            pixels = mask.sum(dim=(1, 2)) * (ph * pw)
            if last_h < ph:
                pixels -= mask[:, -1, :].sum(dim=1) * ((ph - last_h) * pw)
            if last_w < pw:
                pixels -= mask[:, :, -1].sum(dim=1) * (ph * (pw - last_w))
            if last_h < ph and last_w < pw:
                pixels += mask[:, -1, -1] * ((ph - last_h) * (pw - last_w))
        # The quotient in float64, rounded once to float32: the same bits on
        # every device. The divisor is a tensor on the plan's device because
        # CUDA divides by a Python number as a product with its reciprocal,
        # an ulp off for 9 / 20; a filled tensor needs no host sync.
        total = torch.full((), h * w, dtype=torch.float64, device=mask.device)
        return pixels.double().div_(total).float()

    def __repr__(self) -> str:
        """A one-line summary instead of the tensors (hundreds of lines for a real batch).

        On the CPU it counts the ``pairs``, the ``active`` pairs (those that
        exchange cells) and the ``cells`` exchanged (per pair, counted once).
        On other devices it shows only what the shapes say, since reading
        the counts from a GPU would synchronise it, e.g. when a training loop
        logs the plan; ``plan.to("cpu")`` shows them.

        Example:
            >>> import torch, ipsd_cuda
            >>> ipsd_cuda.make_plan(torch.tensor([0, 1, 0, 1, 2]), (2, 2), p=1.0)
            SwapPlan(N=5, grid=(2, 2), pairs=2, active=2, cells=4, device=cpu)
        """
        partner, mask = self.partner, self.mask
        shaped = (
            isinstance(partner, torch.Tensor)
            and isinstance(mask, torch.Tensor)
            and partner.dim() == 1
            and mask.dim() == 3
            and mask.shape[0] == partner.shape[0]
        )
        if not shaped:
            # A hand-built plan that apply_plan would reject: say what it holds.
            return f"SwapPlan(partner={_describe(partner)}, mask={_describe(mask)})"
        head = f"SwapPlan(N={partner.shape[0]}, grid={self.grid}"
        if partner.device.type != "cpu" or mask.device.type != "cpu":
            return f"{head}, device={partner.device})"
        paired = partner >= 0
        pairs = int(paired.sum()) // 2
        active = int((paired & mask.flatten(1).any(dim=1)).sum()) // 2
        cells = int(mask[paired].sum()) // 2
        return f"{head}, pairs={pairs}, active={active}, cells={cells}, device=cpu)"


def _describe(value) -> str:
    """A tensor as its shape, dtype and device; anything else as its repr."""
    if isinstance(value, torch.Tensor):
        return f"<{tuple(value.shape)} {value.dtype} on {value.device}>"
    return repr(value)


def patch_pair(patch_size: PatchSize) -> Tuple[int, int]:
    """``patch_size`` as ``(ph, pw)``, checked: an int or a pair of ints, each >= 1."""
    if type(patch_size) is int and patch_size >= 1:
        return (patch_size, patch_size)
    pair = (patch_size, patch_size) if not isinstance(patch_size, (tuple, list)) else tuple(patch_size)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"patch_size must be an int or a pair of ints (ph, pw), got {patch_size!r}")
    if min(pair) < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size!r}")
    return pair


def cell_grid(h: int, w: int, ph: int, pw: int) -> Tuple[int, int]:
    """``(ceil(h / ph), ceil(w / pw))`` for a checked patch ``(ph, pw)``."""
    return (-(-h // ph), -(-w // pw))


def grid_for(images_or_shape: Union[torch.Tensor, Sequence[int]], patch_size: PatchSize) -> Tuple[int, int]:
    """The cell grid ``(gh, gw) = (ceil(H / ph), ceil(W / pw))`` of images.

    Args:
        images_or_shape: a tensor or a shape whose last two sizes are ``H, W``.
        patch_size: ``P`` or ``(ph, pw)``. The last row and column of cells
            may be partial.

    Example:
        >>> import ipsd_cuda
        >>> ipsd_cuda.grid_for((8, 3, 30, 32), 8)
        (4, 4)
    """
    shape = images_or_shape.shape if isinstance(images_or_shape, torch.Tensor) else tuple(images_or_shape)
    if len(shape) < 2:
        raise ValueError(f"grid_for needs a shape ending in (H, W), got {tuple(shape)}")
    return cell_grid(shape[-2], shape[-1], *patch_pair(patch_size))


def _is_number(value) -> bool:
    """A real number that is not a bool; floats and ints first, as an ABC check costs
    more than the rest of a small swap's checks."""
    kind = type(value)
    return kind is float or kind is int or (isinstance(value, Real) and kind is not bool)


def check_plan_args(swap_ratio, alpha, p, pairing, region="cells") -> None:
    """Raise ValueError/TypeError for out-of-range plan arguments."""
    for name, value in (("swap_ratio", swap_ratio), ("p", p)):
        if not _is_number(value):
            raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
        if not 0.0 <= cast(float, value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if alpha is not None:
        if not _is_number(alpha):
            raise TypeError(f"alpha must be a positive number or None, got {alpha!r}")
        if not (cast(float, alpha) > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not isinstance(pairing, str) or pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {tuple(PAIRINGS)}, got {pairing!r}")
    if not isinstance(region, str) or region not in REGIONS:
        raise ValueError(f"region must be one of {tuple(REGIONS)}, got {region!r}")


def check_labels(labels, n: Optional[int] = None, device: Optional[torch.device] = None) -> None:
    """Raise for labels that are not an (N,) int32/int64 tensor on ``device``."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-d (N,), got shape {tuple(labels.shape)}")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"labels must have length N = {n}, got {labels.shape[0]}")
    if device is not None and labels.device != device:
        raise ValueError(f"labels must be on the images' device {device}, got {labels.device}")


def partner_mates(partner: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where ``partner`` is a valid pairing, and each sample's mate.

    Returns:
        ``(valid, mate)``, both ``(N,)``: ``valid[i]`` holds when
        ``partner[i]`` is -1, or another sample ``j`` in ``[0, N)`` with
        ``partner[j] == i``; ``mate[i]`` is ``partner[i]`` where that is an
        index in range, else ``i`` itself. Computed on the partner's device,
        without synchronising it.
    """
    n = partner.shape[0]
    pos = torch.arange(n, device=partner.device)
    in_range = (partner >= -1) & (partner < n) & (partner != pos)
    mate = torch.where(in_range & (partner >= 0), partner, pos)
    return in_range & (mate[mate] == pos), mate


def check_generator(generator, device: torch.device) -> None:
    """Raise unless ``generator`` is None or a torch.Generator of ``device``'s type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    same = generator.device.type == device.type and (
        device.type == "cpu" or generator.device.index in (None, device.index)
    )
    if not same:
        raise ValueError(f"generator must be on the tensors' device {device}, got {generator.device}")


class _Draw(NamedTuple):
    """The random part of a plan and the scalars derived from the arguments:
    the ``ipsd_cuda::make_plan`` op's inputs."""

    keys: torch.Tensor
    pair_size: Optional[torch.Tensor]
    size: int
    threshold: int
    pairing: int
    region: int


def draw_keys(labels, cells: int, swap_ratio, alpha, p, pairing, generator, region="cells") -> _Draw:
    """Draw a plan's keys (one call) and, with ``alpha``, its per-pair sizes.

    The layout of ``keys`` (see ``csrc/plan_common.h``): ``N`` pairing keys,
    then ``N // 2`` pair keys, uniform in ``[0, 2^62)``. A pair is active when
    the high 31 bits of its key are below ``threshold = floor(p * 2^31)``.
    A pair's size is, in the "cells" region, its number of cells
    ``round(fraction * G)`` clamped to ``[1, G - 1]``; in the "box" region, the
    scale of the box's sides, ``round(sqrt(fraction) * 2^31)``, at least 1.
    Both are 0 when ``G < 2``: nothing can be exchanged.
    """
    n = labels.shape[0]
    pairs = n // 2
    device = labels.device
    if pairing == "halves":
        if n % 2:
            raise ValueError(f"pairing='halves' needs an even batch size, got N = {n}")
        if device.type == "cpu" and not torch.compiler.is_compiling():
            # Free on the CPU: say so before anything is written.
            differ = (labels[:pairs] != labels[pairs:]).nonzero()
            if differ.numel():
                i = int(differ[0, 0])
                raise ValueError(
                    f"pairing='halves' pairs i with i + N/2, but labels[{i}] = {int(labels[i])} "
                    f"!= labels[{i + pairs}] = {int(labels[i + pairs])}"
                )
    keys = torch.randint(0, 1 << KEY_BITS, (n + pairs,), generator=generator, device=device)
    box = region == "box"
    size = 0
    if cells >= 2:
        size = max(round(math.sqrt(swap_ratio) * SCALE_ONE), 1) if box else min(max(round(swap_ratio * cells), 1), cells - 1)
    pair_size = None
    if alpha is not None:
        # Beta(a, a) is the first coordinate of Dirichlet(a, a); this is the
        # Beta sampler that accepts a generator.
        concentration = torch.full((pairs, 2), float(alpha), dtype=torch.float64, device=device)
        fraction = torch._sample_dirichlet(concentration, generator=generator).select(1, 0)
        # In place where the values are new: a small batch pays per tensor op.
        if cells < 2:
            pair_size = torch.zeros(pairs, dtype=torch.int64, device=device)
        elif box:
            pair_size = fraction.sqrt().mul_(SCALE_ONE).round_().long().clamp_(1, SCALE_ONE)
        else:
            pair_size = torch.round(fraction * cells).long().clamp_(1, cells - 1)
    return _Draw(keys, pair_size, size, int(p * (1 << HALF_BITS)), PAIRINGS[pairing], REGIONS[region])


# pairing="halves" on CUDA checks the labels on the device without waiting for
# it: each call leaves (its error, copied to pinned memory, and an event), and
# the next call raises once the event has passed and the error is set.
_unchecked: List[Tuple[torch.Tensor, "torch.cuda.Event", int]] = []


def defer_error(error: torch.Tensor, draw: _Draw, n: int) -> None:
    """Keep a CUDA plan's ``error`` for :func:`raise_deferred` to read later."""
    if draw.pairing != PAIR_HALVES or error.device.type != "cuda" or torch.compiler.is_compiling():
        return
    if torch.cuda.is_current_stream_capturing():
        return
    host = torch.empty((), dtype=torch.int64, pin_memory=True)
    host.copy_(error, non_blocking=True)
    # On the stream that ran the copy: that of the error's device, which need
    # not be the current device.
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(error.device))
    _unchecked.append((host, event, n))


def raise_deferred() -> None:
    """Raise for an earlier pairing="halves" call on CUDA whose labels differed."""
    if not _unchecked or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        # Events cannot be queried while a CUDA graph is being captured.
        return
    while _unchecked and _unchecked[0][1].query():
        host, _, n = _unchecked.pop(0)
        i = int(host)
        if i >= 0:
            _unchecked.clear()
            raise ValueError(
                f"pairing='halves' pairs i with i + N/2, but an earlier call (N = {n}) had "
                f"labels[{i}] != labels[{i + n // 2}]; such pairs were left unpaired. On CUDA the "
                "labels are checked on the device without waiting, and a mismatch is reported "
                "by the next call."
            )


def make_plan(
    labels: torch.Tensor,
    grid: Tuple[int, int],
    *,
    swap_ratio: float = 0.5,
    alpha: Optional[float] = None,
    p: float = 0.5,
    pairing: str = "random",
    region: str = "cells",
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> SwapPlan:
    """Draw a swap plan: pairs of samples and, per pair, the cells to exchange.

    Args:
        labels: ``(N,)`` int32/int64 class labels; the plan lives on their device.
        grid: ``(gh, gw)``, the cell grid (see :func:`grid_for`).
        swap_ratio: fraction of the ``G = gh * gw`` cells a pair exchanges.
        alpha: if given, each pair draws its fraction from ``Beta(alpha, alpha)``
            instead of using ``swap_ratio``.
        p: probability that a pair exchanges anything at all (default 0.5).
        pairing: ``"random"`` pairs samples of each class at random (an odd
            one out stays unpaired); ``"halves"`` pairs ``i`` with ``i + N/2``
            (batches from :class:`IntraClassPairSampler`); ``"any"`` pairs
            the whole batch at random, whatever the labels (CutMix).
        region: ``"cells"`` exchanges cells drawn anywhere in the grid;
            ``"box"`` one rectangle of cells (CutMix's box at ``patch_size=1``).
        generator: the only source of randomness (default: torch's default
            generator of the labels' device).
        backend: ``"auto"`` (the extension's kernel where built, else the
            fallback), ``"kernel"`` or ``"torch"``; all draw the same plan.

    In the ``"cells"`` region each active pair exchanges exactly
    ``k = round(fraction * G)`` distinct cells (clamped to ``[1, G - 1]``
    when ``G >= 2``, ``0`` when ``G == 1``), drawn uniformly. In the
    ``"box"`` region it exchanges a box of ``round(sqrt(fraction) * gh)`` by
    ``round(sqrt(fraction) * gw)`` cells (each side at least 1, never the
    whole grid), placed uniformly where it fits. Both members use the same
    cells. All the random numbers
    are drawn in one call (a second one for ``alpha``), and every decision is
    arithmetic on them, so the same seed on the same device gives the same
    plan on every backend. Nothing waits for the device: on CUDA, a
    ``"halves"`` batch whose labels differ across the halves leaves those
    pairs unpaired and is reported by the next call (on the CPU it raises at
    once).

    Returns:
        a :class:`SwapPlan`.

    Example:
        >>> import torch, ipsd_cuda
        >>> g = torch.Generator().manual_seed(0)
        >>> plan = ipsd_cuda.make_plan(torch.tensor([3, 3, 7]), (4, 4), generator=g)
        >>> plan.partner.tolist()  # sample 2 is alone in class 7
        [1, 0, -1]
    """
    check_labels(labels)
    check_plan_args(swap_ratio, alpha, p, pairing, region)
    check_generator(generator, labels.device)
    if len(grid) != 2 or min(grid) < 0:
        raise ValueError(f"grid must be (gh, gw) with gh, gw >= 0, got {grid!r}")
    grid = (int(grid[0]), int(grid[1]))
    kernel = use_kernel(backend, labels.device)
    raise_deferred()
    draw = draw_keys(labels, grid[0] * grid[1], swap_ratio, alpha, p, pairing, generator, region)
    plan_of = make_plan_kernel if kernel else make_plan_torch
    partner, mask, error = plan_of(labels, draw.keys, draw.pair_size, draw.size, draw.threshold, grid,
                                   draw.pairing, draw.region)
    defer_error(error, draw, labels.shape[0])
    return SwapPlan(partner, mask)
