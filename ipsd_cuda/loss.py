"""The instance-to-instance distillation loss of intra-class patch swap.

After a swap, the two members of each pair show the same class through
exchanged patches. The member that is more confident on its true class is
the teacher, the other the student, and the student is pulled towards the
teacher's softened prediction (``docs/contract.md``, section 5)::

    loss = ce + kd_weight * T^2 * KL(softmax(z_t / T).detach() || softmax(z_s / T))

Everything is vectorised over the batch and free of host synchronisation on
a GPU, so it can sit in a CUDA training loop without stalls.
"""

from numbers import Real
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .plan import partner_mates


class IPSLossParts(NamedTuple):
    """The terms of one :func:`ips_loss` call, detached, as 0-d tensors.

    Attributes:
        ce: mean cross-entropy over all samples.
        kd: the distillation term, ``T^2`` times the KL divergence averaged
            over pairs (before ``kd_weight``); 0 when there are no pairs.
        pairs: int64, the number of pairs that were distilled.
        first_teacher: the share of pairs whose lower-index member was the
            teacher; 0 when there are no pairs. Far from 0.5 on a shuffled
            batch means the teacher rule is biased by position.

    Example:
        >>> import torch, ipsd_cuda
        >>> logits = torch.randn(4, 10)
        >>> loss, parts = ipsd_cuda.ips_loss(
        ...     logits, torch.tensor([1, 1, 2, 2]), torch.tensor([1, 0, 3, 2]), return_parts=True
        ... )
        >>> int(parts.pairs)
        2
    """

    ce: torch.Tensor
    kd: torch.Tensor
    pairs: torch.Tensor
    first_teacher: torch.Tensor


def _check_hyper(temperature, kd_weight) -> None:
    for name, value in (("temperature", temperature), ("kd_weight", kd_weight)):
        if not isinstance(value, Real) or isinstance(value, bool):
            raise TypeError(f"{name} must be a number, got {value!r}")
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not 0.0 <= kd_weight < float("inf"):
        raise ValueError(f"kd_weight must be a finite number >= 0, got {kd_weight!r}")


def _check_inputs(logits, labels, partner) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be (N, K) with K >= 1, got shape {tuple(logits.shape)}")
    n, device = logits.shape[0], logits.device
    for name, value, dtypes in (
        ("labels", labels, (torch.int32, torch.int64)),
        ("partner", partner, (torch.int64,)),
    ):
        if not isinstance(value, torch.Tensor):
            hint = " (pass plan.partner)" if name == "partner" else ""
            raise TypeError(f"{name} must be a tensor{hint}, got {type(value).__name__}")
        if value.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")
        if tuple(value.shape) != (n,):
            raise ValueError(f"{name} must have shape (N,) = ({n},) like logits, got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} must be on the logits' device {device}, got {value.device}")


def _check_pairing(labels: torch.Tensor, partner: torch.Tensor) -> None:
    """Raise unless ``partner`` is an involution between samples of the same label."""
    valid, mate = partner_mates(partner)
    same = labels[mate] == labels
    bad = (~(valid & same)).nonzero()
    if not bad.numel():
        return
    i = int(bad[0, 0])
    j = int(partner[i])
    if not bool(valid[i]):
        n = partner.shape[0]
        back = f", but partner[{j}] = {int(partner[j])}" if 0 <= j < n and j != i else ""
        raise ValueError(
            f"partner is not a pairing at sample {i}: partner[{i}] = {j}{back}; it must be -1 or "
            f"another sample in [0, {n}) whose partner is {i} (pass a SwapPlan's partner)"
        )
    raise ValueError(
        f"partner pairs samples of different labels: partner[{i}] = {j}, but labels[{i}] = "
        f"{int(labels[i])} != labels[{j}] = {int(labels[j])}"
    )


def ips_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    partner: torch.Tensor,
    *,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    clean_logits: Optional[torch.Tensor] = None,
    return_parts: bool = False,
    check_partner: Optional[bool] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, IPSLossParts]]:
    """Cross-entropy plus distillation from the more confident member of each pair.

    For every pair ``(i, j)`` of ``partner``, the member with the higher
    softmax probability on its true class is the teacher (ties: the lower
    index), the other the student. The loss is

    ``ce + kd_weight * T^2 * KL(softmax(z_t / T).detach() || softmax(z_s / T))``,

    the KL term averaged over pairs. The teacher gets no gradient from the KD
    term. With no pairs the KD term is 0 (never NaN) and still part of the
    graph. Softmax and KL run in float32 for float16/bfloat16 logits (e.g.
    under autocast), in float64 for float64 logits. No host synchronisation
    on a GPU unless ``check_partner=True``.

    Args:
        logits: ``(N, K)`` floating-point model outputs, on CPU or CUDA.
        labels: ``(N,)`` int32/int64 true classes, on the logits' device.
        partner: ``(N,)`` int64, ``partner[i]`` the sample paired with ``i``
            or ``-1`` (a :class:`SwapPlan`'s ``partner``): an involution
            between samples of the same label (see ``check_partner``).
        temperature: ``T > 0``, the softening of both distributions (default
            1.0, which trained better than 4.0 in the README's comparison).
        kd_weight: weight ``>= 0`` of the KD term (default 1.0).
        clean_logits: optional ``(N, K)`` logits of the same samples before
            the swap. When given, the CE term is computed on them and
            ``logits`` (of the swapped images) only drive the distillation.
        return_parts: also return the detached terms as :class:`IPSLossParts`.
        check_partner: raise ``ValueError`` unless ``partner`` is an
            involution between samples of the same label. ``None`` (default)
            checks CPU tensors only, where it costs some 50 microseconds, far
            less than a training step; on a GPU the check would synchronise
            the device, so it runs there only with ``True``. ``False`` never
            checks. Skipped inside ``torch.compile`` unless ``True``.

    Returns:
        the 0-d loss, or ``(loss, parts)`` when ``return_parts``. The loss of
        an empty batch is 0.

    Example:
        >>> import torch, ipsd_cuda
        >>> images = torch.rand(8, 3, 32, 32)
        >>> labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 4])
        >>> plan = ipsd_cuda.swap(images, labels, patch_size=8)
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
        >>> loss = ipsd_cuda.ips_loss(model(images), labels, plan.partner)
        >>> loss.backward()
    """
    _check_hyper(temperature, kd_weight)
    if check_partner is not None and not isinstance(check_partner, bool):
        raise TypeError(f"check_partner must be True, False or None, got {check_partner!r}")
    _check_inputs(logits, labels, partner)
    n, device = logits.shape[0], logits.device
    if clean_logits is not None:
        if not isinstance(clean_logits, torch.Tensor) or not clean_logits.is_floating_point():
            raise TypeError(f"clean_logits must be a floating-point tensor or None, got {clean_logits!r:.80}")
        if clean_logits.shape != logits.shape or clean_logits.device != device:
            raise ValueError(
                f"clean_logits must match logits, shape {tuple(logits.shape)} on {device}; "
                f"got {tuple(clean_logits.shape)} on {clean_logits.device}"
            )
    if check_partner is None:
        check_partner = device.type == "cpu" and not torch.compiler.is_compiling()
    if check_partner:
        _check_pairing(labels, partner)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    labels = labels.long()
    ce_input = z if clean_logits is None else clean_logits.to(z.dtype)
    # Summed and divided by max(N, 1) so an empty batch gives 0, not NaN.
    ce = F.cross_entropy(ce_input, labels, reduction="sum") / max(n, 1)

    pos = torch.arange(n, device=device)
    paired = partner >= 0
    mate = torch.where(paired, partner, pos)
    frozen = z.detach()
    # The log-odds of the true class, z_y - logsumexp of the other logits,
    # order the members as their probabilities do, and stay exact at both
    # ends: a log-probability rounds to 0 for every confident member in
    # float32 (log(1 + 1e-9) == 0), which made confident pairs tie. One class
    # gives +inf for both members: a tie.
    confidence = frozen.gather(1, labels[:, None]).squeeze(1) - frozen.scatter(
        1, labels[:, None], float("-inf")
    ).logsumexp(dim=1)
    # Row s is a student when its mate is more confident, or equally
    # confident and of lower index. Every row is scored as if it were a
    # student and the teachers' rows are masked out: this keeps the batch
    # shape static, where selecting the students would synchronise.
    student = paired & (
        (confidence < confidence[mate]) | ((confidence == confidence[mate]) & (mate < pos))
    )
    log_student = F.log_softmax(z / temperature, dim=1)
    log_teacher = F.log_softmax(frozen[mate] / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(dim=1)
    pairs = student.sum()
    kd = temperature**2 * torch.where(student, kl, 0.0).sum() / pairs.clamp(min=1)
    loss = ce + kd_weight * kd
    if not return_parts:
        return loss
    first_teacher = (student & (mate < pos)).sum() / pairs.clamp(min=1)
    return loss, IPSLossParts(ce.detach(), kd.detach(), pairs, first_teacher.to(torch.float32))


class IPSLoss(torch.nn.Module):
    """:func:`ips_loss` as a module that holds the temperature and the KD weight.

    Args:
        temperature: ``T > 0``, the softening of both distributions (default 1.0).
        kd_weight: weight ``>= 0`` of the KD term (default 1.0).
        check_partner: whether to check the partner (default ``None``: on
            CPU tensors only), as in :func:`ips_loss`.

    Example:
        >>> import torch, ipsd_cuda
        >>> criterion = ipsd_cuda.IPSLoss(temperature=2.0)
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> loss = criterion(torch.randn(4, 3), labels, torch.tensor([1, 0, 3, 2]))
    """

    def __init__(self, *, temperature: float = 1.0, kd_weight: float = 1.0, check_partner: Optional[bool] = None) -> None:
        super().__init__()
        _check_hyper(temperature, kd_weight)
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.check_partner = check_partner

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        partner: torch.Tensor,
        clean_logits: Optional[torch.Tensor] = None,
        return_parts: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, IPSLossParts]]:
        """The loss of one batch; the arguments are those of :func:`ips_loss`.

        Example:
            >>> import torch, ipsd_cuda
            >>> loss, parts = ipsd_cuda.IPSLoss()(
            ...     torch.randn(2, 3), torch.tensor([0, 0]), torch.tensor([1, 0]), return_parts=True
            ... )
            >>> int(parts.pairs)
            1
        """
        return ips_loss(
            logits,
            labels,
            partner,
            temperature=self.temperature,
            kd_weight=self.kd_weight,
            clean_logits=clean_logits,
            return_parts=return_parts,
            check_partner=self.check_partner,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, kd_weight={self.kd_weight}, check_partner={self.check_partner}"
