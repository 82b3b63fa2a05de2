"""Benchmarks of the patch swap: our kernel, our fallback, the peers, and a copy.

Each group is one input (device, batch shape, patch size, dtype, layout) and
times, on that same input:

- ``copy``: ``dst.copy_(src)`` of the batch, the machine's bandwidth reference;
- ``plan:kernel`` / ``plan:torch``: ``make_plan`` alone (keys, pairing and
  cell choice, no data moved), native and fallback;
- ``apply:kernel`` / ``apply:torch``: applying a fixed plan, the pure data
  movement, with the C++/CUDA kernel and with the PyTorch fallback;
- ``apply_plan:kernel``: the public ``apply_plan``, which also validates the
  plan (one device synchronisation) before applying it;
- ``swap:kernel`` / ``swap:torch``: the whole ``swap`` (checks, plan, apply);
- the peers, each a whole augmentation call with its own random draws:
  timm ``Mixup`` (CutMix only) in ``pair`` and ``batch`` mode, torchvision
  ``v2.CutMix`` and kornia ``RandomCutMixV2``.

The swap is in place and swapping the same tensor again is just as much work,
so ours are timed in place on one tensor; peers that return a new tensor are
timed with that allocation, as a user would pay it. The CutMix peers cut a
box of Beta(1, 1)-distributed area (half the image on average), so they move
about as much as a swap of ratio 0.5; the median smooths their variation.
They randomise less, though: timm's ``batch`` mode and torchvision cut one box
for the whole batch (one strided copy from the batch in reverse or rolled
order), timm's ``pair`` mode one box per pair in a Python loop, where a swap
exchanges its own random cells in every pair.

Each benchmark records in ``extra_info`` what ``bench/report.py`` needs for
ratios and bandwidth.
"""

from dataclasses import dataclass
from typing import Callable, Tuple

import pytest
import torch

import ipsd_cuda

# The raw ops that ``swap`` runs after drawing its plan. The public
# ``apply_plan`` validates the plan first, with a device synchronisation that
# ``swap`` does not pay; timing the raw ops makes plan + apply add up to swap.
from ipsd_cuda._fallback import apply_plan_torch
from ipsd_cuda._ops import apply_plan_kernel

NUM_CLASSES = 10  # ~N/10 samples per class: all but about one per class pair up
SWAP_RATIO = 0.5
# Every pair swaps (the package's default p is 0.5), so that each benchmark
# moves the full half of every pair, as the peers' CutMix does.
P = 1.0
SEED = 0
# Untimed calls before timing. The first also tells whether a peer accepts the
# input and does lazy imports; CUDA needs a few more to settle its allocator
# and kernel caches. One on the CPU, where the slowest peer takes a second.
WARMUP_CALLS = {"cpu": 1, "cuda": 3}

HAS_CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    """One input that every implementation of a group is timed on."""

    device: str
    shape: Tuple[int, int, int, int]
    patch_size: int
    dtype: torch.dtype
    channels_last: bool

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def name(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"{self.device}-{dims}-p{self.patch_size}-{self.dtype_name}-{self.layout}"

    def images(self) -> torch.Tensor:
        # Drawn on the device itself: filling a large batch on the host would
        # take longer than timing it.
        g = torch.Generator(device=self.device).manual_seed(SEED)
        x = torch.randint(0, 256, self.shape, dtype=torch.uint8, generator=g, device=self.device)
        if self.dtype.is_floating_point:
            x = x.to(self.dtype).div_(255)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory_format)

    def labels(self) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(SEED)
        return torch.randint(0, NUM_CLASSES, self.shape[:1], generator=g, device=self.device)


def _cases(device, imagenet_batch, dtypes):
    shapes = (((256, 3, 32, 32), (4,)), ((imagenet_batch, 3, 224, 224), (16, 32)))
    for shape, patch_sizes in shapes:
        for patch_size in patch_sizes:
            for dtype in dtypes:
                for channels_last in (False, True):
                    yield Case(device, shape, patch_size, dtype, channels_last)


# The CPU batch of ImageNet-sized images is halved to keep the CPU run short.
CASES = [
    pytest.param(case, id=case.name, marks=pytest.mark.cpu)
    for case in _cases("cpu", 64, (torch.uint8, torch.float32))
] + [
    pytest.param(
        case,
        id=case.name,
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")],
    )
    for case in _cases("cuda", 128, (torch.uint8, torch.float32, torch.bfloat16))
]


def moved_bytes(images: torch.Tensor, plan: ipsd_cuda.SwapPlan, patch_size: int) -> int:
    """Bytes a swap must move: each exchanged cell is read and written in both members.

    Counted from the plan, partial border cells included, so it is exact
    where ``4 * swap_ratio * N/2 * C*H*W * itemsize`` is an estimate.
    """
    _, c, h, w = images.shape
    gh, gw = plan.grid
    heights = torch.tensor([min(patch_size, h - r * patch_size) for r in range(gh)])
    widths = torch.tensor([min(patch_size, w - q * patch_size) for q in range(gw)])
    partner, mask = plan.partner.cpu(), plan.mask.cpu()
    lower = partner > torch.arange(partner.shape[0])  # each pair counted once
    pixels = int((mask[lower] * (heights[:, None] * widths[None, :])).sum())
    return 4 * pixels * c * images.element_size()


def _need_kernel(case: Case) -> None:
    if not ipsd_cuda.backends()[case.device]:
        pytest.skip(f"ipsd_cuda has no {case.device} kernel here: backends() = {ipsd_cuda.backends()}")


def _copy(case, images, labels, plan):
    dst = torch.empty_like(images)  # same layout as the source
    return lambda: dst.copy_(images)


def _plan(backend):
    def make(case, images, labels, plan):
        if backend == "kernel":
            _need_kernel(case)
        grid = ipsd_cuda.grid_for(images, case.patch_size)
        return lambda: ipsd_cuda.make_plan(labels, grid, swap_ratio=SWAP_RATIO, p=P, backend=backend)

    return make


def _apply_kernel(case, images, labels, plan):
    _need_kernel(case)
    p = case.patch_size
    return lambda: apply_plan_kernel(images, plan.partner, plan.mask, p, p)


def _apply_torch(case, images, labels, plan):
    p = case.patch_size
    return lambda: apply_plan_torch(images, plan.partner, plan.mask, p, p)


def _apply_plan_checked(case, images, labels, plan):
    _need_kernel(case)
    return lambda: ipsd_cuda.apply_plan(images, plan, patch_size=case.patch_size, backend="kernel")


def _swap(backend):
    def make(case, images, labels, plan):
        if backend == "kernel":
            _need_kernel(case)
        return lambda: ipsd_cuda.swap(
            images, labels, patch_size=case.patch_size, swap_ratio=SWAP_RATIO, p=P, backend=backend
        )

    return make


def _timm(mode):
    def make(case, images, labels, plan):
        mixup = pytest.importorskip("timm.data.mixup", reason="timm is not installed: pip install .[bench]")
        # CutMix only (no MixUp), on every pair, as close to a patch swap as timm gets.
        mix = mixup.Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, mode=mode, num_classes=NUM_CLASSES)
        return lambda: mix(images, labels)

    return make


def _torchvision(case, images, labels, plan):
    v2 = pytest.importorskip("torchvision.transforms.v2", reason="torchvision is not installed")
    cutmix = v2.CutMix(num_classes=NUM_CLASSES)
    return lambda: cutmix(images, labels)


def _kornia(case, images, labels, plan):
    augmentation = pytest.importorskip("kornia.augmentation", reason="kornia is not installed: pip install .[bench]")
    cutmix = augmentation.RandomCutMixV2(data_keys=["input", "class"], use_correct_lambda=True)
    return lambda: cutmix(images, labels)


@dataclass(frozen=True)
class Impl:
    """How to time one implementation: its kind for the report, and a factory
    ``make(case, images, labels, plan)`` of the function to time (it may skip)."""

    kind: str  # "reference", "plan", "apply", "swap" or "peer"
    make: Callable


IMPLS = {
    "copy": Impl("reference", _copy),
    "plan:kernel": Impl("plan", _plan("kernel")),
    "plan:torch": Impl("plan", _plan("torch")),
    "apply:kernel": Impl("apply", _apply_kernel),
    "apply:torch": Impl("apply", _apply_torch),
    "apply_plan:kernel": Impl("apply", _apply_plan_checked),
    "swap:kernel": Impl("swap", _swap("kernel")),
    "swap:torch": Impl("swap", _swap("torch")),
    "timm:pair": Impl("peer", _timm("pair")),
    "timm:batch": Impl("peer", _timm("batch")),
    "torchvision": Impl("peer", _torchvision),
    "kornia": Impl("peer", _kornia),
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES)
def test_swap(benchmark, others_busy, case, impl):
    torch.manual_seed(SEED)  # the plans that swap() draws, and the peers' draws
    images, labels = case.images(), case.labels()
    plan = ipsd_cuda.make_plan(labels, ipsd_cuda.grid_for(images, case.patch_size), swap_ratio=SWAP_RATIO, p=P)
    kind = IMPLS[impl].kind
    fn = IMPLS[impl].make(case, images, labels, plan)
    if case.device == "cuda":
        # Kernels are asynchronous: a call is done when the device is.
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn

    try:
        for _ in range(WARMUP_CALLS[case.device]):
            timed()
    except (TypeError, ValueError) as err:
        if kind != "peer":
            raise
        pytest.skip(f"{impl} rejects {case.dtype_name} {case.layout} input: {err}")

    benchmark.group = case.name
    benchmark.extra_info.update(
        impl=impl,
        kind=kind,
        device=case.device,
        shape=list(case.shape),
        patch_size=case.patch_size,
        dtype=case.dtype_name,
        layout=case.layout,
        swap_ratio=SWAP_RATIO,
        pairs=int((plan.partner > torch.arange(case.shape[0], device=case.device)).sum()),
        moved_bytes=moved_bytes(images, plan, case.patch_size),
        copy_bytes=2 * images.numel() * images.element_size(),
    )
    benchmark(timed)
    benchmark.extra_info["other_cores_busy"] = others_busy()
