"""Checkpoints written after every round, so an interrupted run resumes without losing rounds.

A checkpoint is the global adapters (safetensors, named by round) plus `state.json`, which
points at them. Both are written to temporary files and renamed, and the old adapters are
removed only after the new state is in place, so a crash at any moment leaves a consistent
checkpoint. No generator state needs saving: every random stream is derived from
(seed, purpose, round, client) (see fedhello.seeding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

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


def save_checkpoint(directory: Path, ckpt: Checkpoint, seed: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    name = f"adapters-round{ckpt.round:05d}.safetensors"
    write_atomic(
        directory / name, save({k: v.detach().cpu().contiguous() for k, v in ckpt.global_state.items()})
    )
    state = {
        "round": ckpt.round,
        "adapters": name,
        "wall_seconds": ckpt.wall_seconds,
        "rng": {"seed": seed, "scheme": "numpy SeedSequence([seed, stream, round, client])"},
        "history": [r.to_json() for r in ckpt.history],
        "extra": ckpt.extra,
    }
    write_atomic(directory / STATE_FILE, json.dumps(state))
    for old in directory.glob("adapters-round*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(directory: Path) -> Checkpoint:
    path = directory / STATE_FILE
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint to resume from")
    try:
        state = json.loads(path.read_text())
        tensors = load_file(str(directory / state["adapters"]))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: unreadable checkpoint ({e.__class__.__name__})") from None
    history = records_from_json(state["history"], str(path))
    return Checkpoint(state["round"], tensors, history, float(state["wall_seconds"]), state.get("extra", {}))
