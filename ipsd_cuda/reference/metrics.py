"""Accuracy and calibration of a classifier's logits."""

import torch
import torch.nn.functional as F


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with ``bins`` equal-width confidence bins (Guo et al., 2017): the
    sample-weighted mean of |accuracy - confidence| over the bins.

    Example:
        >>> import torch
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
        >>> round(expected_calibration_error(probs, torch.tensor([0, 1])), 3)
        0.35
    """
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    # Bin b holds confidences in (b/bins, (b+1)/bins]; confidence is > 0 always.
    which = (confidence.double() * bins).ceil().long().clamp_(1, bins) - 1
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct - confidence.double())
    return float(gap.abs().sum() / max(len(labels), 1))


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Top-1 accuracy (%), negative log-likelihood and ECE (%) of ``logits`` (N, K)."""
    logits = logits.float()
    probs = logits.softmax(dim=1)
    return {
        "top1": 100.0 * float((logits.argmax(dim=1) == labels).double().mean()),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": 100.0 * expected_calibration_error(probs, labels, bins),
    }
