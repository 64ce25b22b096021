"""The round loop every engine shares; an engine only says where a round's clients train.

for round in rounds:
    plan = server.configure_round(round)              # sample clients, the method assigns layers
    results = train_round(plan, server)               # clients train (in-process, or on Flower)
    record = server.aggregate_round(plan, results)    # screen, the method aggregates
    record.metrics = server.evaluate_global()         # the task's metrics on val and test
    checkpoint(); append the record to metrics.jsonl
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedhello.config import ExperimentConfig, config_to_yaml
from fedhello.engine.calibration import attach_costs
from fedhello.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedhello.engine.client import ClientResult
from fedhello.engine.experiment import Experiment, prepare_experiment
from fedhello.engine.run_identity import config_hash
from fedhello.engine.server import FederatedServer
from fedhello.errors import UserError
from fedhello.io import write_atomic, write_json_atomic
from fedhello.method.base import RoundPlan
from fedhello.records import RoundRecord, append_record, records_to_jsonl
from fedhello.reporting.outputs import BEFORE_TRAINING, write_outputs
from fedhello.reporting.summary import new_drift_warning
from fedhello.reporting.tracking import open_tracker

RoundCallback = Callable[[int, RoundRecord], None]
TrainRound = Callable[[RoundPlan, FederatedServer], list[ClientResult]]
"""How an engine gets a round's client results: (plan, server) -> the results it received."""

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


def holds_run(run_dir: Path) -> bool:
    """Whether a run directory already holds a (checkpointed) run."""
    return (run_dir / "checkpoint" / "state.json").is_file()


def prepare_run_dir(cfg: ExperimentConfig, run_dir: Path, resume: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: is a file, not a run directory")
    if resume:
        if not holds_run(run_dir):
            raise UserError(f"{run_dir}: no checkpoint to resume from")
        return
    if holds_run(run_dir):
        raise UserError(
            f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    (run_dir / "metrics.jsonl").write_text("")


def run_federation(
    cfg: ExperimentConfig,
    run_dir: Path,
    make_trainer: Callable[[Experiment], TrainRound],
    *,
    resume: bool = False,
    accept_unverified: bool = False,
    on_round_end: RoundCallback | None = None,
) -> dict[str, Any]:
    """Run (or resume) the experiment; `make_trainer` says where clients train. Returns the summary.
    `accept_unverified` resumes a checkpoint written before checkpoints carried a manifest."""
    session_start = time.perf_counter()
    prepare_run_dir(cfg, run_dir, resume)
    exp = prepare_experiment(cfg)
    attach_costs(exp, run_dir)  # only when a group states device budgets: calibrate, refuse misfits
    identity = config_hash(cfg)  # what the checkpoint's manifest records and a resume checks
    if resume:
        server, records, wall_before = resume_server(exp, run_dir, identity, accept_unverified)
    else:
        server, records, wall_before = FederatedServer(exp), [], 0.0
    evaluate_before_training(server, run_dir)
    first, rounds = len(records) + 1, cfg.federation.rounds
    train_round = make_trainer(exp)

    with _progress(cfg.quiet) as progress, open_tracker(cfg, run_dir) as tracker:
        round_bar = progress.add_task("rounds", total=rounds, completed=first - 1, info="")
        for r in range(first, rounds + 1):
            round_start = time.perf_counter()
            plan = server.configure_round(r)
            progress.update(round_bar, info=f"round {r}: training clients {plan.clients}")
            results = train_round(plan, server)
            record = server.aggregate_round(plan, results)
            warn_about_round(exp, records, record)
            if server.should_evaluate(r):
                record.metrics, record.eval_seconds = server.evaluate_global()
            records.append(record)
            elapsed = wall_before + time.perf_counter() - session_start
            # measured before the checkpoint for the copy inside it, and again to include its writing
            record.round_seconds = time.perf_counter() - round_start
            save_checkpoint(
                run_dir / "checkpoint",
                Checkpoint(r, server.global_state, records, elapsed, server.state_dict()),
                cfg.seed,
                identity,
            )
            record.round_seconds = time.perf_counter() - round_start
            append_record(run_dir / "metrics.jsonl", record)
            tracker.log_round(record)
            progress.update(round_bar, advance=1, info=scores_line(record))
            if on_round_end is not None:
                on_round_end(r, record)

    wall = wall_before + time.perf_counter() - session_start
    return write_outputs(exp, run_dir, records, wall)


def resume_server(
    exp: Experiment, run_dir: Path, identity: str, accept_unverified: bool
) -> tuple[FederatedServer, list[RoundRecord], float]:
    """The server, the completed rounds' records and the wall time so far, from the checkpoint
    (verified against the run's identity); metrics.jsonl is rewritten to match it."""
    ckpt = load_checkpoint(run_dir / "checkpoint", identity, accept_unverified=accept_unverified)
    if ckpt.threads is not None and ckpt.threads != torch.get_num_threads():
        log.warning(
            "resuming with %d torch threads where the checkpoint was written with %d: "
            "the numerics of later rounds may differ slightly",
            torch.get_num_threads(),
            ckpt.threads,
        )
    server = FederatedServer(exp, ckpt.global_state)
    server.load_state_dict(ckpt.extra)
    write_atomic(run_dir / "metrics.jsonl", records_to_jsonl(ckpt.history))
    return server, ckpt.history, ckpt.wall_seconds


def evaluate_before_training(server: FederatedServer, run_dir: Path) -> None:
    """With eval.before_training: the starting point's metrics (LoRA B = 0: the base model, e.g.
    an LLM before instruction tuning), once per run."""
    before = run_dir / BEFORE_TRAINING
    if server.exp.cfg.eval.before_training and not before.is_file():
        metrics, seconds = server.evaluate_global()
        write_json_atomic(before, {"metrics": metrics, "eval_seconds": seconds})


def warn_about_round(exp: Experiment, records: list[RoundRecord], record: RoundRecord) -> None:
    """One log line for clients that never replied, and one when a group's measured time has
    drifted from its cost model's prediction (docs/budgets.md)."""
    if record.missing:
        log.warning("round %d: no reply from clients %s; aggregated the others", record.round, record.missing)
    for group in exp.groups if exp.costs is not None else ():
        drift = new_drift_warning([*records, record], group.name, group.device_budget.speed)
        if drift is not None:
            log.warning("round %d: %s", record.round, drift)


def scores_line(record: RoundRecord) -> str:
    """The progress bar's note: the round's validation and test scores, when it was evaluated."""
    if not record.evaluated:
        return ""
    m = record.primary_metric
    return f"val {m} {record.metric('val'):.3f}  test {m} {record.metric('test'):.3f}"


def default_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method}-seed{cfg.seed}-{stamp}"
