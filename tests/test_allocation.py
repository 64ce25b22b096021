"""Allocation strategies: the geometric sets of docs/method.md exactly, plus properties for any depth and budget."""

import numpy as np
import pytest
from helpers import allocate_layers, build_strategy
from hypothesis import given
from hypothesis import strategies as st

from fedhello.errors import UserError
from fedhello.method.allocation import (
    PATTERNS,
    collective_distribution,
    geometric_layers,
    inclusion_frequency,
    pattern_prior,
    sample_layers,
)

PAPER_SETS = {
    ("triangle", 6): (0, 1, 2, 3, 4, 5),
    ("triangle", 9): (0, 1, 2, 3, 4, 5, 6, 7, 8),
    ("inverted_triangle", 6): (6, 7, 8, 9, 10, 11),
    ("inverted_triangle", 9): (3, 4, 5, 6, 7, 8, 9, 10, 11),
    ("bottleneck", 6): (0, 1, 2, 9, 10, 11),
    ("bottleneck", 9): (0, 1, 2, 3, 4, 8, 9, 10, 11),
    ("uniform", 6): (0, 2, 4, 6, 8, 10),
    ("uniform", 9): (0, 1, 2, 4, 5, 6, 8, 9, 10),
}


@pytest.mark.parametrize(("pattern", "budget"), sorted(PAPER_SETS))
def test_spec_layer_sets_for_12_layers(pattern: str, budget: int) -> None:
    assert geometric_layers(pattern, budget, 12) == PAPER_SETS[(pattern, budget)]
    assert geometric_layers(pattern, 12, 12) == tuple(range(12))


def test_bottleneck_collective_distribution_and_released_prior() -> None:
    counts = collective_distribution("bottleneck", [6, 9, 12], [1, 1, 1], 12) * 3
    np.testing.assert_allclose(counts, [3, 3, 3, 2, 2, 1, 1, 1, 2, 3, 3, 3])
    prior = pattern_prior("bottleneck", [6, 9, 12], [1, 1, 1], 12)
    third, two27, one27 = 1 / 9, 2 / 27, 1 / 27
    released = [third] * 3 + [two27] * 2 + [one27] * 3 + [two27] + [third] * 3
    np.testing.assert_allclose(prior, released)


def test_uniform_prior_is_flat_and_shares_weight_groups() -> None:
    np.testing.assert_allclose(pattern_prior("uniform", [6, 9, 12], [1, 1, 1], 12), np.full(12, 1 / 12))
    c = collective_distribution("triangle", [6, 12], [3, 1], 12)
    np.testing.assert_allclose(c, [1.0] * 6 + [0.25] * 6)


@given(
    pattern=st.sampled_from(PATTERNS),
    num_layers=st.integers(1, 40),
    data=st.data(),
)
def test_geometric_sets_have_budget_size_range_and_nest(
    pattern: str, num_layers: int, data: st.DataObject
) -> None:
    small = data.draw(st.integers(1, num_layers))
    large = data.draw(st.integers(small, num_layers))
    a, b = geometric_layers(pattern, small, num_layers), geometric_layers(pattern, large, num_layers)
    assert len(a) == small and len(set(a)) == small
    assert all(0 <= i < num_layers for i in a)
    assert list(a) == sorted(a)
    if pattern != "uniform":  # evenly spaced sets need not nest (e.g. 2 of 5 vs 3 of 5)
        assert set(a) <= set(b)


@given(num_layers=st.integers(1, 30), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_sampled_sets_have_budget_size_and_follow_zero_probabilities(
    num_layers: int, data: st.DataObject, seed: int
) -> None:
    p = np.array(data.draw(st.lists(st.floats(0, 1), min_size=num_layers, max_size=num_layers)))
    p[0] = max(p[0], 0.5)
    p = np.where(p / p.sum() > 0, p, 0.0)  # denormals vanish when normalised
    budget = data.draw(st.integers(1, int(np.count_nonzero(p))))
    layers = sample_layers(p, budget, np.random.default_rng(seed))
    assert len(set(layers)) == budget
    assert all(p[i] > 0 for i in layers)


def test_sampling_matches_numpy_choice_semantics() -> None:
    p = pattern_prior("bottleneck", [6, 9, 12], [1, 1, 1], 12)
    ours = sample_layers(p, 6, np.random.default_rng(7))
    ref = np.random.default_rng(7).choice(12, size=6, replace=False, p=p)
    assert ours == tuple(sorted(int(i) for i in ref))


def test_realised_inclusion_is_flatter_than_prior() -> None:
    p = pattern_prior("bottleneck", [6, 9, 12], [1, 1, 1], 12)
    freq = inclusion_frequency(p, 6, 4000, np.random.default_rng(0))
    assert freq.sum() == pytest.approx(6)
    ratio_prior = p.max() / p.min()
    ratio_real = freq.max() / freq.min()
    assert 1 < ratio_real < ratio_prior


def test_strategies_by_method_name() -> None:
    budgets = {0: 6, 1: 9, 2: 12}
    full = allocate_layers(build_strategy("full", 12, [6, 9, 12], [1, 1, 1]), 1, budgets, 0)
    assert all(v == tuple(range(12)) for v in full.values())
    gd = allocate_layers(build_strategy("gd-bottleneck", 12, [6, 9, 12], [1, 1, 1]), 5, budgets, 0)
    assert gd[0] == PAPER_SETS[("bottleneck", 6)]
    rgd = build_strategy("rgd-bottleneck", 12, [6, 9, 12], [1, 1, 1])
    r1 = allocate_layers(rgd, 1, budgets, 0)
    assert allocate_layers(rgd, 1, budgets, 0) == r1  # seeded by (seed, round)
    assert [allocate_layers(rgd, r, budgets, 0)[0] for r in range(2, 8)] != [r1[0]] * 6
    assert {k: len(v) for k, v in r1.items()} == budgets
    rnd = allocate_layers(build_strategy("fedra", 12, [6], [1]), 3, {4: 6}, 1)
    assert len(rnd[4]) == 6


def test_unknown_method_or_budget_is_a_user_error() -> None:
    with pytest.raises(UserError, match="method"):
        build_strategy("gd-pyramid", 12, [6], [1])
    with pytest.raises(UserError, match="budget"):
        geometric_layers("triangle", 13, 12)
