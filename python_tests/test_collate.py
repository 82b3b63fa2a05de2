"""The swap as a collate function: in the DataLoader's workers, equal to replaying its plan."""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

import ipsd_cuda
from conftest import same_bits
from ipsd_cuda.data import PatchSwapCollate
from ipsd_cuda.sampler import IntraClassPairSampler

PATCH = (4, 3)


class InMemory(Dataset):
    """Random images of one dtype and labels with every class at least twice."""

    def __init__(self, n, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        if dtype == torch.uint8:
            self.images = torch.randint(0, 256, (n, 3, 10, 11), dtype=dtype, generator=g)
        else:
            self.images = torch.randn(n, 3, 10, 11, generator=g).to(dtype)
        self.labels = (torch.arange(n) % (n // 3))[torch.randperm(n, generator=g)].tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        # A view of the dataset's own storage: a collate that swapped it in
        # place would corrupt the dataset, which the tests would see.
        return self.images[i], self.labels[i]


def check_loader(dataset, loader, batches, pairing, cells):
    """Every batch equals its clean batch with the returned plan replayed, bit for bit;
    every pair exchanges ``cells`` cells."""
    pristine = dataset.images.clone()
    moved = False
    seen = 0
    for (images, labels, plan), indices in zip(loader, batches):
        clean_images, clean_labels = default_collate([dataset[i] for i in indices])
        assert torch.equal(labels, clean_labels)
        paired = plan.partner >= 0
        assert torch.equal(labels[paired], labels[plan.partner[paired]])
        assert (plan.mask.flatten(1).sum(dim=1)[paired] == cells).all()
        ipsd_cuda.apply_plan(clean_images, plan, patch_size=PATCH, backend="torch")
        assert same_bits(images, clean_images)
        if pairing == "halves":
            half = len(indices) // 2
            assert plan.partner.tolist() == list(range(half, 2 * half)) + list(range(half))
        moved |= bool(plan.mask.any())
        seen += 1
    assert seen == len(batches)
    assert moved, "the loader should have swapped something"
    assert torch.equal(dataset.images, pristine), "the dataset itself was modified"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("with_sampler", [False, True], ids=["batch_size", "pair_sampler"])
def test_loader_batches_equal_replayed_plans(dtype, num_workers, with_sampler):
    dataset = InMemory(30, dtype, seed=num_workers)
    if with_sampler:
        sampler = IntraClassPairSampler(dataset.labels, 4, seed=1)
        sampler.set_epoch(2)
        batches, pairing = list(sampler), "halves"
        extra = dict(batch_sampler=sampler)
    else:
        batches, pairing = [list(range(i, min(i + 8, 30))) for i in range(0, 30, 8)], "random"
        extra = dict(batch_size=8)
    # p=1: every pair swaps, so every pair shows exactly its k cells.
    collate = PatchSwapCollate(PATCH, swap_ratio=0.4, p=1.0, pairing=pairing)
    loader = DataLoader(dataset, num_workers=num_workers, collate_fn=collate, **extra)
    # The 10 x 11 images hold 3 x 4 cells of 4 x 3 pixels; round(0.4 * 12) = 5.
    check_loader(dataset, loader, batches, pairing, cells=5)


def test_workers_are_reproducible_from_the_main_seed():
    dataset = InMemory(24, torch.uint8, seed=3)
    collate = PatchSwapCollate(PATCH, alpha=1.0)
    loader = DataLoader(dataset, batch_size=6, num_workers=2, collate_fn=collate)
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        runs.append([(images, plan.mask) for images, _, plan in loader])
    for (x1, m1), (x2, m2) in zip(*runs):
        assert torch.equal(x1, x2) and torch.equal(m1, m2)
    torch.manual_seed(4321)
    other = [plan.mask for _, _, plan in loader]
    assert any(not torch.equal(m1, m2) for (_, m1), m2 in zip(runs[0], other))


def test_pickle_round_trip():
    collate = PatchSwapCollate((2, 5), swap_ratio=0.25, alpha=0.7, p=0.9, pairing="halves")
    copy = pickle.loads(pickle.dumps(collate))
    assert repr(copy) == repr(collate)
    dataset = InMemory(12, torch.float32, seed=4)
    samples = [dataset[i] for i in next(iter(IntraClassPairSampler(dataset.labels, 6)))]
    outputs = []
    for fn in (collate, copy):
        torch.manual_seed(77)
        outputs.append(fn(samples))
    (x1, y1, p1), (x2, y2, p2) = outputs
    assert same_bits(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(p1.partner, p2.partner) and torch.equal(p1.mask, p2.mask)


def test_spawned_worker():
    """spawn pickles the collate function into a fresh interpreter."""
    dataset = InMemory(12, torch.uint8, seed=5)
    loader = DataLoader(
        dataset,
        batch_size=6,
        num_workers=1,
        multiprocessing_context="spawn",
        collate_fn=PatchSwapCollate(PATCH, p=1.0),
    )
    check_loader(dataset, loader, [list(range(6)), list(range(6, 12))], "random", cells=6)


def test_channels_last_and_custom_collate():
    def to_channels_last(batch):
        images, labels = default_collate(batch)
        return images.contiguous(memory_format=torch.channels_last), labels

    dataset = InMemory(9, torch.float32, seed=6)
    collate = PatchSwapCollate(PATCH, collate_fn=to_channels_last)
    images, labels, plan = collate([dataset[i] for i in range(9)])
    assert images.is_contiguous(memory_format=torch.channels_last)
    clean, _ = default_collate([dataset[i] for i in range(9)])
    ipsd_cuda.apply_plan(clean, plan, patch_size=PATCH, backend="torch")
    assert same_bits(images, clean)


@pytest.mark.parametrize(
    "args, error, words",
    [
        (dict(patch_size=0), ValueError, "patch_size"),
        (dict(patch_size=(2, 2, 2)), TypeError, "patch_size"),
        (dict(swap_ratio=1.5), ValueError, "swap_ratio"),
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(p=-0.1), ValueError, "p must be"),
        (dict(pairing="neighbours"), ValueError, "pairing"),
        (dict(collate_fn="default"), TypeError, "collate_fn"),
    ],
)
def test_bad_arguments(args, error, words):
    full = dict(patch_size=4)
    full.update(args)
    with pytest.raises(error, match=words):
        PatchSwapCollate(full.pop("patch_size"), **full)


def test_batch_that_is_not_image_label_pairs():
    triples = [(torch.zeros(3, 4, 4), 0, "extra")] * 2
    with pytest.raises(TypeError, match=r"\(images, labels\)"):
        PatchSwapCollate(2)(triples)


@pytest.mark.parametrize("to_sample", [lambda a: a, torch.from_numpy], ids=["numpy", "tensor"])
def test_channels_last_samples_are_an_error_that_names_the_fix(to_sample):
    """(H, W, C) uint8 samples, as from images read without ToTensor(): an error, data untouched."""
    arrays = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8).numpy()
    pristine = arrays.copy()
    samples = [(to_sample(a), i % 2) for i, a in enumerate(arrays)]
    with pytest.raises(ValueError, match=r"\(N, H, W, C\).*make each sample \(C, H, W\).*ToTensor"):
        PatchSwapCollate(4)(samples)
    assert np.array_equal(arrays, pristine)
    # The fix the message names: channels-first samples swap as usual.
    chw = [(torch.from_numpy(a).permute(2, 0, 1), y) for a, y in zip(arrays, [0, 1] * 3)]
    _, _, plan = PatchSwapCollate(4, p=1.0)(chw)
    assert plan.grid == (8, 8) and plan.mask.any()


def test_collate_refuses_pairing_across_classes():
    """It returns the labels as they are: across classes they would be wrong."""
    with pytest.raises(ValueError, match="collate with ipsd_cuda.CutMix"):
        PatchSwapCollate(4, pairing="any")
