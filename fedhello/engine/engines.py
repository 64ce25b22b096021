"""Engines by name: what runs the clients of a round. Each engine is a thin driver around the
shared round loop (`loop.run_federation`); `engine: <name>` in a config selects one.

    register_engine(EngineEntry("my-engine", "my_package.engine:run_mine", "what it is"))

The runner is named as "module:function" and imported only when chosen, so that the in-process
engine never imports Flower. Every runner takes (cfg, run_dir, *, resume, accept_unverified)
and returns the run's summary; `on_round_end` reaches only engines that run the loop in this
process.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fedhello.config import ExperimentConfig
from fedhello.registry import Registry


class EngineRunner(Protocol):
    def __call__(
        self, cfg: ExperimentConfig, run_dir: Path, *, resume: bool, accept_unverified: bool, **kwargs: Any
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class EngineEntry:
    name: str
    runner: str  # "module:function", imported on use
    summary: str
    in_process_loop: bool = False  # whether the round loop runs here (then on_round_end works)

    def load(self) -> EngineRunner:
        module, function = self.runner.split(":")
        runner: EngineRunner = getattr(importlib.import_module(module), function)
        return runner


ENGINES: Registry[EngineEntry] = Registry("engine", "engine")


def register_engine(entry: EngineEntry) -> EngineEntry:
    """Make `engine: entry.name` run `entry.runner`; names are unique."""
    return ENGINES.register(entry.name, entry)


register_engine(
    EngineEntry(
        "local",
        "fedhello.engine.local:run_local",
        "every client in this process, one after another, on one shared base model",
        in_process_loop=True,
    )
)
register_engine(
    EngineEntry(
        "flower",
        "fedhello.flower.simulation:run_simulation_engine",
        "Flower's simulation engine (deployment: `flwr run`, see docs/flower.md)",
    )
)
