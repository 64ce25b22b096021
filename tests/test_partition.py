"""Partitions: every training index goes to exactly one client, seeded, with the promised skew."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhello.config import PartitionConfig
from fedhello.data import (
    describe_partition,
    format_partition_table,
    partition_dirichlet,
    partition_iid,
    partition_indices,
    partition_pathological,
)
from fedhello.errors import UserError

NUM_CLASSES = 10


def skewed_labels(n: int = 2000, seed: int = 0) -> np.ndarray:
    """Labels with unequal class sizes (like the wiki data: one class 5x another)."""
    rng = np.random.default_rng(seed)
    weights = np.linspace(1.0, 5.0, NUM_CLASSES)
    return rng.choice(NUM_CLASSES, size=n, p=weights / weights.sum())


CONFIGS = [
    PartitionConfig(scheme="iid", num_clients=20),
    PartitionConfig(scheme="dirichlet", num_clients=20, alpha=0.3),
    PartitionConfig(scheme="pathological", num_clients=20, classes_per_client=3, beta=1.0, min_per_share=10),
]


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    everything = np.concatenate(parts)
    assert len(everything) == n
    assert np.array_equal(np.sort(everything), np.arange(n))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.scheme)
def test_each_index_exactly_once_and_sorted(cfg: PartitionConfig) -> None:
    labels = skewed_labels()
    parts = partition_indices(labels, cfg, seed=0)
    assert len(parts) == cfg.num_clients
    assert_exact_cover(parts, len(labels))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.scheme)
def test_deterministic_for_a_seed_and_different_across_seeds(cfg: PartitionConfig) -> None:
    labels = skewed_labels()
    a = partition_indices(labels, cfg, seed=3)
    b = partition_indices(labels, cfg, seed=3)
    c = partition_indices(labels, cfg, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_partition_indices_uses_the_partition_stream() -> None:
    labels = skewed_labels()
    cfg = PartitionConfig(scheme="iid", num_clients=7)
    expected = partition_iid(labels, 7, np.random.default_rng(np.random.SeedSequence([5, 1001])))
    got = partition_indices(labels, cfg, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(expected, got, strict=True))


def test_iid_sizes_balanced() -> None:
    parts = partition_iid(skewed_labels(n=1003), 10, np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 1003


def test_iid_too_few_examples() -> None:
    with pytest.raises(UserError, match="num_clients"):
        partition_iid(np.zeros(3, dtype=np.int64), 5, np.random.default_rng(0))


def test_pathological_classes_per_client_and_coverage() -> None:
    labels = skewed_labels()
    k = 3
    parts = partition_pathological(labels, 20, k, beta=1.0, min_per_share=10, rng=np.random.default_rng(1))
    holders = np.zeros(NUM_CLASSES, dtype=np.int64)
    for p in parts:
        held = np.unique(labels[p])
        assert len(held) <= k
        holders[held] += 1
    assert np.all(holders > 0), "every class must be held by some client"
    # Classes are dealt evenly: each goes to about K*k/C = 6 clients.
    assert holders.max() - holders.min() <= 2
    assert_exact_cover(parts, len(labels))


def test_pathological_min_per_share_respected_when_feasible() -> None:
    labels = skewed_labels()
    parts = partition_pathological(labels, 20, 2, beta=0.1, min_per_share=15, rng=np.random.default_rng(2))
    for p in parts:
        counts = np.bincount(labels[p], minlength=NUM_CLASSES)
        held = counts[counts > 0]
        assert len(held) == 2  # with 15 guaranteed per share, no share is empty
        assert held.min() >= 15


def test_pathological_tiny_class_does_not_crash() -> None:
    # Class 2 has 3 examples but is held by several clients: the minimum shrinks, nothing breaks.
    labels = np.array([0] * 100 + [1] * 100 + [2] * 3)
    parts = partition_pathological(labels, 6, 2, beta=1.0, min_per_share=10, rng=np.random.default_rng(0))
    assert_exact_cover(parts, len(labels))


def test_pathological_errors() -> None:
    labels = skewed_labels()
    with pytest.raises(UserError, match="classes_per_client"):
        partition_pathological(labels, 5, NUM_CLASSES + 1, 1.0, 10, np.random.default_rng(0))
    with pytest.raises(UserError, match="cannot hold all"):
        partition_pathological(labels, 2, 2, 1.0, 10, np.random.default_rng(0))


def dominant_classes(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean number of classes needed to cover 80% of a client's examples (low = skewed)."""
    needed = []
    for p in parts:
        counts = np.sort(np.bincount(labels[p], minlength=NUM_CLASSES))[::-1]
        share = np.cumsum(counts) / counts.sum()
        needed.append(int(np.searchsorted(share, 0.8) + 1))
    return float(np.mean(needed))


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    labels = skewed_labels(n=5000)
    skewed = partition_dirichlet(labels, 20, 0.1, np.random.default_rng(0))
    mild = partition_dirichlet(labels, 20, 100.0, np.random.default_rng(0))
    assert dominant_classes(labels, skewed) + 3 < dominant_classes(labels, mild)
    assert_exact_cover(skewed, len(labels))


def test_dirichlet_min_size_and_failure() -> None:
    labels = skewed_labels()
    parts = partition_dirichlet(labels, 10, 0.5, np.random.default_rng(0), min_size=20)
    assert min(len(p) for p in parts) >= 20
    with pytest.raises(UserError, match=r"partition\.alpha"):
        partition_dirichlet(labels, 50, 0.01, np.random.default_rng(0), min_size=30)


def test_describe_partition_is_consistent_and_json_ready() -> None:
    labels = skewed_labels()
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    parts = partition_indices(labels, CONFIGS[2], seed=0)
    d = describe_partition(labels, parts, names)
    json.dumps(d)  # plain ints only
    assert d["total"] == len(labels)
    for c, p in zip(d["clients"], parts, strict=True):
        assert c["size"] == len(p) == sum(c["histogram"])
        assert len(c["histogram"]) == NUM_CLASSES
    assert d["class_totals"] == np.bincount(labels, minlength=NUM_CLASSES).tolist()
    table = format_partition_table(d, names)
    assert "class9" in table
    assert len(table.splitlines()) >= 20


def test_format_partition_table_many_classes() -> None:
    labels = np.arange(300) % 30
    names = [f"c{i}" for i in range(30)]
    parts = partition_iid(labels, 4, np.random.default_rng(0))
    table = format_partition_table(describe_partition(labels, parts, names), names)
    assert "largest classes" in table
    assert max(len(line) for line in table.splitlines()) < 120


label_arrays = st.lists(st.integers(0, 5), min_size=12, max_size=80).map(
    lambda xs: np.array(xs, dtype=np.int64)
)


@settings(max_examples=60, deadline=None)
@given(labels=label_arrays, num_clients=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_iid_property(labels: np.ndarray, num_clients: int, seed: int) -> None:
    num_clients = min(num_clients, len(labels))
    parts = partition_iid(labels, num_clients, np.random.default_rng(seed))
    assert_exact_cover(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(
    labels=label_arrays,
    num_clients=st.integers(1, 12),
    k=st.integers(1, 4),
    min_per_share=st.integers(0, 10),
    seed=st.integers(0, 2**31),
)
def test_pathological_property(
    labels: np.ndarray, num_clients: int, k: int, min_per_share: int, seed: int
) -> None:
    num_classes = len(np.unique(labels))
    k = min(k, num_classes)
    num_clients = max(min(num_clients, len(labels)), -(-num_classes // k))
    parts = partition_pathological(labels, num_clients, k, 0.5, min_per_share, np.random.default_rng(seed))
    assert len(parts) == num_clients
    assert_exact_cover(parts, len(labels))
    for p in parts:
        assert len(np.unique(labels[p])) <= k
