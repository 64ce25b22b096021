"""Secure aggregation per tensor (fedhello/privacy/secagg.py, docs/privacy.md): the unmasked sums
equal plain aggregation within the quantisation error, for layer sets and rank slices; dropped
clients are recovered from their neighbours' shares or the round is skipped; what the server
receives says nothing about an update; runs with it equal runs without."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.quantization import dequantize
from scipy import stats

from fedhello.cli import main
from fedhello.engine import server as engine_server
from fedhello.privacy.secagg import (
    WEIGHT,
    RoundLayout,
    SecAggParams,
    SkippedRound,
    masks_for,
    ring_neighbours,
    secure_round,
)
from fedhello.records import read_records

SHAPES = {"a": (4, 8), "b": (16, 16), "c": (16,), "head": (3,)}
TENSORS = {
    1: ("a", "b", "head"),
    2: ("a", "head"),
    3: ("a", "b", "c", "head"),
    5: ("c", "head"),
    7: ("a", "c"),
}
WEIGHTS = {1: 10, 2: 20, 3: 5, 5: 7, 7: 3}


def params(threshold: int = 3, neighbours: int = 4, limbs: int = 2) -> SecAggParams:
    return SecAggParams(
        threshold,
        neighbours,
        clipping_range=1.0,
        field_bits=48,
        weight_bound=sum(WEIGHTS.values()),
        limbs=limbs,
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
    """The first limb's quantisation step: how far a stochastically rounded value can move."""
    return 2 * p.clipping_range / p.quantisation_range


def tolerance(p: SecAggParams) -> float:
    """The largest error of a secure mean: the last limb's step, plus float64's rounding of
    values below 1 (a few ulps of 2^-53)."""
    return p.resolution() + 1e-15


def secure(ups: dict[int, dict[str, np.ndarray]], lay: RoundLayout, p: SecAggParams, gone=None):  # type: ignore[no-untyped-def]
    result, traffic = secure_round(p, lay, ups, WEIGHTS, zeros(), lambda c: 100 + c, gone)
    return result, traffic


def test_sums_equal_plain_aggregation_within_the_quantisation_step_for_layer_sets() -> None:
    p, ups = params(), updates()
    result, traffic = secure(ups, layout(), p)
    assert isinstance(result, dict)
    expected = plain_mean(ups)
    for name, value in expected.items():
        assert np.abs(result[name] - value).max() <= tolerance(p), name
        contributors = sum(WEIGHTS[c] for c in TENSORS if name in TENSORS[c])
        assert np.all(result[name + WEIGHT] == contributors)  # the summed weight, never one client's
    assert tolerance(p) < 2e-15
    assert traffic["messages"] == 4 * len(TENSORS)  # keys, shares, masked input, unmasking shares


def test_two_limbs_give_the_plain_float32_state_and_one_limb_does_not() -> None:
    """One limb (SecAgg+ as published) leaves each mean within 2c/Q of the plain one, about 2e-9,
    which training amplifies until a run leaves the plain run's path. Two limbs carry a float32
    update exactly: a tensor with one contributor comes back bit for bit, a mean of several to
    float64's rounding, and the server's new float32 state (global + mean, as the engine builds
    it) equals plain aggregation's, also where global + mean falls on a rounding tie, which a
    1e-18 error would break the other way. (Where the exact mean of several is itself a float32
    tie, plain aggregation's own float64 rounding decides, and the two can differ by an ulp:
    docs/privacy.md; these weights make no such tie.) The unmasked sums are exact integers, so
    the result does not depend on the masks."""
    tensors = {**TENSORS, 1: ("b",), 3: ("a", "c", "head")}  # 'b' has one contributor
    rng = np.random.default_rng(7)
    ups = {
        c: {n: rng.normal(0, 0.1, SHAPES[n]).astype(np.float32).astype(np.float64) for n in ts}
        for c, ts in tensors.items()
    }
    state = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in SHAPES.items()}
    weights = {c: WEIGHTS[c] for c in tensors}

    def plain_state(name: str) -> np.ndarray:  # aggregate_per_tensor's arithmetic
        cs = [c for c in tensors if name in tensors[c]]
        total = sum(weights[c] for c in cs)
        combined = np.zeros(SHAPES[name])
        for c in cs:
            combined += (weights[c] / total) * ups[c][name]
        return (state[name].astype(np.float64) + combined).astype(np.float32)

    errors, differing = {}, {}
    for limbs in (1, 2):
        result, _ = secure_round(params(limbs=limbs), layout(tensors), ups, weights, zeros(), lambda c: c)
        assert isinstance(result, dict)
        errors[limbs] = max(np.abs(result[n] - plain_mean(ups)[n]).max() for n in SHAPES if n != "b")
        errors[limbs] = max(errors[limbs], np.abs(result["b"] - ups[1]["b"]).max())
        new = {n: (state[n].astype(np.float64) + result[n]).astype(np.float32) for n in SHAPES}
        differing[limbs] = sum(int(np.sum(new[n] != plain_state(n))) for n in SHAPES)
        if limbs == 2:
            assert np.array_equal(result["b"], ups[1]["b"])  # one contributor: its value, to the bit
    assert 1e-12 < errors[1] <= step(params(limbs=1))
    assert errors[2] <= 1e-16
    assert differing[1] > 0 and differing[2] == 0, differing
    # the ties are there: 'b' off by one float64 ulp would already change the float32 state
    for direction in (np.inf, -np.inf):
        nudged = (state["b"].astype(np.float64) + np.nextafter(ups[1]["b"], direction)).astype(np.float32)
        assert np.any(nudged != plain_state("b"))


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
    assert np.abs(result["a"][:2] - top).max() <= tolerance(p)
    assert np.abs(result["a"][2:] - bottom).max() <= tolerance(p)


def test_a_client_gone_after_its_masked_input_is_recovered_and_one_gone_before_is_left_out() -> None:
    p, ups = params(), updates(2)
    after, _ = secure(ups, layout(), p, gone=lambda stage, c: stage == "unmask" and c == 3)
    assert isinstance(after, dict)
    for name, value in plain_mean(ups).items():
        assert np.abs(after[name] - value).max() <= tolerance(p), name
    before, _ = secure(ups, layout(), p, gone=lambda stage, c: stage == "input" and c == 3)
    assert isinstance(before, dict)
    for name, value in plain_mean(ups, without=(3,)).items():
        assert np.abs(before[name] - value).max() <= tolerance(p), name


def test_more_dropouts_than_the_threshold_allows_skip_the_round_naming_clients_and_tensors() -> None:
    p, ups = params(threshold=3), updates(3)
    result, _ = secure(ups, layout(), p, gone=lambda stage, c: stage == "unmask" and c in (2, 5, 7))
    assert isinstance(result, SkippedRound)
    text = result.describe()
    assert "fewer than threshold" in text and "round skipped" in text and "a" in result.tensors


def test_a_run_skips_a_round_it_cannot_unmask_and_goes_on(
    tiny_overrides: Callable[..., list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The engine's side of too many dropouts: in round 2 every client but one is gone before
    unmasking, so the server cannot remove the masks; the round is recorded as skipped, the
    global adapters stay as they were (round 2 evaluates as round 1) and round 3 trains."""
    real, rounds = engine_server.secure_round, []

    def two_gone_in_round_two(*args: Any, **kwargs: Any) -> Any:
        rounds.append(len(rounds) + 1)
        if rounds[-1] == 2:
            survivor = args[1].clients[0]
            kwargs["gone"] = lambda stage, c: stage == "unmask" and c != survivor
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_server, "secure_round", two_gone_in_round_two)
    out = tmp_path / "run"
    overrides = tiny_overrides("secure_aggregation.enabled=true", "secure_aggregation.threshold=2")
    with caplog.at_level(logging.WARNING):
        assert main(["run", *overrides, "--out", str(out)]) == 0
    records = read_records(out / "metrics.jsonl")
    assert [r.round for r in records] == [1, 2, 3] and rounds == [1, 2, 3]
    skipped = [r.extras["secure_aggregation"].get("skipped") for r in records]
    assert skipped == [None, 1, None]
    assert records[1].metrics["test"] == records[0].metrics["test"]
    assert records[2].metrics["test"] != records[1].metrics["test"]
    assert any("round 2: secure aggregation: fewer than threshold" in m for m in caplog.messages)


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
        assert np.abs(result[name] - mean).max() <= tolerance(p), name


Seen = dict[str, dict[int, object]]


def eavesdrop(tensors: dict[int, tuple[str, ...]], update: dict[str, np.ndarray]) -> Seen:
    """Every message the server receives, stage by stage, in one run of the protocol in which
    client 1 sends `update` (fresh keys and seeds each time, as in a real run)."""
    ups = {c: {n: np.full(SHAPES[n], 0.01 * c) for n in ts} for c, ts in tensors.items()}
    ups[1] = update
    seen: Seen = {}
    secure_round(
        params(),
        layout(tensors),
        ups,
        WEIGHTS,
        zeros(),
        lambda c: 7,
        observe=lambda stage, c, message: seen.setdefault(stage, {}).__setitem__(c, message),
    )
    return seen


def attack(tensors: dict[int, tuple[str, ...]], seen: Seen) -> np.ndarray:
    """The server's best use of everything it received against client 1: rebuild client 1's
    private seed b from the unmasking shares and take PRG(b) off its masked input. What is left
    is client 1's weighted, quantised update plus its pairwise masks (integers modulo 2^bits)."""
    p, lay = params(), layout(tensors)
    answers = [a for a in seen["unmask"].values() if isinstance(a, dict) and 1 in a]
    seed = combine_shares([a[1] for a in answers][: p.effective_threshold(p.neighbours + 1)])
    names = sorted(tensors[1])
    private_mask = masks_for(seed, lay.slots(names, p.limbs), p.modulus)
    masked = seen["input"][1]
    assert isinstance(masked, dict)
    return np.concatenate([((masked[n] - private_mask[n]) % p.modulus).ravel() for n in names])


def decode(residual: np.ndarray) -> np.ndarray:
    """Read a residual as client 1's update: right exactly when no pairwise mask is in it."""
    p = params()
    return np.asarray(dequantize([residual / WEIGHTS[1]], p.clipping_range, p.quantisation_range)[0])


def test_nothing_the_server_receives_reveals_an_update() -> None:
    """Keys, encrypted shares, masked inputs and unmasking shares: the server combines all of
    them and still finds client 1's update hidden by the pairwise masks of its neighbours, and
    two runs with the same update look unrelated. The same attack recovers the update exactly
    when client 1 shares no tensor with anyone, which shows that the attack is a real one."""
    rng = np.random.default_rng(6)
    update = {n: rng.normal(0, 0.1, SHAPES[n]) for n in TENSORS[1]}
    values = np.concatenate([update[n].ravel() for n in sorted(update)])
    first, second = eavesdrop(TENSORS, update), eavesdrop(TENSORS, update)
    assert set(first) == {"keys", "shares", "input", "unmask"}
    for stage in first:  # nothing repeats between two runs: no fixed key, share or mask
        for c, message in first[stage].items():
            assert _flat(message) != _flat(second[stage][c]), (stage, c)
    # no client dropped, so every unmasking share is of a sender's b, none of a mask key
    assert all(set(a) <= set(first["input"]) for a in first["unmask"].values())  # type: ignore[call-overload]
    # The masks come from fresh key pairs (the OS's randomness), so each check is a statistical
    # test at a level (1e-6) that a correct implementation fails once in a million runs, while a
    # residual that carries the update fails it with certainty.
    level = 1e-6
    p = params()
    residuals = [attack(TENSORS, run) for run in (first, second)]
    assert stats.pearsonr(residuals[0].astype(float), residuals[1].astype(float)).pvalue > level
    for residual in residuals:  # uniform over [0, 2^field_bits), unrelated to the update
        assert stats.kstest(residual / p.modulus, "uniform").pvalue > level
        assert stats.pearsonr(residual.astype(float), values).pvalue > level
        assert not np.any(np.isclose(decode(residual), values, atol=step(p)))
    alone = {**TENSORS, 1: ("b",), 3: ("a", "c", "head")}  # only client 1 trains 'b'
    exposed = decode(attack(alone, eavesdrop(alone, {"b": update["b"]})))
    assert np.abs(exposed - update["b"].ravel()).max() <= step(p)  # a sum of one is that one


def _flat(message: object) -> bytes:
    if isinstance(message, bytes):
        return message
    if isinstance(message, np.ndarray | np.generic):
        return np.asarray(message).tobytes()
    if isinstance(message, dict):
        return b"".join(_flat(message[k]) for k in sorted(message))
    if isinstance(message, tuple):
        return b"".join(_flat(m) for m in message)
    raise TypeError(type(message))


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
            if method == "hetlora":  # its norm-weighted rule gives way to the mean (docs/privacy.md)
                assert abs(x.metrics["test"]["accuracy"] - y.metrics["test"]["accuracy"]) < 0.005
            else:  # two limbs carry the means to float64's precision: the same float32 states
                assert x.metrics == y.metrics, (method, extra, x.round)
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
