"""Patch swap inside the DataLoader workers, as a collate function.

Swapping on the CPU while the batch is assembled takes the work off the
training loop's critical path: the model's device never sees the clean batch.
"""

from typing import Any, Callable, List, Optional, Tuple

import torch
from torch.utils.data import default_collate

from .patch_swap import check_layout, swap
from .plan import PatchSize, SwapPlan, check_plan_args, patch_pair


class PatchSwapCollate:
    """Collate ``(image, label)`` samples, then swap patches within the batch, in place.

    The samples are collated by ``collate_fn`` into ``(images, labels)`` and
    :func:`swap` is applied to the CPU batch (uint8, float16, bfloat16,
    float32 or float64 images, contiguous or channels_last) in the worker
    that built it. Samples must be ``(C, H, W)``: ``(H, W, C)`` ones, such as
    numpy images without torchvision's ``ToTensor()``, are an error. Each batch
    comes back as ``(images, labels, plan)``; ``plan.partner`` feeds
    :func:`ips_loss` once the batch is on the model's device.

    The random plan is drawn from torch's default CPU generator. DataLoader
    seeds it in every worker with ``base_seed + worker_id``, ``base_seed``
    drawn anew each epoch from the DataLoader's ``generator`` or else from
    the main process's default generator: the workers draw different plans,
    and ``torch.manual_seed`` in the main process makes a run reproducible.
    With ``num_workers=0`` the main process's generator draws the plans.

    The instance holds only its settings and the collate function, so it
    pickles (for the ``spawn`` and ``forkserver`` start methods) whenever
    ``collate_fn`` does.

    Args:
        patch_size: ``P`` or ``(ph, pw)``, the cell size in pixels.
        swap_ratio: fraction of the cells a pair exchanges (default 0.5).
        alpha: if given, the fraction is drawn per pair from ``Beta(alpha, alpha)``.
        p: probability that a pair exchanges anything (default 0.5; the
            other pairs are distilled on clean images).
        pairing: ``"random"`` (default) pairs samples of a class at random
            within the batch; ``"halves"`` pairs ``i`` with ``i + N/2``, for
            batches from :class:`IntraClassPairSampler`.
        collate_fn: turns the list of samples into ``(images, labels)``
            (default ``torch.utils.data.default_collate``). The images it
            returns are swapped in place, so they must not share memory with
            the dataset, as ``default_collate``'s freshly stacked tensors do not.

    Example:
        >>> import torch, ipsd_cuda
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> labels = torch.arange(64) % 4
        >>> dataset = TensorDataset(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), labels)
        >>> sampler = ipsd_cuda.IntraClassPairSampler(labels, batch_size=16)
        >>> loader = DataLoader(
        ...     dataset,
        ...     batch_sampler=sampler,
        ...     num_workers=2,
        ...     collate_fn=ipsd_cuda.PatchSwapCollate(8, pairing="halves"),
        ... )
        >>> for images, labels, plan in loader:
        ...     pass  # logits = model(images.float() / 255); ips_loss(logits, labels, plan.partner)
        >>> plan.partner.shape
        torch.Size([32])
    """

    def __init__(
        self,
        patch_size: PatchSize,
        *,
        swap_ratio: float = 0.5,
        alpha: Optional[float] = None,
        p: float = 0.5,
        pairing: str = "random",
        collate_fn: Optional[Callable] = None,
    ) -> None:
        patch_pair(patch_size)
        check_plan_args(swap_ratio, alpha, p, pairing)
        if pairing == "any":
            # The collate returns the labels as they are: across classes they
            # would be wrong. CutMix returns the soft targets instead.
            raise ValueError(
                "PatchSwapCollate pairs within a class (pairing 'random' or 'halves'); to swap across "
                "classes with soft targets, collate with ipsd_cuda.CutMix"
            )
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable or None, got {type(collate_fn).__name__}")
        self.patch_size = patch_size
        self.swap_ratio = swap_ratio
        self.alpha = alpha
        self.p = p
        self.pairing = pairing
        self.collate_fn = default_collate if collate_fn is None else collate_fn

    def __call__(self, batch: List[Any]) -> Tuple[torch.Tensor, torch.Tensor, SwapPlan]:
        """Collate ``batch`` and swap it.

        Args:
            batch: a list of ``(image, label)`` samples, images ``(C, H, W)``.

        Returns:
            ``(images, labels, plan)``: the swapped ``(N, C, H, W)`` images,
            the ``(N,)`` labels (unchanged) and the :class:`SwapPlan` applied.

        Example:
            >>> import torch, ipsd_cuda
            >>> samples = [(torch.rand(3, 8, 8), c) for c in (0, 0, 1, 1)]
            >>> images, labels, plan = ipsd_cuda.PatchSwapCollate(4)(samples)
            >>> plan.partner.tolist()
            [1, 0, 3, 2]
        """
        collated = self.collate_fn(batch)
        if not isinstance(collated, (tuple, list)) or len(collated) != 2:
            raise TypeError(
                "collate_fn must return (images, labels); the samples should be (image, label) pairs, "
                f"got {type(collated).__name__}"
                + (f" of length {len(collated)}" if isinstance(collated, (tuple, list)) else "")
            )
        images, labels = collated
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            # Before swap's own check, to say what to change in a data pipeline.
            check_layout(
                images,
                "make each sample (C, H, W), e.g. with torchvision's PILToTensor() or ToTensor(), "
                "or torch.from_numpy(array).permute(2, 0, 1)",
            )
        plan = swap(
            images,
            labels,
            patch_size=self.patch_size,
            swap_ratio=self.swap_ratio,
            alpha=self.alpha,
            p=self.p,
            pairing=self.pairing,
        )
        return images, labels, plan

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(patch_size={self.patch_size!r}, swap_ratio={self.swap_ratio}, "
            f"alpha={self.alpha}, p={self.p}, pairing={self.pairing!r}, collate_fn={self.collate_fn!r})"
        )
