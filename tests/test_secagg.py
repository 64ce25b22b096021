"""Secure aggregation per tensor (fedhello/privacy/secagg.py, docs/privacy.md): the unmasked sums
equal plain aggregation within the quantisation error, for layer sets and rank slices; dropped
clients are recovered from their neighbours' shares or the round is skipped; what the server
receives says nothing about an update; runs with it equal runs without."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedhello.cli import main
from fedhello.privacy.secagg import (
    WEIGHT,
    RoundLayout,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    SkippedRound,
    ring_neighbours,
    secure_round,
)
from fedhello.records import read_records

SHAPES = {"a": (4, 8), "b": (8, 4), "c": (16,), "head": (3,)}
TENSORS = {
    1: ("a", "b", "head"),
    2: ("a", "head"),
    3: ("a", "b", "c", "head"),
    5: ("c", "head"),
    7: ("a", "c"),
}
WEIGHTS = {1: 10, 2: 20, 3: 5, 5: 7, 7: 3}


def params(threshold: int = 3, neighbours: int = 4) -> SecAggParams:
    return SecAggParams(
        threshold, neighbours, clipping_range=1.0, field_bits=48, weight_bound=sum(WEIGHTS.values())
    )


def layout(tensors: dict[int, tuple[str, ...]] = TENSORS, sliced: tuple[str, ...] = ()) -> RoundLayout:
    return RoundLayout(tensors, SHAPES, {k: (SHAPES[k] if k in sliced else ()) for k in SHAPES})


def updates(seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {c: {n: rng.normal(0, 0.1, SHAPES[n]) for n in ts} for c, ts in TENSORS.items()}


def plain_mean(ups: dict[int, dict[str, np.ndarray]], without: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    out = {}
    for name in SHAPES:
        cs = [c for c in ups if name in ups[c] and c not in without]
        if cs:
            out[name] = sum(WEIGHTS[c] * ups[c][name] for c in cs) / sum(WEIGHTS[c] for c in cs)
    return out


def zeros() -> dict[str, np.ndarray]:
    return {n: np.zeros(s) for n, s in SHAPES.items()}


def step(p: SecAggParams) -> float:
    """One quantisation step: the largest error of a (weighted mean of) stochastically rounded values."""
    return 2 * p.clipping_range / p.quantisation_range


def secure(ups: dict[int, dict[str, np.ndarray]], lay: RoundLayout, p: SecAggParams, gone=None):  # type: ignore[no-untyped-def]
    result, traffic = secure_round(p, lay, ups, WEIGHTS, zeros(), lambda c: 100 + c, gone)
    return result, traffic


def test_sums_equal_plain_aggregation_within_the_quantisation_step_for_layer_sets() -> None:
    p, ups = params(), updates()
    result, traffic = secure(ups, layout(), p)
    assert isinstance(result, dict)
    expected = plain_mean(ups)
    for name, value in expected.items():
        assert np.abs(result[name] - value).max() <= step(p), name
        contributors = sum(WEIGHTS[c] for c in TENSORS if name in TENSORS[c])
        assert np.all(result[name + WEIGHT] == contributors)  # the summed weight, never one client's
    assert step(p) < 1e-8
    assert traffic["messages"] == 4 * len(TENSORS)  # keys, shares, masked input, unmasking shares


def test_rank_slices_are_averaged_over_the_clients_that_cover_each_coordinate() -> None:
    p, ups = params(), updates(1)
    # clients 1 and 3 send rank-2 slices of 'a' (rows 0-1), zero-padded, with their coverage
    for c in (1, 3):
        ups[c]["a"][2:] = 0.0
        cover = np.zeros(SHAPES["a"])
        cover[:2] = 1.0
        ups[c]["a" + WEIGHT] = cover
    result, _ = secure(ups, layout(sliced=("a",)), p)
    assert isinstance(result, dict)
    full = [c for c in TENSORS if "a" in TENSORS[c] and c not in (1, 3)]
    both = [c for c in TENSORS if "a" in TENSORS[c]]
    top = sum(WEIGHTS[c] * ups[c]["a"][:2] for c in both) / sum(WEIGHTS[c] for c in both)
    bottom = sum(WEIGHTS[c] * ups[c]["a"][2:] for c in full) / sum(WEIGHTS[c] for c in full)
    assert np.abs(result["a"][:2] - top).max() <= step(p)
    assert np.abs(result["a"][2:] - bottom).max() <= step(p)


def test_a_client_gone_after_its_masked_input_is_recovered_and_one_gone_before_is_left_out() -> None:
    p, ups = params(), updates(2)
    after, _ = secure(ups, layout(), p, gone=lambda stage, c: stage == "unmask" and c == 3)
    assert isinstance(after, dict)
    for name, value in plain_mean(ups).items():
        assert np.abs(after[name] - value).max() <= step(p), name
    before, _ = secure(ups, layout(), p, gone=lambda stage, c: stage == "input" and c == 3)
    assert isinstance(before, dict)
    for name, value in plain_mean(ups, without=(3,)).items():
        assert np.abs(before[name] - value).max() <= step(p), name


def test_more_dropouts_than_the_threshold_allows_skip_the_round_naming_clients_and_tensors() -> None:
    p, ups = params(threshold=3), updates(3)
    result, _ = secure(ups, layout(), p, gone=lambda stage, c: stage == "unmask" and c in (2, 5, 7))
    assert isinstance(result, SkippedRound)
    text = result.describe()
    assert "fewer than threshold" in text and "round skipped" in text and "a" in result.tensors


def test_sparse_ring_of_neighbours_is_symmetric_and_masks_still_cancel() -> None:
    graph = ring_neighbours([1, 2, 3, 5, 7, 9, 11], 4)
    assert all(len(v) == 4 for v in graph.values())
    assert all(c in graph[d] for c, ns in graph.items() for d in ns)
    tensors = {**TENSORS, 9: ("a", "b"), 11: ("c", "head")}
    rng = np.random.default_rng(4)
    ups = {c: {n: rng.normal(0, 0.1, SHAPES[n]) for n in ts} for c, ts in tensors.items()}
    weights = {**WEIGHTS, 9: 4, 11: 6}
    p = SecAggParams(2, 4, 1.0, 48, sum(weights.values()))
    result, _ = secure_round(p, layout(tensors), ups, weights, zeros(), lambda c: c)
    assert isinstance(result, dict)
    for name in SHAPES:
        cs = [c for c in tensors if name in tensors[c]]
        mean = sum(weights[c] * ups[c][name] for c in cs) / sum(weights[c] for c in cs)
        assert np.abs(result[name] - mean).max() <= step(p), name


def intercepted_input(update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the server receives from client 1 in one run of the first three steps."""
    p, lay = params(), layout()
    graph = ring_neighbours(lay.clients, p.neighbours)
    clients = {c: SecAggClient(c, p, lay, graph[c]) for c in lay.clients}
    server = SecAggServer(p, lay, graph)
    keys = {c: cl.advertise_keys() for c, cl in clients.items()}
    routed = server.route_shares({c: cl.share_keys(keys) for c, cl in clients.items()})
    ups = updates(5)
    ups[1] = update
    return clients[1].masked_input(routed[1], ups[1], WEIGHTS[1], quantise_seed=7)


def test_the_server_cannot_recover_an_update_from_what_it_receives() -> None:
    rng = np.random.default_rng(6)
    update = {n: rng.normal(0, 0.1, SHAPES[n]) for n in TENSORS[1]}
    first, second = intercepted_input(update), intercepted_input(update)
    p = params()
    sent = np.concatenate([first[n].ravel() for n in sorted(first)]).astype(np.float64)
    again = np.concatenate([second[n].ravel() for n in sorted(second)]).astype(np.float64)
    values = np.concatenate([update[n].ravel() for n in sorted(update)])
    payload = np.concatenate([first[n].ravel() for n in sorted(update)]).astype(np.float64)
    # the same update, other masks: unrelated payloads, each uniform over [0, 2^field_bits)
    assert np.mean(sent == again) < 0.01
    assert abs(np.corrcoef(sent, again)[0, 1]) < 0.2
    for payload_run in (sent, again):
        assert stats.kstest(payload_run / p.modulus, "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(payload, values)[0, 1]) < 0.2  # nothing of the update shows
    assert not np.any(np.isclose(payload / p.modulus * 2 - 1, values, atol=1e-3))


def test_a_run_with_secure_aggregation_equals_the_plain_run_also_under_central_privacy(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    central_dp = ("privacy.mode=central", "privacy.clip_norm=0.05", "privacy.noise_multiplier=0.5")
    for method, extra in [("fedhello", ()), ("hetlora", ()), ("fedhello", central_dp)]:
        name = f"{method}-{len(extra)}"
        plain, secure_run = tmp_path / f"{name}-plain", tmp_path / f"{name}-secure"
        assert main(["run", *tiny_overrides(f"method={method}", *extra), "--out", str(plain)]) == 0
        overrides = tiny_overrides(f"method={method}", *extra, "secure_aggregation.enabled=true")
        assert main(["run", *overrides, "--out", str(secure_run)]) == 0
        a, b = read_records(plain / "metrics.jsonl"), read_records(secure_run / "metrics.jsonl")
        assert [r.round for r in a] == [r.round for r in b]
        for x, y in zip(a, b, strict=True):
            assert [c.layers for c in x.clients] == [c.layers for c in y.clients]
            assert abs(x.metrics["test"]["accuracy"] - y.metrics["test"]["accuracy"]) < 0.005, method
        summary = json.loads((secure_run / "summary.json").read_text())
        assert summary["rounds_completed"] == 3


def test_secure_aggregation_refuses_rules_that_read_individual_updates(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for extra, field in [
        ("federation.aggregation=median", "federation.aggregation"),
        ("federation.norm_bound=clip", "federation.norm_bound"),
        ("method=flora", "secure_aggregation.enabled"),
        ("secure_aggregation.threshold=5", "secure_aggregation.threshold"),
    ]:
        argv = [
            "run",
            *tiny_overrides("secure_aggregation.enabled=true", extra),
            "--out",
            str(tmp_path / "r"),
        ]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and field in err, err
