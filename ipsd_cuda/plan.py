"""The plan of a patch swap: which samples are paired, which cells they exchange.

All the random decisions of a swap are made here, once, as a small value
(:class:`SwapPlan`); applying it is pure data movement, identical on every
backend. A plan can be inspected, stored, moved between devices and replayed.
"""

import math
from dataclasses import dataclass
from numbers import Real
from typing import Optional, Sequence, Tuple, Union

import torch

PatchSize = Union[int, Tuple[int, int]]

PAIRINGS = ("random", "halves")


@dataclass(frozen=True)
class SwapPlan:
    """Which samples are paired and which cells each pair exchanges.

    Attributes:
        partner: ``(N,)`` int64. ``partner[i]`` is the sample paired with
            ``i``, or ``-1``. An involution (``partner[partner[i]] == i``)
            between samples of the same label.
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
        return tuple(self.mask.shape[1:])

    def to(self, device) -> "SwapPlan":
        """The same plan with its tensors on ``device``."""
        return SwapPlan(self.partner.to(device), self.mask.to(device))


def patch_pair(patch_size: PatchSize) -> Tuple[int, int]:
    """``patch_size`` as ``(ph, pw)``, checked: an int or a pair of ints, each >= 1."""
    pair = (patch_size, patch_size) if not isinstance(patch_size, (tuple, list)) else tuple(patch_size)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"patch_size must be an int or a pair of ints (ph, pw), got {patch_size!r}")
    if min(pair) < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size!r}")
    return pair


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
    ph, pw = patch_pair(patch_size)
    h, w = shape[-2], shape[-1]
    return (-(-h // ph), -(-w // pw))


def check_plan_args(swap_ratio, alpha, p, pairing) -> None:
    """Raise ValueError/TypeError for out-of-range plan arguments."""
    for name, value in (("swap_ratio", swap_ratio), ("p", p)):
        if not isinstance(value, Real) or isinstance(value, bool):
            raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if alpha is not None:
        if not isinstance(alpha, Real) or isinstance(alpha, bool):
            raise TypeError(f"alpha must be a positive number or None, got {alpha!r}")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")


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


# Each pairing returns (partner, slot): slot[i] in [0, N // 2) numbers the
# pair of i, the same for both members, so that each pair's random draws are
# made once, in a batch of N // 2 slots.


def _pair_random(labels: torch.Tensor, generator):
    n = labels.shape[0]
    device = labels.device
    # Shuffle, then sort stably by label: each class becomes one run of
    # positions, in random order, and neighbours 2m, 2m + 1 of a run pair up.
    order = torch.randperm(n, generator=generator, device=device)
    by_class, idx = torch.sort(labels[order], stable=True)
    members = order[idx]
    pos = torch.arange(n, device=device)
    rank = pos - torch.searchsorted(by_class, by_class)
    mate = torch.where(rank % 2 == 0, pos + 1, pos - 1).clamp_(max=n - 1)
    has_mate = (mate != pos) & (by_class[mate] == by_class)
    partner = torch.empty(n, dtype=torch.int64, device=device)
    partner[members] = torch.where(has_mate, members[mate], -1)
    # Counting pair starts numbers the pairs; a second member counts as its first.
    starts = (rank % 2 == 0) & has_mate
    slot = torch.empty(n, dtype=torch.int64, device=device)
    slot[members] = (starts.cumsum(0) - 1).clamp_(min=0)
    return partner, slot


def _pair_halves(labels: torch.Tensor):
    n = labels.shape[0]
    if n % 2:
        raise ValueError(f"pairing='halves' needs an even batch size, got N = {n}")
    half = n // 2
    differ = (labels[:half] != labels[half:]).nonzero()
    if differ.numel():
        i = int(differ[0, 0])
        raise ValueError(
            f"pairing='halves' pairs i with i + N/2, but labels[{i}] = {int(labels[i])} "
            f"!= labels[{i + half}] = {int(labels[i + half])}"
        )
    pos = torch.arange(n, device=labels.device)
    return torch.where(pos < half, pos + half, pos - half), pos % max(half, 1)


def _choose_cells(k, rows: int, cells: int, generator, device) -> torch.Tensor:
    """``(rows, cells)`` bool with exactly ``k`` (an int, or one per row) cells
    set per row, each k-subset equally likely."""
    if cells < 2:
        return torch.zeros(rows, cells, dtype=torch.bool, device=device)
    # Random keys made distinct by the cell index in their low part (ties of
    # the random part, of probability ~cells^2 / 2^50, go to the lower cell):
    # the k smallest keys are then exactly those up to the k-th, found by a
    # selection, which is several times cheaper than sorting each row.
    span = 1 << (62 - cells.bit_length())
    keys = torch.randint(0, span, (rows, cells), generator=generator, device=device) * cells
    keys += torch.arange(cells, device=device)
    if isinstance(k, int):
        threshold = keys.kthvalue(k, dim=1, keepdim=True).values
    else:
        threshold = keys.sort(dim=1).values.gather(1, k[:, None] - 1)
    return keys <= threshold


def make_plan(
    labels: torch.Tensor,
    grid: Tuple[int, int],
    *,
    swap_ratio: float = 0.5,
    alpha: Optional[float] = None,
    p: float = 0.5,
    pairing: str = "random",
    generator: Optional[torch.Generator] = None,
) -> SwapPlan:
    """Draw a swap plan: intra-class pairs and, per pair, the cells to exchange.

    Args:
        labels: ``(N,)`` int32/int64 class labels; the plan lives on their device.
        grid: ``(gh, gw)``, the cell grid (see :func:`grid_for`).
        swap_ratio: fraction of the ``G = gh * gw`` cells a pair exchanges.
        alpha: if given, each pair draws its fraction from ``Beta(alpha, alpha)``
            instead of using ``swap_ratio``.
        p: probability that a pair exchanges anything at all (default 0.5).
        pairing: ``"random"`` pairs samples of each class at random (an odd
            one out stays unpaired); ``"halves"`` pairs ``i`` with ``i + N/2``
            (batches from :class:`IntraClassPairSampler`).
        generator: the only source of randomness (default: torch's default
            generator of the labels' device).

    Each active pair exchanges exactly ``k = round(fraction * G)`` distinct
    cells (clamped to ``[1, G - 1]`` when ``G >= 2``, ``0`` when ``G == 1``),
    drawn uniformly; both members use the same cells. Random numbers are drawn
    in a fixed order (pairing, activity, fraction, cells), so the same seed on
    the same device gives the same plan.

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
    check_plan_args(swap_ratio, alpha, p, pairing)
    check_generator(generator, labels.device)
    if len(grid) != 2 or min(grid) < 0:
        raise ValueError(f"grid must be (gh, gw) with gh, gw >= 0, got {grid!r}")
    gh, gw = (int(v) for v in grid)
    n, cells, device = labels.shape[0], gh * gw, labels.device

    partner, slot = _pair_random(labels, generator) if pairing == "random" else _pair_halves(labels)
    slots = n // 2
    active = torch.rand(slots, generator=generator, device=device) < p
    if alpha is None:
        k = min(max(round(swap_ratio * cells), 1), cells - 1)
    else:
        # Beta(a, a) is the first coordinate of Dirichlet(a, a); this is the
        # Beta sampler that accepts a generator.
        concentration = torch.full((slots, 2), float(alpha), dtype=torch.float64, device=device)
        fraction = torch._sample_dirichlet(concentration, generator=generator)[:, 0]
        k = torch.round(fraction * cells).long().clamp_(1, max(cells - 1, 1))
    chosen = _choose_cells(k, slots, cells, generator, device) & active[:, None]
    if slots == 0:
        mask = torch.zeros(n, cells, dtype=torch.bool, device=device)
    else:
        mask = chosen[slot] & (partner >= 0)[:, None]
    mask = mask.view(n, gh, gw)
    return SwapPlan(partner, mask)
