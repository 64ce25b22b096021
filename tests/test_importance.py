"""Exact 1-D k-means, importance levels and level probabilities (docs/method.md, "Fisher scores")."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedhello.method.importance import (
    fisher_probabilities,
    importance_levels,
    kmeans_1d,
    level_probabilities,
    released_levels,
)


def _sse(values: np.ndarray, labels: np.ndarray) -> float:
    return float(sum(((values[labels == c] - values[labels == c].mean()) ** 2).sum() for c in set(labels)))


def _brute_force_sse(values: np.ndarray, k: int) -> float:
    """Minimum SSE over all splits of the sorted values into k contiguous non-empty groups."""
    v = np.sort(values)
    n = len(v)
    k = min(k, n)
    best = np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        cost = sum(((v[a:b] - v[a:b].mean()) ** 2).sum() for a, b in itertools.pairwise(bounds))
        best = min(best, float(cost))
    return best


values_strategy = st.lists(
    st.one_of(st.integers(-5, 5).map(float), st.floats(-100, 100, allow_nan=False, width=32)),
    min_size=1,
    max_size=9,
)


@settings(max_examples=150, deadline=None)
@given(values=values_strategy, k=st.integers(1, 4))
def test_kmeans_1d_is_exact(values: list[float], k: int) -> None:
    x = np.array(values)
    labels, centroids = kmeans_1d(x, k)
    distinct = len(np.unique(x))
    assert len(centroids) == min(k, distinct)
    assert sorted(set(labels.tolist())) == list(range(len(centroids)))
    assert np.all(np.diff(centroids) > 0)  # numbered by increasing centroid
    for c, mu in enumerate(centroids):
        assert mu == pytest.approx(x[labels == c].mean())
    for a, b in itertools.combinations(range(len(x)), 2):  # equal values share a cluster
        if x[a] == x[b]:
            assert labels[a] == labels[b]
    brute = _brute_force_sse(x, k)
    assert _sse(x, labels) == pytest.approx(brute, rel=1e-9, abs=1e-9 * (1 + float(np.abs(x).max()) ** 2))
    again, _ = kmeans_1d(x, k)
    assert np.array_equal(labels, again)


def test_kmeans_1d_hand_examples() -> None:
    labels, centroids = kmeans_1d([10.2, 0.1, 5.0, 10.0, 0.2, 5.1], 3)
    assert labels.tolist() == [2, 0, 1, 2, 0, 1]
    np.testing.assert_allclose(centroids, [0.15, 5.05, 10.1])
    # A far outlier gets its own cluster; the DP does not fall into Lloyd's local optima.
    labels, _ = kmeans_1d([0.0, 1.0, 2.0, 3.0, 100.0], 2)
    assert labels.tolist() == [0, 0, 0, 0, 1]


def test_importance_levels_and_probabilities_hand_example() -> None:
    scores = np.array([0.1, 0.2, 5.0, 5.1, 10.0, 10.2])
    levels = importance_levels(scores)
    assert levels.tolist() == [1, 1, 2, 2, 3, 3]
    p = level_probabilities(levels)
    np.testing.assert_allclose(p, np.array([1, 1, 2, 2, 3, 3]) / 12)
    np.testing.assert_allclose(fisher_probabilities(scores), p)
    # Order of the layers does not matter: the highest scores get level 3 wherever they are.
    perm = np.array([4, 0, 5, 2, 1, 3])
    assert importance_levels(scores[perm]).tolist() == levels[perm].tolist()


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(0, 1e3, allow_nan=False), min_size=3, max_size=24))
def test_levels_follow_scores(values: list[float]) -> None:
    x = np.array(values)
    levels = importance_levels(x, 3)
    assert levels.min() == 1
    assert levels[np.argmax(x)] == levels.max()
    assert levels[np.argmin(x)] == 1
    if len(np.unique(x)) >= 3:
        assert levels.max() == 3
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(levels[order]) >= 0)  # monotone in the score
    p = fisher_probabilities(x)
    assert p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(p * levels.sum(), levels)


def test_degenerate_inputs() -> None:
    # All equal: one cluster, level 1 everywhere, uniform probabilities.
    labels, centroids = kmeans_1d([0.5] * 12, 3)
    assert labels.tolist() == [0] * 12
    np.testing.assert_allclose(centroids, [0.5])
    np.testing.assert_allclose(fisher_probabilities(np.full(12, 0.5)), np.full(12, 1 / 12))
    # Two distinct values: the two lowest levels; ties get equal probabilities.
    assert importance_levels([3.0, 1.0, 3.0, 1.0]).tolist() == [2, 1, 2, 1]
    np.testing.assert_allclose(fisher_probabilities([3.0, 1.0, 3.0, 1.0]), [2 / 6, 1 / 6, 2 / 6, 1 / 6])
    # Fewer layers than levels.
    assert importance_levels([7.0]).tolist() == [1]
    assert importance_levels([2.0, 1.0]).tolist() == [2, 1]
    # k = 1.
    assert kmeans_1d([1.0, 2.0, 3.0], 1)[0].tolist() == [0, 0, 0]
    for bad in ([], [1.0, np.nan], [[1.0, 2.0]]):
        with pytest.raises(ValueError):
            kmeans_1d(np.array(bad), 3)
    with pytest.raises(ValueError):
        kmeans_1d([1.0], 0)
    with pytest.raises(ValueError):
        level_probabilities([1, 0, 2])


def test_prior_product() -> None:
    scores = [0.1, 0.2, 5.0, 5.1, 10.0, 10.2]  # levels 1,1,2,2,3,3
    prior = np.array([3.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    expected = prior * np.array([1, 1, 2, 2, 3, 3])  # 3,1,2,2,3,0 -> sum 11
    p = fisher_probabilities(scores, prior=prior)
    np.testing.assert_allclose(p, expected / 11)
    # A uniform prior changes nothing.
    np.testing.assert_allclose(
        fisher_probabilities(scores, prior=np.full(6, 1 / 6)), fisher_probabilities(scores)
    )
    with pytest.raises(ValueError):
        fisher_probabilities(scores, prior=np.ones(5))
    with pytest.raises(ValueError):
        fisher_probabilities(scores, prior=np.zeros(6))
    with pytest.raises(ValueError):
        fisher_probabilities(scores, prior=-np.ones(6))


def test_released_levels_ignore_which_cluster_is_important() -> None:
    scores = np.array([0.1, 0.2, 5.0, 5.1, 10.0, 10.2])
    seen = set()
    for seed in range(30):
        levels = released_levels(scores, seed=seed)
        assert levels.shape == (6,)
        assert set(levels.tolist()) <= {1, 2, 3}
        # The clusters themselves are the well separated pairs ...
        assert levels[0] == levels[1] and levels[2] == levels[3] and levels[4] == levels[5]
        seen.add(tuple(levels.tolist()))
        assert np.array_equal(levels, released_levels(scores, seed=seed))  # seeded: reproducible
    # ... but the level each pair gets depends on the initialisation, not on the scores.
    assert len(seen) > 1
    assert any(levels != (1, 1, 2, 2, 3, 3) for levels in seen)
    assert len(set(released_levels([4.0, 4.0], seed=0).tolist())) == 1  # equal scores, one level
    assert len(released_levels([1.0, 2.0], num_levels=3, seed=0)) == 2
