"""fedhello: federated LoRA fine-tuning where each client trains only the LoRA layers it can afford.

Public API: `load_config`, `ExperimentConfig`, `run_experiment`. Imports are lazy so that
light commands (`fedhello allocate`) do not pay for torch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

# peft imports bitsandbytes when it is installed, and bitsandbytes' CPU backend then logs that an
# optional kernel package is missing: noise on every command's stderr, not a problem of the run.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["ExperimentConfig", "UserError", "load_config", "run_experiment"]

if TYPE_CHECKING:
    from fedhello.api import run_experiment
    from fedhello.config import ExperimentConfig, load_config
    from fedhello.errors import UserError


def __getattr__(name: str) -> Any:
    if name == "run_experiment":
        from fedhello.api import run_experiment

        return run_experiment
    if name in ("ExperimentConfig", "load_config"):
        from fedhello import config

        return getattr(config, name)
    if name == "UserError":
        from fedhello.errors import UserError

        return UserError
    raise AttributeError(name)
