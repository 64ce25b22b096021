"""The in-process engine: every client is simulated in one process on one shared base model.

Clients differ only in their adapters and optimizer state, so memory does not grow with the
number of clients. The whole federated loop fits on one screen:

    for round in rounds:
        plan = server.configure_round(round)              # sample clients, allocate layers
        results = train_round(plan, download)             # clients train (here: one after another)
        record = server.aggregate_round(plan, results)    # screen, per-tensor mean
        record |= server.evaluate_global()                # validation and test
        checkpoint(); append metrics
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedhello.config import ExperimentConfig, config_to_yaml
from fedhello.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedhello.engine.client import ClientResult, train_client
from fedhello.engine.server import FederatedServer, RoundPlan
from fedhello.engine.setup import Experiment, prepare_experiment
from fedhello.errors import UserError
from fedhello.method.aggregation import State
from fedhello.reporting.plots import (
    layer_frequency,
    plot_accuracy,
    plot_fisher_scores,
    plot_layer_counts,
    plot_layer_heatmap,
)
from fedhello.reporting.summary import append_metrics, summarize, write_json_atomic, write_metrics

RoundCallback = Callable[[int, dict[str, Any]], None]
log = logging.getLogger(__name__)


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        disable=quiet,
        transient=False,
    )


def prepare_run_dir(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> None:
    ckpt = run_dir / "checkpoint"
    if resume:
        if not (ckpt / "state.json").is_file():
            raise UserError(f"{run_dir}: no checkpoint to resume from")
        return
    if (ckpt / "state.json").is_file():
        raise UserError(
            f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    (run_dir / "metrics.jsonl").write_text("")


def write_outputs(
    exp: Experiment, run_dir: Path, records: list[dict[str, Any]], wall: float
) -> dict[str, Any]:
    names = [g.name for g in exp.groups]
    summary = summarize(records, method=exp.cfg.method, group_names=names, wall_seconds=wall)
    summary["majority_class_test_accuracy"] = exp.majority_rate("test")
    summary["num_layers"] = exp.num_layers
    summary["groups"] = {g.name: {"share": g.share, "num_layers": g.num_layers} for g in exp.groups}
    write_json_atomic(run_dir / "summary.json", summary)
    title = f"{exp.cfg.method} (seed {exp.cfg.seed})"
    plot_accuracy(records, run_dir / "accuracy.png", title, summary["majority_class_test_accuracy"])
    freq = layer_frequency(records, names, exp.num_layers)
    plot_layer_heatmap(freq, names, run_dir / "layer_frequency.png", f"{title}: layers trained per group")
    plot_layer_counts(
        records, exp.num_layers, run_dir / "layer_counts.png", f"{title}: realised training counts"
    )
    plot_fisher_scores(records, run_dir / "fisher_scores.png", f"{title}: Fisher layer scores")
    return summary


TrainRound = Callable[[RoundPlan, State], list[ClientResult]]
"""How an engine gets a round's client results: (plan, download state) -> results it received."""


def train_assigned(
    exp: Experiment, download: State, client: int, layers: Sequence[int], round_index: int, rank: int | None
) -> ClientResult:
    """One client's local training as the plan assigned it; every engine trains through this."""
    cfg = exp.cfg
    return train_client(
        exp.lm,
        download,
        client,
        layers,
        exp.tokens,
        exp.client_indices[client],
        cfg.train,
        train_head=exp.train_head,
        seed=cfg.seed,
        round_index=round_index,
        pad_id=exp.pad_id,
        device=exp.device,
        rank=rank,
        pruning=exp.rank_pruning,
    )


def local_trainer(exp: Experiment) -> TrainRound:
    """Every sampled client trains here, one after another, on the shared base model."""

    def train_round(plan: RoundPlan, download: State) -> list[ClientResult]:
        return [
            train_assigned(exp, download, c, plan.allocation[c], plan.round, plan.ranks[c])
            for c in plan.clients
        ]

    return train_round


def run_local(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    on_round_end: RoundCallback | None = None,
) -> dict[str, Any]:
    """Run (or resume) an experiment in this process; returns the summary."""
    return run_federation(cfg, run_dir, local_trainer, resume=resume, on_round_end=on_round_end)


def run_federation(
    cfg: ExperimentConfig,
    run_dir: Path,
    make_trainer: Callable[[Experiment], TrainRound],
    *,
    resume: bool = False,
    on_round_end: RoundCallback | None = None,
) -> dict[str, Any]:
    """The round loop every engine shares; `make_trainer` says where clients train."""
    session_start = time.perf_counter()
    prepare_run_dir(cfg, run_dir, resume)
    exp = prepare_experiment(cfg)
    records: list[dict[str, Any]] = []
    wall_before = 0.0
    if not resume:
        server = FederatedServer(exp)
    else:
        ckpt = load_checkpoint(run_dir / "checkpoint")
        server = FederatedServer(exp, ckpt.global_state)
        server.load_state_dict(ckpt.extra)
        records = ckpt.history
        wall_before = ckpt.wall_seconds
        write_metrics(run_dir / "metrics.jsonl", records)
    first = len(records) + 1
    rounds = cfg.federation.rounds
    train_round = make_trainer(exp)

    with _progress(cfg.quiet) as progress:
        round_bar = progress.add_task("rounds", total=rounds, completed=first - 1, info="")
        for r in range(first, rounds + 1):
            round_start = time.perf_counter()
            plan = server.configure_round(r)
            progress.update(round_bar, info=f"round {r}: training clients {plan.clients}")
            results = train_round(plan, server.download_state())
            record = server.aggregate_round(plan, results)
            if record["missing"]:
                log.warning("round %d: no reply from clients %s; aggregated the others", r, record["missing"])
            if server.should_evaluate(r):
                record.update(server.evaluate_global())
            records.append(record)
            elapsed = wall_before + time.perf_counter() - session_start
            # measured before the checkpoint for the copy inside it, and again to include its writing
            record["round_seconds"] = time.perf_counter() - round_start
            save_checkpoint(
                run_dir / "checkpoint",
                Checkpoint(r, server.global_state, records, elapsed, server.state_dict()),
                cfg.seed,
            )
            record["round_seconds"] = time.perf_counter() - round_start
            append_metrics(run_dir / "metrics.jsonl", record)
            info = ""
            if "test_accuracy" in record:
                info = f"val {record['val_accuracy']:.3f}  test {record['test_accuracy']:.3f}"
            progress.update(round_bar, advance=1, info=info)
            if on_round_end is not None:
                on_round_end(r, record)

    wall = wall_before + time.perf_counter() - session_start
    return write_outputs(exp, run_dir, records, wall)


def default_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method}-seed{cfg.seed}-{stamp}"
