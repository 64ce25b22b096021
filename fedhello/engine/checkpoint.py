"""Checkpoints written after every round, so an interrupted run resumes without losing rounds.

A checkpoint is the global adapters (safetensors, named by round) plus `state.json`, which
points at them. Both are written to temporary files and renamed, and the old adapters are
removed only after the new state is in place, so a crash at any moment leaves a consistent
checkpoint. No generator state needs saving: every random stream is derived from
(seed, purpose, round, client) (see fedhello.seeding).

`state.json` is also a manifest that `load_checkpoint` verifies before anything is used: the
round, the hash of the config that wrote it (`fedhello/engine/run_identity.py`), SHA-256
checksums of the adapters file and of the metrics history, and the torch thread count. A
truncated or edited checkpoint, a shortened history, or a checkpoint of another config is
refused with one line. A checkpoint written before the manifest existed cannot be verified: it
is refused unless the user accepts it explicitly (`fedhello run --resume
--accept-unverified-checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from fedhello.errors import UserError
from fedhello.io import write_atomic
from fedhello.records import RoundRecord, records_from_json

STATE_FILE = "state.json"


@dataclass
class Checkpoint:
    round: int  # last completed round
    global_state: dict[str, torch.Tensor]
    history: list[RoundRecord]  # the records of rounds 1..round
    wall_seconds: float
    extra: dict[str, Any]
    threads: int | None = None  # torch CPU threads of the process that wrote it


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _history_digest(history: list[dict[str, Any]]) -> str:
    return _sha256(json.dumps(history, sort_keys=True).encode())


def save_checkpoint(directory: Path, ckpt: Checkpoint, seed: int, config_hash: str | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    name = f"adapters-round{ckpt.round:05d}.safetensors"
    adapters = save({k: v.detach().cpu().contiguous() for k, v in ckpt.global_state.items()})
    write_atomic(directory / name, adapters)
    history = [r.to_json() for r in ckpt.history]
    state = {
        "round": ckpt.round,
        "adapters": name,
        "adapters_sha256": _sha256(adapters),
        "history_sha256": _history_digest(history),
        "config_hash": config_hash,
        "threads": torch.get_num_threads(),
        "wall_seconds": ckpt.wall_seconds,
        "rng": {"seed": seed, "scheme": "numpy SeedSequence([seed, stream, round, client])"},
        "history": history,
        "extra": ckpt.extra,
    }
    write_atomic(directory / STATE_FILE, json.dumps(state))
    for old in directory.glob("adapters-round*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(
    directory: Path, config_hash: str | None = None, *, accept_unverified: bool = False
) -> Checkpoint:
    """The checkpoint in `directory`, verified against its manifest (and, when given, against the
    hash of the config that is resuming it); any mismatch is a one-line UserError. A checkpoint
    without a manifest is refused unless `accept_unverified`."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint to resume from")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        adapters_file = directory / state["adapters"]
        adapters = adapters_file.read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: unreadable checkpoint ({e.__class__.__name__})") from None
    if "adapters_sha256" not in state and not accept_unverified:
        raise UserError(
            f"{path}: written before checkpoints carried a manifest, so it cannot be verified; "
            "resume it with --accept-unverified-checkpoint if you trust it"
        )
    if "adapters_sha256" in state:
        if _sha256(adapters) != state["adapters_sha256"]:
            raise UserError(f"{adapters_file}: does not match its checksum (truncated or edited)")
        if _history_digest(state.get("history", [])) != state.get("history_sha256"):
            raise UserError(f"{path}: the metrics history does not match its checksum (edited)")
        expected = state.get("config_hash")
        if config_hash is not None and expected is not None and expected != config_hash:
            raise UserError(f"{path}: written by another config (hash {expected}, now {config_hash})")
    try:
        tensors = load(adapters)
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise UserError(f"{adapters_file}: unreadable adapters ({e.__class__.__name__})") from None
    history = records_from_json(state["history"], str(path))
    if state["round"] != len(history) or [r.round for r in history] != list(range(1, len(history) + 1)):
        raise UserError(f"{path}: round {state['round']} does not match its {len(history)} recorded rounds")
    return Checkpoint(
        state["round"],
        tensors,
        history,
        float(state["wall_seconds"]),
        state.get("extra", {}),
        state.get("threads"),
    )
