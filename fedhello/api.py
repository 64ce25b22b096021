"""The Python entry point: run an experiment from a config object, get its summary back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedhello.config import ExperimentConfig
from fedhello.engine.local import run_local
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

    With `cfg.engine == "flower"` the same rounds run on Flower's simulation engine.
    The run directory receives config.yaml, metrics.jsonl, summary.json, plots and a
    checkpoint after every round; `resume=True` continues from the last completed round
    (`accept_unverified=True`: also from a checkpoint written before checkpoints carried a
    manifest, which cannot be verified).
    """
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(cfg)
    if cfg.engine == "flower":
        if on_round_end is not None:
            raise UserError("on_round_end: not available with engine=flower (read metrics.jsonl instead)")
        from fedhello.engine.flower import run_simulation_engine

        return run_simulation_engine(cfg, run_dir, resume=resume, accept_unverified=accept_unverified)
    return run_local(
        cfg, run_dir, resume=resume, accept_unverified=accept_unverified, on_round_end=on_round_end
    )
