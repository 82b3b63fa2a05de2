"""The plan: pairing, cell selection, reproducibility (docs/contract.md, sections 2 and 3)."""

from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ipsd_cuda
from conftest import DEVICES, HAS_CUDA


def check_plan_properties(plan, labels, grid, k_expected=None):
    partner, mask = plan.partner.cpu(), plan.mask.cpu()
    labels = labels.cpu()
    n = labels.shape[0]
    gh, gw = grid
    cells = gh * gw
    assert partner.dtype == torch.int64 and partner.shape == (n,)
    assert mask.dtype == torch.bool and mask.shape == (n, gh, gw)
    paired = partner >= 0
    idx = torch.arange(n)
    assert (partner[paired] != idx[paired]).all()
    assert (partner[partner[paired]] == idx[paired]).all(), "not an involution"
    assert (labels[partner[paired]] == labels[paired]).all(), "pairs across classes"
    assert not mask[~paired].any(), "unpaired samples have cells"
    assert torch.equal(mask[paired], mask[partner[paired]]), "mask differs within a pair"
    # Every class pairs all it can: at most one sample per class is left out.
    left_out = Counter(labels[~paired].tolist())
    assert all(count == 1 for count in left_out.values())
    assert all(labels.tolist().count(c) % 2 == 1 for c in left_out)
    k = mask.flatten(1).sum(dim=1)
    if cells == 1:
        assert not mask.any()
    elif k_expected is not None:
        active = paired & (k > 0)
        assert (k[active] == k_expected).all()
    return k


@st.composite
def plan_cases(draw):
    n = draw(st.integers(0, 40))
    return dict(
        n=n,
        classes=draw(st.integers(1, max(1, n))),
        grid=(draw(st.integers(1, 9)), draw(st.integers(1, 9))),
        swap_ratio=draw(st.floats(0.0, 1.0)),
        seed=draw(st.integers(0, 2**63 - 1)),
        dtype=draw(st.sampled_from([torch.int32, torch.int64])),
    )


@pytest.mark.parametrize("device", DEVICES)
@given(case=plan_cases())
def test_plan_properties(device, case):
    g = torch.Generator().manual_seed(case["seed"])
    labels = torch.randint(0, case["classes"], (case["n"],), generator=g, dtype=case["dtype"]).to(device)
    gen = torch.Generator(device=device).manual_seed(case["seed"])
    plan = ipsd_cuda.make_plan(labels, case["grid"], swap_ratio=case["swap_ratio"], p=1.0, generator=gen)
    assert plan.partner.device == labels.device and plan.mask.device == labels.device
    cells = case["grid"][0] * case["grid"][1]
    k = min(max(round(case["swap_ratio"] * cells), 1), cells - 1)
    got = check_plan_properties(plan, labels, case["grid"], k_expected=k)
    paired = plan.partner.cpu() >= 0
    if cells >= 2:
        assert (got[paired] == k).all(), "p = 1 activates every pair"


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_plan_and_draw_order(device):
    labels = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(0)).to(device)
    plans = [
        ipsd_cuda.make_plan(labels, (6, 5), alpha=1.0, p=0.7, generator=torch.Generator(device=device).manual_seed(s))
        for s in (7, 7, 8)
    ]
    assert torch.equal(plans[0].partner, plans[1].partner) and torch.equal(plans[0].mask, plans[1].mask)
    assert not torch.equal(plans[0].mask, plans[2].mask)
    # The default generator is used when none is given, and seeded the same way.
    torch.manual_seed(3)
    a = ipsd_cuda.make_plan(labels, (4, 4))
    torch.manual_seed(3)
    b = ipsd_cuda.make_plan(labels, (4, 4))
    assert torch.equal(a.partner, b.partner) and torch.equal(a.mask, b.mask)


def test_p_selects_pairs():
    labels = torch.zeros(2000, dtype=torch.long)
    for p, lo, hi in ((0.0, 0, 0), (1.0, 1000, 1000), (0.3, 250, 350), (None, 450, 550)):
        kwargs = {} if p is None else {"p": p}  # None: the default, 0.5
        plan = ipsd_cuda.make_plan(labels, (4, 4), **kwargs, generator=torch.Generator().manual_seed(1))
        active_pairs = int(plan.mask.flatten(1).any(dim=1).sum()) // 2
        assert lo <= active_pairs <= hi, (p, active_pairs)


def test_alpha_draws_a_fraction_per_pair():
    labels = torch.zeros(4000, dtype=torch.long)
    grid = (8, 8)
    plan = ipsd_cuda.make_plan(labels, grid, alpha=1.0, p=1.0, generator=torch.Generator().manual_seed(2))
    k = check_plan_properties(plan, labels, grid)
    assert k.min() >= 1 and k.max() <= 63
    # Beta(1, 1) is uniform: k spreads over the whole range, mean G / 2.
    assert abs(k.double().mean().item() - 32) < 1.5
    assert len(set(k.tolist())) > 50
    small = ipsd_cuda.make_plan(labels, grid, alpha=0.05, p=1.0, generator=torch.Generator().manual_seed(2))
    ks = small.mask.flatten(1).sum(dim=1)
    # A small alpha concentrates on the ends, clamped to [1, G - 1].
    assert ((ks <= 3) | (ks >= 61)).double().mean() > 0.8


def test_cells_and_pairs_are_uniform():
    """Each cell is chosen with probability k / G; each pairing of a class is equally likely."""
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([3, 3, 3, 3])
    cell_counts = torch.zeros(12)
    pairings = Counter()
    trials = 3000
    for _ in range(trials):
        plan = ipsd_cuda.make_plan(labels, (3, 4), swap_ratio=0.25, p=1.0, generator=g)
        cell_counts += plan.mask[0].flatten().double()
        pairings[int(plan.partner[0])] += 1
    expected = trials * 3 / 12
    assert ((cell_counts - expected).abs() < 5 * expected**0.5).all(), cell_counts
    assert set(pairings) == {1, 2, 3}
    assert all(abs(v - trials / 3) < 5 * (trials * 2 / 9) ** 0.5 for v in pairings.values()), pairings


@pytest.mark.parametrize("device", DEVICES)
def test_halves_pairs_i_with_i_plus_half(device):
    labels = torch.tensor([4, 1, 1, 9, 4, 1, 1, 9], device=device)
    plan = ipsd_cuda.make_plan(labels, (3, 3), pairing="halves", p=1.0)
    assert plan.partner.tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    check_plan_properties(plan, labels, (3, 3), k_expected=round(0.5 * 9))


@pytest.mark.parametrize(
    "labels, message",
    [([1, 1, 1], "even batch size"), ([0, 1, 2, 0, 1, 3], r"labels\[2\] = 2 != labels\[5\] = 3")],
)
def test_halves_errors(labels, message):
    with pytest.raises(ValueError, match=message):
        ipsd_cuda.make_plan(torch.tensor(labels), (2, 2), pairing="halves")


def test_grid_for():
    assert ipsd_cuda.grid_for((2, 3, 30, 32), 8) == (4, 4)
    assert ipsd_cuda.grid_for(torch.empty(1, 1, 7, 9), (2, 5)) == (4, 2)
    assert ipsd_cuda.grid_for((5, 5), 10) == (1, 1)
    assert ipsd_cuda.grid_for((0, 1, 0, 4), 3) == (0, 2)


def test_plan_to_moves_both_tensors():
    plan = ipsd_cuda.make_plan(torch.tensor([0, 0]), (2, 2))
    moved = plan.to("meta")
    assert moved.partner.device.type == "meta" and moved.mask.device.type == "meta"
    assert plan.grid == (2, 2)


def test_repr_summarises_a_cpu_plan():
    n = int(torch.randint(200, 300, ()))
    labels = torch.randint(0, 10, (n,))
    plan = ipsd_cuda.make_plan(labels, (8, 8))
    paired = plan.partner >= 0
    active = int((plan.mask.flatten(1).any(dim=1) & paired).sum()) // 2
    assert 0 < active < int(paired.sum()) // 2
    text = repr(plan)
    assert text == (
        f"SwapPlan(N={n}, grid=(8, 8), pairs={int(paired.sum()) // 2}, active={active}, "
        f"cells={32 * active}, device=cpu)"
    )
    empty = ipsd_cuda.make_plan(torch.zeros(0, dtype=torch.long), (2, 3))
    assert repr(empty) == "SwapPlan(N=0, grid=(2, 3), pairs=0, active=0, cells=0, device=cpu)"


@pytest.mark.parametrize(
    "device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]
)
def test_repr_of_a_device_plan_reads_only_shapes(device):
    """Counting would read the tensors back, synchronising a GPU; the repr says what the shapes say."""
    plan = ipsd_cuda.make_plan(torch.tensor([0, 0, 1, 1, 2]), (3, 4)).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        text = repr(plan)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert text == f"SwapPlan(N=5, grid=(3, 4), device={plan.partner.device})"


def test_repr_of_a_malformed_plan_does_not_raise():
    plan = ipsd_cuda.SwapPlan(torch.tensor([1, 0]), [[True]])
    assert repr(plan) == "SwapPlan(partner=<(2,) torch.int64 on cpu>, mask=[[True]])"
