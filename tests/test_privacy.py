"""Client-level differential privacy: Opacus's accounting, the noise the server adds (measured),
clipping of whole updates (layer sets and rank slices), determinism, and one-line refusals."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from fedhello import load_config, run_experiment
from fedhello.cli import main
from fedhello.errors import UserError
from fedhello.method.aggregation import ClientUpdate
from fedhello.method.rank import pad_rank
from fedhello.privacy import clip_update, private_mean, resolve_privacy, update_norm
from fedhello.privacy.accounting import epsilon_of
from fedhello.privacy.mechanism import planned_coverage


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_is_opacus_own_answer_and_a_target_is_met(accountant: str) -> None:
    q, z, steps, delta = 0.05, 1.1, 40, 1e-3
    theirs = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(steps):
        theirs.step(noise_multiplier=z, sample_rate=q)
    assert epsilon_of(accountant, z, q, steps, delta) == pytest.approx(theirs.get_epsilon(delta), rel=1e-9)

    cfg = load_config(
        None,
        [
            "partition.num_clients=100",
            "federation.clients_per_round=5",
            "federation.rounds=40",
            "privacy.mode=central",
            "privacy.clip_norm=1.0",
            "privacy.target_epsilon=4",
            "privacy.delta=0.001",
            f"privacy.accountant={accountant}",
        ],
    )
    resolved = resolve_privacy(cfg)
    assert resolved is not None and resolved.sample_rate == 0.05
    spent = resolved.epsilon(40)  # the z Opacus's get_noise_multiplier found, spent over 40 rounds
    assert 4 * 0.97 <= spent <= 4  # Opacus's search stops within its tolerance, never above


def test_the_servers_noise_has_std_zc_over_the_planned_contributors() -> None:
    state = {"a": torch.zeros(40, 50), "b": torch.zeros(30, 20)}
    # three clients planned: all three send `a`, one sends `b`
    shapes = {0: {"a": (40, 50), "b": (30, 20)}, 1: {"a": (40, 50)}, 2: {"a": (40, 50)}}
    coverage = planned_coverage(shapes, state, lambda name, t, shape: t)
    z, clip = 1.3, 0.7
    g = torch.Generator().manual_seed(0)
    steps = {"a": [], "b": []}
    for _ in range(60):  # many aggregations of no update at all: what moves is the noise
        out = private_mean(state, [], coverage, z * clip, g, lambda name, t, shape: t)
        for k in steps:
            steps[k].append(out[k].double().flatten())
    for name, contributors in (("a", 3), ("b", 1)):
        measured = float(torch.cat(steps[name]).std())
        assert measured == pytest.approx(z * clip / contributors, rel=0.05), name


def test_rank_slices_are_averaged_over_the_clients_whose_rank_covers_each_component() -> None:
    name = "x.lora_A.default.weight"
    state = {name: torch.zeros(4, 3)}
    shapes = {0: {name: (2, 3)}, 1: {name: (4, 3)}}  # ranks 2 and 4
    coverage = planned_coverage(shapes, state, pad_rank)
    assert coverage[name][:, 0].tolist() == [2, 2, 1, 1]
    updates = [ClientUpdate(0, {name: torch.ones(2, 3)}, 1), ClientUpdate(1, {name: 3 * torch.ones(4, 3)}, 1)]
    out = private_mean(state, updates, coverage, 0.0, torch.Generator(), pad_rank)
    assert out[name][:, 0].tolist() == [2.0, 2.0, 3.0, 3.0]


def test_clipping_bounds_the_whole_update() -> None:
    update = {"a": torch.full((10,), 3.0), "b": torch.full((5,), -4.0)}
    clipped = clip_update(update, 1.5)
    assert update_norm(clipped) == pytest.approx(1.5, rel=1e-6)
    assert torch.allclose(clipped["a"] / clipped["b"][0], update["a"] / update["b"][0])  # direction kept
    small = {"a": torch.full((4,), 0.1)}
    assert clip_update(small, 1.5)["a"] is small["a"]  # shorter updates are sent as they are


@pytest.mark.parametrize("method", ["fedhello", "hetlora"])
def test_every_update_the_server_sums_is_within_c_and_a_seed_repeats(
    method: str, tiny_overrides: Callable[..., list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedhello.engine.server as server

    summed: list[tuple[float, set[str]]] = []
    original = server.private_mean

    def spy(state: Any, updates: Any, *args: Any) -> Any:
        summed.extend((update_norm(u.deltas), set(u.deltas)) for u in updates)
        return original(state, updates, *args)

    monkeypatch.setattr(server, "private_mean", spy)
    over = tiny_overrides(
        f"method={method}",
        "federation.rounds=2",
        "privacy.mode=central",
        "privacy.clip_norm=0.05",
        "privacy.noise_multiplier=0.5",
    )
    first = run_experiment(load_config(None, over), tmp_path / "a")
    second = run_experiment(load_config(None, over), tmp_path / "b")
    assert first["final_test_accuracy"] == second["final_test_accuracy"]
    assert summed and all(norm <= 0.05 * (1 + 1e-5) for norm, _ in summed)
    assert any(norm == pytest.approx(0.05, rel=1e-4) for norm, _ in summed)  # clipping was active
    if method == "fedhello":  # partial layer sets: clients sent different tensors
        assert len({frozenset(keys) for _, keys in summed}) > 1
    rounds = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1] and first["privacy"]["epsilon"] == eps[-1]
    # nothing of a client's data size or loss is sent
    assert all(c["samples"] == 1 and "train_loss" not in c for r in rounds for c in r["clients"])


def test_local_noise_is_added_by_each_client(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    over = tiny_overrides(
        "federation.rounds=1", "privacy.mode=local", "privacy.clip_norm=0.05", "privacy.noise_multiplier=2"
    )
    noisy = run_experiment(load_config(None, over), tmp_path / "local")
    plain = run_experiment(load_config(None, tiny_overrides("federation.rounds=1")), tmp_path / "plain")
    assert noisy["privacy"]["mode"] == "local" and noisy["privacy"]["sample_rate"] == 1.0
    assert noisy["final_test_loss"] != plain["final_test_loss"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("privacy.clip_norm=0", "privacy.clip_norm: Input should be greater than 0"),
        ("privacy.delta=1", "privacy.delta: Input should be less than 1"),
        ("federation.aggregation=median", "federation.aggregation: median reads individual updates"),
        ("federation.norm_bound=clip", "federation.norm_bound: privacy.clip_norm bounds every update"),
        (
            "privacy.target_epsilon=0.5",
            "privacy.target_epsilon: 20 rounds at noise_multiplier 0.5 spend epsilon",
        ),
        ("method=flora", "privacy.mode: central needs a noised mean of clipped updates; flora merges"),
    ],
)
def test_bad_privacy_settings_are_one_line_and_exit_2(
    override: str, message: str, tiny_overrides: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "privacy.mode=central",
        "privacy.clip_norm=1",
        "privacy.noise_multiplier=0.5",
        "federation.rounds=20",
    ]
    code = main(["run", *tiny_overrides(*base, override), "--out", "/nonexistent/never-written"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err


def test_an_unmeetable_target_is_one_line() -> None:
    cfg = load_config(
        None,
        [
            "privacy.mode=central",
            "privacy.clip_norm=1",
            "privacy.target_epsilon=0.000001",
            "privacy.delta=0.000000001",
            "federation.rounds=100000",
            "federation.clients_per_round=5",
            "partition.num_clients=5",
        ],
    )
    with pytest.raises(
        UserError, match=re.escape("privacy.target_epsilon: 1e-06 cannot be met in 100000 rounds")
    ):
        resolve_privacy(cfg)
    assert np.isfinite(epsilon_of("rdp", 1.0, 1.0, 10, 1e-5))


def test_plan_prints_the_epsilon_the_configured_run_will_spend(
    tiny_overrides: Callable[..., list[str]], fast_calibration: None, capsys: pytest.CaptureFixture[str]
) -> None:
    over = tiny_overrides("privacy.mode=central", "privacy.clip_norm=0.1", "privacy.target_epsilon=8")
    assert main(["plan", *over, "--methods", "fedhello"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("privacy: "))
    spent = float(line.split("spend epsilon ")[1].split()[0])
    assert "central DP, clip 0.1" in line and "sampling rate 0.5" in line and 7.7 <= spent <= 8, line
