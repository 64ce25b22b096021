"""The Python entry point: run an experiment from a config object, get its summary back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedhello.config import ExperimentConfig
from fedhello.engine.engines import ENGINES
from fedhello.engine.loop import RoundCallback, default_run_dir
from fedhello.errors import UserError


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    accept_unverified: bool = False,
    on_round_end: RoundCallback | None = None,
) -> dict[str, Any]:
    """Run `cfg` (or resume the run in `out_dir`) and return its summary.

    Example::

        from fedhello import load_config, run_experiment
        cfg = load_config(overrides=["federation.rounds=3", "method=gd-bottleneck"])
        summary = run_experiment(cfg, "runs/demo")
        print(summary["final_test_accuracy"])

    `cfg.engine` chooses what runs the clients (fedhello/engine/engines.py): "local" in this
    process, "flower" the same rounds on Flower's simulation engine.
    The run directory receives config.yaml, metrics.jsonl, summary.json, plots and a
    checkpoint after every round; `resume=True` continues from the last completed round
    (`accept_unverified=True`: also from a checkpoint written before checkpoints carried a
    manifest, which cannot be verified).
    """
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    engine = ENGINES.get(cfg.engine)
    if on_round_end is None:
        return engine.load()(cfg, run_dir, resume=resume, accept_unverified=accept_unverified)
    if not engine.in_process_loop:
        raise UserError(f"on_round_end: not available with engine={cfg.engine} (read metrics.jsonl instead)")
    return engine.load()(
        cfg, run_dir, resume=resume, accept_unverified=accept_unverified, on_round_end=on_round_end
    )
