"""Optional experiment tracking, fed from the typed round records.

`tracking: tensorboard` writes, for every round, the task's metrics per split
(`val/accuracy`, `test/macro_f1`, ...), the round's costs (`cost/bytes_up`, `cost/bytes_down`,
`cost/train_seconds`, ...) and each group's peak training memory and median step time
(`group/<name>/peak_memory_bytes`), to `<run dir>/tensorboard/`. Needs the `tensorboard`
package (`pip install 'fedhello[tracking]'`).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from fedhello.config import ExperimentConfig
from fedhello.errors import UserError
from fedhello.records import RoundRecord


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """Every scalar of a round, by TensorBoard tag."""
    out: dict[str, float] = {}
    for split, metrics in record.metrics.items():
        for name, value in metrics.items():
            out[f"{split}/{name}"] = float(value)
    out["cost/bytes_up"] = float(record.bytes_up)
    out["cost/bytes_down"] = float(record.bytes_down)
    out["cost/train_seconds"] = float(record.train_seconds)
    for key in ("eval_seconds", "round_seconds"):
        value = getattr(record, key)
        if value is not None:
            out[f"cost/{key}"] = float(value)
    if record.epsilon is not None:
        out["privacy/epsilon"] = float(record.epsilon)
    out["clients/trained"] = float(len(record.clients))
    out["clients/rejected"] = float(len(record.rejected))
    groups: dict[str, list[Any]] = {}
    for c in record.clients:
        groups.setdefault(c.group, []).append(c)
    for group, clients in groups.items():
        out[f"group/{group}/peak_memory_bytes"] = float(max(c.peak_memory_bytes for c in clients))
        steps = [c.seconds / c.steps for c in clients if c.steps]
        if steps:
            out[f"group/{group}/step_seconds"] = float(np.median(steps))
    for kind, extra in record.extras.items():  # a method's own record: its float fields
        out |= {f"{kind}/{k}": v for k, v in extra.items() if isinstance(v, float)}
    return out


class Tracker:
    """No tracking: every call does nothing."""

    def log_round(self, record: RoundRecord) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "tracking: 'tensorboard' needs the tensorboard package (pip install 'fedhello[tracking]')"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_round(self, record: RoundRecord) -> None:
        for tag, value in round_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record.round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(cfg: ExperimentConfig, run_dir: Path) -> Tracker:
    if cfg.tracking == "tensorboard":
        return TensorBoardTracker(run_dir / "tensorboard")
    return Tracker()
