"""Applying a plan: kernel == fallback == a plain loop, to the bit, on fresh random inputs."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ipsd_cuda
from conftest import (
    DEVICES,
    HAS_CUDA,
    IMAGE_DTYPES,
    TARGET_DTYPES,
    guard_bytes,
    kernel_available,
    random_bits,
    reference_apply,
    same_bits,
)


@st.composite
def cases(draw, dtypes=IMAGE_DTYPES):
    """One swap problem: sizes, layout, dtype, alignment, plan arguments, a seed."""
    n = draw(st.integers(0, 9))
    patch = draw(st.one_of(st.integers(1, 9), st.tuples(st.integers(1, 9), st.integers(1, 9))))
    return dict(
        n=n,
        c=draw(st.integers(0, 5)),
        h=draw(st.integers(0, 21)),
        w=draw(st.integers(0, 21)),
        patch=patch,
        dtype=draw(st.sampled_from(dtypes)),
        channels_last=draw(st.booleans()),
        storage_offset=draw(st.integers(0, 3)),
        classes=draw(st.integers(1, max(1, n))),
        swap_ratio=draw(st.floats(0.0, 1.0)),
        alpha=draw(st.one_of(st.none(), st.floats(0.05, 5.0))),
        p=draw(st.sampled_from([0.0, 0.5, 1.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def draw_inputs(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    shape = (case["n"], case["c"], case["h"], case["w"])
    images = random_bits(
        shape,
        case["dtype"],
        generator=g,
        channels_last=case["channels_last"],
        device=device,
        storage_offset=case["storage_offset"],
    )
    labels = torch.randint(0, case["classes"], (case["n"],), generator=g).to(device)
    seg = random_bits((case["n"], case["h"], case["w"]), torch.int64, generator=g, device=device)
    return images, labels, seg


def plan_for(case, labels, device):
    gen = torch.Generator(device=device).manual_seed(case["seed"])
    grid = ipsd_cuda.grid_for((case["h"], case["w"]), case["patch"])
    return ipsd_cuda.make_plan(
        labels, grid, swap_ratio=case["swap_ratio"], alpha=case["alpha"], p=case["p"], generator=gen
    )


def check_apply(case, device, backend):
    images, labels, seg = draw_inputs(case, device)
    plan = plan_for(case, labels, device)
    expected = [reference_apply(t, plan, case["patch"]) for t in (images, seg)]
    for t, want in zip((images, seg), expected):
        guards, ptr = guard_bytes(t), t.data_ptr()
        ipsd_cuda.apply_plan(t, plan, patch_size=case["patch"], backend=backend)
        assert same_bits(t, want)
        assert t.data_ptr() == ptr
        assert torch.equal(guard_bytes(t), guards), "wrote outside the tensor"
    assert images.is_contiguous(
        memory_format=torch.channels_last if case["channels_last"] else torch.contiguous_format
    )


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases())
def test_fallback_matches_plain_loop(device, case):
    check_apply(case, device, "torch")


@pytest.mark.parametrize("device", DEVICES)
@given(case=cases())
def test_kernel_matches_plain_loop(device, case):
    if not kernel_available(device):
        pytest.skip(f"no {device} kernel built")
    check_apply(case, device, "kernel")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TARGET_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("patch", [1, 3, (2, 5), 8])
@pytest.mark.parametrize("pairing, region", [("random", "cells"), ("any", "box")])
def test_swap_kernel_equals_fallback_every_dtype_and_layout(device, dtype, channels_last, patch, pairing, region):
    """The whole swap, with a 4-d target, on both backends from the same seed: same bits
    (narrow cells in a box go run by run on the CPU, scattered ones by selection)."""
    if not kernel_available(device):
        pytest.skip(f"no {device} kernel built")
    g = torch.Generator().manual_seed(1234)
    # Images cannot be int64 (a mask's dtype); the same width instead.
    image_dtype = torch.float64 if dtype == torch.int64 else dtype
    images = random_bits((11, 3, 13, 17), image_dtype, generator=g, channels_last=channels_last, device=device)
    target = random_bits((11, 2, 13, 17), dtype, generator=g, channels_last=channels_last, device=device)
    labels = torch.randint(0, 3, (11,), generator=g).to(device)
    results = []
    for backend in ("kernel", "torch"):
        x, t = images.clone(), target.clone()
        plan_gen = torch.Generator(device=device).manual_seed(99)
        plan = ipsd_cuda.swap(
                x, labels, patch_size=patch, targets=[t], p=1.0, pairing=pairing, region=region, alpha=1.0,
                generator=plan_gen, backend=backend,
            )
        assert plan.mask.any(), "the case should move something"
        results.append((x, t, plan))
    (xk, tk, pk), (xt, tt, pt) = results
    assert torch.equal(pk.partner, pt.partner) and torch.equal(pk.mask, pt.mask)
    assert same_bits(xk, xt) and same_bits(tk, tt)
    assert same_bits(xk, reference_apply(images, pk, patch)) and same_bits(tk, reference_apply(target, pk, patch))
    assert tk.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("pairing, region", [("random", "cells"), ("any", "box")])
@pytest.mark.parametrize(
    "labels",
    [[], [4], [0, 1, 2, 3, 4], [2, 2, 2, 2, 2, 2, 2], [1, 1, 1]],
    ids=["empty", "one", "all-distinct", "one-class-odd", "one-class-of-3"],
)
def test_edge_batches(device, backend, pairing, region, labels):
    """Empty and pair-less batches move nothing; one class pairs everything it can, and so does
    pairing="any" whatever the classes."""
    if backend == "kernel" and not kernel_available(device):
        pytest.skip(f"no {device} kernel built")
    g = torch.Generator().manual_seed(len(labels))
    y = torch.tensor(labels, dtype=torch.int64).to(device)
    images = random_bits((len(labels), 3, 9, 9), torch.float32, generator=g, device=device)
    before = images.clone()
    plan = ipsd_cuda.swap(images, y, patch_size=4, pairing=pairing, region=region, backend=backend)
    pairs = int((plan.partner >= 0).sum()) // 2
    if pairing == "any":
        assert pairs == len(labels) // 2
    else:
        assert pairs == sum(labels.count(c) // 2 for c in set(labels))
    assert same_bits(images, reference_apply(before, plan, 4))
    if pairs == 0:
        assert same_bits(images, before) and not plan.mask.any()


@pytest.mark.parametrize("device", DEVICES)
def test_single_cell_grid_moves_nothing(device):
    """G == 1 means k == 0: a patch as large as the image exchanges nothing."""
    g = torch.Generator().manual_seed(0)
    images = random_bits((6, 3, 8, 8), torch.uint8, generator=g, device=device)
    before = images.clone()
    with pytest.warns(UserWarning, match="patch_size=8 covers the whole 8 x 8 image"):
        plan = ipsd_cuda.swap(images, torch.zeros(6, dtype=torch.long, device=device), patch_size=8)
    assert (plan.partner >= 0).all() and not plan.mask.any()
    assert same_bits(images, before)


def test_single_cell_warning_shows_once_per_call_site():
    """Under Python's default filter a loop over batches warns once, not per batch;
    a patch that leaves two cells does not warn."""
    images = torch.rand(4, 1, 6, 5)
    labels = torch.tensor([0, 0, 1, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            ipsd_cuda.swap(images, labels, patch_size=(6, 5))
        ipsd_cuda.swap(images, labels, patch_size=(3, 5))
    assert [str(w.message)[:40] for w in caught] == ["patch_size=(6, 5) covers the whole 6 x 5"]
    assert caught[0].filename == __file__


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_patch_larger_than_any_index(device, backend):
    """A patch beyond 64-bit range is one cell (G = 1): nothing moves, on both backends."""
    if backend == "kernel" and not kernel_available(device):
        pytest.skip(f"no {device} kernel built")
    x = random_bits((4, 2, 5, 6), torch.float32, generator=torch.Generator().manual_seed(0), device=device)
    before = x.clone()
    labels = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.warns(UserWarning, match="covers the whole 5 x 6 image"):
        plan = ipsd_cuda.swap(x, labels, patch_size=(2**70, 2**63 - 1), backend=backend)
    assert plan.grid == (1, 1) and same_bits(x, before)
    plan = ipsd_cuda.swap(x, labels, patch_size=(2, 2**63), backend=backend)
    assert plan.grid == (3, 1) and same_bits(x, reference_apply(before, plan, (2, 2**63)))


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_more_samples_than_one_grid_dimension(backend):
    """N > 65535 exercises the CUDA kernel's loop over samples (grid y is capped)."""
    if not HAS_CUDA:
        pytest.skip("no CUDA device")
    if backend == "kernel" and not kernel_available("cuda"):
        pytest.skip("no cuda kernel built")
    g = torch.Generator().manual_seed(3)
    x = random_bits((70_001, 1, 3, 2), torch.uint8, generator=g, device="cuda")
    labels = torch.randint(0, 5, (70_001,), generator=g).to("cuda")
    before = x.clone()
    plan = ipsd_cuda.swap(x, labels, patch_size=1, backend=backend)
    assert same_bits(x, reference_apply(before, plan, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16], ids=str)
def test_box_rows_of_every_length(device, dtype):
    """A box of a whole grid but one column is one row run of W - 1 pixels: every run length
    from 1 to 69 pixels, against the plain loop (the CPU kernel swaps short runs without a loop)."""
    if not kernel_available(device):
        pytest.skip(f"no {device} kernel built")
    g = torch.Generator().manual_seed(8)
    for width in range(2, 71):
        x = random_bits((3, 2, 3, width), dtype, generator=g, device=device)
        before = x.clone()
        plan = ipsd_cuda.swap(x, torch.zeros(3, dtype=torch.long, device=device), patch_size=1, region="box",
                              swap_ratio=1.0, p=1.0)
        assert int(plan.mask[plan.partner >= 0].flatten(1).sum(1).min()) == 3 * (width - 1)
        assert same_bits(x, reference_apply(before, plan, 1)), width
