"""From layer scores to sampling probabilities: exact 1-D k-means and importance levels (docs/method.md, "Fisher scores").

The L Fisher layer scores are clustered into `num_levels` (3) groups; the groups are ordered by
centroid and given levels 1 (least important) .. num_levels; a layer's sampling probability is
proportional to its level, p_l = level_l / sum_j level_j.

`kmeans_1d` is exact and deterministic: in one dimension the optimal k-means clusters are
contiguous runs of the sorted values, so dynamic programming over split points finds the global
minimum of the within-cluster sum of squares (O(k d^2) for d distinct values).

Degenerate inputs: equal values always share a cluster (the DP runs over the distinct values
with their multiplicities; an optimal partition never needs to split ties). With fewer distinct
values than k there are only that many clusters, numbered from 0, so the levels used are the
lowest ones: all-equal scores give every layer level 1 (uniform probabilities), two distinct
values give levels 1 and 2. Equal scores therefore always get equal probabilities.

`released_levels` reproduces the released code's defect for compatibility: k-means labels (from
a randomly initialised Lloyd's algorithm, unseeded by default) used directly as levels, so which
cluster gets level 3 depends on the initialisation and not on the scores.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def _as_scores(values: npt.ArrayLike, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what}: no values")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: values must be finite")
    return arr


def kmeans_1d(values: npt.ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact 1-D k-means: (labels, centroids).

    labels[i] is the cluster of values[i]; clusters are numbered 0..m-1 in order of increasing
    centroid, with m = min(k, number of distinct values); centroids has length m. Among partitions
    with equal cost the DP keeps the first one found (deterministic).
    """
    x = _as_scores(values, "kmeans_1d")
    if k < 1:
        raise ValueError(f"kmeans_1d: k must be at least 1, got {k}")
    distinct, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    d = len(distinct)
    m = min(k, d)

    # Centre and scale for numerically stable prefix sums; the argmin is unchanged.
    scale = float(np.std(distinct)) or 1.0
    z = (distinct - float(np.mean(distinct))) / scale
    w = counts.astype(np.float64)
    cw = np.concatenate([[0.0], np.cumsum(w)])
    c1 = np.concatenate([[0.0], np.cumsum(w * z)])
    c2 = np.concatenate([[0.0], np.cumsum(w * z * z)])

    def cost(i: np.ndarray, j: int) -> np.ndarray:
        """Within-cluster SSE of distinct values [i, j) (vectorised over i < j)."""
        n = cw[j] - cw[i]
        s = c1[j] - c1[i]
        return np.maximum(c2[j] - c2[i] - s * s / n, 0.0)

    # best[c, j]: minimal cost of splitting the first j distinct values into c+1 clusters.
    best = np.full((m, d + 1), np.inf)
    start = np.zeros((m, d + 1), dtype=np.int64)  # where the last cluster starts
    for j in range(1, d + 1):
        best[0, j] = cost(np.array([0]), j)[0]
    for c in range(1, m):
        for j in range(c + 1, d + 1):
            i = np.arange(c, j)  # the last cluster is [i, j); the first j values need >= c of them
            total = best[c - 1, i] + cost(i, j)
            pick = int(np.argmin(total))
            best[c, j] = total[pick]
            start[c, j] = i[pick]

    cluster_of_distinct = np.empty(d, dtype=np.int64)
    end = d
    for c in range(m - 1, -1, -1):
        first = int(start[c, end]) if c > 0 else 0
        cluster_of_distinct[first:end] = c
        end = first
    labels = cluster_of_distinct[inverse]
    centroids = np.array([x[labels == c].mean() for c in range(m)])
    return labels, centroids


def importance_levels(scores: npt.ArrayLike, num_levels: int = 3) -> np.ndarray:
    """Levels 1..num_levels (1 = least important) by exact k-means on the scores.

    With fewer distinct scores than levels only the lowest levels are used (see module docstring).
    """
    labels, _ = kmeans_1d(scores, num_levels)
    return labels + 1


def level_probabilities(levels: npt.ArrayLike) -> np.ndarray:
    """p_l = level_l / sum_j level_j."""
    lv = _as_scores(levels, "level_probabilities")
    if np.any(lv <= 0):
        raise ValueError("level_probabilities: levels must be positive")
    return lv / lv.sum()


def released_levels(
    scores: npt.ArrayLike, num_levels: int = 3, seed: int | None = None, max_iter: int = 300
) -> np.ndarray:
    """The released code's level mapping (compatibility only): raw k-means labels + 1.

    Lloyd's algorithm with one k-means++ initialisation (like scikit-learn's KMeans, which the
    released code called, without its greedy trials), k = min(num_levels, n), random numbers from
    `np.random.default_rng(seed)` (seed=None is unseeded like the released code). The cluster
    numbering follows the random initialisation, not the centroids' order, so the level a layer
    gets ignores whether its cluster holds high or low scores: the defect this reproduces.
    """
    x = _as_scores(scores, "released_levels")
    if num_levels < 1:
        raise ValueError(f"released_levels: num_levels must be at least 1, got {num_levels}")
    rng = np.random.default_rng(seed)
    k = min(num_levels, len(x))
    centroids = np.empty(k)
    centroids[0] = x[rng.integers(len(x))]
    for c in range(1, k):  # k-means++: next centre with probability proportional to D^2
        d2 = np.min((x[:, None] - centroids[None, :c]) ** 2, axis=1)
        total = d2.sum()
        centroids[c] = x[rng.choice(len(x), p=d2 / total)] if total > 0 else x[rng.integers(len(x))]
    labels = np.zeros(len(x), dtype=np.int64)
    for step in range(max_iter):
        new = np.argmin(np.abs(x[:, None] - centroids[None, :]), axis=1)
        if step > 0 and np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = x[labels == c]
            if members.size:  # an empty cluster keeps its centroid
                centroids[c] = members.mean()
    return labels + 1


def fisher_probabilities(
    scores: npt.ArrayLike, num_levels: int = 3, prior: npt.ArrayLike | None = None
) -> np.ndarray:
    """Sampling probabilities from layer scores: level-proportional, optionally times a prior.

    With `prior` (e.g. the geometric pattern's p, the product variant in docs/method.md):
    p_l proportional to prior_l * level_l / sum(levels), renormalised to sum 1.
    """
    p = level_probabilities(importance_levels(scores, num_levels))
    if prior is None:
        return p
    q = np.asarray(prior, dtype=np.float64)
    if q.shape != p.shape:
        raise ValueError(f"fisher_probabilities: prior has shape {q.shape}, scores {p.shape}")
    if not np.all(np.isfinite(q)) or np.any(q < 0):
        raise ValueError("fisher_probabilities: prior must be finite and non-negative")
    prod = q * p
    total = prod.sum()
    if total <= 0:
        raise ValueError("fisher_probabilities: prior is zero everywhere")
    return prod / total
