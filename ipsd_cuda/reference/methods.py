"""One training step per method: the forward passes and the loss of one batch.

- ``ce``: cross-entropy on shuffled batches.
- ``cskd``: class-wise self-distillation (Yun et al., 2020): the batch is
  ``B`` anchors then ``B`` same-class partners; the partners' softened
  predictions, under no grad, teach the anchors.
- ``ips``: intra-class patch swap self-distillation: the batch (anchors then
  partners, pairs ``i`` and ``i + B``) was swapped by the plan; the more
  confident member of each pair teaches the other (:func:`ipsd_cuda.ips_loss`).

Every step returns the loss and a dict of detached 0-d tensors, summed over
an epoch by the training loop without a host synchronisation. Besides the
loss terms, the paired methods report how far apart the two members of a
pair are in true-class probability, for swapped and for clean pairs apart:
the gap that the swap is meant to open between teacher and student.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import ipsd_cuda

Stats = Dict[str, torch.Tensor]


@dataclass
class Batch:
    """One training batch on the device.

    Attributes:
        x: the model's input, normalised (for ``ips``: the swapped images).
        y: ``(N,)`` int64 labels.
        plan: ``ips``: the swap plan of ``x`` (pairs ``i``, ``i + N/2``).
        clean: ``ips`` with the CE on clean images: the normalised images before the swap.
    """

    x: torch.Tensor
    y: torch.Tensor
    plan: Optional[ipsd_cuda.SwapPlan] = None
    clean: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class LossSettings:
    """The loss hyper-parameters: IPS temperature, CS-KD temperature, KD weight (both methods)."""

    temperature: float = 1.0
    cskd_temperature: float = 4.0
    kd_weight: float = 1.0


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


def ce_step(net, batch: Batch, settings: LossSettings) -> Tuple[torch.Tensor, Stats]:
    """Cross-entropy on the batch."""
    loss = F.cross_entropy(net(batch.x), batch.y)
    return loss, {"ce": loss.detach()}


def cskd_step(net, batch: Batch, settings: LossSettings) -> Tuple[torch.Tensor, Stats]:
    """CE on the anchors plus ``kd_weight`` times CS-KD's term from their partners."""
    half = len(batch.y) // 2
    anchor_logits = net(batch.x[:half])
    with torch.no_grad():
        partner_logits = net(batch.x[half:])
    y = batch.y[:half]
    ce = F.cross_entropy(anchor_logits, y)
    kd = class_wise_kd(anchor_logits, partner_logits, settings.cskd_temperature)
    stats = {"ce": ce.detach(), "kd": kd.detach(), "pairs": torch.full((), half, device=y.device)}
    stats.update(pair_gaps(anchor_logits, partner_logits, y))
    return ce + settings.kd_weight * kd, stats


def ips_step(net, batch: Batch, settings: LossSettings) -> Tuple[torch.Tensor, Stats]:
    """:func:`ipsd_cuda.ips_loss` on the swapped batch (CE on the clean copy when given)."""
    if batch.clean is None:
        logits, clean_logits = net(batch.x), None
    else:
        # One forward over both, so that batch norm sees them together.
        clean_logits, logits = net(torch.cat([batch.clean, batch.x])).chunk(2)
    loss, parts = ipsd_cuda.ips_loss(
        logits, batch.y, batch.plan.partner, temperature=settings.temperature, kd_weight=settings.kd_weight,
        clean_logits=clean_logits, return_parts=True,
    )
    half = len(batch.y) // 2
    stats = {"ce": parts.ce, "kd": parts.kd, "pairs": parts.pairs, "first_teacher": parts.first_teacher}
    swapped = batch.plan.mask[:half].flatten(1).any(1)
    stats.update(pair_gaps(logits[:half], logits[half:], batch.y[:half], swapped))
    return loss, stats


STEPS: Dict[str, Callable[..., Tuple[torch.Tensor, Stats]]] = {"ce": ce_step, "cskd": cskd_step, "ips": ips_step}
METHODS = tuple(STEPS)
