"""The distillation loss against a plain per-pair loop, its gradients, dtypes and bad input."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import ipsd_cuda
from conftest import DEVICES, HAS_CUDA
from ipsd_cuda.loss import IPSLoss, IPSLossParts, ips_loss


def log_odds(row, label):
    """log(p / (1 - p)) of class ``label``: its logit minus the logsumexp of the others."""
    others = torch.cat([row[:label], row[label + 1 :]])
    return row[label] - (torch.logsumexp(others, dim=0) if len(others) else row.new_tensor(float("-inf")))


def reference_loss(logits, labels, partner, temperature, kd_weight):
    """docs/contract.md section 5 as plainly as possible, in float64: a loop over the pairs."""
    z = logits.double()
    y = labels.tolist()
    zero = z.sum() * 0.0
    ce = sum((-torch.log_softmax(z[i], dim=0)[y[i]] for i in range(len(y))), zero) / max(len(y), 1)
    terms, first_teacher = [], 0
    for i, j in enumerate(partner.tolist()):
        if j <= i:
            continue
        # The true class's log-odds: ordered as its probability, which float64
        # rounds to 1 for logit gaps above ~37 (scale 20 reaches them).
        confident_i = log_odds(z[i], y[i])
        confident_j = log_odds(z[j], y[j])
        teacher, student = (i, j) if confident_i >= confident_j else (j, i)
        first_teacher += teacher == i
        q = torch.softmax(z[teacher].detach() / temperature, dim=0)
        log_s = torch.log_softmax(z[student] / temperature, dim=0)
        terms.append(temperature**2 * (q * (q.log() - log_s)).sum())
    kd = torch.stack(terms).mean() if terms else zero
    loss = ce + kd_weight * kd
    share = first_teacher / len(terms) if terms else 0.0
    return loss, ce, kd, len(terms), share


def random_pairs(n, pairs, tie_chance, classes, scale, *, seed):
    """Logits, labels and an involution with ``pairs`` pairs; some pairs exactly tied."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * scale
    labels = torch.randint(0, classes, (n,), generator=g)
    order = torch.randperm(n, generator=g)
    partner = torch.full((n,), -1, dtype=torch.int64)
    for a, b in order[: 2 * pairs].view(-1, 2).tolist():
        partner[a], partner[b] = b, a
        labels[b] = labels[a]
        if torch.rand((), generator=g) < tie_chance:
            logits[b] = logits[a]  # same row, same label: an exact tie
    return logits, labels, partner


@st.composite
def problems(draw):
    n = draw(st.integers(0, 13))
    return dict(
        n=n,
        pairs=draw(st.integers(0, n // 2)),
        tie_chance=draw(st.sampled_from([0.0, 0.5, 1.0])),
        classes=draw(st.integers(1, 7)),
        scale=draw(st.floats(0.01, 20.0)),
        seed=draw(st.integers(0, 2**32 - 1)),
        temperature=draw(st.floats(0.5, 8.0)),
        kd_weight=draw(st.floats(0.0, 3.0)),
    )


@pytest.mark.parametrize("device", DEVICES)
@given(case=problems())
def test_matches_per_pair_loop(device, case):
    logits, labels, partner = random_pairs(
        case["n"], case["pairs"], case["tie_chance"], case["classes"], case["scale"], seed=case["seed"]
    )
    t, w = case["temperature"], case["kd_weight"]
    ref_logits = logits.double().requires_grad_()
    want, ce, kd, pairs, share = reference_loss(ref_logits, labels, partner, t, w)
    want.backward()

    x = logits.to(device).requires_grad_()
    loss, parts = ips_loss(
        x, labels.to(device), partner.to(device), temperature=t, kd_weight=w, return_parts=True
    )
    loss.backward()
    assert isinstance(parts, IPSLossParts)
    assert loss.shape == () and loss.dtype == torch.float32 and loss.device == x.device
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.double().cpu(), want.detach(), **close)
    torch.testing.assert_close(parts.ce.double().cpu(), ce.detach(), **close)
    torch.testing.assert_close(parts.kd.double().cpu(), kd.detach(), **close)
    assert parts.pairs.dtype == torch.int64 and int(parts.pairs) == pairs == case["pairs"]
    assert float(parts.first_teacher) == pytest.approx(share, abs=1e-6)
    assert not any(p.requires_grad for p in parts)
    torch.testing.assert_close(x.grad.double().cpu(), ref_logits.grad, **close)


def kd_gradient(logits, labels, partner, temperature=4.0):
    """The gradient of the KD term alone: CE's gradient enters twice with opposite signs."""
    x = logits.clone().requires_grad_()
    kd = ips_loss(x, labels, partner, temperature=temperature) - ips_loss(x, labels, partner, kd_weight=0.0)
    kd.backward()
    return x.grad


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_gets_no_gradient_from_kd(device):
    logits, labels, partner = random_pairs(11, 4, 0.0, 5, 3.0, seed=7)
    grad = kd_gradient(logits.to(device), labels.to(device), partner.to(device)).cpu()
    confidence = torch.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1).tolist()
    for i, j in enumerate(partner.tolist()):
        if j < 0 or confidence[i] > confidence[j]:
            assert torch.equal(grad[i], torch.zeros_like(grad[i])), f"sample {i} got a KD gradient"
        else:
            assert grad[i].abs().max() > 0, f"student {i} got no KD gradient"


@pytest.mark.parametrize("device", DEVICES)
def test_tie_makes_lower_index_the_teacher(device):
    """Equal true-class probabilities, different rows: the lower index teaches, either way round."""
    # exp(-1000) is exactly 0, so both rows have the softmax sum 1 + exp(-5) exactly.
    a = [5.0, 0.0, -1000.0]
    b = [5.0, -1000.0, 0.0]
    for rows in ((a, b), (b, a)):
        logits = torch.tensor(rows, device=device)
        labels = torch.tensor([0, 0], device=device)
        partner = torch.tensor([1, 0], device=device)
        _, parts = ips_loss(logits, labels, partner, return_parts=True)
        assert float(parts.first_teacher) == 1.0 and float(parts.kd) > 0
        grad = kd_gradient(logits, labels, partner)
        assert grad[0].abs().max() == 0 and grad[1].abs().max() > 0


@pytest.mark.parametrize("teacher_first", [True, False])
def test_gradcheck_student_side(teacher_first):
    """float64 finite differences on the students' rows; the teachers stay fixed and clearly ahead."""
    g = torch.Generator().manual_seed(11)
    n, k = 6, 5
    labels = torch.randint(0, k, (n // 2,), generator=g).repeat(2)
    partner = torch.cat([torch.arange(n // 2, n), torch.arange(n // 2)])
    teachers = torch.randn(n // 2, k, generator=g, dtype=torch.float64)
    teachers[torch.arange(n // 2), labels[: n // 2]] += 20.0
    students = torch.randn(n // 2, k, generator=g, dtype=torch.float64, requires_grad=True)

    def assemble(students):
        return torch.cat((teachers, students) if teacher_first else (students, teachers))

    _, parts = ips_loss(assemble(students.detach()), labels, partner, return_parts=True)
    assert float(parts.first_teacher) == float(teacher_first), "the case should keep its teachers"
    assert torch.autograd.gradcheck(
        lambda s: ips_loss(assemble(s), labels, partner, temperature=2.5, kd_weight=1.5), (students,)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "partner", [[-1, -1, -1, -1, -1], []], ids=["no-pairs", "empty-batch"]
)
def test_no_pairs_is_zero_and_differentiable(device, partner):
    n = len(partner)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, 3, (n,), generator=g).to(device)
    partner = torch.tensor(partner, dtype=torch.int64, device=device)
    loss, parts = ips_loss(x, labels, partner, return_parts=True)
    assert float(parts.kd) == 0.0 and int(parts.pairs) == 0 and float(parts.first_teacher) == 0.0
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    expected = torch.autograd.grad(F.cross_entropy(x, labels, reduction="sum") / max(n, 1), x)[0]
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_logits_are_computed_in_float32(device, dtype):
    logits, labels, partner = random_pairs(10, 4, 0.0, 6, 4.0, seed=5)
    half = logits.to(dtype).to(device).requires_grad_()
    upcast = half.detach().float().requires_grad_()
    labels, partner = labels.to(device), partner.to(device)
    loss = ips_loss(half, labels, partner)
    want = ips_loss(upcast, labels, partner)
    assert loss.dtype == torch.float32 and torch.equal(loss, want)
    loss.backward()
    want.backward()
    assert half.grad.dtype == dtype and torch.equal(half.grad, upcast.grad.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_under_autocast(device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    g = torch.Generator().manual_seed(9)
    features = torch.randn(8, 16, generator=g).to(device)
    labels = torch.randint(0, 3, (4,), generator=g).repeat(2).to(device)
    partner = torch.cat([torch.arange(4, 8), torch.arange(4)]).to(device)
    model = torch.nn.Linear(16, 3).to(device)
    with torch.autocast(device, dtype=dtype):
        logits = model(features)
        loss, parts = ips_loss(logits, labels, partner, return_parts=True)
    assert logits.dtype == dtype and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(model.weight.grad).all() and int(parts.pairs) == 4


def test_float64_stays_float64():
    logits = torch.randn(4, 3, dtype=torch.float64)
    loss = ips_loss(logits, torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 3, 2]))
    assert loss.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_with_a_swap_plan(device):
    """The loss takes a plan's partner as is, on the plan's device; int32 labels work."""
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (16,), generator=g, dtype=torch.int32).to(device)
    images = torch.rand(16, 3, 8, 8, generator=g).to(device)
    plan = ipsd_cuda.swap(images, labels, patch_size=4)
    logits = torch.randn(16, 4, generator=g).to(device)
    loss, parts = ips_loss(logits, labels, plan.partner, temperature=4.0, return_parts=True)
    want = reference_loss(logits.cpu(), labels.cpu(), plan.partner.cpu(), 4.0, 1.0)
    torch.testing.assert_close(loss.double().cpu(), want[0], rtol=1e-4, atol=1e-5)
    assert int(parts.pairs) == int((plan.partner >= 0).sum()) // 2


def test_clean_logits_carry_the_ce_and_swapped_logits_the_kd():
    logits, labels, partner = random_pairs(10, 4, 0.6, 5, 2.0, seed=8)
    clean = (logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))).requires_grad_()
    swapped = logits.clone().requires_grad_()
    loss, parts = ips_loss(
        swapped, labels, partner, clean_logits=clean, temperature=4.0, kd_weight=0.7, return_parts=True
    )
    torch.testing.assert_close(parts.ce, F.cross_entropy(clean.detach(), labels))
    kd_only = reference_loss(logits, labels, partner, 4.0, 1.0)[2]
    torch.testing.assert_close(parts.kd.double(), kd_only, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, parts.ce + 0.7 * parts.kd)
    loss.backward()
    # The clean side gets exactly the CE gradient, the swapped side only KD's.
    want_clean = torch.autograd.grad(F.cross_entropy(clean, labels), clean)[0]
    torch.testing.assert_close(clean.grad, want_clean)
    reference_swapped = logits.clone().requires_grad_()
    (0.7 * reference_loss(reference_swapped, labels, partner, 4.0, 1.0)[2]).backward()
    assert reference_swapped.grad.abs().max() > 0
    torch.testing.assert_close(swapped.grad, reference_swapped.grad.float(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="clean_logits must match logits"):
        ips_loss(logits, labels, partner, clean_logits=clean[:5])
    with pytest.raises(TypeError, match="clean_logits must be a floating-point tensor"):
        ips_loss(logits, labels, partner, clean_logits=labels)


def test_module_matches_function():
    logits, labels, partner = random_pairs(9, 3, 0.5, 4, 2.0, seed=4)
    criterion = IPSLoss(temperature=3.0, kd_weight=0.5)
    assert "temperature=3.0" in repr(criterion)
    want = ips_loss(logits, labels, partner, temperature=3.0, kd_weight=0.5)
    assert torch.equal(criterion(logits, labels, partner), want)
    _, parts = criterion(logits, labels, partner, return_parts=True)
    assert int(parts.pairs) == 3


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_no_host_sync_on_cuda():
    logits, labels, partner = random_pairs(64, 20, 0.2, 10, 3.0, seed=8)
    x, labels, partner = logits.cuda().requires_grad_(), labels.cuda(), partner.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = ips_loss(x, labels, partner, return_parts=True)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def good_inputs():
    return torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 3, 2])


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(logits=[[0.0]]), TypeError, "logits must be a tensor"),
        (dict(logits=torch.zeros(4, 3, dtype=torch.long)), TypeError, "floating-point"),
        (dict(logits=torch.zeros(4)), ValueError, "(N, K)"),
        (dict(logits=torch.zeros(4, 0)), ValueError, "K >= 1"),
        (dict(labels=torch.tensor([0.0, 0, 1, 1])), TypeError, "labels must have dtype"),
        (dict(labels=torch.tensor([0, 0, 1])), ValueError, "labels must have shape (N,) = (4,)"),
        (dict(partner=torch.tensor([1, 0, 3, 2], dtype=torch.int32)), TypeError, "partner must have dtype"),
        (dict(partner=torch.tensor([1, 0])), ValueError, "partner must have shape"),
        (dict(partner=torch.tensor([[1, 0, 3, 2]])), ValueError, "partner must have shape"),
        (dict(partner=None), TypeError, "plan.partner"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature="4"), TypeError, "temperature"),
        (dict(kd_weight=-0.1), ValueError, "kd_weight"),
        (dict(kd_weight=True), TypeError, "kd_weight"),
    ],
)
def test_bad_input(change, error, words):
    logits, labels, partner = good_inputs()
    args = dict(logits=logits, labels=labels, partner=partner, temperature=4.0, kd_weight=1.0)
    args.update(change)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        ips_loss(args.pop("logits"), args.pop("labels"), args.pop("partner"), **args)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="temperature"):
        IPSLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="kd_weight"):
        IPSLoss(kd_weight=float("inf"))


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_partner_on_another_device():
    logits, labels, partner = good_inputs()
    with pytest.raises(ValueError, match="partner must be on the logits' device"):
        ips_loss(logits.cuda(), labels.cuda(), partner)


def _bad_pairing(kind, n=8):
    """Logits and labels of a valid pairing, then ``partner`` broken in one way."""
    logits, labels, partner = random_pairs(n, 3, 0.0, 4, 2.0, seed=int(torch.randint(0, 2**31, ())))
    i = int((partner >= 0).nonzero()[0, 0])
    j = int(partner[i])
    unpaired = int((partner < 0).nonzero()[0, 0])
    if kind == "out of range":
        partner[i] = n
    elif kind == "below -1":
        partner[i] = -2
    elif kind == "fixed point":
        partner[unpaired] = unpaired
    elif kind == "one-sided":
        partner[unpaired] = i
    elif kind == "labels differ":
        labels[j] = labels[i] + 1
    return logits, labels, partner


BAD_PAIRINGS = [
    ("out of range", r"partner is not a pairing at sample \d+: partner\[\d+\] = 8;"),
    ("below -1", r"partner is not a pairing at sample \d+: partner\[\d+\] = -2;"),
    ("fixed point", r"partner is not a pairing at sample (\d+): partner\[\1\] = \1;"),
    ("one-sided", r"partner is not a pairing at sample \d+: partner\[\d+\] = \d+, but partner\[\d+\] = \d+"),
    ("labels differ", r"partner pairs samples of different labels: partner\[\d+\] = \d+, but labels"),
]


@pytest.mark.parametrize("kind, message", BAD_PAIRINGS, ids=[c[0] for c in BAD_PAIRINGS])
def test_partner_is_checked_on_cpu(kind, message):
    logits, labels, partner = _bad_pairing(kind)
    with pytest.raises(ValueError, match=message):
        ips_loss(logits, labels, partner)
    with pytest.raises(ValueError, match=message):
        IPSLoss()(logits, labels, partner)


@pytest.mark.parametrize("kind", [k for k, _ in BAD_PAIRINGS if k not in ("out of range", "below -1")])
def test_partner_check_can_be_skipped(kind):
    """check_partner=False trusts the partner (in-range values only: the loss indexes with them)."""
    logits, labels, partner = _bad_pairing(kind)
    assert torch.isfinite(ips_loss(logits, labels, partner, check_partner=False))
    assert torch.isfinite(IPSLoss(check_partner=False)(logits, labels, partner))


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_partner_is_checked_on_cuda_only_when_asked():
    logits, labels, partner = (t.cuda() for t in _bad_pairing("labels differ"))
    assert torch.isfinite(ips_loss(logits, labels, partner))
    with pytest.raises(ValueError, match="partner pairs samples of different labels"):
        ips_loss(logits, labels, partner, check_partner=True)


def test_check_partner_must_be_a_bool_or_none():
    logits, labels, partner = good_inputs()
    with pytest.raises(TypeError, match="check_partner must be True, False or None"):
        ips_loss(logits, labels, partner, check_partner=1)
