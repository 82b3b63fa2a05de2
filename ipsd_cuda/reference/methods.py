"""The training methods: each prepares its own batch and takes its own step.

- ``ce``: cross-entropy on shuffled batches.
- ``cskd``: class-wise self-distillation (Yun et al., 2020): the batch is
  ``B`` anchors then ``B`` same-class partners; the partners' softened
  predictions, under no grad, teach the anchors.
- ``ips``: intra-class patch swap self-distillation: the batch (anchors then
  partners, pairs ``i`` and ``i + B``) is swapped; the more confident member
  of each pair teaches the other (:func:`ipsd_cuda.ips_loss`).
- ``cutmix``: CutMix with a box for every pair (:class:`ipsd_cuda.CutMix`) on
  shuffled batches, cross-entropy against its soft targets.
- ``swap-across``: IPS's batches and swap, but pairing across classes
  (``pairing="any"``) with soft targets weighed by the exchanged share
  (:func:`ipsd_cuda.mix_cross_entropy`) and no distillation: IPS's swap
  without its intra-class constraint.

A method is an object with ``paired`` (whether its batches come from the pair
sampler), ``prepare`` (the raw uint8 batch on the device to a :class:`Batch`:
the swap or the CutMix), ``step`` (the forward passes and the loss) and
``collate`` (a DataLoader collate function, for swapping in the loader's
workers). The training loop calls them and nothing else, so it has no
branch per method.

Every step returns the loss and a dict of detached 0-d tensors, summed over
an epoch by the training loop without a host synchronisation: the loss
terms, ``backward_images`` (the images whose gradient the step computes: the
method's cost) and, for the paired methods, how far apart the two members of
a pair are in true-class probability, for swapped and for clean pairs apart:
the gap that the swap is meant to open between teacher and student.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

import ipsd_cuda

Stats = Dict[str, torch.Tensor]


@dataclass
class Batch:
    """One training batch on the device.

    Attributes:
        x: the model's input (for the swapping methods: the swapped images).
        y: ``(N,)`` int64 labels.
        plan: the swap plan applied to ``x``, if any.
        clean: ``ips`` with the CE on clean images: the images before the swap.
        share: the exchanged share of each sample (soft targets), if any.
        targets: ``(N, C)`` soft targets, if any.
    """

    x: torch.Tensor
    y: torch.Tensor
    plan: Optional[ipsd_cuda.SwapPlan] = None
    clean: Optional[torch.Tensor] = None
    share: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None

    def normalized(self, normalize: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        """The batch with its images (and clean images) through ``normalize``."""
        clean = None if self.clean is None else normalize(self.clean)
        return Batch(normalize(self.x), self.y, self.plan, clean, self.share, self.targets)


@dataclass(frozen=True)
class LossSettings:
    """The loss hyper-parameters: IPS temperature, CS-KD temperature, KD weight (both methods)."""

    temperature: float = 1.0
    cskd_temperature: float = 4.0
    kd_weight: float = 1.0


@dataclass(frozen=True)
class SwapSettings:
    """The swap of ``ips`` and ``swap-across``: :func:`ipsd_cuda.swap`'s arguments."""

    patch_size: Union[int, Tuple[int, int]] = 4
    swap_ratio: float = 0.5
    alpha: Optional[float] = None
    p: float = 0.5
    region: str = "cells"

    def kwargs(self) -> dict:
        return {"patch_size": self.patch_size, "swap_ratio": self.swap_ratio, "alpha": self.alpha, "p": self.p,
                "region": self.region}

    @property
    def patch(self) -> Tuple[int, int]:
        """The patch as ``(ph, pw)``."""
        return self.patch_size if isinstance(self.patch_size, tuple) else (self.patch_size, self.patch_size)


def class_wise_kd(anchor_logits, partner_logits, temperature):
    """CS-KD's term: ``T^2 KL(softmax(z_partner / T) || softmax(z_anchor / T))``, batch mean."""
    log_student = F.log_softmax(anchor_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(partner_logits.float() / temperature, dim=1)
    return temperature**2 * F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)


def pair_gaps(first_logits, second_logits, y, swapped: Optional[torch.Tensor] = None) -> Stats:
    """Sums and counts of ``|p_first - p_second|``, the pairs' gaps in true-class probability.

    Args:
        first_logits, second_logits: ``(M, K)`` logits of the pairs' two members.
        y: ``(M,)`` their (shared) labels.
        swapped: ``(M,)`` bool, the pairs that exchanged cells (None: none did).

    Example:
        >>> import torch
        >>> from ipsd_cuda.reference.methods import pair_gaps
        >>> g = pair_gaps(torch.tensor([[9.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([0]))
        >>> round(float(g["gap_clean_sum"]), 3), int(g["clean_pairs"])
        (0.5, 1)
    """
    index = y[:, None]
    p_first = first_logits.detach().float().softmax(1).gather(1, index).squeeze(1)
    p_second = second_logits.detach().float().softmax(1).gather(1, index).squeeze(1)
    gap = (p_first - p_second).abs()
    if swapped is None:
        swapped = torch.zeros_like(gap, dtype=torch.bool)
    return {
        "gap_swapped_sum": torch.where(swapped, gap, 0.0).sum(),
        "swapped_pairs": swapped.sum(),
        "gap_clean_sum": torch.where(swapped, 0.0, gap).sum(),
        "clean_pairs": (~swapped).sum(),
    }


def images_count(n: int, device) -> torch.Tensor:
    """``n`` as a 0-d tensor on ``device``, for the step's sums."""
    return torch.full((), n, device=device)


class Method:
    """A training method: its batches, their preparation and its step.

    Attributes:
        name: the method's name on the command line.
        paired: whether batches are ``B`` anchors then ``B`` same-class partners.
        swaps: whether ``prepare`` swaps the batch (the loop times it).
    """

    name = ""
    paired = False
    swaps = False

    def prepare(self, x: torch.Tensor, y: torch.Tensor, plan: Optional[ipsd_cuda.SwapPlan] = None) -> Batch:
        """The batch of uint8 images ``x`` and labels ``y`` on the training device
        (``plan``: the swap a loader's worker applied, if any)."""
        return Batch(x, y)

    def step(self, net, batch: Batch) -> Tuple[torch.Tensor, Stats]:
        """The loss of one normalised batch and its statistics."""
        raise NotImplementedError

    def collate(self) -> Optional[Callable]:
        """A DataLoader collate function that prepares batches in the workers, or None."""
        return None


class CrossEntropy(Method):
    """Cross-entropy on shuffled batches (``ce``)."""

    name = "ce"

    def step(self, net, batch: Batch) -> Tuple[torch.Tensor, Stats]:
        loss = F.cross_entropy(net(batch.x), batch.y)
        return loss, {"ce": loss.detach(), "backward_images": images_count(len(batch.y), batch.y.device)}


@dataclass
class ClassWiseKD(Method):
    """CE on the anchors plus ``kd_weight`` times CS-KD's term from their partners (``cskd``)."""

    settings: LossSettings = field(default_factory=LossSettings)
    name = "cskd"
    paired = True

    def step(self, net, batch: Batch) -> Tuple[torch.Tensor, Stats]:
        half = len(batch.y) // 2
        anchor_logits = net(batch.x[:half])
        with torch.no_grad():
            partner_logits = net(batch.x[half:])
        y = batch.y[:half]
        ce = F.cross_entropy(anchor_logits, y)
        kd = class_wise_kd(anchor_logits, partner_logits, self.settings.cskd_temperature)
        stats = {"ce": ce.detach(), "kd": kd.detach(), "pairs": images_count(half, y.device),
                 "backward_images": images_count(half, y.device)}
        stats.update(pair_gaps(anchor_logits, partner_logits, y))
        return ce + self.settings.kd_weight * kd, stats


@dataclass
class PatchSwapKD(Method):
    """:func:`ipsd_cuda.ips_loss` on the swapped batch, the CE on a clean copy with
    ``ce_on="clean"`` (``ips``); ``swap_on="loader"`` swaps in the loader's workers."""

    settings: LossSettings = field(default_factory=LossSettings)
    swap: SwapSettings = field(default_factory=SwapSettings)
    ce_on: str = "swapped"
    swap_on: str = "device"
    name = "ips"
    paired = True
    swaps = True

    def prepare(self, x, y, plan=None) -> Batch:
        if plan is not None:
            return Batch(x, y, plan)
        clean = x.clone() if self.ce_on == "clean" else None
        return Batch(x, y, ipsd_cuda.swap(x, y, pairing="halves", **self.swap.kwargs()), clean)

    def step(self, net, batch: Batch) -> Tuple[torch.Tensor, Stats]:
        if batch.clean is None:
            logits, clean_logits = net(batch.x), None
        else:
            # One forward over both, so that batch norm sees them together.
            clean_logits, logits = net(torch.cat([batch.clean, batch.x])).chunk(2)
        loss, parts = ipsd_cuda.ips_loss(
            logits, batch.y, batch.plan.partner, temperature=self.settings.temperature,
            kd_weight=self.settings.kd_weight, clean_logits=clean_logits, return_parts=True,
        )
        half = len(batch.y) // 2
        backward = len(batch.y) * (1 if batch.clean is None else 2)
        stats = {"ce": parts.ce, "kd": parts.kd, "pairs": parts.pairs, "first_teacher": parts.first_teacher,
                 "backward_images": images_count(backward, batch.y.device)}
        swapped = batch.plan.mask[:half].flatten(1).any(1)
        stats.update(pair_gaps(logits[:half], logits[half:], batch.y[:half], swapped))
        return loss, stats

    def collate(self) -> Optional[Callable]:
        if self.swap_on != "loader":
            return None
        s = self.swap
        if s.region != "cells":
            raise ValueError("swapping in the loader uses PatchSwapCollate, whose region is 'cells'")
        return ipsd_cuda.PatchSwapCollate(s.patch_size, swap_ratio=s.swap_ratio, alpha=s.alpha, p=s.p,
                                          pairing="halves")


@dataclass
class BoxMix(Method):
    """CutMix with a box for every pair (:class:`ipsd_cuda.CutMix`, pixel boxes,
    ``alpha`` and ``p`` as given), cross-entropy against its soft targets (``cutmix``)."""

    num_classes: int = 10
    alpha: float = 1.0
    p: float = 1.0
    name = "cutmix"
    swaps = True

    def __post_init__(self):
        self.cutmix = ipsd_cuda.CutMix(self.num_classes, alpha=self.alpha, p=self.p)

    def prepare(self, x, y, plan=None) -> Batch:
        x, targets = self.cutmix(x, y)
        return Batch(x, y, targets=targets)

    def step(self, net, batch: Batch) -> Tuple[torch.Tensor, Stats]:
        log_p = F.log_softmax(net(batch.x).float(), dim=1)
        loss = -(batch.targets * log_p).sum(1).mean()
        return loss, {"ce": loss.detach(), "backward_images": images_count(len(batch.y), batch.y.device)}


@dataclass
class SwapAcross(Method):
    """IPS's batches and swap with the pairs drawn across classes, and cross-entropy
    against soft targets weighed by the exchanged share; no distillation (``swap-across``)."""

    swap: SwapSettings = field(default_factory=SwapSettings)
    name = "swap-across"
    paired = True
    swaps = True

    def prepare(self, x, y, plan=None) -> Batch:
        plan = ipsd_cuda.swap(x, y, pairing="any", **self.swap.kwargs())
        h, w = x.shape[-2:]
        return Batch(x, y, plan, share=plan.share((h, w), self.swap.patch_size))

    def step(self, net, batch: Batch) -> Tuple[torch.Tensor, Stats]:
        loss = ipsd_cuda.mix_cross_entropy(net(batch.x), batch.y, batch.plan.partner, batch.share)
        different = batch.y[batch.plan.partner.clamp(min=0)] != batch.y
        return loss, {"ce": loss.detach(), "backward_images": images_count(len(batch.y), batch.y.device),
                      "pairs": (batch.plan.partner >= 0).sum() // 2,
                      "cross_class_pairs": ((batch.plan.partner >= 0) & different).sum() // 2}


METHODS = ("ce", "cskd", "ips", "cutmix", "swap-across")


def build(name: str, settings: LossSettings, swap: SwapSettings, num_classes: int, ce_on: str = "swapped",
          swap_on: str = "device") -> Method:
    """The method called ``name`` with the run's settings."""
    if name == "ce":
        return CrossEntropy()
    if name == "cskd":
        return ClassWiseKD(settings)
    if name == "ips":
        return PatchSwapKD(settings, swap, ce_on, swap_on)
    if name == "cutmix":
        return BoxMix(num_classes)
    if name == "swap-across":
        return SwapAcross(swap)
    raise ValueError(f"unknown method {name!r}; one of {METHODS}")
