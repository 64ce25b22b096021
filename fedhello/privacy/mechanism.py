"""The mechanism: clip a client's whole update, add Gaussian noise, average by planned counts.

Plain functions over {name: tensor} dicts. A client's update is every tensor it sends (its
layers' LoRA tensors, rank slices or not, and the head when the head is federated); its L2 norm
is taken over all of them together, so one client moves the sum of all tensors by at most C,
however many layers it trained. The server's mean divides each coordinate by how many clients the
round's plan assigned to it (`coverage`), a number fixed before any update arrives: dividing by
the updates that happened to be accepted would make the denominator depend on the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from fedhello.method.aggregation import ClientUpdate, State

ToFull = Callable[[str, Tensor, torch.Size], Tensor]
"""Places a sent tensor in the global tensor's shape (a rank slice zero-padded; others as they are)."""


def update_norm(tensors: Mapping[str, Tensor]) -> float:
    """The L2 norm of all tensors together (float64)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clip_update(tensors: Mapping[str, Tensor], clip_norm: float) -> dict[str, Tensor]:
    """Scale the whole update down to norm `clip_norm` when it is longer (min(1, C / norm))."""
    norm = update_norm(tensors)
    if norm <= clip_norm:
        return dict(tensors)
    factor = clip_norm / norm
    return {k: (t.double() * factor).to(t.dtype) for k, t in tensors.items()}


def noised(tensors: Mapping[str, Tensor], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """Every coordinate plus N(0, std^2), drawn in float64 in sorted name order."""
    out = {}
    for name in sorted(tensors):
        t = tensors[name]
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64) * std
        out[name] = (t.double() + noise).to(t.dtype)
    return out


def planned_coverage(
    shapes: Mapping[int, Mapping[str, tuple[int, ...]]], state: State, to_full: ToFull
) -> dict[str, Tensor]:
    """Per tensor and coordinate, how many of the round's planned clients may send it (from the
    plan's upload shapes, before any update arrives)."""
    coverage: dict[str, Tensor] = {}
    for client in sorted(shapes):
        for name, shape in shapes[client].items():
            full = state[name].shape
            ones = to_full(name, torch.ones(shape, dtype=torch.float64), full)
            coverage[name] = coverage.get(name, torch.zeros(full, dtype=torch.float64)) + ones
    return coverage


def private_mean(
    state: State,
    updates: Sequence[ClientUpdate],
    coverage: Mapping[str, Tensor],
    std: float,
    generator: torch.Generator,
    to_full: ToFull,
) -> State:
    """The next global state: per covered coordinate, the current value plus (the sum of the
    updates' clipped changes + N(0, std^2)) / the planned number of contributors. Coordinates no
    planned client covers stay as they are (nothing about the data could move them)."""
    out = {k: v.clone() for k, v in state.items()}
    for name in sorted(coverage):
        cover = coverage[name]
        full = state[name].shape
        total = torch.zeros(full, dtype=torch.float64)
        for u in updates:
            if name in u.deltas:
                total += to_full(name, u.deltas[name].double(), full)
        noise = torch.randn(full, generator=generator, dtype=torch.float64) * std
        covered = cover > 0
        step = torch.where(covered, (total + noise) / cover.clamp(min=1.0), torch.zeros_like(total))
        out[name] = (state[name].double() + step).to(state[name].dtype)
    return out
