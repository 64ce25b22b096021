"""Hostile and broken input: bad client updates are rejected with a reason and the round goes
on; bad checkpoints and bad settings end in one line and exit status 2; nothing good is lost."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fedhello import load_config, run_experiment
from fedhello.cli import main
from fedhello.engine.client import ClientResult, train_assignment
from fedhello.engine.experiment import Experiment, prepare_experiment
from fedhello.engine.server import FederatedServer
from fedhello.errors import UserError
from fedhello.method.aggregation import ClientUpdate

# --- screening in a real round -------------------------------------------------------------------


@pytest.fixture
def round_one(
    tiny_overrides: Callable[..., list[str]],
) -> tuple[Experiment, FederatedServer, Any, list[ClientResult]]:
    """A tiny BERT federation's first round: the plan and three honest results."""
    exp = prepare_experiment(load_config(None, tiny_overrides("method=rgd-bottleneck")))
    server = FederatedServer(exp)
    plan = server.configure_round(1)
    results = [
        train_assignment(exp, server.client_download(plan.assignments[c]), plan.assignments[c], 1)
        for c in plan.clients
    ]
    return exp, server, plan, results


def _with(result: ClientResult, **changes: Any) -> ClientResult:
    update = result.update
    fields = {"client_id": update.client_id, "deltas": update.deltas, "num_samples": update.num_samples}
    fields.update(changes)
    new = ClientUpdate(fields["client_id"], fields["deltas"], fields["num_samples"], dict(update.metrics))
    return ClientResult(new, result.layers, result.seconds, 0, result.steps, result.train_loss)


def _scaled(result: ClientResult, factor: float, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype else v) * factor for k, v in result.update.deltas.items()}


CASES: list[tuple[str, Callable[[ClientResult], ClientResult], str]] = [
    ("nan samples", lambda r: _with(r, num_samples=math.nan), "not a whole number"),
    ("inf samples", lambda r: _with(r, num_samples=math.inf), "not a whole number"),
    ("zero samples", lambda r: _with(r, num_samples=0), "non-positive sample count"),
    ("too many samples", lambda r: _with(r, num_samples=10**6), "exceeds the client's"),
    ("float64 1e300", lambda r: _with(r, deltas=_scaled(r, 1e300, torch.float64)), "dtype torch.float64"),
    ("nan values", lambda r: _with(r, deltas=_scaled(r, math.nan)), "non-finite"),
    ("missing tensor", lambda r: _with(r, deltas=dict(list(r.update.deltas.items())[1:])), "is missing"),
    ("client 999", lambda r: _with(r, client_id=999), "client 999 was not sampled"),
    ("client -1", lambda r: _with(r, client_id=-1), "client -1 was not sampled"),
]


@pytest.mark.parametrize(("case", "tamper", "reason"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_update_is_rejected_with_its_reason_and_the_round_goes_on(
    round_one: Any, case: str, tamper: Callable[[ClientResult], ClientResult], reason: str
) -> None:
    _, server, plan, results = round_one
    bad = tamper(results[0])
    before = {k: v.clone() for k, v in server.global_state.items()}
    record = server.aggregate_round(plan, [bad, *results[1:]])
    assert reason in record.rejected[str(bad.update.client_id)]
    assert all(torch.isfinite(v).all() for v in server.global_state.values())
    # the honest clients' tensors moved; the round's record books nobody twice or wrongly
    changed = [k for k in before if not torch.equal(before[k], server.global_state[k])]
    assert changed
    booked = [c.client for c in record.clients]
    assert len(booked) == len(set(booked)) and set(booked) <= set(plan.clients)
    if bad.update.client_id in plan.clients:
        assert not next(c for c in record.clients if c.client == bad.update.client_id).accepted


def test_an_update_sent_under_another_clients_id_is_rejected_for_both(round_one: Any) -> None:
    _, server, plan, results = round_one
    first, second = results[0], results[1]
    impostor = _with(second, client_id=first.update.client_id)
    record = server.aggregate_round(plan, [first, impostor, *results[2:]])
    assert "sent 2 updates" in record.rejected[str(first.update.client_id)]
    assert [c.client for c in record.clients].count(first.update.client_id) == 2
    assert not any(c.accepted for c in record.clients if c.client == first.update.client_id)


def test_a_round_with_every_update_rejected_leaves_the_model_unchanged(
    round_one: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _, server, plan, results = round_one
    before = {k: v.clone() for k, v in server.global_state.items()}
    record = server.aggregate_round(plan, [_with(r, num_samples=-1) for r in results])
    assert len(record.rejected) == len(results)
    assert all(torch.equal(before[k], server.global_state[k]) for k in before)
    assert "every update was rejected" in caplog.text


def test_an_aggregate_that_overflows_is_never_adopted(round_one: Any) -> None:
    """Finite updates whose sum with the global state leaves float32's range: the run stops with
    one line naming the round and the clients, and the global state stays as it was."""
    _, server, plan, results = round_one
    key = next(iter(results[0].update.deltas))
    server.global_state[key].fill_(3e38)
    before = {k: v.clone() for k, v in server.global_state.items()}
    huge = [r for r in results if key in r.update.deltas]
    for r in huge:
        r.update.deltas[key] = torch.full_like(r.update.deltas[key], 3e38)
    with pytest.raises(UserError, match=r"round 1: aggregating the updates of clients \[.*non-finite"):
        server.aggregate_round(plan, results)
    assert all(torch.equal(before[k], server.global_state[k]) for k in before)


@pytest.mark.parametrize("rank", [0, -2, math.nan, 99])
def test_hetlora_rejects_reported_ranks_out_of_range(
    tiny_overrides: Callable[..., list[str]], rank: float
) -> None:
    exp = prepare_experiment(load_config(None, tiny_overrides("method=hetlora", "hetlora.self_pruning=true")))
    server = FederatedServer(exp)
    plan = server.configure_round(1)
    results = [
        train_assignment(exp, server.client_download(plan.assignments[c]), plan.assignments[c], 1)
        for c in plan.clients
    ]
    results[0].update.metrics["rank"] = rank
    record = server.aggregate_round(plan, results)
    assert "reported rank" in record.rejected[str(results[0].update.client_id)]
    assert not exp.method.state_dict()["client_ranks"].get(str(results[0].update.client_id))


# --- checkpoints you can trust ---------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted_once(
    tiny_overrides: Callable[..., list[str]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A run cut off after round 2 of 3 (run once for this module: tests damage copies of it)."""
    cfg = load_config(None, tiny_overrides())

    def stop(round_number: int, record: object) -> None:
        if round_number == 2:
            raise KeyboardInterrupt

    run = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, run, on_round_end=stop)
    return run


@pytest.fixture
def interrupted(interrupted_once: Path, tmp_path: Path) -> Path:
    """This test's own copy of the run cut off after round 2 of 3."""
    return Path(shutil.copytree(interrupted_once, tmp_path / "run"))


def _resume_error(run: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["run", "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def _adapters(run: Path) -> Path:
    return next((run / "checkpoint").glob("adapters-round*.safetensors"))


def test_resume_refuses_a_flipped_byte(interrupted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(_adapters(interrupted).read_bytes())
    data[len(data) // 2] ^= 0x01
    _adapters(interrupted).write_bytes(bytes(data))
    assert "does not match its checksum" in _resume_error(interrupted, capsys)


def test_resume_refuses_a_truncated_checkpoint(interrupted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _adapters(interrupted)
    path.write_bytes(path.read_bytes()[:100])
    assert "does not match its checksum" in _resume_error(interrupted, capsys)
    (interrupted / "checkpoint" / "state.json").write_text('{"round": 2, "adapt')
    assert "unreadable checkpoint" in _resume_error(interrupted, capsys)


def test_resume_refuses_a_shortened_history_or_another_config(
    interrupted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_file = interrupted / "checkpoint" / "state.json"
    good = state_file.read_text()
    state = json.loads(good)
    state["history"] = state["history"][:1]
    state_file.write_text(json.dumps(state))
    assert "metrics history does not match its checksum" in _resume_error(interrupted, capsys)
    state_file.write_text(good)
    config = interrupted / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.01", "lr: 0.02"))
    assert "written by another config" in _resume_error(interrupted, capsys)


def test_a_checkpoint_without_a_manifest_resumes_only_when_accepted(
    interrupted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_file = interrupted / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("adapters_sha256", "history_sha256", "config_hash"):  # as written before manifests
        del state[key]
    state_file.write_text(json.dumps(state))
    assert "--accept-unverified-checkpoint" in _resume_error(interrupted, capsys)
    assert main(["run", "--resume", "--accept-unverified-checkpoint", "--out", str(interrupted)]) == 0
    assert len((interrupted / "metrics.jsonl").read_text().splitlines()) == 3


def test_resume_with_another_thread_count_says_so(
    interrupted: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A shortened metrics.jsonl loses nothing (it is rewritten from the checkpoint); a thread
    count other than the checkpoint's is one warning line."""
    state_file = interrupted / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    state["threads"] = 7
    state_file.write_text(json.dumps(state))
    (interrupted / "metrics.jsonl").write_text("")
    summary = run_experiment(load_config(interrupted / "config.yaml"), interrupted, resume=True)
    assert summary["rounds_completed"] == 3
    assert len((interrupted / "metrics.jsonl").read_text().splitlines()) == 3
    assert "written with 7" in caplog.text


# --- settings and files: one line, exit 2 -----------------------------------------------------


def test_bad_settings_and_files_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    cases = [
        (["run", "--out", str(a_file)], "is a file, not a run directory"),
        (
            ["run", "seed=-1", "--out", str(tmp_path / "a")],
            "seed: Input should be greater than or equal to 0",
        ),
        (["run", "train.lr=.inf", "--out", str(tmp_path / "b")], "train.lr: Input should be a finite number"),
        (["run", str(latin), "--out", str(tmp_path / "c")], "latin.yaml: not UTF-8 text"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1]  # before it at most the "run directory: ..." note
        assert last.startswith("fedhello: error:") and message in last and "Traceback" not in err, err
    assert a_file.read_text() == "not a directory"


def test_large_fields_load_and_incomplete_rows_are_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedhello.config import DataConfig
    from fedhello.data import load_examples

    path = tmp_path / "d.csv"
    long_text = "word " * 60_000  # 300 KB, over the csv module's default 128 KB limit
    rows = [f'"{long_text}",a', '"",b', "no label,", "fine,b", "also fine,a", "short row"]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    examples = load_examples(DataConfig(source="csv", path=str(path)))
    assert len(examples) == 3 and examples.dropped == 3
    assert len(examples.texts[0]) == len(long_text)
    assert "dropped 3 of 6 rows with an empty text or no label" in caplog.text


# --- robust aggregation -------------------------------------------------------------------------


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(4)}


def _update(client: int, value: float, samples: int = 10) -> ClientUpdate:
    return ClientUpdate(client, {"w": torch.full((4,), value)}, samples)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_robust_rules_equal_the_mean_when_everyone_agrees_and_resist_one_attacker(rule: str) -> None:
    from fedhello.method.aggregation import aggregate_per_tensor

    same = [_update(c, 0.5, samples=10 * (c + 1)) for c in range(4)]
    mean = aggregate_per_tensor(_state(), same, "samples")
    torch.testing.assert_close(aggregate_per_tensor(_state(), same, "samples", rule, 0.25), mean)

    honest = [_update(c, v) for c, v in enumerate([0.9, 1.0, 1.1])]
    attacked = aggregate_per_tensor(_state(), [*honest, _update(3, 1e6)], "samples", rule, 0.25)
    assert float(attacked["w"].max()) <= 1.1 + 1e-6  # the median / trimmed mean ignore the attacker
    assert (
        float(aggregate_per_tensor(_state(), [*honest, _update(3, 1e6)])["w"][0]) > 1e5
    )  # the mean does not


def test_norm_bound_with_two_contributors_uses_the_tensors_history_or_the_absolute_bound() -> None:
    """Two contributors, one an attacker: no median defends that. Documented: the bound falls back
    to the tensor's accepted norms of earlier rounds, or else to the absolute bound; with neither,
    nothing is bounded."""
    from fedhello.method.aggregation import NormBound

    honest_norm = float(torch.full((4,), 1.0).norm())
    bound = NormBound("clip", factor=3.0)
    kept, rejected = bound.apply([_update(0, 1.0), _update(1, 1e6)])  # no history, no absolute bound
    assert not rejected and float(kept[1].deltas["w"].norm()) == pytest.approx(2e6)
    bound.history = {}
    bound.apply([_update(c, 1.0) for c in range(3)])  # three honest peers: median 2.0, remembered
    kept, _ = bound.apply([_update(0, 1.0), _update(1, 1e6)])
    assert float(kept[1].deltas["w"].norm()) == pytest.approx(3.0 * honest_norm)
    kept, _ = NormBound("clip", absolute=5.0).apply([_update(0, 1.0), _update(1, 1e6)])
    assert float(kept[1].deltas["w"].norm()) == pytest.approx(5.0)
    kept, rejected = NormBound("reject", factor=3.0).apply(
        [_update(c, v) for c, v in enumerate([1, 1, 1, 1e6])]
    )
    assert [u.client_id for u in kept] == [0, 1, 2] and "above the bound" in rejected[3]


@pytest.mark.parametrize("bound", ["none", "reject"])
def test_a_run_with_an_attacker_every_round_finishes(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bound: str
) -> None:
    """One client per round sends its update scaled by 1e6. With the norm bound it is rejected
    every round; with the plain mean the run still finishes (the Fisher refresh of a broken model
    keeps the previous probabilities) and the damage shows in the metrics."""
    from fedhello.engine import local as local_engine

    real = local_engine.train_assignment
    attacked_rounds: set[int] = set()

    def attack(exp: Any, received: Any, assignment: Any, round_number: int) -> ClientResult:
        result = real(exp, received, assignment, round_number)
        if round_number not in attacked_rounds:  # the first client trained in each round
            attacked_rounds.add(round_number)
            for k in result.update.deltas:
                result.update.deltas[k] = result.update.deltas[k] * 1e6
        return result

    monkeypatch.setattr(local_engine, "train_assignment", attack)
    cfg = load_config(
        None, tiny_overrides(f"federation.norm_bound={bound}", "federation.clients_per_round=4")
    )
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["rounds_completed"] == 3
    rejected = summary["aggregation"]["rejected_updates"]
    assert rejected == (3 if bound == "reject" else 0)
