"""CutMix with a box for every pair, and the soft targets of any swap plan.

CutMix (Yun, Han, Oh, Chun, Choe, Yoo: "CutMix: Regularization Strategy to
Train Strong Classifiers with Localizable Features", ICCV 2019) replaces a
box of one image with the same box of another and mixes their labels by the
box's area. timm's ``Mixup(mode="pair")`` cuts a box for every pair in a
Python loop with NumPy randomness; torchvision's ``v2.CutMix`` cuts one box
for the whole batch. Here the box comes from the swap's plan
(``pairing="any"``, ``region="box"``): one box per pair, drawn and exchanged
both ways in place, on the tensors' device, without a host synchronisation.

- :func:`mix_targets`: the soft targets of a plan, ``(N, C)``, with label
  smoothing as in timm's ``mixup_target``;
- :func:`mix_cross_entropy`: the cross-entropy against those targets
  without materialising them, for many classes;
- :class:`CutMix`: the drop-in, ``images, targets = cutmix(images, labels)``.

The weight of the partner's label is the share of a sample's pixels that
the plan exchanged (:meth:`SwapPlan.share`), so any plan, a box or random
cells, within a class or across classes, gets its soft targets the same way.
"""

from numbers import Integral, Real
from typing import Optional, Tuple, cast

import torch
import torch.nn.functional as F

from .patch_swap import Targets, swap
from .plan import PatchSize, check_plan_args, patch_pair


def _check_mix_inputs(labels, partner, share, n: Optional[int] = None, device=None) -> None:
    """Raise unless labels, partner and share are ``(N,)`` tensors of the right dtypes on one device
    (values: see :func:`_check_label_range` and :func:`_check_partner_range`)."""
    for name, value, dtypes, expected in (
        ("labels", labels, (torch.int32, torch.int64), "int32 or int64"),
        ("partner", partner, (torch.int64,), "int64 (pass plan.partner)"),
        ("share", share, _FLOATS, "floating point (pass plan.share(...))"),
    ):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
        if value.dtype not in dtypes:
            raise TypeError(f"{name} must be {expected}, got {value.dtype}")
        if n is None:
            n, device = value.shape[0] if value.dim() == 1 else -1, value.device
        if value.dim() != 1 or value.shape[0] != n:
            expected_shape = "(N,)" if n < 0 else f"(N,) = ({n},)"
            raise ValueError(f"{name} must have shape {expected_shape}, got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} must be on {device}, got {value.device}")


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _values_checked(t: torch.Tensor) -> bool:
    """Whether the values of ``t`` are checked: on the CPU, eagerly. Elsewhere checking would
    wait for the device, which nothing here does, so values are taken as given."""
    return t.device.type == "cpu" and t.numel() > 0 and not torch.compiler.is_compiling()


def _check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Raise unless labels lie in ``[0, num_classes)``: out of range they would index
    outside the targets."""
    if _values_checked(labels):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"labels must lie in [0, num_classes) = [0, {num_classes}), got values in [{low}, {high}]"
            )


def _check_partner_range(partner: torch.Tensor) -> None:
    """Raise unless partner lies in ``[-1, N)``."""
    if _values_checked(partner) and (int(partner.min()) < -1 or int(partner.max()) >= partner.shape[0]):
        raise ValueError(f"partner must lie in [-1, N) = [-1, {partner.shape[0]}) (pass plan.partner)")


def _check_smoothing(label_smoothing) -> None:
    if not isinstance(label_smoothing, Real) or isinstance(label_smoothing, bool):
        raise TypeError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    if not 0.0 <= cast(float, label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")


def _check_num_classes(num_classes) -> None:
    if not isinstance(num_classes, Integral) or isinstance(num_classes, bool):
        raise TypeError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")


def mix_targets(
    labels: torch.Tensor,
    partner: torch.Tensor,
    share: torch.Tensor,
    num_classes: int,
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Soft targets ``(1 - share) * onehot(labels) + share * onehot(labels[partner])``.

    With label smoothing ``s`` each one-hot vector is first smoothed as in
    timm's ``mixup_target``: ``1 - s + s / C`` on its class, ``s / C``
    elsewhere. Unpaired samples (``partner == -1``) keep their own label.
    Every row sums to one. Labels must lie in ``[0, num_classes)`` and
    partners in ``[-1, N)``: checked on the CPU (a ``ValueError``); on a GPU
    they are taken as given, since checking would wait for the device, which
    nothing here does.

    Args:
        labels: ``(N,)`` int32/int64 class labels.
        partner: ``(N,)`` int64, the plan's ``partner``.
        share: ``(N,)`` float, the exchanged share of each sample
            (:meth:`SwapPlan.share`).
        num_classes: ``C``.
        label_smoothing: ``s`` in ``[0, 1)`` (default 0).

    Returns:
        ``(N, C)`` float32.

    Example:
        >>> import torch, ipsd_cuda
        >>> ipsd_cuda.mix_targets(torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([0.25, 0.25]), 3)
        tensor([[0.7500, 0.0000, 0.2500],
                [0.2500, 0.0000, 0.7500]])
    """
    _check_mix_inputs(labels, partner, share)
    _check_num_classes(num_classes)
    _check_smoothing(label_smoothing)
    _check_label_range(labels, num_classes)
    _check_partner_range(partner)
    return _soft_targets(labels, partner, share, num_classes, label_smoothing)


def _soft_targets(
    labels: torch.Tensor, partner: torch.Tensor, share: torch.Tensor, num_classes: int, label_smoothing: float
) -> torch.Tensor:
    """:func:`mix_targets` on inputs already checked."""
    off = label_smoothing / num_classes
    # What moves from a sample's own class to its partner's.
    theirs = share.float() * (1.0 - label_smoothing)
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    targets.scatter_add_(1, labels.long().unsqueeze(1), (1.0 - label_smoothing - theirs).unsqueeze(1))
    targets.scatter_add_(1, _partner_labels(labels, partner).unsqueeze(1), theirs.unsqueeze(1))
    return targets


def _partner_labels(labels: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """Each sample's partner's label as int64, its own where it has no partner."""
    labels = labels.long()
    return torch.where(partner >= 0, labels[partner], labels)


def mix_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    partner: torch.Tensor,
    share: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy against :func:`mix_targets`, without materialising them.

    Equal to ``-(mix_targets(...) * log_softmax(logits)).sum(1).mean()``
    (timm's ``SoftTargetCrossEntropy`` on the soft targets), computed from one
    log-softmax and two gathers, so its memory is that of the logits however
    many classes there are. Runs in float32 for float16/bfloat16 logits (in
    float64 for float64 ones); an empty batch gives 0.

    Args:
        logits: ``(N, C)`` floating point.
        labels, partner, share: as for :func:`mix_targets`, on the logits' device.
        label_smoothing: as for :func:`mix_targets`.

    Returns:
        a 0-d tensor, the mean over the batch.

    Example:
        >>> import torch, ipsd_cuda
        >>> logits = torch.randn(4, 10)
        >>> y, partner, share = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, -1, -1]), torch.tensor([0.3, 0.3, 0, 0])
        >>> soft = ipsd_cuda.mix_targets(y, partner, share, 10)
        >>> expected = -(soft * logits.log_softmax(1)).sum(1).mean()
        >>> torch.allclose(ipsd_cuda.mix_cross_entropy(logits, y, partner, share), expected)
        True
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be (N, C) with C >= 1, got shape {tuple(logits.shape)}")
    _check_mix_inputs(labels, partner, share, logits.shape[0], logits.device)
    _check_smoothing(label_smoothing)
    _check_label_range(labels, logits.shape[1])
    _check_partner_range(partner)
    n = logits.shape[0]
    log_p = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
    share = share.to(log_p.dtype)
    own = log_p.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    theirs = log_p.gather(1, _partner_labels(labels, partner).unsqueeze(1)).squeeze(1)
    loss = -torch.lerp(own, theirs, share)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * log_p.mean(dim=1)
    return loss.sum() / max(n, 1)


class CutMix:
    """CutMix with a box for every pair, in place: ``images, targets = cutmix(images, labels)``.

    Pairs the batch at random (an odd one out stays as it is), and each pair
    exchanges one box, the same in both images, both ways: timm's
    ``Mixup(mixup_alpha=0, cutmix_alpha=1, mode="pair")``, drawn and
    applied on the images' device (CPU or CUDA) with no host
    synchronisation and no Python loop over the batch. The box of a pair is
    ``round(sqrt(lam) * H)`` by ``round(sqrt(lam) * W)`` pixels (cells, with a
    ``patch_size`` above 1) with
    ``lam ~ Beta(alpha, alpha)``, each side at least 1, never the whole
    image, placed uniformly where it fits (timm and torchvision clip a box
    at the border instead, which makes the border's pixels rarer). The soft
    targets weigh the partner's label by the pixels actually exchanged.

    The images are written in place (any image dtype, uint8 included, and
    either memory format); so is every tensor in ``targets``, e.g.
    segmentation masks, which get the same boxes.

    Args:
        num_classes: the number of classes ``C`` of the soft targets.
        p: probability that a pair is mixed (default 1.0, timm's ``prob``).
        alpha: the Beta parameter of the box's area (default 1.0: uniform),
            or None for a fixed area of ``swap_ratio``.
        swap_ratio: the box's area when ``alpha`` is None (default 0.5).
        label_smoothing: as in timm's ``Mixup`` (default 0: torchvision's
            ``CutMix`` has none; timm's ``Mixup`` defaults to 0.1).
        pairing: ``"any"`` (default) pairs the batch whatever the labels;
            ``"random"`` or ``"halves"`` pair within a class (see :func:`swap`).
        patch_size: 1 (default) cuts boxes of pixels; a larger patch snaps
            the boxes to a grid of patches.
        generator: a ``torch.Generator`` on the images' device (default:
            torch's default generator of that device).

    Example:
        >>> import torch, ipsd_cuda
        >>> cutmix = ipsd_cuda.CutMix(num_classes=10)
        >>> images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
        >>> images, targets = cutmix(images, labels)   # images mixed in place
        >>> targets.shape, bool(torch.allclose(targets.sum(1), torch.ones(8)))
        (torch.Size([8, 10]), True)
    """

    def __init__(
        self,
        num_classes: int,
        *,
        p: float = 1.0,
        alpha: Optional[float] = 1.0,
        swap_ratio: float = 0.5,
        label_smoothing: float = 0.0,
        pairing: str = "any",
        patch_size: PatchSize = 1,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        _check_num_classes(num_classes)
        check_plan_args(swap_ratio, alpha, p, pairing, "box")
        _check_smoothing(label_smoothing)
        patch_pair(patch_size)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.num_classes = num_classes
        self.p = p
        self.alpha = alpha
        self.swap_ratio = swap_ratio
        self.label_smoothing = label_smoothing
        self.pairing = pairing
        self.patch_size = patch_size
        self.generator = generator

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, targets: Targets = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix ``images`` (and ``targets``) in place; return them with their soft targets.

        Args:
            images: ``(N, C, H, W)``, as for :func:`swap`.
            labels: ``(N,)`` int32/int64 in ``[0, num_classes)``, on the images' device.
            targets: tensors that get the same boxes, as for :func:`swap`.

        Returns:
            ``(images, soft_targets)``: the same ``images`` tensor, mixed,
            and ``(N, num_classes)`` float32 soft targets for a soft-target
            cross-entropy (timm's ``SoftTargetCrossEntropy``).
        """
        # Before the swap writes anything: a label out of range would fail
        # only in the targets, after the images were mixed.
        _check_num_classes(self.num_classes)
        _check_smoothing(self.label_smoothing)
        if isinstance(labels, torch.Tensor) and labels.dtype in (torch.int32, torch.int64):
            _check_label_range(labels, self.num_classes)
        plan = swap(
            images,
            labels,
            patch_size=self.patch_size,
            swap_ratio=self.swap_ratio,
            alpha=self.alpha,
            p=self.p,
            pairing=self.pairing,
            region="box",
            targets=targets,
            generator=self.generator,
        )
        h, w = images.shape[-2:]
        share = plan.share((h, w), self.patch_size)
        # The labels were checked above and by the swap; partner and share are the plan's.
        soft = _soft_targets(labels, plan.partner, share, self.num_classes, self.label_smoothing)
        return images, soft

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, p={self.p}, alpha={self.alpha}, "
            f"swap_ratio={self.swap_ratio}, label_smoothing={self.label_smoothing}, pairing={self.pairing!r}, "
            f"patch_size={self.patch_size!r})"
        )
