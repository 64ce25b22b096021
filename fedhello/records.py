"""Typed records of a run: one per round, one per client within it.

A run's `metrics.jsonl` holds one `RoundRecord` per line; the checkpoint keeps the same records;
the summary, plots, report, grid cells and resume all read them back through `read_records` /
`RoundRecord.from_json`. Metrics are `{split: {metric: value}}` plus the task's primary metric,
so nothing downstream assumes accuracy.

Compatibility: every field added after schema 1 has a default, so older files still read.
Schema 1 (before typed records) stored `val_accuracy`, `test_accuracy`, `val_loss` and
`test_loss` at the top level; `from_json` moves them into `metrics`. Schema 2 stored a Fisher
refresh as a top-level `fisher`; from schema 3 every method's own record of a round (a
`RoundExtra`) is in `extras`, under its kind, and `from_json` moves `fisher` there. Unknown
fields (written by a newer fedhello) are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedhello.errors import UserError

SCHEMA_VERSION = 3
EVAL_SPLITS = ("val", "test")


class RoundExtra(BaseModel):
    """A method's own record of one round beyond its plan (a Fisher refresh: scores, levels,
    probabilities), declared by the method as a subclass with its `kind`. Round records keep it
    under its kind; the summary sums its `seconds` and counts its rounds, TensorBoard shows its
    float fields, and the report its totals: none of them knows the method."""

    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "extra"
    seconds: float = 0.0  # the server's time spent on it, outside client training


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ClientRecord(_Record):
    """One client's part of a round: what it trained and what that cost."""

    client: int
    group: str
    layers: list[int]
    rank: int | None = None
    samples: int = 0
    steps: int = 0
    train_loss: float | None = None
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    accepted: bool = True
    # with device budgets (docs/budgets.md): the frozen model's bytes (peak = this + peak_memory_bytes,
    # what training added), the cost model's worst-case prediction, and which budgets were exceeded
    model_memory_bytes: int | None = None
    predicted_memory_bytes: int | None = None
    predicted_seconds: float | None = None
    over_budget: list[str] | None = None
    timings: dict[str, float] | None = None  # Flower deployment: the ClientApp's start-up, setup, training


class RoundRecord(_Record):
    """One round: its clients, costs, allocation details and (when evaluated) the metrics."""

    schema_version: int = Field(SCHEMA_VERSION, alias="schema")
    round: int
    clients: list[ClientRecord] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict)  # client id -> reason
    missing: list[int] = Field(default_factory=list)  # sampled clients that never replied
    idle: list[int] = Field(default_factory=list)  # sampled clients with nothing to train
    bytes_up: int = 0
    bytes_down: int = 0
    train_seconds: float = 0.0
    primary_metric: str = "accuracy"
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)  # {split: {metric: value}}
    eval_seconds: float | None = None
    round_seconds: float | None = None
    probabilities: list[float] | None = None  # per-layer sampling probabilities of sampled methods
    epsilon: float | None = None  # differential privacy: epsilon spent after this round (docs/privacy.md)
    extras: dict[str, dict[str, Any]] = Field(default_factory=dict)  # kind -> a method's RoundExtra

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @property
    def evaluated(self) -> bool:
        return bool(self.metrics.get("test"))

    def metric(self, split: str, name: str | None = None) -> float | None:
        """A metric of a split (the primary one by default); None when not evaluated."""
        return self.metrics.get(split, {}).get(name or self.primary_metric)

    @property
    def extra_seconds(self) -> float:
        """The server's time in the method's own work this round (e.g. a Fisher refresh)."""
        return float(sum(e.get("seconds", 0.0) for e in self.extras.values()))

    def to_json(self) -> dict[str, Any]:
        out = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        if not out["extras"]:
            del out["extras"]
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RoundRecord:
        """Read a record of any schema version (see the module docstring)."""
        if int(obj.get("schema", 1)) < 2:
            obj = dict(obj)
            metrics: dict[str, dict[str, float]] = {}
            for split in EVAL_SPLITS:
                for name in ("accuracy", "loss"):
                    value = obj.pop(f"{split}_{name}", None)
                    if value is not None:
                        metrics.setdefault(split, {})[name] = float(value)
            obj["metrics"] = metrics
            obj.setdefault("primary_metric", "accuracy")
        if int(obj.get("schema", 1)) < 3 and obj.get("fisher") is not None:
            obj = dict(obj)
            obj["extras"] = {"fisher": obj.pop("fisher")}
        if int(obj.get("schema", 1)) < SCHEMA_VERSION:
            obj = {**obj, "schema": SCHEMA_VERSION}  # now in this version's layout
        return cls.model_validate(obj)


def read_records(path: Path) -> list[RoundRecord]:
    """Every round of a `metrics.jsonl`; one clear line (UserError) for a broken file."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(RoundRecord.from_json(json.loads(line)))
        except (ValueError, ValidationError) as e:
            first = e.errors()[0] if isinstance(e, ValidationError) else None
            where = ".".join(str(p) for p in first["loc"]) + ": " if first else ""
            reason = first["msg"] if first else "not JSON"
            raise UserError(f"{path}: line {number}: {where}{reason}") from None
    return records


def records_from_json(objs: Iterable[dict[str, Any]], where: str) -> list[RoundRecord]:
    """Records stored inside another JSON file (a checkpoint, a grid cell)."""
    try:
        return [RoundRecord.from_json(o) for o in objs]
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"{where}: round record {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def records_to_jsonl(records: Iterable[RoundRecord]) -> str:
    return "".join(json.dumps(r.to_json()) + "\n" for r in records)


def append_record(path: Path, record: RoundRecord) -> None:
    with Path(path).open("a") as f:
        f.write(json.dumps(record.to_json()) + "\n")
