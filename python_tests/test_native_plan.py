"""The native plan against the fallback's, bit for bit, its distribution, and the
sync-free CUDA path (graph capture, launches, the deferred halves check)."""

import math
from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ipsd_cuda
from conftest import DEVICES, HAS_CUDA, kernel_available, random_bits, same_bits
from ipsd_cuda import plan as plan_module
from ipsd_cuda._fallback import (
    PAIR_ANY,
    PAIR_CLASSES,
    PAIR_HALVES,
    REGION_BOX,
    REGION_CELLS,
    SCALE_ONE,
    make_plan_torch,
)
from ipsd_cuda._ops import make_plan_kernel

CUDA_ONLY = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")


def needs_kernel(device):
    if not kernel_available(device):
        pytest.skip(f"no {device} kernel built")


@st.composite
def plan_inputs(draw):
    n = draw(st.integers(0, 300))
    pairing = draw(st.sampled_from([PAIR_CLASSES, PAIR_HALVES, PAIR_ANY]))
    if pairing == PAIR_HALVES and n % 2:
        n -= 1
    region = draw(st.sampled_from([REGION_CELLS, REGION_BOX]))
    grid = draw(
        st.one_of(
            st.tuples(st.integers(0, 9), st.integers(0, 9)),
            st.sampled_from([(1, 1), (8, 8), (64, 64), (1, 4096), (17, 3), (5, 1)]),
        )
    )
    cells = grid[0] * grid[1]
    # A number of cells, or a box's scale in 31-bit fixed point (beyond its range too).
    sizes = st.integers(0, cells + 1) if region == REGION_CELLS else st.one_of(
        st.sampled_from([0, 1, SCALE_ONE // 2, SCALE_ONE, SCALE_ONE + 1]), st.integers(0, SCALE_ONE)
    )
    return dict(
        n=n,
        classes=draw(st.integers(1, max(1, n))),
        pairing=pairing,
        region=region,
        # Mostly matching halves, sometimes not: mismatched pairs stay unpaired.
        mismatches=draw(st.integers(0, 2)) if pairing == PAIR_HALVES else 0,
        grid=grid,
        size=draw(sizes),
        per_pair_size=draw(st.booleans()),
        size_seed=draw(st.integers(0, 2**31)),
        p=draw(st.sampled_from([0.0, 0.5, 1.0])),
        # A tiny key range makes ties, which the sample index must break.
        key_range=draw(st.sampled_from([2, 2**62])),
        seed=draw(st.integers(0, 2**63 - 1)),
        label_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
    )


@pytest.mark.parametrize("device", DEVICES)
@given(case=plan_inputs())
def test_native_plan_equals_fallback_on_any_keys(device, case):
    """Same keys, same plan, for every pairing and region, including ties in the keys,
    mismatched halves and sizes out of range."""
    needs_kernel(device)
    g = torch.Generator().manual_seed(case["seed"])
    n, pairs = case["n"], case["n"] // 2
    halves = case["pairing"] == PAIR_HALVES
    labels = torch.randint(0, case["classes"], (n,), generator=g, dtype=case["label_dtype"])
    if halves:
        labels[pairs:] = labels[:pairs]
        if pairs:
            labels[torch.randint(0, pairs, (case["mismatches"],), generator=g) + pairs] += 1
    keys = torch.randint(0, case["key_range"], (n + pairs,), generator=g)
    pair_size = None
    if case["per_pair_size"]:
        high = case["grid"][0] * case["grid"][1] + 2 if case["region"] == REGION_CELLS else SCALE_ONE + 2
        pair_size = torch.randint(-1, high, (pairs,), generator=torch.Generator().manual_seed(case["size_seed"]))
    threshold = int(case["p"] * 2**31)
    args = [t.to(device) if isinstance(t, torch.Tensor) else t for t in (labels, keys, pair_size)]
    modes = (case["pairing"], case["region"])
    got = make_plan_kernel(*args, case["size"], threshold, case["grid"], *modes)
    want = make_plan_torch(*args, case["size"], threshold, case["grid"], *modes)
    for a, b, name in zip(got, want, ("partner", "mask", "error")):
        assert a.device == labels.to(device).device and torch.equal(a.cpu(), b.cpu()), name
    partner, mask, error = (t.cpu() for t in got)
    if halves:
        differ = (labels[:pairs] != labels[pairs:]).nonzero()
        assert int(error) == (int(differ[0, 0]) if differ.numel() else -1)
        assert (partner[labels != labels.roll(pairs)] == -1).all()
    if case["pairing"] == PAIR_ANY:
        assert int((partner >= 0).sum()) == n - n % 2, "everyone but an odd one out is paired"
    if case["region"] == REGION_BOX and mask.numel():
        # Each pair's cells form one box: as many as its rows times its columns.
        rows, cols = mask.any(2).sum(1), mask.any(1).sum(1)
        assert torch.equal(mask.flatten(1).sum(1), rows * cols)
        assert not mask.flatten(1).all(1).any(), "never the whole grid"


@st.composite
def plan_arguments(draw):
    return dict(
        n=draw(st.integers(0, 200)),
        classes=draw(st.integers(1, 20)),
        grid=draw(st.sampled_from([(1, 1), (2, 3), (8, 8), (7, 5), (64, 64)])),
        swap_ratio=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])),
        alpha=draw(st.sampled_from([None, 0.2, 1.0, 5.0])),
        p=draw(st.sampled_from([0.0, 0.5, 1.0])),
        pairing=draw(st.sampled_from(["random", "halves", "any"])),
        region=draw(st.sampled_from(["cells", "box"])),
        seed=draw(st.integers(0, 2**63 - 1)),
    )


# The (1, 1) grid is drawn on purpose: swap's warning about it is tested elsewhere.
@pytest.mark.filterwarnings("ignore:patch_size=.* covers the whole")
@pytest.mark.parametrize("device", DEVICES)
@given(case=plan_arguments())
def test_make_plan_and_swap_agree_across_backends(device, case):
    """make_plan and swap, same generator state: same plan and bits on every backend."""
    needs_kernel(device)
    g = torch.Generator().manual_seed(case["seed"])
    n = case["n"] - case["n"] % 2 if case["pairing"] == "halves" else case["n"]
    labels = torch.randint(0, case["classes"], (n,), generator=g)
    if case["pairing"] == "halves":
        labels[n // 2 :] = labels[: n // 2]
    labels = labels.to(device)
    kwargs = {key: case[key] for key in ("swap_ratio", "alpha", "p", "pairing", "region")}
    gh, gw = case["grid"]
    patch = (1, 1) if gh * gw > 100 else (2, 3)
    images = random_bits((n, 2, gh * patch[0], gw * patch[1]), torch.float32, generator=g, device=device)
    results = []
    for backend in ("kernel", "torch"):
        plan = ipsd_cuda.make_plan(
            labels, case["grid"], **kwargs, backend=backend,
            generator=torch.Generator(device=device).manual_seed(case["seed"]),
        )
        x = images.clone()
        applied = ipsd_cuda.swap(
            x, labels, patch_size=patch, **kwargs, backend=backend,
            generator=torch.Generator(device=device).manual_seed(case["seed"]),
        )
        assert torch.equal(plan.partner, applied.partner) and torch.equal(plan.mask, applied.mask)
        results.append((plan, x))
    (a, xa), (b, xb) = results
    assert torch.equal(a.partner, b.partner) and torch.equal(a.mask, b.mask)
    assert same_bits(xa, xb)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_same_seed_same_plan_different_seed_different_plan(device, backend):
    needs_kernel(device)
    labels = torch.randint(0, 4, (256,), generator=torch.Generator().manual_seed(0)).to(device)

    def plan(seed):
        g = torch.Generator(device=device).manual_seed(seed)
        return ipsd_cuda.make_plan(labels, (8, 8), alpha=1.0, generator=g, backend=backend)

    a, b, c = plan(1), plan(1), plan(2)
    assert torch.equal(a.partner, b.partner) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.partner, c.partner) and not torch.equal(a.mask, c.mask)


def chi_square_bound(dof, z=4.75):
    """The chi-square value exceeded with probability ~1e-6 (Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(counts, expected):
    return sum((c - expected) ** 2 / expected for c in counts)


BACKENDS = ["kernel", "torch"] if kernel_available("cpu") else ["torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid, swap_ratio", [((2, 3), 0.5), ((1, 5), 0.4), ((2, 2), 0.25)])
def test_every_k_subset_is_equally_likely(backend, grid, swap_ratio):
    pairs = 20000
    labels = torch.zeros(2 * pairs, dtype=torch.int64)
    g = torch.Generator().manual_seed(11)
    plan = ipsd_cuda.make_plan(labels, grid, swap_ratio=swap_ratio, p=1.0, generator=g, backend=backend)
    leaders = plan.partner > torch.arange(2 * pairs)
    subsets = Counter(tuple(row) for row in plan.mask[leaders].flatten(1).tolist())
    cells = grid[0] * grid[1]
    k = round(swap_ratio * cells)
    assert all(sum(s) == k for s in subsets)
    assert len(subsets) == math.comb(cells, k)
    expected = pairs / math.comb(cells, k)
    assert chi_square(subsets.values(), expected) < chi_square_bound(len(subsets) - 1), subsets


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_in_class_matching_is_equally_likely(backend):
    """Classes of 4 have 3 matchings; classes of 3 leave each member out alike."""
    classes = 6000
    sizes = torch.tensor([4, 3]).repeat(classes // 2)
    labels = torch.arange(classes).repeat_interleave(sizes)
    g = torch.Generator().manual_seed(12)
    partner = ipsd_cuda.make_plan(labels, (2, 2), generator=g, backend=backend).partner
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)[:-1]])
    of_four = Counter(int(partner[s]) - int(s) for s in starts[sizes == 4])
    left_out = Counter(int((partner[s : s + 3] < 0).nonzero()[0, 0]) for s in starts[sizes == 3].tolist())
    for counts, options in ((of_four, {1, 2, 3}), (left_out, {0, 1, 2})):
        assert set(counts) == options
        assert chi_square(counts.values(), (classes // 2) / 3) < chi_square_bound(2), counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairs_across_classes_occur_at_the_rate_the_class_counts_imply(backend):
    """pairing="any" is a uniform matching of the whole batch: a pair of classes (a, b) occurs
    n_a * n_b / (N - 1) times in expectation, (a, a) n_a * (n_a - 1) / 2 / (N - 1) times."""
    counts = {0: 15000, 1: 10000, 2: 5000}
    labels = torch.cat([torch.full((c,), k) for k, c in counts.items()])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    n = len(labels)
    plan = ipsd_cuda.make_plan(labels, (2, 2), pairing="any", generator=torch.Generator().manual_seed(14),
                               backend=backend)
    lead = plan.partner > torch.arange(n)
    first, second = labels[lead], labels[plan.partner[lead]]
    seen = Counter(zip(torch.minimum(first, second).tolist(), torch.maximum(first, second).tolist()))
    expected = {(a, b): (counts[a] * counts[b] if a != b else counts[a] * (counts[a] - 1) / 2) / (n - 1)
                for a in counts for b in counts if a <= b}
    assert sum(seen.values()) == n // 2 and set(seen) <= set(expected)
    statistic = sum((seen[t] - e) ** 2 / e for t, e in expected.items())
    assert statistic < chi_square_bound(len(expected) - 1), seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_side_follows_the_beta_draw(backend):
    """With alpha = 1 the share is uniform, so a box on a g x g grid has side b with probability
    ((b + 1/2) / g)^2 - ((b - 1/2) / g)^2 (side 1 also takes the shares that round to 0), and a
    box that would cover the grid loses a column."""
    pairs, g = 30000, 6
    plan = ipsd_cuda.make_plan(torch.zeros(2 * pairs, dtype=torch.int64), (g, g), alpha=1.0, p=1.0,
                               region="box", generator=torch.Generator().manual_seed(15), backend=backend)
    lead = plan.partner > torch.arange(2 * pairs)
    mask = plan.mask[lead]
    rows, cols = mask.any(2).sum(1), mask.any(1).sum(1)
    whole = rows == g
    assert torch.equal(cols[whole], torch.full_like(cols[whole], g - 1))
    assert torch.equal(cols[~whole], rows[~whole])

    def below(b):  # P(round(sqrt(F) * g) < b) for F uniform on [0, 1]
        return min(max((b - 0.5) / g, 0.0), 1.0) ** 2

    expected = {b: pairs * ((1.0 if b == g else below(b + 1)) - below(1 if b == 1 else b)) for b in range(1, g + 1)}
    seen = Counter(rows.tolist())
    assert set(seen) == set(expected)
    statistic = sum((seen[b] - e) ** 2 / e for b, e in expected.items())
    assert statistic < chi_square_bound(g - 1), seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_box_position_is_uniform_where_it_fits(backend):
    """A fixed share of 0.25 on a 5 x 7 grid: sides round(0.5 * 5) = 3 and round(0.5 * 7) = 4
    (halves up), so the box has 3 x 4 places, each as likely."""
    pairs = 24000
    plan = ipsd_cuda.make_plan(torch.zeros(2 * pairs, dtype=torch.int64), (5, 7), swap_ratio=0.25, p=1.0,
                               region="box", generator=torch.Generator().manual_seed(16), backend=backend)
    mask = plan.mask[plan.partner > torch.arange(2 * pairs)]
    assert torch.equal(mask.any(2).sum(1), torch.full((pairs,), 3))
    assert torch.equal(mask.any(1).sum(1), torch.full((pairs,), 4))
    corners = Counter(zip(mask.any(2).int().argmax(1).tolist(), mask.any(1).int().argmax(1).tolist()))
    assert set(corners) == {(top, left) for top in range(3) for left in range(4)}
    assert chi_square(corners.values(), pairs / 12) < chi_square_bound(11), corners


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("region", ["cells", "box"])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_activity_follows_p(backend, region, p):
    pairs = 20000
    plan = ipsd_cuda.make_plan(
        torch.zeros(2 * pairs, dtype=torch.int64), (4, 4), p=p, region=region,
        generator=torch.Generator().manual_seed(13), backend=backend,
    )
    active = int(plan.mask.flatten(1).any(dim=1).sum()) // 2
    assert abs(active - p * pairs) <= 5 * math.sqrt(pairs * p * (1 - p)), active


@CUDA_ONLY
def test_cuda_plan_with_more_than_65535_samples():
    needs_kernel("cuda")
    n = 70001
    labels = torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(0)).cuda()
    x = random_bits((n, 1, 4, 6), torch.uint8, generator=torch.Generator().manual_seed(1), device="cuda")
    results = []
    for backend in ("kernel", "torch"):
        g = torch.Generator(device="cuda").manual_seed(5)
        y = x.clone()
        plan = ipsd_cuda.swap(y, labels, patch_size=2, p=1.0, generator=g, backend=backend)
        results.append((plan, y))
    (a, ya), (b, yb) = results
    assert torch.equal(a.partner, b.partner) and torch.equal(a.mask, b.mask) and same_bits(ya, yb)
    assert int((a.partner >= 0).sum()) > n - 8


def swapped_cell_by_cell(x, y, plan, patch):
    """Whether ``y`` is ``x`` swapped by ``plan``, by the plan's definition, one cell's
    slice at a time (no copy of the batch): a chosen cell holds the partner's bytes,
    any other its own."""
    gh, gw = plan.grid
    mask, partner = plan.mask.cpu(), plan.partner.tolist()
    for i, j in enumerate(partner):
        for r in range(gh):
            for c in range(gw):
                cell = (slice(None), slice(r * patch[0], (r + 1) * patch[0]), slice(c * patch[1], (c + 1) * patch[1]))
                source = x[j] if j >= 0 and mask[i, r, c] else x[i]
                if not torch.equal(y[i][cell], source[cell]):
                    return False
    return True


@pytest.mark.parametrize("device", DEVICES)
def test_swap_cell_by_cell_with_partial_cells_and_one_byte_units(device):
    """The check of the 64-bit test below, at a size every device runs."""
    needs_kernel(device)
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.randint(0, 256, (7, 1, 33, 32), dtype=torch.uint8, device=device, generator=g)
    y = x.clone()
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 5], device=device)
    plan = ipsd_cuda.swap(y, labels, patch_size=(5, 3), p=1.0, generator=g)
    assert swapped_cell_by_cell(x, y, plan, (5, 3))
    y[0, 0, 0, 0] ^= 1
    assert not swapped_cell_by_cell(x, y, plan, (5, 3))


@CUDA_ONLY
def test_cuda_swap_beyond_32_bit_offsets():
    """Samples of more than 2^30 one-byte units, the kernels' 64-bit offsets (2.1e9
    elements in all), checked cell by cell against the plan."""
    needs_kernel("cuda")
    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    # An odd patch width makes every run a whole number of bytes only: one-byte units.
    h, w, patch = 32769, 32768, (4097, 4095)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, 256, (2, 1, h, w), dtype=torch.uint8, device="cuda", generator=g)
    assert x[0].numel() > 2**30 and x.numel() > 2**31
    y = x.clone()
    plan = ipsd_cuda.swap(y, torch.zeros(2, dtype=torch.int64, device="cuda"), patch_size=patch, p=1.0, generator=g)
    assert plan.partner.tolist() == [1, 0] and 0 < int(plan.mask[0].sum()) < plan.grid[0] * plan.grid[1]
    assert swapped_cell_by_cell(x, y, plan, patch)


@CUDA_ONLY
@pytest.mark.parametrize("pairing, region", [("random", "cells"), ("any", "box"), ("halves", "box")])
def test_swap_replays_in_a_cuda_graph(pairing, region):
    """Captured on static tensors, a replay gives the bytes of the eager call
    from the same generator state."""
    needs_kernel("cuda")
    g = torch.Generator().manual_seed(0)
    source = random_bits((64, 3, 32, 32), torch.float32, generator=g, device="cuda")
    labels = torch.randint(0, 10, (64,), generator=g).cuda()
    if pairing == "halves":
        labels[32:] = labels[:32]
    kwargs = dict(patch_size=4, pairing=pairing, region=region)
    static = source.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        ipsd_cuda.swap(source.clone(), labels, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ipsd_cuda.swap(static, labels, **kwargs)
    for seed in (1, 2):
        eager = source.clone()
        torch.cuda.manual_seed(seed)
        plan = ipsd_cuda.swap(eager, labels, **kwargs)
        static.copy_(source)
        torch.cuda.manual_seed(seed)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured.partner, plan.partner) and torch.equal(captured.mask, plan.mask)
        assert same_bits(static, eager)
        assert plan.mask.any()


@CUDA_ONLY
@pytest.mark.parametrize("pairing", ["random", "halves", "any"])
@pytest.mark.parametrize("region", ["cells", "box"])
def test_swap_on_cuda_is_three_launches(pairing, region):
    """One draw of keys, the pairing kernel, the cells-and-apply kernel."""
    needs_kernel("cuda")
    x = torch.rand(256, 3, 32, 32, device="cuda")
    labels = torch.arange(128, device="cuda").repeat(2)
    ipsd_cuda.swap(x, labels, patch_size=4, pairing=pairing, region=region)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ipsd_cuda.swap(x, labels, patch_size=4, pairing=pairing, region=region)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
    assert len(kernels) <= 3, kernels


@CUDA_ONLY
def test_cuda_halves_mismatch_is_reported_by_the_next_call():
    needs_kernel("cuda")
    labels = torch.tensor([0, 1, 2, 0, 1, 3], device="cuda")
    x = torch.rand(6, 1, 4, 4, device="cuda")
    plan = ipsd_cuda.swap(x, labels, patch_size=2, pairing="halves", p=1.0)
    assert plan.partner.tolist() == [3, 4, -1, 0, 1, -1], "the mismatched pair stays unpaired"
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"labels\[2\] != labels\[5\]"):
        ipsd_cuda.make_plan(labels[:2], (2, 2))
    ipsd_cuda.make_plan(labels[:2], (2, 2))  # reported once


def test_deferred_check_is_only_for_cuda_halves():
    before = list(plan_module._unchecked)
    ipsd_cuda.make_plan(torch.tensor([0, 1, 0, 1]), (2, 2), pairing="halves")
    assert plan_module._unchecked == before


@pytest.mark.parametrize("device", DEVICES)
def test_plan_ops_opcheck(device):
    needs_kernel(device)
    g = torch.Generator().manual_seed(0)
    cases = ((6, PAIR_CLASSES, REGION_CELLS, (3, 4), False), (8, PAIR_HALVES, REGION_CELLS, (2, 2), True),
             (1, PAIR_CLASSES, REGION_CELLS, (1, 3), False), (7, PAIR_ANY, REGION_BOX, (5, 6), True),
             (6, PAIR_HALVES, REGION_BOX, (4, 4), False))
    for n, pairing, region, grid, per_pair in cases:
        labels = torch.randint(0, 2, (n,), generator=g).to(device)
        if pairing == PAIR_HALVES:
            labels[n // 2 :] = labels[: n // 2]
        keys = torch.randint(0, 2**62, (n + n // 2,), generator=g).to(device)
        high = 4 if region == REGION_CELLS else SCALE_ONE
        pair_size = torch.randint(0, high, (n // 2,), generator=g).to(device) if per_pair else None
        size = 2 if region == REGION_CELLS else SCALE_ONE // 3
        torch.library.opcheck(torch.ops.ipsd_cuda.make_plan.default,
                              (labels, keys, pair_size, size, 2**30, *grid, pairing, region))
        x = random_bits((n, 3, grid[0] * 2, grid[1] * 2), torch.float32, generator=g, device=device)
        torch.library.opcheck(torch.ops.ipsd_cuda.swap_.default,
                              (x, labels, keys, pair_size, size, 2**30, 2, 2, pairing, region))
        mask = ipsd_cuda.make_plan(labels, grid, p=1.0).mask
        torch.library.opcheck(torch.ops.ipsd_cuda.exchanged_pixels.default,
                              (mask, grid[0] * 2, grid[1] * 2 - 1, 2, 2))
