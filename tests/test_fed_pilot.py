"""Fed-pilot: the per-client knapsack is exact under the real (non-additive) cost model, and a
run with it plans by the layers' importance within every budget."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedhello import load_config, run_experiment
from fedhello.method.budgets import CostModel, DeviceBudget
from fedhello.method.fed_pilot import best_layer_set

MiB = 2**20


def _costs(num_layers: int) -> CostModel:
    # a frozen model of 100 MiB; activations: 6 MiB per block in the backward pass, 1 MiB per
    # trained layer; step time likewise: training a low block costs the whole way down
    return CostModel(
        num_layers=num_layers,
        model_bytes=100 * MiB,
        layer_bytes=[64 * 1024] * num_layers,
        head_bytes=0,
        rank=16,
        memory_coef=[2.0 * MiB, 6.0 * MiB, 1.0 * MiB],
        time_coef=[0.05, 0.02, 0.005],
    )


def _brute_force(
    values: np.ndarray, budget: int, costs: CostModel, device: DeviceBudget, steps: int
) -> float:
    best = 0.0
    for n in range(1, budget + 1):
        for layers in itertools.combinations(range(len(values)), n):
            if not costs.predict(layers, steps, None, device.speed).over(device):
                best = max(best, float(values[list(layers)].sum()))
    return best


@pytest.mark.parametrize("num_layers", [4, 6, 8])
def test_the_knapsack_equals_brute_force_with_the_cost_model(num_layers: int) -> None:
    costs = _costs(num_layers)
    rng = np.random.default_rng(num_layers)
    for trial in range(25):
        values = rng.exponential(size=num_layers)
        memory = int((100 + rng.uniform(5, 6 * num_layers + 10)) * MiB)
        device = DeviceBudget(memory=memory, seconds_per_round=float(rng.uniform(0.5, 2.5)))
        budget = int(rng.integers(1, num_layers + 1))
        limits = costs.limits(device, steps=8)
        chosen = best_layer_set(list(values), budget, limits)
        assert len(chosen) <= budget
        if chosen:
            assert not costs.predict(chosen, 8, None, device.speed).over(device), (trial, chosen)
        got = float(values[list(chosen)].sum()) if chosen else 0.0
        assert got == pytest.approx(_brute_force(values, budget, costs, device, 8)), (trial, chosen)


def test_without_device_budgets_it_takes_the_most_important_layers() -> None:
    values = [0.1, 0.9, 0.3, 0.8, 0.2, 0.7]
    assert best_layer_set(values, 3, None) == (1, 3, 5)
    assert best_layer_set([1.0] * 6, 2, None) == (4, 5)  # ties: the cheaper, higher blocks


def test_a_fed_pilot_run_reproduces_and_records_the_importance(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    over = tiny_overrides("method=fed-pilot", "federation.rounds=2")
    first = run_experiment(load_config(None, over), tmp_path / "a")
    second = run_experiment(load_config(None, over), tmp_path / "b")
    assert first["final_test_accuracy"] == second["final_test_accuracy"]
    rounds = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    for r in rounds:
        scores = r["extras"]["importance"]["scores"]
        for c in r["clients"]:
            budget = int(first["groups"][c["group"]]["budget"])
            assert len(c["layers"]) <= budget
            top = sorted(range(len(scores)), key=lambda i: (-scores[i], -i))[:budget]
            assert sum(scores[i] for i in c["layers"]) == pytest.approx(sum(scores[i] for i in top))
    assert first["importance_rounds"] == 2
