"""The pure-PyTorch implementation: the plan from its keys, and applying a plan.

Used when the extension is not built, with ``backend="torch"``, and as the
reference the kernels are tested against: for the same keys it draws the same
plan, and for the same plan it gives the same bits. The plan's arithmetic is
that of ``csrc/plan_common.h`` (key layout, pair activity, the cells' order),
written with tensor operations: every product of two 31-bit values fits in
int64, so no operation overflows.

Vectorised over the whole batch, with no Python loop over samples and no host
synchronisation (so it traces into one graph). Unlike the kernels, applying a
plan reads the whole batch and writes every element back, unchanged ones with
their own value: selecting only the moved elements would need a
data-dependent shape.
"""

from typing import Optional, Tuple

import torch

# csrc/plan_common.h: the 31-bit halves of a pair key, the step between the
# inputs of consecutive cells, the rounds of mix31, the fixed-point 1 of a
# box's scale, and the codes of the ops' pairing and region arguments.
HALF_BITS = 31
HALF_MASK = (1 << HALF_BITS) - 1
CELL_STEP = 0x1E3779B9
_MIX_ROUNDS = ((16, 0x7FEB352D), (15, 0x2C1B3C6D), (16, 0x3A8F05C5))
SCALE_ONE = 1 << HALF_BITS
PAIR_CLASSES, PAIR_HALVES, PAIR_ANY = 0, 1, 2
REGION_CELLS, REGION_BOX = 0, 1

# A swap moves bits, never values: viewing floats as same-width integers keeps
# every payload (NaNs included) exactly as it was.
_AS_INTEGER = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def mix31(x: torch.Tensor) -> torch.Tensor:
    """``mix31`` of plan_common.h on an int64 tensor of values in ``[0, 2^31)``."""
    for shift, multiplier in _MIX_ROUNDS:
        x = ((x ^ (x >> shift)) * multiplier) & HALF_MASK
    return x ^ (x >> 15)


def cell_key(seeds: torch.Tensor, cell) -> torch.Tensor:
    """plan_common.h's ``cell_key``: the 31-bit key of ``cell`` (an int or a
    tensor broadcasting against ``seeds``) in the pairs seeded by ``seeds``."""
    return mix31((seeds + cell * CELL_STEP) & HALF_MASK)


def cell_order(seeds: torch.Tensor, cells: int) -> torch.Tensor:
    """``(len(seeds), cells)`` int64: plan_common.h's ``cell_order`` of every
    cell of every pair, whose ``k`` smallest values are the pair's cells."""
    index = torch.arange(cells, device=seeds.device)
    return (cell_key(seeds[:, None], index) << 32) | index


def box_side(scale: torch.Tensor, grid: int) -> torch.Tensor:
    """plan_common.h's ``box_side``: ``scale * grid`` rounded half up, in ``[1, grid]``."""
    side = (scale.clamp(0, SCALE_ONE) * grid + SCALE_ONE // 2) >> HALF_BITS
    return side.clamp(1, grid)


def box_cells(seeds: torch.Tensor, scale: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """``(len(seeds), gh * gw)`` bool: the cells inside each pair's box
    (plan_common.h's ``pair_box``), for a grid of at least one cell."""
    gh, gw = grid
    rows, cols = box_side(scale, gh), box_side(scale, gw)
    whole = (rows == gh) & (cols == gw)
    if gw >= 2:
        cols = cols - whole.long()
    else:
        rows = rows - whole.long()
    top = (cell_key(seeds, 0) * (gh - rows + 1)) >> HALF_BITS
    left = (cell_key(seeds, 1) * (gw - cols + 1)) >> HALF_BITS
    r = torch.arange(gh, device=seeds.device)
    c = torch.arange(gw, device=seeds.device)
    in_rows = (r >= top[:, None]) & (r < (top + rows)[:, None])
    in_cols = (c >= left[:, None]) & (c < (left + cols)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :]).flatten(1)


def _pair_random(labels: torch.Tensor, keys: torch.Tensor):
    """Partner and pair number of every sample, pairing neighbours in the
    order (label, key, index) within each class."""
    n = labels.shape[0]
    pos = torch.arange(n, device=labels.device)
    _, by_key = torch.sort(keys, stable=True)
    by_class, idx = torch.sort(labels[by_key], stable=True)
    members = by_key[idx]
    rank = pos - torch.searchsorted(by_class, by_class)
    mate = torch.where(rank % 2 == 0, pos + 1, pos - 1).clamp_(max=n - 1)
    has_mate = (mate != pos) & (by_class[mate] == by_class)
    partner = torch.empty_like(pos)
    partner[members] = torch.where(has_mate, members[mate], -1)
    # Pairs are numbered by their leader's position; a second member counts
    # the start just before it, which is its own pair's.
    starts = (rank % 2 == 0) & has_mate
    pair = torch.empty_like(pos)
    pair[members] = (starts.cumsum(0) - 1).clamp_(min=0)
    return partner, pair, torch.full((), -1, device=labels.device)


def _pair_halves(labels: torch.Tensor):
    """Partner and pair number of every sample, pairing ``i`` with ``i + N/2``
    where their labels agree; the error is the first ``i`` where they do not."""
    n = labels.shape[0]
    half = n // 2
    pos = torch.arange(n, device=labels.device)
    mate = torch.where(pos < half, pos + half, pos - half)
    same = labels == labels[mate]
    partner = torch.where(same, mate, -1)
    if half == 0:
        return partner, pos, torch.full((), -1, device=labels.device)
    first_bad = torch.where(same[:half], n, pos[:half]).amin()
    return partner, pos % half, torch.where(first_bad < n, first_bad, -1)


def _chosen_cells(seeds: torch.Tensor, pair_size: Optional[torch.Tensor], size: int, cells: int) -> torch.Tensor:
    """``(pairs, cells)`` bool: each pair's ``size`` (or ``pair_size``) cells
    that come first in ``cell_order`` (the "cells" region)."""
    pairs = seeds.shape[0]
    order = cell_order(seeds, cells)
    if pair_size is not None:
        rank = torch.empty_like(order).scatter_(
            1, order.argsort(dim=1), torch.arange(cells, device=order.device).expand(pairs, cells)
        )
        return rank < pair_size[:, None]
    if size <= 0:
        return torch.zeros_like(order, dtype=torch.bool)
    if size >= cells:
        return torch.ones_like(order, dtype=torch.bool)
    return order <= order.kthvalue(size, dim=1, keepdim=True).values


def make_plan_torch(
    labels: torch.Tensor,
    keys: torch.Tensor,
    pair_size: Optional[torch.Tensor],
    size: int,
    threshold: int,
    grid: Tuple[int, int],
    pairing: int,
    region: int,
):
    """The plan drawn from ``keys`` (the ``ipsd_cuda::make_plan`` op's
    arguments and results): ``(partner, mask, error)``."""
    n = labels.shape[0]
    pairs = n // 2
    gh, gw = grid
    cells = gh * gw
    if pairing == PAIR_HALVES:
        partner, pair, error = _pair_halves(labels)
    elif pairing == PAIR_ANY:
        partner, pair, error = _pair_random(torch.zeros_like(labels), keys[:n])
    else:
        partner, pair, error = _pair_random(labels, keys[:n])
    if pairs == 0 or cells == 0:
        return partner, torch.zeros(n, gh, gw, dtype=torch.bool, device=labels.device), error
    pair_keys = keys[n:]
    seeds = pair_keys & HALF_MASK
    active = (pair_keys >> HALF_BITS) < threshold
    if region == REGION_BOX:
        scale = pair_size if pair_size is not None else torch.full_like(seeds, size)
        chosen = box_cells(seeds, scale, grid)
        active &= scale > 0
    else:
        chosen = _chosen_cells(seeds, pair_size, size, cells)
    chosen &= active[:, None]
    mask = chosen[pair] & (partner >= 0)[:, None]
    return partner, mask.view(n, gh, gw), error


def apply_plan_torch(
    x: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor, patch_h: int, patch_w: int
) -> None:
    """Exchange the masked cells of every pair in ``x`` ((N, H, W) or (N, C, H, W)), in place.

    As the kernels do, a pair moves only where ``partner`` is mutual
    (``partner[partner[i]] == i``, no fixed point) and with its lower member's
    mask, so that any plan, even an inconsistent one, gives the same bits on
    every backend.
    """
    n = x.shape[0]
    if x.numel() == 0 or n < 2:
        return
    h, w = x.shape[-2:]
    pos = torch.arange(n, device=x.device)
    in_range = (partner >= 0) & (partner < n)
    mate = torch.where(in_range, partner, pos)
    source = torch.where(in_range & (mate != pos) & (mate[mate] == pos), mate, pos)
    rows = torch.arange(h, device=x.device) // patch_h
    cols = torch.arange(w, device=x.device) // patch_w
    lead_mask = mask[torch.minimum(pos, source)]
    moved = lead_mask[:, rows[:, None], cols[None, :]]  # (N, H, W): the cell mask per pixel
    if x.dim() == 4:
        moved = moved.unsqueeze(1)
    bits = x.view(_AS_INTEGER.get(x.dtype, x.dtype))
    torch.where(moved, bits[source], bits, out=bits)
