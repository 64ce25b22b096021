"""Server-side aggregation: each tensor is averaged over the clients that trained it this round.

Plain functions over plain data ({name: tensor} dicts), independent of how clients run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """What a client sends back: the change of every tensor it trained, and how much data it saw."""

    client_id: int
    deltas: dict[str, torch.Tensor]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def payload_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Exact bytes of the tensor payload (what crosses the network, headers aside)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_update(
    update: ClientUpdate, global_state: Mapping[str, torch.Tensor], allowed: Mapping[str, tuple[int, ...]]
) -> str | None:
    """Why an update must be rejected, or None if it is acceptable.

    `allowed` maps each tensor the client may send to the shape it must have (the global shape,
    or a rank slice of it for rank-heterogeneous methods)."""
    if update.num_samples <= 0:
        return f"non-positive sample count {update.num_samples}"
    for key, value in update.deltas.items():
        if key not in global_state:
            return f"unknown tensor '{key}'"
        if key not in allowed:
            return f"tensor '{key}' is outside the client's allocation"
        if tuple(value.shape) != tuple(allowed[key]):
            return f"tensor '{key}' has shape {tuple(value.shape)}, expected {tuple(allowed[key])}"
        if not torch.isfinite(value).all():
            return f"tensor '{key}' has non-finite values"
    return None


def screen_updates(
    updates: Sequence[ClientUpdate],
    global_state: Mapping[str, torch.Tensor],
    allowed: Mapping[int, Mapping[str, tuple[int, ...]]],
) -> tuple[list[ClientUpdate], dict[int, str]]:
    """Split updates into accepted ones and rejected ones (client -> reason); rejections are logged."""
    accepted: list[ClientUpdate] = []
    rejected: dict[int, str] = {}
    for u in updates:
        reason = check_update(u, global_state, allowed.get(u.client_id, {}))
        if reason is None:
            accepted.append(u)
        else:
            log.warning("rejected update from client %d: %s", u.client_id, reason)
            rejected[u.client_id] = reason
    return accepted, rejected


def aggregate_per_layer(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    weighting: Literal["samples", "uniform"] = "samples",
) -> State:
    """New global state: global + weighted mean of the deltas of the clients that sent each tensor.

    Weights are normalised per tensor over the clients that trained it, so a layer trained by
    one client moves by that client's full change; tensors nobody trained stay as they are.
    """
    new_state = {k: v.clone() for k, v in global_state.items()}
    contributors: dict[str, list[tuple[float, torch.Tensor]]] = {}
    for u in updates:
        w = float(u.num_samples) if weighting == "samples" else 1.0
        for key, delta in u.deltas.items():
            contributors.setdefault(key, []).append((w, delta))
    for key, pairs in contributors.items():
        total = sum(w for w, _ in pairs)
        mean = torch.zeros_like(new_state[key], dtype=torch.float64)
        for w, delta in pairs:
            mean += (w / total) * delta.to(torch.float64)
        new_state[key] = (new_state[key].to(torch.float64) + mean).to(new_state[key].dtype)
    return new_state
