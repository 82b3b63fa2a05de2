"""ipsd_cuda: intra-class patch swap self-distillation for PyTorch.

Pairs samples of the same class inside a batch and exchanges a random set of
patches between the two members of each pair, in place, on the tensors' own
device ("Intra-class Patch Swap for Self-Distillation", Choi et al., arXiv
2505.14124). The more confident member of each pair then teaches the other.

    plan = ipsd_cuda.swap(images, labels, patch_size=4)
    loss = ipsd_cuda.ips_loss(model(images), labels, plan.partner)

The same engine, pairing across classes and exchanging one box per pair, is
CutMix with a box for every pair (:class:`CutMix`, :mod:`ipsd_cuda.mix`):

    images, soft_targets = ipsd_cuda.CutMix(num_classes=10)(images, labels)
"""

from ._ops import backends, kernel_available
from .data import PatchSwapCollate
from .loss import IPSLoss, IPSLossParts, ips_loss
from .mix import CutMix, mix_cross_entropy, mix_targets
from .patch_swap import apply_plan, swap
from .plan import SwapPlan, grid_for, make_plan
from .sampler import IntraClassPairSampler

__all__ = [
    "CutMix",
    "IPSLoss",
    "IPSLossParts",
    "IntraClassPairSampler",
    "PatchSwapCollate",
    "SwapPlan",
    "apply_plan",
    "backends",
    "grid_for",
    "ips_loss",
    "kernel_available",
    "make_plan",
    "mix_cross_entropy",
    "mix_targets",
    "swap",
]
__version__ = "0.3.0"
