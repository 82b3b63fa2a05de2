"""A batch sampler that puts a same-class partner next to every anchor.

Random intra-class pairing inside an ordinary shuffled batch leaves many
samples without a partner when the classes are many and the batch is small.
This sampler guarantees one: each batch is ``B`` anchors followed by ``B``
partners drawn from the anchors' classes, which is the layout that
``pairing="halves"`` expects (``docs/contract.md``, section 6).
"""

import math
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

if TYPE_CHECKING:
    import numpy


def _as_label_tensor(labels) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu()
    else:
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"labels must be a sequence of integers, got {type(labels).__name__}") from error
    # An empty list becomes a float tensor; having no labels is not a type error.
    integral = not (labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex())
    if labels.numel() and not integral:
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-d (one label per sample), got shape {tuple(labels.shape)}")
    return labels.long()


class IntraClassPairSampler(Sampler[List[int]]):
    """Batches of ``B`` anchors followed by a same-class partner for each.

    Every epoch shuffles the dataset's indices; each index is an anchor once
    (on one rank). Batch ``b`` is ``anchors + partners``, a list of ``2B``
    indices where ``partners[i]`` is a uniformly random *other* sample of
    ``anchors[i]``'s class (the anchor itself when its class has one sample).
    Pass it as ``batch_sampler=`` and swap with ``pairing="halves"``, which
    pairs ``i`` with ``i + B``.

    Without ``generator`` the randomness derives from ``seed + epoch``, as in
    :class:`~torch.utils.data.DistributedSampler`: call :meth:`set_epoch`
    at the start of every epoch, or every epoch repeats the same batches.

    Args:
        labels: the dataset's labels, one integer per sample (a list, a numpy
            array or a tensor).
        batch_size: ``B``, the number of anchors per batch; batches hold ``2B``
            indices.
        drop_last: drop the last, smaller batch of each rank and, when
            distributed, the anchors that do not divide evenly between the
            ranks (otherwise those are padded by repeating anchors from the
            start of the shuffled order).
        generator: a CPU ``torch.Generator`` that drives all randomness,
            advancing from epoch to epoch. Only without distribution, since
            the ranks must agree on the shuffle.
        num_replicas: number of ranks (default: the world size when
            ``torch.distributed`` is initialised, else 1).
        rank: this process's rank (default: its rank in ``torch.distributed``,
            else 0).
        seed: the base seed when ``generator`` is None; must be the same on
            every rank.

    Example:
        >>> import torch, ipsd_cuda
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> labels = torch.arange(40) % 4
        >>> dataset = TensorDataset(torch.rand(40, 3, 16, 16), labels)
        >>> sampler = ipsd_cuda.IntraClassPairSampler(labels, batch_size=8)
        >>> loader = DataLoader(dataset, batch_sampler=sampler)
        >>> for epoch in range(2):
        ...     sampler.set_epoch(epoch)
        ...     for images, y in loader:
        ...         plan = ipsd_cuda.swap(images, y, patch_size=4, pairing="halves")
        >>> len(sampler)
        5
    """

    def __init__(
        self,
        labels: Union[torch.Tensor, "numpy.ndarray", Sequence[int]],
        batch_size: int,
        *,
        drop_last: bool = False,
        generator: Optional[torch.Generator] = None,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an int in [0, {num_replicas - 1}], got {rank!r}")
        if generator is not None:
            if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
                raise TypeError(f"generator must be a CPU torch.Generator or None, got {generator!r}")
            if num_replicas > 1:
                raise ValueError(
                    f"generator is for a single process; with num_replicas = {num_replicas} "
                    "give the same seed on every rank instead"
                )
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.labels = _as_label_tensor(labels)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.generator = generator
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0

        n = self.labels.shape[0]
        if drop_last:
            self.anchors_per_rank = n // num_replicas
        else:
            self.anchors_per_rank = math.ceil(n / num_replicas)

        # Sorting groups each class into one run of ``members``; a sample's
        # class is then the run [start, start + count) and its own place
        # in the run is ``place``, the one slot a partner must skip.
        sorted_labels, self._members = torch.sort(self.labels, stable=True)
        run_start = torch.searchsorted(sorted_labels, sorted_labels)
        run_count = torch.searchsorted(sorted_labels, sorted_labels, right=True) - run_start
        self._start = torch.empty_like(run_start)
        self._start[self._members] = run_start
        self._count = torch.empty_like(run_count)
        self._count[self._members] = run_count
        self._place = torch.empty_like(run_start)
        self._place[self._members] = torch.arange(n) - run_start

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (used when no ``generator`` was given).

        Args:
            epoch: the epoch number; every rank must pass the same one.

        Example:
            >>> import ipsd_cuda
            >>> sampler = ipsd_cuda.IntraClassPairSampler([0, 0, 1, 1], batch_size=2)
            >>> sampler.set_epoch(3)
        """
        self.epoch = epoch

    def _partners(self, anchors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        count = self._count[anchors]
        # A uniform slot among the count - 1 others: draw in [0, count - 1),
        # then step over the anchor's own place. A class of one draws slot 0
        # and does not step, which is the anchor itself. float64 keeps the
        # bias of floor(u * m) far below anything a class size could reveal.
        slot = (torch.rand(anchors.shape[0], dtype=torch.float64, generator=generator) * (count - 1)).long()
        slot += (slot >= self._place[anchors]) & (count > 1)
        return self._members[self._start[anchors] + slot]

    def __iter__(self) -> Iterator[List[int]]:
        if self.generator is not None:
            generator = self.generator
        else:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = self.labels.shape[0]
        order = torch.randperm(n, generator=generator)
        total = self.anchors_per_rank * self.num_replicas
        if total > n:
            order = order.repeat(math.ceil(total / n))
        anchors = order[:total][self.rank :: self.num_replicas]
        anchor_list = anchors.tolist()
        partner_list = self._partners(anchors, generator).tolist()
        for begin in range(0, len(self) * self.batch_size, self.batch_size):
            end = begin + self.batch_size
            yield anchor_list[begin:end] + partner_list[begin:end]

    def __len__(self) -> int:
        """The number of batches this rank yields per epoch."""
        if self.drop_last:
            return self.anchors_per_rank // self.batch_size
        return math.ceil(self.anchors_per_rank / self.batch_size)
