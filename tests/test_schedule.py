"""The co-designed schedule: which probabilities govern each round, for every hold mode."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import allocate_layers, build_strategy

from fedhello.method.allocation import (
    FisherAllocation,
    FisherSchedule,
    pattern_prior,
    sample_layers,
)
from fedhello.method.fisher import FisherOptions
from fedhello.method.importance import fisher_probabilities
from fedhello.seeding import Stream, numpy_rng

L = 6
PRIOR = pattern_prior("bottleneck", [3, 4, 6], [1, 1, 1], L)
BUDGETS = {0: 3, 1: 4, 2: 6, 5: 3}


def scores_for(round_number: int) -> np.ndarray:
    """Distinct scores per refresh so that each refresh gives different probabilities."""
    rng = np.random.default_rng(round_number)
    return rng.permutation([0.1, 0.2, 1.0, 1.1, 5.0, 5.5])


def run_schedule(strategy: FisherAllocation, rounds: int) -> dict[int, np.ndarray]:
    used = {}
    for r in range(1, rounds + 1):
        if strategy.needs_scores(r):
            strategy.update_scores(r, scores_for(r))
        used[r] = strategy.probabilities(r)
        if strategy.schedule.hold != "persist_allocation" or used[r] is PRIOR:
            # one stream per round, clients in order: exactly numpy's sequential draws from `used[r]`
            rng = numpy_rng(7, Stream.ALLOCATION, r)
            expected = {c: sample_layers(used[r], n, rng) for c, n in sorted(BUDGETS.items())}
            assert allocate_layers(strategy, r, BUDGETS, 7) == expected, r
    return used


def fim(r: int) -> np.ndarray:
    return fisher_probabilities(scores_for(r), 3)


def make(hold: str, warmup: int = 2, every: int = 3) -> FisherAllocation:
    return FisherAllocation("fedhello", PRIOR, FisherSchedule(warmup, every, hold), seed=7)  # type: ignore[arg-type]


def test_refresh_rounds() -> None:
    s = FisherSchedule(2, 3)
    assert [r for r in range(1, 12) if s.is_refresh(r)] == [3, 6, 9]
    assert [r for r in range(1, 5) if FisherSchedule(0, 1).is_refresh(r)] == [1, 2, 3, 4]  # pure FIM-HLA


def test_persist_probs_round_by_round() -> None:
    used = run_schedule(make("persist_probs"), 10)
    expected = {
        1: PRIOR,
        2: PRIOR,
        3: fim(3),
        4: fim(3),
        5: fim(3),
        6: fim(6),
        7: fim(6),
        8: fim(6),
        9: fim(9),
        10: fim(9),
    }
    for r, p in expected.items():
        np.testing.assert_allclose(used[r], p, err_msg=f"round {r}")
    assert not np.allclose(fim(3), fim(6))


def test_single_round_released_behaviour() -> None:
    used = run_schedule(make("single_round"), 8)
    expected = {1: PRIOR, 2: PRIOR, 3: fim(3), 4: PRIOR, 5: PRIOR, 6: fim(6), 7: PRIOR, 8: PRIOR}
    for r, p in expected.items():
        np.testing.assert_allclose(used[r], p, err_msg=f"round {r}")


def test_persist_allocation_keeps_each_clients_layers_until_the_next_refresh() -> None:
    strategy = make("persist_allocation")
    allocations = {}
    for r in range(1, 9):
        if strategy.needs_scores(r):
            strategy.update_scores(r, scores_for(r))
        allocations[r] = allocate_layers(strategy, r, BUDGETS, 7)
        if r >= 3:
            np.testing.assert_allclose(strategy.probabilities(r), fim(3 if r < 6 else 6))
    assert allocations[3] == allocations[4] == allocations[5]
    assert allocations[6] == allocations[7] == allocations[8]
    assert allocations[3] != allocations[6]
    assert allocations[1] != allocations[2]  # warm-up still draws afresh every round
    # the held draw comes from the Fisher probabilities of the refresh
    assert allocations[3][0] == sample_layers(fim(3), 3, numpy_rng(7, Stream.ALLOCATION, 3, 1))


def test_prior_product_and_released_levels() -> None:
    product = FisherAllocation("x", PRIOR, FisherSchedule(0, 1), 7, prior_product=True)
    info = product.update_scores(1, scores_for(1))
    expected = PRIOR * fim(1)
    np.testing.assert_allclose(info.probabilities, expected / expected.sum())
    released = FisherAllocation("x", PRIOR, FisherSchedule(0, 1), 7, released_levels=True)
    a = released.update_scores(1, scores_for(1))
    b = FisherAllocation("x", PRIOR, FisherSchedule(0, 1), 7, released_levels=True).update_scores(
        1, scores_for(1)
    )
    assert a == b  # the released mapping is arbitrary but seeded here, so runs still reproduce
    assert sorted(set(a.levels)) == [1, 2, 3]


def test_state_round_trip_for_resume() -> None:
    a = make("persist_probs")
    for r in range(1, 5):
        if a.needs_scores(r):
            a.update_scores(r, scores_for(r))
    b = make("persist_probs")
    b.load_state_dict(a.state_dict())
    assert allocate_layers(a, 5, BUDGETS, 7) == allocate_layers(b, 5, BUDGETS, 7)


def test_methods_by_name_and_defaults() -> None:
    s = build_strategy("fedhello", L, [3, 4, 6], [1, 1, 1], rounds=500, seed=0)
    assert isinstance(s, FisherAllocation)
    assert (s.schedule.warmup_rounds, s.schedule.refresh_every, s.schedule.hold) == (50, 50, "persist_probs")
    np.testing.assert_allclose(s.prior, PRIOR)
    short = build_strategy("fedhello", L, [3, 4, 6], [1, 1, 1], rounds=10, seed=0)
    assert (short.schedule.warmup_rounds, short.schedule.refresh_every) == (1, 1)  # type: ignore[attr-defined]
    f = build_strategy("fim", L, [3], [1], rounds=10, seed=0)
    assert (f.schedule.warmup_rounds, f.schedule.refresh_every) == (0, 1)  # type: ignore[attr-defined]
    custom = build_strategy(
        "fedhello", L, [3], [1], rounds=10, seed=0, fisher=FisherOptions(warmup_rounds=4, refresh_every=3)
    )
    assert (custom.schedule.warmup_rounds, custom.schedule.refresh_every) == (4, 3)  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="unknown method"):
        build_strategy("fedavg", L, [3], [1])
