"""Benchmarks of CutMix with a box for every pair: ours, our fallback, the peers, and a copy.

Each group is one input (device, batch shape, dtype, layout) and times, on
that same input, a whole CutMix call, soft targets included where the
implementation makes them:

- ``copy``: ``dst.copy_(images)`` of the batch, the machine's bandwidth reference;
- ``cutmix:kernel``: ``ipsd_cuda.CutMix(10)(images, labels)``, the swap of
  one box per pair (``pairing="any"``, ``region="box"``) with the C++/CUDA
  kernel, then the exchanged share and the soft targets;
- ``cutmix:torch``: the same three steps with the PyTorch fallback
  (:func:`cutmix_torch`: ``CutMix`` has no ``backend`` argument);
- the peers: timm ``Mixup`` (CutMix only, no label smoothing) in ``pair``
  mode (one box per pair, a Python loop over the pairs) and ``elem`` mode
  (one box per sample, a Python loop over the batch), torchvision
  ``v2.CutMix`` (one box for the whole batch) and kornia ``RandomCutMixV2``
  (one box per sample; it returns the boxes' label weights, not soft targets).

The peers cut one box for the batch (torchvision), one per pair (timm
``pair``, as ours) or one per sample (timm ``elem``, kornia), so the ratios
say what a user gains by switching, not how fast equal work is. Ours
are timed in place on one tensor, as a training step would call them; peers
that clone the batch (timm keeps an unmodified original, torchvision
returns a new tensor) are timed with that allocation, as a user pays it.
Every box has a Beta(1, 1)-distributed area, so every implementation moves
about half the batch on average; the median smooths their variation.
timm casts its label weights to the images' dtype: on uint8 they truncate to
0, and its soft targets are the partners' one-hot labels. It is still timed,
the work being the same.

Each benchmark records in ``extra_info`` what ``bench/report.py`` needs for
its CutMix table, with ``bench="cutmix"`` to tell these groups from the
swap's.
"""

import pytest
import torch

# The same inputs, the same seeds and warm-up, the same peer factories as the
# swap's benchmarks: the two sets of ratios compare like with like.
from test_bench_swap import (
    HAS_CUDA,
    NUM_CLASSES,
    SEED,
    WARMUP_CALLS,
    Case,
    Impl,
    _copy,
    _kornia,
    _need_kernel,
    _torchvision,
)

import ipsd_cuda

# Pixel boxes: our CutMix's default, and the grid on which the peers cut theirs.
PATCH_SIZE = 1
ALPHA = 1.0  # Beta(1, 1): a uniform box area, the peers' default
P = 1.0  # every pair mixed, as the peers do by default


def _cases(device, shapes):
    for shape, dtypes in shapes:
        for dtype in dtypes:
            for channels_last in (False, True):
                yield Case(device, shape, PATCH_SIZE, dtype, channels_last)


# The CPU batch of ImageNet-sized images is halved, as for the swap, and
# float32 only, to keep the CPU run short: `make bench` runs every CPU benchmark.
CASES = [
    pytest.param(case, id=case.name, marks=pytest.mark.cpu)
    for case in _cases("cpu", (((256, 3, 32, 32), (torch.uint8, torch.float32)), ((64, 3, 224, 224), (torch.float32,))))
] + [
    pytest.param(
        case,
        id=case.name,
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")],
    )
    for case in _cases(
        "cuda",
        [
            ((256, 3, 32, 32), (torch.uint8, torch.bfloat16, torch.float32)),
            ((128, 3, 224, 224), (torch.uint8, torch.bfloat16, torch.float32)),
        ],
    )
]


def cutmix_torch(images, labels, num_classes=NUM_CLASSES):
    """``ipsd_cuda.CutMix(num_classes)(images, labels)`` with the PyTorch fallback.

    The steps of ``CutMix.__call__`` (swap one box per pair, the exchanged
    share, the soft targets) with ``backend="torch"``, which ``CutMix`` does
    not take: our kernel's gain over the fallback, on the whole call.
    """
    plan = ipsd_cuda.swap(
        images, labels, patch_size=PATCH_SIZE, pairing="any", region="box", alpha=ALPHA, p=P, backend="torch"
    )
    share = plan.share(tuple(images.shape[-2:]), PATCH_SIZE)
    return images, ipsd_cuda.mix_targets(labels, plan.partner, share, num_classes)


def _cutmix_kernel(case, images, labels, plan):
    # CutMix picks the kernel where it is built and falls back silently:
    # without the kernel, this row would time the fallback under our name.
    _need_kernel(case)
    cutmix = ipsd_cuda.CutMix(NUM_CLASSES, p=P, alpha=ALPHA, patch_size=PATCH_SIZE)
    return lambda: cutmix(images, labels)


def _cutmix_torch(case, images, labels, plan):
    return lambda: cutmix_torch(images, labels)


def _timm(mode):
    def make(case, images, labels, plan):
        mixup = pytest.importorskip("timm.data.mixup", reason="timm is not installed: pip install .[bench]")
        # CutMix only (no MixUp) on every pair, and no label smoothing (timm's
        # default is 0.1): the soft targets that ours make.
        mix = mixup.Mixup(
            mixup_alpha=0.0, cutmix_alpha=ALPHA, prob=P, mode=mode, num_classes=NUM_CLASSES, label_smoothing=0.0
        )
        return lambda: mix(images, labels)

    return make


# Kinds for the report: "cutmix" (ours), "peer" or "reference".
IMPLS = {
    "copy": Impl("reference", _copy),
    "cutmix:kernel": Impl("cutmix", _cutmix_kernel),
    "cutmix:torch": Impl("cutmix", _cutmix_torch),
    "timm:pair": Impl("peer", _timm("pair")),
    "timm:elem": Impl("peer", _timm("elem")),
    "torchvision": Impl("peer", _torchvision),
    "kornia": Impl("peer", _kornia),
}
# The boxes each one cuts: how much it randomises, for whoever reads the JSON.
BOXES = {
    "copy": "none",
    "cutmix:kernel": "per pair",
    "cutmix:torch": "per pair",
    "timm:pair": "per pair",
    "timm:elem": "per sample",
    "torchvision": "per batch",
    "kornia": "per sample",
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES)
def test_cutmix(benchmark, others_busy, case, impl):
    torch.manual_seed(SEED)  # our boxes and pairs, and the peers' torch draws
    images, labels = case.images(), case.labels()
    kind = IMPLS[impl].kind
    fn = IMPLS[impl].make(case, images, labels, None)  # no plan: every implementation draws its own
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
    except (TypeError, ValueError, RuntimeError) as err:
        if kind != "peer":
            raise
        pytest.skip(f"{impl} rejects {case.dtype_name} {case.layout} input: {err}")

    benchmark.group = f"cutmix-{case.name}"
    benchmark.extra_info.update(
        bench="cutmix",
        impl=impl,
        kind=kind,
        boxes=BOXES[impl],
        device=case.device,
        shape=list(case.shape),
        dtype=case.dtype_name,
        layout=case.layout,
        num_classes=NUM_CLASSES,
        copy_bytes=2 * images.numel() * images.element_size(),
    )
    benchmark(timed)
    benchmark.extra_info["other_cores_busy"] = others_busy()
