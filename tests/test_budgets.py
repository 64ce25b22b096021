"""Device budgets: units, the cost model's limits, budget-respecting allocation for every kind of
method, calibration against measurement, `fedhello plan`, and runs that respect budgets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from fedhello.cli import main
from fedhello.config import load_config
from fedhello.errors import UserError
from fedhello.method.allocation import FisherAllocation, FixedAllocation, sample_layers, sample_layers_within
from fedhello.method.base import ClientProfile, MethodContext, RoundInputs
from fedhello.method.budgets import CostModel, DeviceBudget, LayerLimits, check_budget_fits
from fedhello.method.fisher import FisherOptions
from fedhello.method.layers import LayerAllocation
from fedhello.method.registry import build_method, method_entries
from fedhello.records import read_records

MiB = 2**20


def synthetic_costs(num_layers: int = 6) -> CostModel:
    """A cost model with round numbers: 100 MiB frozen, 10 MiB per backward block, 1 MiB per
    trained layer's adapters (x3 for gradient and moments), 1 s + 0.1 s per backward block."""
    return CostModel(
        num_layers=num_layers,
        model_bytes=100 * MiB,
        layer_bytes=[MiB] * num_layers,
        head_bytes=0,
        rank=8,
        memory_coef=[0.0, 10.0 * MiB, 0.0],
        time_coef=[1.0, 0.1, 0.0],
    )


# -- configuration ---------------------------------------------------------------------------


def test_budgets_parse_with_units() -> None:
    cfg = load_config(
        None,
        ["groups=[{name: a, share: 1, memory: 1.5GiB, seconds_per_round: 500ms, upload: 2MB, speed: 0.5}]"],
    )
    g = cfg.groups[0]
    assert (g.memory, g.seconds_per_round, g.upload, g.speed) == (int(1.5 * 2**30), 0.5, 2_000_000, 0.5)
    assert g.budget == 1.0  # a budget in bytes alone: every layer count is allowed by the layer budget


@pytest.mark.parametrize(
    ("group", "field"),
    [
        ("memory: 1.5XB", "groups.0.memory"),
        ("memory: 0", "groups.0.memory"),
        ("upload: lots", "groups.0.upload"),
        ("seconds_per_round: 3 parsecs", "groups.0.seconds_per_round"),
        ("seconds_per_round: -1", "groups.0.seconds_per_round"),
        ("speed: 0", "groups.0.speed"),
    ],
)
def test_malformed_budget_is_one_line_naming_the_field(
    group: str, field: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", f"groups=[{{name: a, share: 1, {group}}}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err, err


# -- limits ----------------------------------------------------------------------------------


def test_limits_give_the_lowest_block_per_layer_count() -> None:
    costs = synthetic_costs()
    # a set from block m of n layers: 100 + 10 (6 - m) + 3 n MiB
    limits = costs.limits(DeviceBudget(memory=100 * MiB + 30 * MiB + 9 * MiB), steps=1)
    assert limits.lowest == (3, 3, 3, None, None, None)  # 3 layers from block 3: 139 MiB fits
    assert limits.fits((3, 4, 5)) and not limits.fits((2, 4, 5)) and not limits.fits((2, 3, 4, 5))
    assert limits.max_rank is None  # all layers never fit: rank methods sit out
    assert limits.describe() == "up to 3 layers: 3 from block 3, 2 from block 3, 1 from block 3"
    # time: 1 + 0.1 (6 - m) s per step, 10 steps, on a device half as fast
    slow = costs.limits(DeviceBudget(seconds_per_round=2 * 10 * 1.3, speed=0.5), steps=10)
    assert slow.lowest[0] == 3 and slow.lowest[2] == 3
    # upload: 1 MiB per layer at rank 8; at most 2.5 MiB -> 2 layers at full rank, rank 3 on all 6
    up = costs.limits(DeviceBudget(upload=int(2.5 * MiB)), steps=1)
    assert up.counts() == [1, 2] and up.lowest[1] == 0
    assert up.max_rank == 3


def test_a_budget_nothing_fits_is_one_line_with_what_is_needed() -> None:
    costs = synthetic_costs()
    budget = DeviceBudget(memory=105 * MiB)
    limits = costs.limits(budget, steps=1)
    with pytest.raises(
        UserError, match=r"groups.0: memory 105 MiB is below the least a client needs, 113 MiB"
    ):
        check_budget_fits(limits, costs.smallest_need(1), budget, "groups.0")


# -- allocation within limits -----------------------------------------------------------------


def test_sampling_within_limits_draws_only_sets_that_fit() -> None:
    p = np.array([0.3, 0.3, 0.1, 0.1, 0.1, 0.1])
    limits = LayerLimits((2, 2, 3, None, None, None))
    drawn = {sample_layers_within(p, 4, np.random.default_rng(s), limits) for s in range(200)}
    assert all(len(s) == 3 and min(s) >= 3 for s in drawn)  # 4 do not fit; 3 from block 3 do
    # without limits: the very same draws as before budgets existed
    for s in range(20):
        assert sample_layers_within(p, 3, np.random.default_rng(s), None) == sample_layers(
            p, 3, np.random.default_rng(s)
        )
    assert sample_layers_within(p, 2, np.random.default_rng(0), LayerLimits((None,) * 6)) == ()


def test_fixed_patterns_shrink_to_a_set_that_fits_or_sit_out() -> None:
    limits = LayerLimits((4, 4, 3, None, None, None))
    inverted = FixedAllocation("gd-inverted_triangle", 6, "inverted_triangle")
    assert inverted.fitting_layers(4, limits) == (3, 4, 5)
    triangle = FixedAllocation("gd-triangle", 6, "triangle")
    assert triangle.fitting_layers(3, limits) == ()  # every triangle set holds block 0
    assert FixedAllocation("full", 6).fitting_layers(6, limits) == ()


BUILT_IN_METHODS = sorted(
    n for n, e in method_entries().items() if e.factory.__module__.startswith("fedhello.")
)


@pytest.mark.parametrize("name", BUILT_IN_METHODS)
def test_every_method_sends_only_sets_within_the_limits(name: str) -> None:
    ctx = MethodContext(num_layers=6, budgets=[3, 6], shares=[1, 1], rounds=10)
    method = build_method(name, ctx)
    tight = LayerLimits((3, 3, 3, None, None, None), max_rank=None)
    upload_only = LayerLimits((0,) * 6, max_rank=2)
    profiles = {0: ClientProfile(3, 4, tight), 1: ClientProfile(6, 8, upload_only), 2: ClientProfile(6, 8)}
    inputs = RoundInputs(
        1, profiles, np.random.default_rng(0), lambda _options: np.arange(6, dtype=float) + 1
    )
    plan = method.plan_round(inputs)
    a0, a1 = plan.assignments[0], plan.assignments[1]
    assert tight.fits(a0.layers), (name, a0)
    if a1.rank is not None:  # rank-heterogeneous: the largest rank whose upload fits
        assert a1.rank <= 2 and a0.layers == ()
    assert plan.assignments[2].layers  # no limits: trains as before


# -- calibration and runs (tiny BERT) ---------------------------------------------------------


@pytest.fixture
def cache_dir(shared_cache: Path, fast_calibration: None) -> Path:
    """The cache folder of this module's calibrations: the tiny BERT is calibrated (in one probe
    pass) by the first test that needs it, and later tests load it, checked by a probe."""
    return shared_cache


def test_calibrated_memory_matches_measurement_on_sets_that_were_not_probes(
    tiny_overrides: Callable[..., list[str]], cache_dir: Path
) -> None:
    from fedhello.engine.calibration import cache_key, calibrated, measure, model_bytes
    from fedhello.engine.experiment import prepare_experiment

    exp = prepare_experiment(load_config(None, tiny_overrides()))
    costs = calibrated(exp)
    assert costs.model_bytes == model_bytes(exp.adapted.model) > 0
    assert (cache_dir / "costs" / f"{cache_key(exp)}.json").is_file(), "the calibration is cached"
    probes = {p.layers for p in costs.probes}
    for layers in [(1, 2), (1, 3), (2,), (0, 3), (1, 2, 3)]:
        assert layers not in probes
        m = measure(exp, layers, steps=2)
        assert costs.training_bytes(layers) == pytest.approx(m.training_bytes, rel=0.02), layers
        assert costs.seconds_per_step(layers) > 0
    # the exact parts: the trained tensors' bytes grow with the layer count
    assert costs.training_bytes((3,)) < costs.training_bytes((2, 3)) < costs.training_bytes((0, 3))


def budget_groups(low: int, mid: int, high: int) -> str:
    return (
        f"groups=[{{name: low, share: 1, budget: 0.5, memory: {low}}}, "
        f"{{name: mid, share: 1, budget: 0.75, memory: {mid}}}, {{name: high, share: 1, budget: 1.0, memory: {high}}}]"
    )


def test_plan_json_and_measure_on_tiny_bert(
    tiny_overrides: Callable[..., list[str]], cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedhello.engine.calibration import calibrated
    from fedhello.engine.experiment import prepare_experiment

    exp = prepare_experiment(load_config(None, tiny_overrides()))
    costs = calibrated(exp)
    steps = 3
    low = costs.predict((2, 3), steps).memory_bytes  # admits the 2-layer set {2, 3} and nothing lower
    everything = costs.predict((0, 1, 2, 3), steps).memory_bytes
    argv = [
        "plan",
        *tiny_overrides(budget_groups(low, everything, everything)),
        "--methods",
        "fedhello,fedit,gd-triangle",
    ]
    assert main([*argv, "--json", "--measure"]) == 0
    plan = json.loads(capsys.readouterr().out)
    rows = {(r["method"], r["group"]): r for r in plan["methods"]}
    assert all(min(s) >= 2 for s in rows[("fedhello", "low")]["layer_sets"])
    assert rows[("fedit", "low")]["clients_sat_out"] > 0 and rows[("fedit", "high")]["clients_sat_out"] == 0
    assert "sit out" in rows[("gd-triangle", "low")]["warning"]
    assert plan["groups"][0]["lowest_block_by_count"][:2] == [2, 2]
    for m in plan["measured"]:
        assert abs(m["peak_memory_error"]) < 0.02, m
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "warning: fedit / low" in text and "cost model:" in text


def test_run_with_memory_budgets_stays_within_them(
    tiny_overrides: Callable[..., list[str]], cache_dir: Path, tmp_path: Path
) -> None:
    from fedhello.engine.calibration import calibrated
    from fedhello.engine.experiment import prepare_experiment

    exp = prepare_experiment(load_config(None, tiny_overrides()))
    costs = calibrated(exp)
    low = costs.predict((2, 3), 3).memory_bytes
    everything = costs.predict((0, 1, 2, 3), 3).memory_bytes
    out = tmp_path / "run"
    assert main(["run", *tiny_overrides(budget_groups(low, everything, everything)), "--out", str(out)]) == 0
    records = read_records(out / "metrics.jsonl")
    clients = [c for r in records for c in r.clients]
    assert clients and all(c.over_budget == [] for c in clients)
    for c in clients:
        assert c.model_memory_bytes is not None and c.predicted_memory_bytes is not None
        assert c.model_memory_bytes + c.peak_memory_bytes <= c.predicted_memory_bytes
        if c.group == "low":
            assert min(c.layers) >= 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budgets"]["low"]["clients_over_budget"] == 0
    assert summary["budgets"]["low"]["measured_peak_memory_bytes"] <= low
    assert (out / "cost_model.json").is_file()
    # under central differential privacy the budgets still decide every plan (docs/privacy.md)
    private = tmp_path / "private"
    dp = (
        "privacy.mode=central",
        "privacy.clip_norm=0.1",
        "privacy.noise_multiplier=1",
        "federation.rounds=2",
    )
    assert (
        main(["run", *tiny_overrides(budget_groups(low, everything, everything), *dp), "--out", str(private)])
        == 0
    )
    private_records = read_records(private / "metrics.jsonl")
    trained = [c for r in private_records for c in r.clients]
    assert trained and all(c.over_budget == [] for c in trained)
    assert all(min(c.layers) >= 2 for c in trained if c.group == "low")
    assert all(r.epsilon is not None and r.epsilon > 0 for r in private_records)


def test_budget_nothing_fits_stops_before_training(
    tiny_overrides: Callable[..., list[str]],
    cache_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    assert main(["run", *tiny_overrides(budget_groups(1000, 10**10, 10**10)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "groups.0 (low): memory" in err and "below the least" in err, err
    assert (out / "metrics.jsonl").read_text() == ""
    assert main(["plan", *tiny_overrides(budget_groups(1000, 10**10, 10**10))]) == 2


def test_without_budgets_records_carry_no_predictions(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert main(["run", *tiny_overrides("federation.rounds=1"), "--out", str(out)]) == 0
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert not {"predicted_memory_bytes", "over_budget", "model_memory_bytes"} & set(line["clients"][0])
    assert "budgets" not in json.loads((out / "summary.json").read_text())
    assert not (out / "cost_model.json").exists()


def test_clients_over_budget_are_counted_and_groups_that_never_train_are_named() -> None:
    from fedhello.method.budgets import Cost
    from fedhello.records import ClientRecord, RoundRecord
    from fedhello.reporting.summary import summarize_budgets

    over = Cost(100 * MiB, 50 * MiB, 0.5, 4, 3 * MiB, speed=0.5)
    assert over.over(DeviceBudget(memory=140 * MiB, seconds_per_round=3.0, upload=2 * MiB)) == [
        "memory",
        "time",
        "upload",
    ]
    assert over.over(DeviceBudget(memory=150 * MiB, seconds_per_round=4.0, upload=3 * MiB)) == []
    trained = ClientRecord(
        client=0, group="low", layers=[5], model_memory_bytes=100 * MiB, peak_memory_bytes=50 * MiB,
        predicted_memory_bytes=140 * MiB, predicted_seconds=1.0, seconds=2.0, over_budget=["memory"],
    )  # fmt: skip
    records = [RoundRecord(round=1, clients=[trained], idle=[1, 2])]
    budgets = {
        "low": {
            "memory": 140 * MiB,
            "speed": 1.0,
            "allowed": "up to 1 layer: 1 from block 5",
            "members": [0],
        },
        "mid": {"memory": 90 * MiB, "speed": 1.0, "allowed": "nothing", "members": [1, 2]},
    }
    out = summarize_budgets(records, budgets)
    assert out["low"]["clients_over_budget"] == 1 and out["low"]["measured_peak_memory_bytes"] == 150 * MiB
    assert out["low"]["over_budget"] == ["round 1 client 0: memory"]
    assert out["mid"]["sat_out"] and out["mid"]["clients_sat_out"] == 2 and "sat_out_reason" in out["mid"]


def test_levels_over_feasible_blocks_tell_a_low_memory_clients_blocks_apart() -> None:
    # the two bottom blocks dominate the scores: over all layers, blocks 2-5 share the lowest level
    scores = np.array([10.0, 9.0, 0.1, 0.15, 0.2, 0.9])
    limits = LayerLimits((2, 2, 2, None, None, None))  # at most 3 layers, none below block 2

    def strategy(levels_over: Literal["all_layers", "feasible"]) -> FisherAllocation:
        fisher = FisherOptions(warmup_rounds=0, refresh_every=1, levels_over=levels_over)
        built = build_method("fedhello", MethodContext(6, [3], [1.0], rounds=4, options=fisher))
        assert isinstance(built, LayerAllocation) and isinstance(built.strategy, FisherAllocation)
        built.strategy.update_scores(1, scores)
        return built.strategy

    everywhere, feasible = strategy("all_layers"), strategy("feasible")
    p_all = everywhere.probabilities(1)
    assert p_all[2:].tolist() == pytest.approx([p_all[2]] * 4)  # one level: uniform among 2-5
    p = feasible.feasible_probabilities(2)
    assert p[:2].tolist() == [0.0, 0.0]
    assert p[5] == p.max() > p[2] and p.sum() == pytest.approx(1.0)  # block 5 stands out there

    def frequency(s: FisherAllocation) -> np.ndarray:
        counts = np.zeros(6)
        for seed in range(400):
            counts[list(s.client_layers(1, 0, 3, np.random.default_rng(seed), limits))] += 1
        return counts / 400

    f_all, f_feasible = frequency(everywhere), frequency(feasible)
    assert f_all[:2].sum() == 0 and f_feasible[:2].sum() == 0
    assert f_feasible[5] > f_all[5] + 0.05 and f_feasible[2] < f_all[2] - 0.05
    # it survives a resume
    again = strategy("feasible")
    again.load_state_dict(feasible.state_dict())
    assert again.feasible_probabilities(2).tolist() == p.tolist()
