"""Where the training batches come from.

Two pipelines give the same batches in distribution:

- ``loader``: a :class:`~torch.utils.data.DataLoader` over the uint8 images in
  host memory, random crop and flip per sample (in worker processes with
  ``num_workers``), optionally the swap in the workers (:class:`ipsd_cuda.PatchSwapCollate`).
- ``resident``: the whole training set held on the training device as uint8;
  each batch is gathered, cropped and flipped there in one indexing
  operation (:func:`crop_flip`). No host work per batch beyond the
  sampler's indices, which travel once per epoch.

Both take their indices from the same samplers: shuffled batches for CE,
anchors followed by same-class partners (:class:`ipsd_cuda.IntraClassPairSampler`)
for the paired methods.
"""

from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

import ipsd_cuda


def crop_pad(image_size: int) -> int:
    """The zero padding of the random crop: an eighth of the image side (4 px at 32 px)."""
    return max(1, image_size // 8)


class ArrayDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` with labels; optional random crop and flip per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False):
        self.images, self.labels, self.augment = images, labels, augment
        self.pad = crop_pad(images.shape[-1])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.augment:
            h, w = x.shape[-2:]
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = F.pad(x, (self.pad,) * 4)[:, dy : dy + h, dx : dx + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x, self.labels[i]


class IndexBatches:
    """The index lists of one epoch's batches, and ``set_epoch`` to reshuffle.

    ``paired=False``: ``batch_size`` shuffled samples per batch (CE).
    ``paired=True``: ``batch_size`` anchors followed by a same-class partner
    each (CS-KD, IPS). Either way split across ``world`` ranks like
    :class:`~torch.utils.data.DistributedSampler`, and incomplete batches dropped.
    """

    def __init__(self, labels: torch.Tensor, batch_size: int, paired: bool, world: int = 1, rank: int = 0,
                 seed: int = 0):
        if paired:
            self.sampler = ipsd_cuda.IntraClassPairSampler(
                labels, batch_size, drop_last=True, num_replicas=world, rank=rank, seed=seed
            )
            self.batches = self.sampler
        else:
            self.sampler = DistributedSampler(range(len(labels)), num_replicas=world, rank=rank, shuffle=True,
                                              seed=seed)
            self.batches = BatchSampler(self.sampler, batch_size, drop_last=True)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch``."""
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def loader(images, labels, batches: IndexBatches, augment: bool, num_workers: int = 0,
           collate_fn=None) -> DataLoader:
    """The ``loader`` pipeline: a DataLoader that yields ``(images, labels)`` (plus the plan
    when ``collate_fn`` swaps) of host tensors."""
    extra = {} if collate_fn is None else {"collate_fn": collate_fn}
    return DataLoader(ArrayDataset(images, labels, augment), batch_sampler=batches, num_workers=num_workers,
                      persistent_workers=num_workers > 0, **extra)


def crop_flip(images: torch.Tensor, pad: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop (after zero padding by ``pad``) and horizontal flip of every image of a batch.

    The batch version of :class:`ArrayDataset`'s augmentation, on the
    images' own device: one draw of offsets and flips for the batch and one
    gather. Returns a new tensor in channels_last memory format.

    Args:
        images: ``(N, C, H, W)``, any dtype, on any device.
        pad: zero padding on every side; offsets are uniform in ``[0, 2 * pad]``.
        generator: the source of the offsets and flips, on the images' device.

    Example:
        >>> import torch
        >>> from ipsd_cuda.reference.batches import crop_flip
        >>> crop_flip(torch.zeros(8, 1, 28, 28, dtype=torch.uint8), pad=3).shape
        torch.Size([8, 1, 28, 28])
    """
    n, device = images.shape[0], images.device
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), device=device, generator=generator)
    flips = torch.rand(n, device=device, generator=generator) < 0.5
    return crop_flip_at(images, pad, offsets, flips)


def crop_flip_at(images: torch.Tensor, pad: int, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """:func:`crop_flip` with given ``offsets`` ``(N, 2)`` (``dy, dx``) and ``flips`` ``(N,)`` bool."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad,) * 4)
    rows = offsets[:, :1] + torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device).expand(n, w)
    # A flip reads the crop's columns right to left.
    cols = offsets[:, 1:] + torch.where(flips[:, None], w - 1 - cols, cols)
    sample = torch.arange(n, device=images.device)[:, None, None]
    # Advanced indexes around a slice: the result is (N, H, W, C), which
    # permuted back is an NCHW tensor in channels_last memory.
    return padded[sample, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class ResidentBatches:
    """The ``resident`` pipeline: the training set on ``device``, batches gathered and augmented there.

    Each batch is a new tensor (an advanced-indexing gather), so swapping it
    in place never writes into the resident data set.

    Args:
        images: ``(N, C, H, W)`` uint8 training images (moved to ``device`` once).
        labels: ``(N,)`` int64.
        batches: the index source (:class:`IndexBatches`).
        device: where the data, the augmentation and the batches live.
        augment: random crop and flip.
        seed: seeds the device generator of the augmentation.
    """

    def __init__(self, images, labels, batches: IndexBatches, device, augment: bool, seed: int = 0):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batches = batches
        self.augment = augment
        self.pad = crop_pad(images.shape[-1])
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if len(self.batches) == 0:
            return
        # One host-to-device copy per epoch: a copy per batch would wait for
        # the device to drain its queue every step.
        epoch = torch.tensor(list(self.batches), dtype=torch.int64).to(self.device, non_blocking=True)
        for idx in epoch:
            x = self.images[idx]
            if self.augment:
                x = crop_flip(x, self.pad, self.generator)
            yield x, self.labels[idx]
