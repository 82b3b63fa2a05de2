"""CutMix from the swap engine: the exchanged share, soft targets, their loss, the drop-in
(docs/contract.md, section 10)."""

from contextlib import contextmanager, nullcontext
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset, default_collate

import ipsd_cuda
import ipsd_cuda.plan as plan_module
from conftest import DEVICES, HAS_CUDA, IMAGE_DTYPES, kernel_available, random_bits, reference_apply, same_bits


def needs_kernel(device):
    if not kernel_available(device):
        pytest.skip(f"no {device} kernel built")


def tagged(n, h, w, device="cpu"):
    """Images whose every pixel says which sample it came from (channel 0 = sample index)."""
    return torch.arange(n, dtype=torch.float64, device=device)[:, None, None, None].expand(n, 2, h, w).clone()


@st.composite
def share_cases(draw):
    return dict(
        n=draw(st.integers(0, 17)),
        h=draw(st.integers(1, 23)),
        w=draw(st.integers(1, 23)),
        patch=draw(st.one_of(st.integers(1, 9), st.tuples(st.integers(1, 9), st.integers(1, 9)))),
        pairing=draw(st.sampled_from(["random", "halves", "any"])),
        region=draw(st.sampled_from(["cells", "box"])),
        alpha=draw(st.sampled_from([None, 0.3, 1.0])),
        swap_ratio=draw(st.floats(0, 1)),
        p=draw(st.sampled_from([0.5, 1.0])),
        classes=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**32)),
    )


@pytest.mark.parametrize("device", DEVICES)
@given(case=share_cases())
def test_share_is_the_exchanged_pixel_fraction(device, case):
    """Counted on tagged images, partial edge cells by their pixels: each sample's share of pixels
    that came from another sample, the same for both members of a pair, 0 for the unpaired."""
    needs_kernel(device)
    n = case["n"] - case["n"] % 2 if case["pairing"] == "halves" else case["n"]
    g = torch.Generator().manual_seed(case["seed"])
    labels = torch.randint(0, case["classes"], (n,), generator=g)
    if case["pairing"] == "halves":
        labels[n // 2 :] = labels[: n // 2]
    x = tagged(n, case["h"], case["w"], device)
    with pytest.warns(UserWarning) if ipsd_cuda.grid_for(x, case["patch"]) == (1, 1) else nullcontext():
        plan = ipsd_cuda.swap(
            x, labels.to(device), patch_size=case["patch"], pairing=case["pairing"], region=case["region"],
            alpha=case["alpha"], swap_ratio=case["swap_ratio"], p=case["p"],
            generator=torch.Generator(device=device).manual_seed(case["seed"]),
        )
    share = plan.share((case["h"], case["w"]), case["patch"])
    assert share.dtype == torch.float32 and share.device == x.device and share.shape == (n,)
    own = torch.arange(n, device=device)[:, None, None]
    # Python's int / int is the float64 quotient, correctly rounded: the contract's share.
    counts = (x[:, 0] != own).sum(dim=(1, 2)).tolist() if n else []
    moved = torch.tensor([c / (case["h"] * case["w"]) for c in counts], dtype=torch.float64).float()
    assert torch.equal(share.cpu(), moved)
    paired = plan.partner >= 0
    assert torch.equal(share[paired], share[plan.partner[paired]]) and not share[~paired].any()


@pytest.mark.parametrize("device", DEVICES)
@given(n=st.integers(0, 9), h=st.integers(0, 40), w=st.integers(0, 40), ph=st.integers(1, 45), pw=st.integers(1, 45),
       seed=st.integers(0, 2**32))
def test_exchanged_pixels_op_equals_the_fallbacks_formula(device, n, h, w, ph, pw, seed):
    """The native count of a mask's pixels (partial edge cells by their pixels) is the fallback's,
    on any mask, including images smaller than the patch and empty ones."""
    needs_kernel(device)
    from ipsd_cuda import _ops

    grid = ipsd_cuda.grid_for((h, w), (ph, pw))
    mask = (torch.rand(n, *grid, generator=torch.Generator().manual_seed(seed)) < 0.5).to(device)
    plan = ipsd_cuda.SwapPlan(torch.full((n,), -1, device=device), mask)
    native = plan.share((h, w), (ph, pw))
    with _force_fallback():
        fallback = plan.share((h, w), (ph, pw))
    assert native.device == mask.device and torch.equal(native, fallback)
    if h * w:
        pixels = _ops.exchanged_pixels_kernel(mask, h, w, min(ph, h), min(pw, w))
        rows = torch.tensor([min(ph, h - r * ph) for r in range(grid[0])], device=device)
        cols = torch.tensor([min(pw, w - c * pw) for c in range(grid[1])], device=device)
        assert torch.equal(pixels, (mask * rows[:, None] * cols[None, :]).sum(dim=(1, 2)))


@contextmanager
def _force_fallback():
    """Within it, every ipsd_cuda call takes the PyTorch fallback."""
    never = lambda backend, device: False  # noqa: E731
    with mock.patch.object(ipsd_cuda._ops, "use_kernel", never), mock.patch.object(plan_module, "use_kernel", never):
        yield


def test_share_checks_the_geometry():
    plan = ipsd_cuda.make_plan(torch.tensor([0, 0]), (3, 3))
    with pytest.raises(ValueError, match=r"grid \(3, 3\) is not that of 10 x 10 images with patch size 5"):
        plan.share((10, 10), 5)
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        plan.share((9, 9), 0)
    assert torch.equal(ipsd_cuda.make_plan(torch.tensor([0, 0]), (0, 2)).share((0, 5), 3), torch.zeros(2))


def timm_style_targets(labels, partner, share, num_classes, smoothing):
    """Soft targets as timm's mixup_target builds them: smoothed one-hots mixed by lam = 1 - share."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    mate = torch.where(partner >= 0, partner, torch.arange(len(labels)))

    def one_hot(y):
        return torch.full((len(y), num_classes), off).scatter_(1, y[:, None], on)

    lam = (1 - share)[:, None]
    return one_hot(labels) * lam + one_hot(labels[mate]) * (1 - lam)


@given(
    n=st.integers(0, 40),
    classes=st.integers(1, 12),
    smoothing=st.sampled_from([0.0, 0.1, 0.5]),
    seed=st.integers(0, 2**32),
)
def test_mix_targets_sum_to_one_and_match_timms_formula(n, classes, smoothing, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    plan = ipsd_cuda.make_plan(labels, (4, 4), pairing="any", alpha=1.0, region="box", p=0.7, generator=g)
    share = plan.share((7, 8), 2)
    targets = ipsd_cuda.mix_targets(labels, plan.partner, share, classes, label_smoothing=smoothing)
    assert targets.shape == (n, classes) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(n))
    assert torch.allclose(targets, timm_style_targets(labels, plan.partner, share, classes, smoothing), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@given(n=st.integers(0, 30), classes=st.integers(1, 50), smoothing=st.sampled_from([0.0, 0.2]),
       seed=st.integers(0, 2**32))
def test_mix_cross_entropy_equals_soft_target_cross_entropy(dtype, n, classes, smoothing, seed):
    """The loss and its gradient, without the (N, C) targets, equal the soft-target cross-entropy."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    plan = ipsd_cuda.make_plan(labels, (3, 5), pairing="any", alpha=0.5, generator=g)
    share = plan.share((6, 10), 2)
    logits = (3 * torch.randn(n, classes, generator=g)).to(dtype).requires_grad_()
    loss = ipsd_cuda.mix_cross_entropy(logits, labels, plan.partner, share, label_smoothing=smoothing)
    (grad,) = torch.autograd.grad(loss, logits) if n else (torch.zeros_like(logits),)
    reference_logits = logits.detach().float().requires_grad_()
    soft = ipsd_cuda.mix_targets(labels, plan.partner, share, classes, label_smoothing=smoothing)
    expected = -(soft * F.log_softmax(reference_logits, 1)).sum(1).sum() / max(n, 1)
    (expected_grad,) = torch.autograd.grad(expected, reference_logits) if n else (torch.zeros(n, classes),)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(loss.float(), expected, atol=1e-5)
    assert torch.allclose(grad.float(), expected_grad, atol=1e-5 if dtype != torch.bfloat16 else 1e-2)


def test_mix_cross_entropy_of_unmixed_batch_is_cross_entropy():
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    none = torch.full((6,), -1)
    for smoothing in (0.0, 0.1):
        got = ipsd_cuda.mix_cross_entropy(logits, labels, none, torch.zeros(6), label_smoothing=smoothing)
        assert torch.allclose(got, F.cross_entropy(logits, labels, label_smoothing=smoothing))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", IMAGE_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("patch", [1, 3])
def test_cutmix_mixes_images_and_masks_with_the_same_boxes(device, dtype, channels_last, patch):
    """In place, the images and a mask get the same box per pair, and the soft targets weigh the
    partner's label by the pixels that came from it; odd N leaves one sample as it was."""
    needs_kernel(device)
    n, h, w, classes = 9, 13, 11, 5
    g = torch.Generator().manual_seed(7)
    images = random_bits((n, 3, h, w), dtype, generator=g, channels_last=channels_last, device=device)
    labels = torch.randint(0, classes, (n,), generator=g).to(device)
    source = torch.arange(n, device=device)[:, None, None].expand(n, h, w).contiguous()
    before = images.clone()
    cutmix = ipsd_cuda.CutMix(classes, patch_size=patch, generator=torch.Generator(device=device).manual_seed(3))
    out, targets = cutmix(images, labels, targets=source)
    assert out is images
    assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # Every pixel is its own or its partner's, as the mask says.
    gathered = before[source, :, torch.arange(h, device=device)[:, None], torch.arange(w, device=device)]
    assert same_bits(images, gathered.permute(0, 3, 1, 2))
    own = torch.arange(n, device=device)[:, None, None]
    share = (source != own).double().mean(dim=(1, 2))
    assert int((share > 0).sum()) == n - 1, "p = 1: every pair but the odd one out is mixed"
    partner = torch.where(source != own, source, -1).flatten(1).amax(1)
    expected = ipsd_cuda.mix_targets(labels, partner, share.float(), classes)
    assert torch.allclose(targets, expected, atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(n, device=device))


def test_cutmix_same_generator_same_result_on_both_backends():
    """The drop-in draws its boxes through swap: the kernel and the fallback give the same bits."""
    results = []
    for force in (False, True):
        x = random_bits((16, 3, 32, 32), torch.uint8, generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
        with _force_fallback() if force else nullcontext():
            results.append(ipsd_cuda.CutMix(10, generator=torch.Generator().manual_seed(2))(x, y))
    (xa, ta), (xb, tb) = results
    assert same_bits(xa, xb) and torch.equal(ta, tb)


def test_cutmix_in_a_dataloader_collate():
    """uint8 samples mixed in the workers; each batch comes back with its soft targets."""
    data = TensorDataset(torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8), torch.arange(64) % 4)
    cutmix = ipsd_cuda.CutMix(num_classes=4, label_smoothing=0.1)

    def collate(batch):
        return cutmix(*default_collate(batch))

    loader = DataLoader(data, batch_size=16, num_workers=2, collate_fn=collate, multiprocessing_context="fork")
    for images, targets in loader:
        assert images.dtype == torch.uint8 and targets.shape == (16, 4)
        assert torch.allclose(targets.sum(1), torch.ones(16)) and (targets >= 0.1 / 4 - 1e-7).all()


@pytest.mark.parametrize("device", DEVICES)
def test_cutmix_compiles_fullgraph(device):
    needs_kernel(device)
    torch._dynamo.reset()
    cutmix = ipsd_cuda.CutMix(10)

    def step(images, labels):
        images, targets = cutmix(images, labels)
        return images * 2, targets

    source = torch.rand(8, 3, 16, 16, device=device)
    labels = torch.arange(8, device=device)
    # Inductor draws its own random numbers unless told to use eager's: with
    # them the compiled call mixes exactly as eager does.
    with torch._inductor.config.patch(fallback_random=True):
        results = []
        for run in (torch.compile(step, fullgraph=True), step):
            images = source.clone()
            torch.manual_seed(3)
            results.append((images, *run(images, labels)))
    (xa, da, ta), (xb, db, tb) = results
    assert same_bits(xa, xb) and same_bits(da, xa * 2) and torch.equal(ta, tb)
    assert not same_bits(xa, source) and (ta.max(1).values < 1).any(), "something was mixed"


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cutmix_on_cuda_never_synchronises_and_replays_in_a_graph():
    """No call waits for the device (torch's sync debug mode raises on one), and a captured
    CutMix replays with the eager call's boxes and targets from the same generator state."""
    needs_kernel("cuda")
    g = torch.Generator().manual_seed(0)
    source = random_bits((64, 3, 32, 32), torch.bfloat16, generator=g, device="cuda")
    labels = torch.randint(0, 10, (64,), generator=g).cuda()
    masks = torch.randint(0, 5, (64, 32, 32), generator=g).cuda()
    cutmix = ipsd_cuda.CutMix(10, label_smoothing=0.1)
    cutmix(source.clone(), labels)  # warm-up: allocator and lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cutmix(source.clone(), labels, targets=masks.clone())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static, static_masks = source.clone(), masks.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cutmix(source.clone(), labels)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, captured = cutmix(static, labels, targets=static_masks)
    eager, eager_masks = source.clone(), masks.clone()
    torch.cuda.manual_seed(1)
    _, expected = cutmix(eager, labels, targets=eager_masks)
    static.copy_(source)
    static_masks.copy_(masks)
    torch.cuda.manual_seed(1)
    graph.replay()
    torch.cuda.synchronize()
    assert same_bits(static, eager) and torch.equal(static_masks, eager_masks) and torch.equal(captured, expected)


def test_cutmix_repr():
    assert repr(ipsd_cuda.CutMix(10, alpha=None, swap_ratio=0.3)) == (
        "CutMix(num_classes=10, p=1.0, alpha=None, swap_ratio=0.3, label_smoothing=0.0, pairing='any', "
        "patch_size=1)"
    )


BAD_CUTMIX = [
    (dict(num_classes=0), ValueError, "num_classes must be >= 1"),
    (dict(num_classes=2.0), TypeError, "num_classes must be an int"),
    (dict(num_classes=10, p=1.5), ValueError, r"p must be in \[0, 1\]"),
    (dict(num_classes=10, alpha=0), ValueError, "alpha must be a finite number > 0"),
    (dict(num_classes=10, label_smoothing=1.0), ValueError, r"label_smoothing must be in \[0, 1\)"),
    (dict(num_classes=10, label_smoothing="0.1"), TypeError, "label_smoothing must be a number"),
    (dict(num_classes=10, pairing="across"), ValueError, "pairing must be one of"),
    (dict(num_classes=10, patch_size=0), ValueError, "patch_size must be >= 1"),
    (dict(num_classes=10, generator=1), TypeError, "generator must be a torch.Generator"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_CUTMIX, ids=[c[2][:30] for c in BAD_CUTMIX])
def test_cutmix_rejects_bad_settings(kwargs, error, message):
    with pytest.raises(error, match=message):
        ipsd_cuda.CutMix(**kwargs)


def test_cutmix_call_rejects_before_touching_memory():
    images = random_bits((4, 3, 8, 8), torch.float32, generator=torch.Generator().manual_seed(0))
    before = images.clone()
    cutmix = ipsd_cuda.CutMix(10)
    for labels in ([0, 1, 2, 10], [-1, 0, 1, 2]):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes\) = \[0, 10\)"):
            cutmix(images, torch.tensor(labels))
    with pytest.raises(ValueError, match="labels must have length N = 4"):
        cutmix(images, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"targets\[0\] must have N, H, W"):
        cutmix(images, torch.tensor([0, 1, 2, 3]), targets=torch.zeros(4, 7, 8, dtype=torch.int64))
    assert same_bits(images, before)


BAD_MIX = [
    ("labels dtype", lambda y, p, s: (y.float(), p, s), TypeError, "labels must be int32 or int64"),
    ("partner dtype", lambda y, p, s: (y, p.int(), s), TypeError, r"partner must be int64 \(pass plan.partner\)"),
    ("share dtype", lambda y, p, s: (y, p, s.long()), TypeError, "share must be floating point"),
    ("share length", lambda y, p, s: (y, p, s[:3]), ValueError, r"share must have shape \(N,\) = \(4,\)"),
    ("partner rank", lambda y, p, s: (y, p[:, None], s), ValueError, r"partner must have shape \(N,\)"),
    ("share device", lambda y, p, s: (y, p, s.to("meta")), ValueError, "share must be on cpu"),
    ("labels type", lambda y, p, s: (y.tolist(), p, s), TypeError, "labels must be a tensor"),
    ("labels range", lambda y, p, s: (y + 1, p, s), ValueError, r"labels must lie in \[0, num_classes\) = \[0, 4\)"),
    ("negative label", lambda y, p, s: (y - 1, p, s), ValueError, r"labels must lie in \[0, num_classes\)"),
    ("partner range", lambda y, p, s: (y, p + 1, s), ValueError, r"partner must lie in \[-1, N\) = \[-1, 4\)"),
    ("partner below -1", lambda y, p, s: (y, p - 2, s), ValueError, r"partner must lie in \[-1, N\)"),
    ("labels 2-d", lambda y, p, s: (y[:, None], p, s), ValueError, r"labels must have shape \(N,\)"),
]


@pytest.mark.parametrize("name, build, error, message", BAD_MIX, ids=[c[0] for c in BAD_MIX])
def test_mix_functions_reject_bad_input(name, build, error, message):
    args = build(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 3, 2]), torch.full((4,), 0.25))
    with pytest.raises(error, match=message):
        ipsd_cuda.mix_targets(*args, 4)
    with pytest.raises(error, match=message):
        ipsd_cuda.mix_cross_entropy(torch.zeros(4, 4), *args)


def test_share_rejects_bad_image_sizes():
    plan = ipsd_cuda.make_plan(torch.tensor([0, 0]), (4, 4))
    for size, error in (((16.0, 16.0), TypeError), ((16, 16, 3), TypeError), (16, TypeError), ((True, 16), TypeError),
                        ((-16, 16), ValueError)):
        with pytest.raises(error, match="image_size must be"):
            plan.share(size, 4)
    assert torch.equal(plan.share(torch.Size([16, 16]), 4), plan.share([16, 16], 4))


def test_results_do_not_depend_on_the_default_dtype():
    y, partner, share = torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0.25, 0.25])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        targets = ipsd_cuda.mix_targets(y, partner, share, 3)
        empty = ipsd_cuda.make_plan(y, (0, 2)).share((0, 5), 3)
    finally:
        torch.set_default_dtype(previous)
    assert targets.dtype == torch.float32 and empty.dtype == torch.float32


def test_mix_cross_entropy_keeps_float64():
    logits = torch.randn(4, 3, dtype=torch.float64)
    loss = ipsd_cuda.mix_cross_entropy(logits, torch.tensor([0, 1, 2, 0]), torch.tensor([1, 0, -1, -1]),
                                       torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert loss.dtype == torch.float64


def test_mix_functions_reject_bad_settings():
    y, p, s = torch.tensor([0, 1]), torch.tensor([1, 0]), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ipsd_cuda.mix_targets(y, p, s, 0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        ipsd_cuda.mix_targets(y, p, s, 2, label_smoothing=-0.1)
    with pytest.raises(ValueError, match=r"logits must be \(N, C\)"):
        ipsd_cuda.mix_cross_entropy(torch.zeros(2), y, p, s)
    with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
        ipsd_cuda.mix_cross_entropy(torch.zeros(2, 2, dtype=torch.long), y, p, s)
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\) = \(3,\)"):
        ipsd_cuda.mix_cross_entropy(torch.zeros(3, 2), y, p, s)


@pytest.mark.parametrize("device", DEVICES)
def test_box_plan_replays_on_a_mask_with_apply_plan(device):
    """A box plan is an ordinary plan: apply_plan replays it on another tensor."""
    needs_kernel(device)
    g = torch.Generator().manual_seed(5)
    images = random_bits((6, 3, 10, 10), torch.float32, generator=g, device=device)
    plan = ipsd_cuda.swap(images, torch.arange(6, device=device), patch_size=1, pairing="any", region="box",
                          alpha=1.0, p=1.0)
    mask = random_bits((6, 10, 10), torch.int64, generator=g, device=device)
    expected = reference_apply(mask.clone(), plan, 1)
    ipsd_cuda.apply_plan(mask, plan, patch_size=1)
    assert same_bits(mask, expected)


def test_timm_soft_target_cross_entropy_takes_the_targets_unchanged():
    """The README's timm loop: SoftTargetCrossEntropy on CutMix's targets is mix_cross_entropy."""
    loss_module = pytest.importorskip("timm.loss", reason="timm is not installed")
    g = torch.Generator().manual_seed(4)
    images, labels = torch.rand(12, 3, 16, 16, generator=g), torch.randint(0, 7, (12,), generator=g)
    cutmix = ipsd_cuda.CutMix(7, label_smoothing=0.1, generator=torch.Generator().manual_seed(5))
    _, targets = cutmix(images, labels)
    logits = torch.randn(12, 7, generator=g)
    plan = ipsd_cuda.swap(torch.rand(12, 3, 16, 16), labels, patch_size=1, pairing="any", region="box", alpha=1.0,
                          p=1.0, generator=torch.Generator().manual_seed(5))
    ours = ipsd_cuda.mix_cross_entropy(logits, labels, plan.partner, plan.share((16, 16), 1), label_smoothing=0.1)
    assert torch.allclose(loss_module.SoftTargetCrossEntropy()(logits, targets), ours, atol=1e-6)
