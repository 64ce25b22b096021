"""`engine: flower` from `fedhello run`: the ServerApp and ClientApp on Flower's simulation
engine (Ray), one simulated SuperNode per client partition, on this machine.

The apps get the experiment config as an object (no run config, no file), and the run's
summary is read back from the run directory when the simulation ends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedhello.config import ExperimentConfig
from fedhello.flower.client_app import make_client_app
from fedhello.flower.run_config import ACCEPT_UNVERIFIED, CONFIG, OUT_DIR, RESUME, SIMULATION
from fedhello.flower.server_app import make_server_app

RAY_LOGGING_LEVEL = "ERROR"  # Ray's own log lines: errors only (the run logs what matters)


def run_simulation_engine(
    cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False, accept_unverified: bool = False
) -> dict[str, Any]:
    """`engine: flower` from `fedhello run`: Flower's simulation engine, one SuperNode per client."""
    from flwr.simulation import run_simulation

    # Ray starts its workers, the ClientApps, at nice 15: beside any CPU-bound process they starve
    # (on a busy machine simulated nodes took over ten minutes to answer a query). Same priority
    # as the server, as Ray's own job manager does for its drivers.
    os.environ.setdefault("RAY_worker_niceness", "0")
    run_dir = run_dir.resolve()
    defaults = {
        CONFIG: cfg,
        OUT_DIR: str(run_dir),
        RESUME: resume,
        ACCEPT_UNVERIFIED: accept_unverified,
        SIMULATION: True,
    }
    run_simulation(
        server_app=make_server_app(defaults),
        client_app=make_client_app(defaults),
        num_supernodes=cfg.partition.num_clients,
        backend_config={
            "client_resources": {
                "num_cpus": cfg.flower.cpus_per_client,
                "num_gpus": cfg.flower.gpus_per_client,
            },
            "init_args": {"logging_level": RAY_LOGGING_LEVEL, "log_to_driver": False},
        },
    )
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the Flower run ended without a summary in {run_dir}; see the log above")
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary
