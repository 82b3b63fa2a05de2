"""The intra-class pair sampler: every property of docs/contract.md section 6, single process and distributed."""

import math
import time
from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ipsd_cuda
from ipsd_cuda.sampler import IntraClassPairSampler


def random_labels(n, classes, seed):
    """Labels with uneven class sizes: some classes large, some of one sample, some absent."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(classes, generator=g) ** 3 + 1e-3
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.multinomial(weights, n, replacement=True, generator=g)


def split(batch):
    half = len(batch) // 2
    assert len(batch) == 2 * half
    return batch[:half], batch[half:]


@st.composite
def setups(draw):
    return dict(
        n=draw(st.integers(0, 60)),
        classes=draw(st.integers(1, 12)),
        batch_size=draw(st.integers(1, 9)),
        seed=draw(st.integers(0, 2**31 - 1)),
        epoch=draw(st.integers(0, 5)),
    )


@given(setup=setups(), drop_last=st.booleans())
def test_batches_pair_same_class_others(setup, drop_last):
    labels = random_labels(setup["n"], setup["classes"], setup["seed"])
    sampler = IntraClassPairSampler(labels, setup["batch_size"], drop_last=drop_last, seed=setup["seed"])
    sampler.set_epoch(setup["epoch"])
    sizes = Counter(labels.tolist())
    batches = list(sampler)
    assert len(batches) == len(sampler)
    anchors = []
    for b, batch in enumerate(batches):
        assert all(type(i) is int for i in batch)
        first, second = split(batch)
        last = b == len(batches) - 1
        expected = setup["n"] % setup["batch_size"] if last and not drop_last else 0
        assert len(first) == (expected or setup["batch_size"])
        for anchor, partner in zip(first, second):
            assert labels[anchor] == labels[partner]
            alone = sizes[int(labels[anchor])] == 1
            assert (partner == anchor) == alone, f"anchor {anchor} got partner {partner}"
        anchors += first
    if drop_last:
        assert len(anchors) == len(set(anchors)) == setup["n"] // setup["batch_size"] * setup["batch_size"]
    else:
        assert sorted(anchors) == list(range(setup["n"])), "each index is an anchor exactly once"


def test_len():
    labels = random_labels(103, 7, seed=1)
    assert len(IntraClassPairSampler(labels, 10)) == 11
    assert len(IntraClassPairSampler(labels, 10, drop_last=True)) == 10
    assert len(IntraClassPairSampler(labels, 103)) == 1
    assert len(IntraClassPairSampler(labels, 200, drop_last=True)) == 0
    assert len(IntraClassPairSampler([], 4)) == 0 and list(IntraClassPairSampler([], 4)) == []


def test_epochs_change_the_batches_and_replay():
    labels = random_labels(50, 5, seed=2)
    sampler = IntraClassPairSampler(labels, 8, seed=3)
    first = list(sampler)
    assert list(sampler) == first, "without set_epoch the epoch repeats"
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    assert [split(b)[0] for b in second] != [split(b)[0] for b in first], "the anchor order changes too"
    sampler.set_epoch(0)
    assert list(sampler) == first
    same_seed = IntraClassPairSampler(labels.tolist(), 8, seed=3)
    other_seed = IntraClassPairSampler(labels, 8, seed=4)
    assert list(same_seed) == first and list(other_seed) != first


def test_generator_drives_the_randomness():
    labels = random_labels(40, 4, seed=5)
    a = IntraClassPairSampler(labels, 8, generator=torch.Generator().manual_seed(9))
    b = IntraClassPairSampler(labels, 8, generator=torch.Generator().manual_seed(9))
    first = list(a)
    assert list(b) == first
    assert list(a) != first, "the generator advances from epoch to epoch"


def test_partners_are_uniform_over_the_class():
    """Chi-square of partner counts per anchor against uniform over the other members."""
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 11 + [3])
    counts = torch.zeros(len(labels), len(labels))
    sampler = IntraClassPairSampler(labels, 7, seed=12)
    epochs = 600
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            first, second = split(batch)
            counts[first, second] += 1
    for anchor in range(len(labels)):
        others = [j for j in range(len(labels)) if labels[j] == labels[anchor] and j != anchor]
        if not others:
            continue
        observed = counts[anchor, others]
        assert observed.sum() == epochs
        expected = epochs / len(others)
        chi2 = float(((observed - expected) ** 2 / expected).sum())
        df = len(others) - 1
        # About 5 standard deviations above the mean of chi2(df).
        assert chi2 < df + 5 * math.sqrt(2 * df) + 1, f"anchor {anchor}: counts {observed.tolist()}"


@given(setup=setups(), replicas=st.integers(2, 5), drop_last=st.booleans())
def test_distributed_split(setup, replicas, drop_last):
    n = setup["n"]
    labels = random_labels(n, setup["classes"], setup["seed"])
    shares, lengths = [], []
    for rank in range(replicas):
        sampler = IntraClassPairSampler(
            labels,
            setup["batch_size"],
            drop_last=drop_last,
            num_replicas=replicas,
            rank=rank,
            seed=setup["seed"],
        )
        sampler.set_epoch(setup["epoch"])
        batches = list(sampler)
        assert len(batches) == len(sampler)
        lengths.append(len(batches))
        share = []
        for batch in batches:
            first, second = split(batch)
            assert labels[first].tolist() == labels[second].tolist()
            share += first
        shares.append(share)
    assert len(set(lengths)) == 1, f"ranks yield different numbers of batches: {lengths}"
    every = [i for share in shares for i in share]
    if drop_last:
        assert len(every) == len(set(every)), "ranks overlap"
        per_rank = n // replicas
        assert len(every) == replicas * (per_rank // setup["batch_size"] * setup["batch_size"])
    else:
        assert set(every) == set(range(n)), "ranks do not cover the dataset"
        padded = replicas * math.ceil(n / replicas)
        assert len(every) == padded
        # Only the padding repeats anchors: at most once more each, unless n < replicas.
        repeats = Counter(every)
        assert sum(c - 1 for c in repeats.values()) == padded - n
        if n >= replicas:
            assert max(repeats.values(), default=1) <= 2


def test_distributed_epochs_and_divisible_split_are_disjoint():
    labels = random_labels(48, 6, seed=6)
    by_epoch = []
    for epoch in (0, 1):
        shares = []
        for rank in range(4):
            sampler = IntraClassPairSampler(labels, 5, num_replicas=4, rank=rank, seed=7)
            sampler.set_epoch(epoch)
            shares.append([i for batch in sampler for i in split(batch)[0]])
        every = sum(shares, [])
        assert sorted(every) == list(range(48))
        by_epoch.append(shares)
    assert by_epoch[0] != by_epoch[1]


def test_defaults_come_from_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 3)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 2)
    sampler = IntraClassPairSampler(random_labels(30, 3, seed=8), 4)
    assert (sampler.num_replicas, sampler.rank) == (3, 2)
    explicit = IntraClassPairSampler(random_labels(30, 3, seed=8), 4, num_replicas=3, rank=2)
    assert list(sampler) == list(explicit)


def test_an_epoch_of_60k_is_fast():
    labels = torch.randint(0, 10, (60_000,))
    start = time.perf_counter()
    sampler = IntraClassPairSampler(labels, 128)
    batches = list(sampler)
    assert time.perf_counter() - start < 2.0
    assert len(batches) == 469


@pytest.mark.parametrize("source", ["tensor", "list", "numpy"])
def test_swap_halves_on_a_sampler_batch(source):
    g = torch.Generator().manual_seed(10)
    labels = random_labels(37, 5, seed=10)
    images = torch.randint(0, 256, (37, 3, 12, 12), dtype=torch.uint8, generator=g)
    given_labels = {"tensor": labels, "list": labels.tolist(), "numpy": labels.numpy()}[source]
    sampler = IntraClassPairSampler(given_labels, 6, seed=11)
    moved = False
    for batch in sampler:
        x, y = images[batch], labels[batch]
        before = x.clone()
        plan = ipsd_cuda.swap(x, y, patch_size=4, pairing="halves")
        half = len(batch) // 2
        assert plan.partner.tolist() == list(range(half, 2 * half)) + list(range(half))
        moved |= not torch.equal(x, before)
    assert moved


@pytest.mark.parametrize(
    "args, error, words",
    [
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(batch_size=2.0), ValueError, "batch_size"),
        (dict(labels=[0.5, 1.0]), TypeError, "labels must be integers"),
        (dict(labels=[[0, 1]]), ValueError, "labels must be 1-d"),
        (dict(labels=["a", "b"]), TypeError, "labels must be a sequence of integers"),
        (dict(num_replicas=0), ValueError, "num_replicas"),
        (dict(num_replicas=2, rank=2), ValueError, "rank"),
        (dict(generator=torch.Generator().manual_seed(0), num_replicas=2, rank=0), ValueError, "same seed"),
        (dict(generator=1), TypeError, "generator"),
        (dict(seed=1.5), TypeError, "seed"),
    ],
)
def test_bad_arguments(args, error, words):
    full = dict(labels=[0, 0, 1, 1], batch_size=2)
    full.update(args)
    with pytest.raises(error, match=words):
        IntraClassPairSampler(full.pop("labels"), full.pop("batch_size"), **full)
