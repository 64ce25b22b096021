"""The run config both Flower apps read: the `[tool.flwr.app.config]` keys (pyproject.toml;
`flwr run --run-config` overrides them), and the experiment config a run's settings name."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context

from fedhello.config import ExperimentConfig, load_config
from fedhello.errors import UserError

# [tool.flwr.app.config] keys (pyproject.toml); `flwr run --run-config` overrides them.
CONFIG_PATH, OUT_DIR, RESUME, PARTITION_KEYS = "config-path", "out-dir", "resume", "partition-keys"
ACCEPT_UNVERIFIED = "accept-unverified-checkpoint"  # resume a checkpoint written before manifests
SIMULATION = "simulation"  # set by `fedhello run engine=flower`: Flower's simulation engine
CONFIG = "config"  # defaults only (simulation): the ExperimentConfig object itself, no file


def settings_of(context: Context, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings: `defaults`, overridden by every run-config value that is set."""
    return {**defaults, **{k: v for k, v in context.run_config.items() if v not in ("", None)}}


def config_of(settings: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment config of a run (the `partition-keys` run-config key sets
    flower.partition_keys, which the deployment tools know and the experiment file need not)."""
    if isinstance(settings.get(CONFIG), ExperimentConfig):
        cfg: ExperimentConfig = settings[CONFIG]
    elif settings.get(RESUME):
        cfg = load_config(Path(str(settings[OUT_DIR])) / "config.yaml")
    elif settings.get(CONFIG_PATH):
        cfg = load_config(str(settings[CONFIG_PATH]))
    else:
        raise UserError(f"run config '{CONFIG_PATH}': give the absolute path of an experiment config")
    if settings.get(PARTITION_KEYS):
        flower = cfg.flower.model_copy(update={"partition_keys": str(settings[PARTITION_KEYS])})
        cfg = cfg.model_copy(update={"flower": flower})
    return cfg
