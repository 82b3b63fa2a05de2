"""Every misuse raises a clear ValueError/TypeError before any byte changes (docs/contract.md, section 9)."""

import pytest
import torch

import ipsd_cuda
from conftest import HAS_CUDA, random_bits, reference_apply, same_bits

N, C, H, W = 6, 3, 10, 12


def fresh():
    g = torch.Generator().manual_seed(0)
    images = random_bits((N, C, H, W), torch.float32, generator=g)
    seg = random_bits((N, H, W), torch.int64, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    return images, labels, seg


def kwargs(**overrides):
    base = dict(patch_size=4)
    base.update(overrides)
    return base


# (name, exception, message fragment, builder(images, labels, seg) -> (args, kwargs))
CASES = [
    ("images rank", ValueError, "images must be", lambda x, y, s: ((x[0], y), kwargs())),
    ("images dtype", TypeError, "images must have dtype", lambda x, y, s: ((x.to(torch.int32), y), kwargs())),
    ("images not a tensor", TypeError, "images must be a tensor", lambda x, y, s: ((x.numpy(), y), kwargs())),
    ("labels length", ValueError, "labels must have length N = 6", lambda x, y, s: ((x, y[:5]), kwargs())),
    ("labels dtype", TypeError, "labels must be int32 or int64", lambda x, y, s: ((x, y.float()), kwargs())),
    ("labels rank", ValueError, "labels must be 1-d", lambda x, y, s: ((x, y[:, None]), kwargs())),
    ("labels device", ValueError, "labels must be on the images' device", lambda x, y, s: ((x, y.to("meta")), kwargs())),
    ("target H", ValueError, r"targets\[0\] must have N, H, W", lambda x, y, s: ((x, y), kwargs(targets=[s[:, :9]]))),
    ("target N", ValueError, r"targets\[1\] must have N, H, W", lambda x, y, s: ((x, y), kwargs(targets=[s, s[:5].clone()]))),
    ("target dtype", TypeError, r"targets\[0\] must have dtype", lambda x, y, s: ((x, y), kwargs(targets=[s.bool()]))),
    ("target rank", ValueError, r"targets\[0\] must be \(N, H, W\)", lambda x, y, s: ((x, y), kwargs(targets=[s[0]]))),
    ("targets type", TypeError, "targets must be a tensor", lambda x, y, s: ((x, y), kwargs(targets={"a": s}))),
    ("patch 0", ValueError, "patch_size must be >= 1", lambda x, y, s: ((x, y), kwargs(patch_size=0))),
    ("patch pair 0", ValueError, "patch_size must be >= 1", lambda x, y, s: ((x, y), kwargs(patch_size=(2, 0)))),
    ("patch float", TypeError, "patch_size must be an int", lambda x, y, s: ((x, y), kwargs(patch_size=2.5))),
    ("patch triple", TypeError, "patch_size must be an int", lambda x, y, s: ((x, y), kwargs(patch_size=(2, 2, 2)))),
    ("swap_ratio", ValueError, r"swap_ratio must be in \[0, 1\]", lambda x, y, s: ((x, y), kwargs(swap_ratio=1.5))),
    ("swap_ratio neg", ValueError, r"swap_ratio must be in \[0, 1\]", lambda x, y, s: ((x, y), kwargs(swap_ratio=-0.1))),
    ("p", ValueError, r"p must be in \[0, 1\]", lambda x, y, s: ((x, y), kwargs(p=2.0))),
    ("p type", TypeError, "p must be a number", lambda x, y, s: ((x, y), kwargs(p="1"))),
    ("alpha 0", ValueError, "alpha must be a finite number > 0", lambda x, y, s: ((x, y), kwargs(alpha=0.0))),
    ("alpha neg", ValueError, "alpha must be a finite number > 0", lambda x, y, s: ((x, y), kwargs(alpha=-1.0))),
    ("alpha inf", ValueError, "alpha must be a finite number > 0", lambda x, y, s: ((x, y), kwargs(alpha=float("inf")))),
    ("alpha nan", ValueError, "alpha must be a finite number > 0", lambda x, y, s: ((x, y), kwargs(alpha=float("nan")))),
    ("swap_ratio nan", ValueError, r"swap_ratio must be in \[0, 1\]", lambda x, y, s: ((x, y), kwargs(swap_ratio=float("nan")))),
    ("pairing", ValueError, "pairing must be one of", lambda x, y, s: ((x, y), kwargs(pairing="class"))),
    ("region", ValueError, "region must be one of", lambda x, y, s: ((x, y), kwargs(region="boxes"))),
    ("region with any", ValueError, "region must be one of", lambda x, y, s: ((x, y), kwargs(pairing="any", region=None))),
    ("pairing list", ValueError, "pairing must be one of", lambda x, y, s: ((x, y), kwargs(pairing=["any"]))),
    ("region dict", ValueError, "region must be one of", lambda x, y, s: ((x, y), kwargs(region={"box": 1}))),
    ("halves mismatch", ValueError, r"labels\[0\] = 0 != labels\[3\] = 1", lambda x, y, s: ((x, y), kwargs(pairing="halves", targets=[s]))),
    ("backend", ValueError, "backend must be one of", lambda x, y, s: ((x, y), kwargs(backend="cuda"))),
    ("generator type", TypeError, "generator must be a torch.Generator", lambda x, y, s: ((x, y), kwargs(generator=0))),
    ("non-dense images", ValueError, "images must be contiguous or channels_last", lambda x, y, s: ((x[:, :, :, ::2], y), kwargs())),
    ("permuted images", ValueError, "images must be contiguous or channels_last", lambda x, y, s: ((x.transpose(2, 3), y), kwargs())),
    ("overlapping images", ValueError, "images must be contiguous or channels_last", lambda x, y, s: ((x[:1].expand(N, C, H, W), y), kwargs())),
    ("overlapping target", ValueError, r"targets\[0\] must be contiguous", lambda x, y, s: ((x, y), kwargs(targets=[s[:1].expand(N, H, W)]))),
    ("target is images", ValueError, r"images and targets\[0\] share memory", lambda x, y, s: ((x, y), kwargs(targets=[x]))),
    ("targets share memory", ValueError, r"share memory", lambda x, y, s: ((x, y), kwargs(targets=[s, s.view(N, 1, H, W)]))),
    ("images requires grad", ValueError, "images requires grad", lambda x, y, s: ((x.requires_grad_(), y), kwargs())),
    ("target requires grad", ValueError, r"targets\[0\] requires grad", lambda x, y, s: ((x, y), kwargs(targets=[s.double().requires_grad_()]))),
]


@pytest.mark.parametrize("name, error, message, build", CASES, ids=[c[0] for c in CASES])
def test_swap_rejects_before_touching_memory(name, error, message, build):
    images, labels, seg = fresh()
    args, kw = build(images, labels, seg)
    written = [t for t in (args[0], *kw.get("targets", [])) if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    before = [t.detach().clone() for t in written]
    with pytest.raises(error, match=message):
        ipsd_cuda.swap(*args, **kw)
    for t, b in zip(written, before):
        assert same_bits(t.detach(), b), f"{name}: memory changed before the error"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device type")
def test_generator_on_another_device():
    images, labels, _ = fresh()
    before = images.clone()
    with pytest.raises(ValueError, match="generator must be on the tensors' device cpu"):
        ipsd_cuda.swap(images, labels, patch_size=4, generator=torch.Generator("cuda"))
    assert same_bits(images, before)


def test_make_plan_rejects_bad_arguments():
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="grid must be"):
        ipsd_cuda.make_plan(labels, (2,))
    with pytest.raises(ValueError, match="grid must be"):
        ipsd_cuda.make_plan(labels, (-1, 2))
    with pytest.raises(TypeError, match="labels must be a tensor"):
        ipsd_cuda.make_plan([0, 0], (2, 2))
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        ipsd_cuda.make_plan(labels, (2, 2), alpha=0)


def _valid_plan():
    return ipsd_cuda.make_plan(torch.tensor([0, 0, 1, 1, 2]), (3, 3), generator=torch.Generator().manual_seed(0))


def _plan(partner=None, mask=None):
    base = _valid_plan()
    return ipsd_cuda.SwapPlan(
        base.partner if partner is None else torch.tensor(partner), base.mask if mask is None else mask
    )


def _asymmetric_mask():
    mask = _valid_plan().mask.clone()
    mask[0] = ~mask[0]
    return mask


def _unpaired_with_cells():
    mask = _valid_plan().mask.clone()
    mask[4, 0, 0] = True
    return mask


BAD_PLANS = [
    ("out of range", lambda: _plan(partner=[1, 0, 3, 2, 5]), "not a valid swap plan at sample 4"),
    ("not an involution", lambda: _plan(partner=[1, 2, 3, 0, -1]), "not a valid swap plan at sample 0"),
    ("fixed point", lambda: _plan(partner=[0, -1, 3, 2, -1]), "not a valid swap plan at sample 0"),
    ("asymmetric mask", lambda: _plan(mask=_asymmetric_mask()), "not a valid swap plan at sample 0"),
    ("unpaired with cells", lambda: _plan(mask=_unpaired_with_cells()), "not a valid swap plan at sample 4"),
    ("wrong grid", lambda: ipsd_cuda.SwapPlan(_valid_plan().partner, torch.zeros(5, 2, 3, dtype=torch.bool)), "plan.mask must be bool of shape"),
    ("wrong N", lambda: ipsd_cuda.SwapPlan(torch.tensor([1, 0]), torch.zeros(2, 3, 3, dtype=torch.bool)), r"plan.partner must be int64 of shape \(5,\)"),
    ("int32 partner", lambda: ipsd_cuda.SwapPlan(_valid_plan().partner.int(), _valid_plan().mask), "plan.partner must be int64"),
    ("other device", lambda: _valid_plan().to("meta"), "plan must be on the tensor's device"),
]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("name, make, message", BAD_PLANS, ids=[c[0] for c in BAD_PLANS])
def test_apply_plan_rejects_invalid_plans(backend, name, make, message):
    x = random_bits((5, 2, 9, 9), torch.uint8, generator=torch.Generator().manual_seed(1))
    before = x.clone()
    with pytest.raises(ValueError, match=message):
        ipsd_cuda.apply_plan(x, make(), patch_size=3, backend=backend)
    assert same_bits(x, before)


BAD_TENSORS = [
    ("dtype", TypeError, "tensor must have dtype", lambda x: x.to(torch.int32)),
    ("rank", ValueError, r"tensor must be \(N, H, W\) or \(N, C, H, W\)", lambda x: x[0, 0]),
    ("non-dense", ValueError, "tensor must be contiguous or channels_last", lambda x: x[..., ::2]),
    ("requires grad", ValueError, "tensor requires grad", lambda x: x.double().requires_grad_()),
    ("not a tensor", TypeError, "tensor must be a tensor", lambda x: x.tolist()),
]


@pytest.mark.parametrize("name, error, message, make", BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_apply_plan_rejects_bad_tensors(name, error, message, make):
    x = random_bits((5, 2, 9, 9), torch.float32, generator=torch.Generator().manual_seed(1))
    bad = make(x)
    with pytest.raises(error, match=message):
        ipsd_cuda.apply_plan(bad, _valid_plan(), patch_size=3)


def test_apply_plan_accepts_a_plan_made_of_views():
    """A hand-built plan may hold non-contiguous tensors; every backend takes it."""
    plan = _valid_plan()
    transposed = ipsd_cuda.SwapPlan(plan.partner, plan.mask.transpose(1, 2).contiguous().transpose(1, 2))
    assert not transposed.mask.is_contiguous()
    results = []
    for backend in ("auto", "torch"):
        x = random_bits((5, 2, 9, 9), torch.uint8, generator=torch.Generator().manual_seed(1))
        ipsd_cuda.apply_plan(x, transposed, patch_size=3, backend=backend)
        results.append(x)
    assert same_bits(*results)


def test_apply_plan_rejects_non_plans():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(TypeError, match="plan must be a SwapPlan"):
        ipsd_cuda.apply_plan(x, (torch.tensor([1, 0]), torch.ones(2, 2, 2, dtype=torch.bool)), patch_size=2)


def test_kernel_backend_without_kernel_says_how_to_build(monkeypatch):
    from ipsd_cuda import _ops

    monkeypatch.setattr(_ops, "_BUILT", {"cpu": False, "cuda": False})
    images, labels, _ = fresh()
    before = images.clone()
    with pytest.raises(RuntimeError, match="no cpu kernel"):
        ipsd_cuda.swap(images, labels, patch_size=4, backend="kernel")
    assert same_bits(images, before)
    # "auto" quietly falls back.
    ipsd_cuda.swap(images, labels, patch_size=4, backend="auto")


CHANNELS_LAST_SHAPES = [(8, 32, 32, 3), (8, 28, 28, 1), (4, 64, 48, 4), (2, 224, 224, 3), (4, 16, 20, 3)]
# Channels-first batches that share a size with an image layout, tiny ones
# included: where a batch could be either, it is taken as (N, C, H, W).
CHANNELS_FIRST_SHAPES = [
    (8, 3, 32, 32),
    (8, 1, 28, 28),
    (4, 64, 4, 4),
    (4, 3, 4, 4),
    (4, 8, 8, 3),
    (4, 4, 4, 3),
    (4, 3, 32, 3),
]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES, ids=str)
def test_swap_rejects_images_that_look_channels_last(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    images = random_bits(shape, dtype, generator=g)
    labels = torch.randint(0, 2, (shape[0],), generator=g)
    before = images.clone()
    with pytest.raises(ValueError, match=r"look like \(N, H, W, C\).*images.permute\(0, 3, 1, 2\)"):
        ipsd_cuda.swap(images, labels, patch_size=4)
    assert same_bits(images, before)


@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES[:2], ids=str)
def test_permuted_channels_last_images_swap_in_place(shape):
    """The error's advice works: the permuted view is swapped, in the caller's memory."""
    g = torch.Generator().manual_seed(1)
    nhwc = random_bits(shape, torch.float32, generator=g)
    before = nhwc.clone()
    labels = torch.tensor([0, 1] * (shape[0] // 2))
    plan = ipsd_cuda.swap(nhwc.permute(0, 3, 1, 2), labels, patch_size=4, p=1.0)
    assert plan.grid == (shape[1] // 4, shape[2] // 4) and plan.mask.any()
    assert same_bits(nhwc, reference_apply(before.permute(0, 3, 1, 2), plan, 4).permute(0, 2, 3, 1))


@pytest.mark.parametrize("shape", CHANNELS_FIRST_SHAPES, ids=str)
def test_swap_takes_channels_first_images_as_given(shape):
    g = torch.Generator().manual_seed(sum(shape))
    images = random_bits(shape, torch.uint8, generator=g)
    before = images.clone()
    labels = torch.tensor([0, 1] * (shape[0] // 2))
    plan = ipsd_cuda.swap(images, labels, patch_size=2, p=1.0)
    assert plan.mask.any()
    assert same_bits(images, reference_apply(before, plan, 2))


def test_make_plan_and_apply_plan_take_any_layout_as_given():
    """The way out the error names, for a batch that really is 32 channels of 32 x 3 pixels."""
    g = torch.Generator().manual_seed(2)
    images = random_bits((4, 32, 32, 3), torch.float32, generator=g)
    before = images.clone()
    plan = ipsd_cuda.make_plan(torch.tensor([0, 0, 1, 1]), ipsd_cuda.grid_for(images, 2), p=1.0)
    ipsd_cuda.apply_plan(images, plan, patch_size=2)
    assert same_bits(images, reference_apply(before, plan, 2))


def test_non_dense_error_says_contiguous_is_a_copy():
    images, labels, _ = fresh()
    with pytest.raises(ValueError, match=r"images.contiguous\(\) is a copy: swap the copy and use it"):
        ipsd_cuda.swap(images[..., ::2], labels, patch_size=4)
