"""The in-process engine: every client is simulated in one process on one shared base model.

Clients differ only in their adapters and optimizer state, so memory does not grow with the
number of clients. The round loop is `loop.run_federation`; this engine's part is one line:
the sampled clients train here, one after another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedhello.config import ExperimentConfig
from fedhello.engine.client import ClientResult, train_assignment
from fedhello.engine.experiment import Experiment
from fedhello.engine.loop import RoundCallback, TrainRound, run_federation
from fedhello.engine.server import FederatedServer
from fedhello.method.base import RoundPlan


def local_trainer(exp: Experiment) -> TrainRound:
    """Every sampled client trains here, one after another, on the shared base model."""

    def train_round(plan: RoundPlan, server: FederatedServer) -> list[ClientResult]:
        return [
            train_assignment(
                exp, server.client_download(plan.assignments[c]), plan.assignments[c], plan.round_number
            )
            for c in plan.clients
        ]

    return train_round


def run_local(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    accept_unverified: bool = False,
    on_round_end: RoundCallback | None = None,
) -> dict[str, Any]:
    """Run (or resume) an experiment in this process; returns the summary."""
    return run_federation(
        cfg,
        run_dir,
        local_trainer,
        resume=resume,
        accept_unverified=accept_unverified,
        on_round_end=on_round_end,
    )
