"""Engine mechanics on a tiny BERT: real freezing, exact uploads, rejection, resume, determinism."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import pseudo_freezing, strip_timing, train_first_client

from fedhello import load_config, run_experiment
from fedhello.cli import main
from fedhello.engine import local as local_engine
from fedhello.engine.client import ClientResult, train_assignment, train_client
from fedhello.engine.experiment import Experiment, prepare_experiment
from fedhello.method.aggregation import payload_bytes
from fedhello.method.base import Assignment


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny_exp(tiny_overrides: Callable[..., list[str]]) -> Experiment:
    return prepare_experiment(load_config(None, tiny_overrides()))


def _train(exp: Experiment, layers: tuple[int, ...], **kw: Any) -> ClientResult:
    result: ClientResult = train_first_client(exp, layers, **kw)
    return result


def test_frozen_tensors_get_no_gradient_and_do_not_change(
    tiny_exp: Experiment, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = tiny_exp.adapted
    before = lm.lora_state()
    grads_seen: set[str] = set()
    real_step = torch.optim.AdamW.step

    def spy_step(self: torch.optim.Optimizer, *a: Any, **kw: Any) -> Any:
        grads_seen.update(n for n, p in lm.model.named_parameters() if p.grad is not None)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    result = _train(tiny_exp, (2, 3))
    after = lm.lora_state()
    trained = set(lm.trained_names((2, 3), True))
    assert grads_seen == trained  # over every parameter of the model, base weights included
    for key in before:
        changed = not torch.equal(before[key], after[key])
        if key in trained and "lora_A" in key:
            assert changed, f"{key} should have been trained"
        if key not in trained:
            assert not changed, f"{key} is frozen but changed"
    assert set(result.update.deltas) == trained
    assert result.steps == 3


def test_only_trained_tensors_uploaded_with_exact_bytes(tiny_exp: Experiment) -> None:
    lm = tiny_exp.adapted
    result = _train(tiny_exp, (1,))
    expected = lm.trained_names((1,), True)
    assert sorted(result.update.deltas) == sorted(expected)
    params = dict(lm.model.named_parameters())
    assert payload_bytes(result.update.deltas) == sum(params[k].numel() * 4 for k in expected)
    # layer 1 of a 4-block model with LoRA r=4 on query+value (hidden 32): 2 x 4 x (32 + 32) floats
    assert sum(result.update.deltas[k].numel() for k in lm.layer_params[1]) == 2 * 4 * 64


def test_no_autograd_graph_below_lowest_trained_block(tiny_exp: Experiment) -> None:
    lm = tiny_exp.adapted
    needs_grad: dict[int, bool] = {}
    hooks = [
        b.register_forward_hook(
            lambda _m, _a, out, i=i: needs_grad.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out).requires_grad
            )
        )
        for i, b in enumerate(lm.blocks)
    ]
    _train(tiny_exp, (2, 3), local_steps=1)
    assert needs_grad == {0: False, 1: False, 2: True, 3: True}
    _train(
        tiny_exp, (2, 3), local_steps=1, setup_fn=pseudo_freezing()
    )  # the released pseudo-freezing builds it all
    for h in hooks:
        h.remove()
    assert needs_grad == {0: True, 1: True, 2: True, 3: True}


def test_optimizer_holds_only_trained_tensors(tiny_exp: Experiment, monkeypatch: pytest.MonkeyPatch) -> None:
    held: list[int] = []
    real = torch.optim.AdamW

    def spy(groups: Any, **kw: Any) -> torch.optim.Optimizer:
        opt = real(groups, **kw)
        held.append(sum(p.numel() for g in opt.param_groups for p in g["params"]))
        return opt

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    _train(tiny_exp, (3,), local_steps=1)
    params = dict(tiny_exp.adapted.model.named_parameters())
    assert held == [sum(params[k].numel() for k in tiny_exp.adapted.trained_names((3,), True))]


def test_fewer_top_layers_use_less_training_memory(tiny_exp: Experiment) -> None:
    top = _train(tiny_exp, (3,), local_steps=2)
    full = _train(tiny_exp, (0, 1, 2, 3), local_steps=2)
    pseudo = _train(tiny_exp, (3,), local_steps=2, setup_fn=pseudo_freezing())
    assert top.peak_memory_bytes < full.peak_memory_bytes
    assert pseudo.peak_memory_bytes >= full.peak_memory_bytes


def test_resume_after_interrupt_equals_uninterrupted_and_seed_is_reproducible(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    cfg = load_config(None, tiny_overrides("method=rgd-bottleneck"))
    full = run_experiment(cfg, tmp_path / "full")
    again = run_experiment(cfg, tmp_path / "again")
    assert strip_timing(_metrics(tmp_path / "full")) == strip_timing(_metrics(tmp_path / "again"))
    assert full["final_test_accuracy"] == again["final_test_accuracy"]

    def interrupt(round_number: int, record: object) -> None:
        if round_number == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", on_round_end=interrupt)
    assert len(_metrics(tmp_path / "cut")) == 2
    resumed = run_experiment(cfg, tmp_path / "cut", resume=True)
    assert resumed["rounds_completed"] == 3
    assert strip_timing(_metrics(tmp_path / "cut")) == strip_timing(_metrics(tmp_path / "full"))
    for key in (
        "final_test_accuracy",
        "mean_last5_test_accuracy",
        "best_val_accuracy",
        "bytes_uploaded_total",
    ):
        assert resumed[key] == full[key], key


def test_malformed_update_is_rejected_and_round_completes(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = local_engine.train_assignment
    calls: list[int] = []

    def sabotage(*args: Any, **kw: Any) -> ClientResult:
        result = real(*args, **kw)
        calls.append(result.update.client_id)
        if len(calls) == 1:  # the first client of round 1 sends NaNs
            key = next(iter(result.update.deltas))
            result.update.deltas[key] = torch.full_like(result.update.deltas[key], float("nan"))
        return result

    monkeypatch.setattr(local_engine, "train_assignment", sabotage)
    summary = run_experiment(load_config(None, tiny_overrides("federation.rounds=2")), tmp_path / "run")
    rounds = _metrics(tmp_path / "run")
    assert len(rounds) == 2
    assert list(rounds[0]["rejected"]) == [str(calls[0])]
    assert "non-finite" in rounds[0]["rejected"][str(calls[0])]
    assert [c["accepted"] for c in rounds[0]["clients"]] == [False, True, True]
    assert rounds[1]["rejected"] == {}
    assert summary["rejected_updates"] == 1
    assert np.isfinite(summary["final_test_accuracy"])


def test_run_outputs(tiny_overrides: Callable[..., list[str]], tmp_path: Path) -> None:
    run_dir = tmp_path / "out"
    code = main(["run", *tiny_overrides("method=gd-bottleneck", "eval.every=2"), "--out", str(run_dir)])
    assert code == 0
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "accuracy.png", "layer_frequency.png"):
        assert (run_dir / name).is_file(), name
    rounds = _metrics(run_dir)
    assert [bool(r.get("metrics")) for r in rounds] == [False, True, True]  # every 2nd round and the last
    assert set(rounds[1]["metrics"]["test"]) == {"accuracy", "macro_f1", "loss"}
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "method",
        "rounds_completed",
        "final_test_accuracy",
        "mean_last5_test_accuracy",
        "best_val_accuracy",
        "test_accuracy_at_best_val",
        "bytes_uploaded_total",
        "bytes_downloaded_total",
        "peak_memory_bytes_by_group",
        "wall_seconds",
    ):
        assert key in summary, key
    # GD bottleneck on 4 blocks with budgets 2/3/4: the low group always trains {0, 3}.
    low = [c["layers"] for r in rounds for c in r["clients"] if c["group"] == "low"]
    assert low and all(layers == [0, 3] for layers in low)
    assert summary["bytes_uploaded_total"] == sum(c["bytes_up"] for r in rounds for c in r["clients"])
    # a rerun into the same directory must not clobber it
    assert main(["run", *tiny_overrides(), "--out", str(run_dir)]) == 2


def test_cli_user_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["run", "train.lrr=1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedhello: error: override: train.lrr: unknown key"
    assert main(["run", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_frozen_head_mode_keeps_the_seeded_head_and_never_sends_it(
    tiny_overrides: Callable[..., list[str]],
) -> None:
    from fedhello.engine.server import FederatedServer

    exp = prepare_experiment(load_config(None, tiny_overrides("federation.head=frozen")))
    head_before = {k: exp.adapted.parameter(k).detach().clone() for k in exp.adapted.head_params}
    server = FederatedServer(exp)
    assert not set(exp.adapted.head_params) & set(server.download_state())
    plan = server.configure_round(1)
    results = [
        train_assignment(exp, server.client_download(plan.assignments[c]), plan.assignments[c], 1)
        for c in plan.clients
    ]
    assert all(not set(exp.adapted.head_params) & set(r.update.deltas) for r in results)
    server.aggregate_round(plan, results)
    for k, v in head_before.items():
        assert torch.equal(server.global_state[k], v)
        assert torch.equal(exp.adapted.parameter(k).detach(), v)


def test_fisher_schedule_in_a_run_logs_refreshes_and_resumes_exactly(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    over = tiny_overrides(
        "method=fedhello",
        "federation.rounds=4",
        "fisher.warmup_rounds=1",
        "fisher.refresh_every=2",
        "fisher.proxy_size=20",
    )
    cfg = load_config(None, over)
    full = run_experiment(cfg, tmp_path / "full")
    rounds = _metrics(tmp_path / "full")
    assert [("fisher" in r.get("extras", {})) for r in rounds] == [False, True, False, True]
    refresh = rounds[1]["extras"]["fisher"]
    assert len(refresh["scores"]) == 4 and sorted(set(refresh["levels"])) <= [1, 2, 3]
    assert rounds[2]["probabilities"] == refresh["probabilities"]  # persist_probs between refreshes
    assert rounds[0]["probabilities"] != refresh["probabilities"]  # warm-up used the Bottleneck prior
    assert full["fisher_rounds"] == 2 and full["fisher_seconds"] > 0
    assert (tmp_path / "full" / "fisher_scores.png").is_file()
    assert (tmp_path / "full" / "layer_counts.png").is_file()

    def interrupt(round_number: int, record: object) -> None:
        if round_number == 3:  # after a refresh, before the next: Fisher probabilities must survive
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", on_round_end=interrupt)
    run_experiment(cfg, tmp_path / "cut", resume=True)
    assert strip_timing(_metrics(tmp_path / "cut")) == strip_timing(rounds)


def test_default_method_is_the_co_designed_schedule() -> None:
    cfg = load_config(None, [])
    assert cfg.method == "fedhello"


@pytest.mark.parametrize("method", ["fedit", "straggler", "exclusive", "fedra", "hetlora", "flexlora"])
def test_baselines_run_with_the_same_engine_and_accounting(
    method: str, tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    summary = run_experiment(
        load_config(None, tiny_overrides(f"method={method}", "federation.rounds=2")), tmp_path / method
    )
    rounds = _metrics(tmp_path / method)
    assert summary["rounds_completed"] == 2 and np.isfinite(summary["final_test_accuracy"])
    clients = [c for r in rounds for c in r["clients"]]
    assert clients and all(c["accepted"] for c in clients)
    assert summary["bytes_uploaded_total"] == sum(c["bytes_up"] for c in clients)
    if method == "exclusive":
        assert all(c["group"] == "high" for c in clients)
        assert sum(len(r["idle"]) for r in rounds) == 6 - len(clients)  # the others sat out, not failed
    if method == "straggler":
        assert all(c["layers"] == [0, 2] for c in clients)  # weakest budget (2 of 4), uniformly spaced
    if method in ("hetlora", "flexlora"):
        ranks = {c["group"]: c["rank"] for c in clients}
        assert all(c["layers"] == [0, 1, 2, 3] for c in clients)
        assert {"low": 2, "mid": 3, "high": 4}.items() >= ranks.items()  # r=4: parameter-matched ranks
        up = {c["rank"]: c["bytes_up"] for c in clients}
        down = {c["rank"]: c["bytes_down"] for c in clients}
        assert len(up) > 1  # seed 0 samples clients of more than one group
        assert up[min(up)] < up[max(up)] and down[min(down)] < down[max(down)]


def test_hetlora_self_pruning_shrinks_a_fading_tail(tiny_exp: Experiment) -> None:
    from fedhello.method.hetlora import HetLoRAOptions, SelfPruning
    from fedhello.method.rank import RankLocalTraining, is_lora_b

    lm = tiny_exp.adapted
    state = lm.lora_state()
    g = torch.Generator().manual_seed(0)
    for k in lm.lora_params:
        if is_lora_b(k):
            state[k] = 0.5 * torch.randn(state[k].shape, generator=g)
    assignment = Assignment(0, (0, 1, 2, 3), rank=3)

    def train(local: RankLocalTraining) -> ClientResult:
        return train_client(
            lm,
            tiny_exp.task,
            tiny_exp.data,
            tiny_exp.client_indices[0],
            state,
            assignment,
            tiny_exp.cfg.train,
            local=local,
            train_head=True,
            seed=0,
            round_number=1,
            device=tiny_exp.device,
        )

    strong = HetLoRAOptions(self_pruning=True, gamma=0.5, regularization=50.0)
    pruned = train(SelfPruning(3, strong))
    assert pruned.update.metrics["rank"] == 1  # floor(0.5 * 3): the tail was penalised and faded
    a = next(k for k in lm.lora_params if ".lora_A." in k)
    assert pruned.update.deltas[a].shape[0] == 3  # this round's upload still has rank 3 ...
    torch.testing.assert_close(pruned.update.deltas[a][1:], -state[a][1:3])  # ... with the tail cut to zero
    off = train(RankLocalTraining(3))
    assert off.update.metrics["rank"] == 3


def test_pruned_ranks_survive_in_the_method_state(tiny_overrides: Callable[..., list[str]]) -> None:
    from fedhello.engine.server import FederatedServer
    from fedhello.method.hetlora import HetLoRA

    exp = prepare_experiment(load_config(None, tiny_overrides("method=hetlora")))
    server = FederatedServer(exp)
    assert isinstance(server.method, HetLoRA)
    server.method.client_ranks = {2: 1}
    saved = json.loads(json.dumps(server.state_dict()))
    other = prepare_experiment(load_config(None, tiny_overrides("method=hetlora")))
    restored = FederatedServer(other)
    restored.load_state_dict(saved)
    plan = restored.configure_round(1)
    assert plan.clients
    assert all(plan.assignments[c].rank == (1 if c == 2 else other.group_of(c).rank) for c in plan.clients)
    assert plan.extra is None  # without self-pruning there is nothing of its own to record
    pruning = prepare_experiment(
        load_config(None, tiny_overrides("method=hetlora", "hetlora.self_pruning=true"))
    )
    with_pruning = FederatedServer(pruning)
    with_pruning.load_state_dict(saved)
    note = with_pruning.configure_round(1).extra
    assert note is not None and note.kind == "pruning" and note.model_dump()["pruned_ranks"] == {"2": 1}


def test_per_layer_means_with_idle_clients_hand_example(tiny_overrides: Callable[..., list[str]]) -> None:
    from fedhello.engine.server import FederatedServer
    from fedhello.method.aggregation import ClientUpdate
    from fedhello.method.base import RoundPlan

    exp = prepare_experiment(load_config(None, tiny_overrides("method=exclusive")))
    server = FederatedServer(exp)
    before = {k: v.clone() for k, v in server.global_state.items()}
    everything = (0, 1, 2, 3)
    plan = RoundPlan(1, {0: Assignment(0, ()), 1: Assignment(1, everything), 2: Assignment(2, everything)})
    keys = exp.adapted.trained_names(everything, True)

    def result(client: int, value: float, samples: int) -> ClientResult:
        deltas = {k: torch.full_like(before[k], value) for k in keys}
        return ClientResult(ClientUpdate(client, deltas, samples), everything, 1.0, 0, 1, 0.0)

    record = server.aggregate_round(plan, [result(1, 1.0, 10), result(2, 3.0, 30)])
    # the idle client sent nothing and weighs nothing: 1/4 * 1 + 3/4 * 3 = 2.5 on every tensor
    for k in keys:
        torch.testing.assert_close(server.global_state[k], before[k] + 2.5)
    assert record.idle == [0] and record.rejected == {}
    assert [c.client for c in record.clients] == [1, 2]
    assert record.bytes_down == 2 * payload_bytes(before)
