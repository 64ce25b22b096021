"""Server-side aggregation: each tensor is averaged over the clients that trained it this round.

Plain functions over plain data ({name: tensor} dicts), independent of how clients run.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
Rule = Literal["mean", "median", "trimmed_mean"]


@dataclass
class ClientUpdate:
    """What a client sends back: the change of every tensor it trained, and how much data it saw."""

    client_id: int
    deltas: dict[str, torch.Tensor]
    num_samples: int | float  # as received; screening rejects a count that is not whole and in range
    metrics: dict[str, float] = field(default_factory=dict)
    problem: str | None = None  # set by an engine that could not read the reply (screening rejects it)


def payload_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Exact bytes of the tensor payload (what crosses the network, headers aside)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True)
class Expected:
    """What one sampled client may send this round: exactly these tensors at these shapes
    (the global shape, or a rank slice of it), and at most `max_samples` examples (its partition)."""

    shapes: Mapping[str, tuple[int, ...]]
    max_samples: int


def _sample_count_problem(n: object, limit: int) -> str | None:
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return f"sample count {n!r} is not a number"
    if not math.isfinite(n) or n != int(n):
        return f"sample count {n} is not a whole number"
    if n <= 0:
        return f"non-positive sample count {n}"
    if n > limit:
        return f"sample count {int(n)} exceeds the client's {limit} training examples"
    return None


def check_update(
    update: ClientUpdate, global_state: Mapping[str, torch.Tensor], expected: Expected | None
) -> str | None:
    """Why an update must be rejected, or None if it is acceptable.

    Checks, in order: the client was sampled (`expected` is None otherwise); the sample count is a
    positive whole number no larger than the client's partition; the tensors are exactly the
    allocated ones, with the allocated shapes and the global dtype; every value is finite once
    converted to the global dtype (a float64 1e300 would become inf in a float32 state)."""
    if expected is None:
        return f"client {update.client_id} was not sampled this round"
    if update.problem is not None:
        return update.problem
    problem = _sample_count_problem(update.num_samples, expected.max_samples)
    if problem is not None:
        return problem
    for key, value in update.deltas.items():
        if key not in global_state:
            return f"unknown tensor '{key}'"
        if key not in expected.shapes:
            return f"tensor '{key}' is outside the client's allocation"
        if not isinstance(value, torch.Tensor):
            return f"tensor '{key}' is not a tensor"
        if tuple(value.shape) != tuple(expected.shapes[key]):
            return f"tensor '{key}' has shape {tuple(value.shape)}, expected {tuple(expected.shapes[key])}"
        dtype = global_state[key].dtype
        if value.dtype != dtype:
            return f"tensor '{key}' has dtype {value.dtype}, expected {dtype}"
        if not torch.isfinite(value.to(dtype)).all():
            return f"tensor '{key}' has non-finite values"
    missing = sorted(set(expected.shapes) - set(update.deltas))
    if missing:
        return f"tensor '{missing[0]}' of the allocation is missing ({len(missing)} missing)"
    return None


def screen_updates(
    updates: Sequence[ClientUpdate],
    global_state: Mapping[str, torch.Tensor],
    expected: Mapping[int, Expected],
    method_check: Callable[[ClientUpdate], str | None] | None = None,
) -> tuple[list[ClientUpdate], dict[int, str]]:
    """Split updates into accepted ones and rejected ones (client -> reason); rejections are logged.

    A client id that appears more than once is rejected in every copy (which one is genuine cannot
    be told); `method_check` adds the method's own checks (e.g. HetLoRA's reported ranks)."""
    counts = Counter(u.client_id for u in updates)
    accepted: list[ClientUpdate] = []
    rejected: dict[int, str] = {}
    for u in updates:
        if counts[u.client_id] > 1:
            reason: str | None = f"client {u.client_id} sent {counts[u.client_id]} updates this round"
        else:
            reason = check_update(u, global_state, expected.get(u.client_id))
            if reason is None and method_check is not None:
                reason = method_check(u)
        if reason is None:
            accepted.append(u)
        elif u.client_id not in rejected:
            log.warning("rejected update from client %s: %s", u.client_id, reason)
            rejected[u.client_id] = reason
    return accepted, rejected


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors of a state that hold NaN or infinite values."""
    return [k for k, v in state.items() if not torch.isfinite(v).all()]


def aggregate_per_tensor(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    weighting: Literal["samples", "uniform"] = "samples",
    rule: Rule = "mean",
    trim_fraction: float = 0.2,
) -> State:
    """New global state: global + the combined deltas of the clients that sent each tensor.

    `rule="mean"`: the weighted mean, weights normalised per tensor over the clients that trained
    it, so a layer trained by one client moves by that client's full change. `"median"` and
    `"trimmed_mean"` combine coordinate-wise and unweighted (as Flower's FedMedian and
    FedTrimmedAvg); with one or two contributors they equal the (unweighted) mean, and a trimmed
    mean cuts floor(trim_fraction * n) values at each end. Tensors nobody trained stay as they are.
    """
    new_state = {k: v.clone() for k, v in global_state.items()}
    contributors: dict[str, list[tuple[float, torch.Tensor]]] = {}
    for u in updates:
        w = float(u.num_samples) if weighting == "samples" else 1.0
        for key, delta in u.deltas.items():
            contributors.setdefault(key, []).append((w, delta))
    for key, pairs in contributors.items():
        if rule == "mean":
            total = sum(w for w, _ in pairs)
            combined = torch.zeros_like(new_state[key], dtype=torch.float64)
            for w, delta in pairs:
                combined += (w / total) * delta.to(torch.float64)
        else:
            stacked = torch.stack([delta.to(torch.float64) for _, delta in pairs])
            combined = robust_combine(stacked, rule, trim_fraction)
        new_state[key] = (new_state[key].to(torch.float64) + combined).to(new_state[key].dtype)
    return new_state


def robust_combine(stacked: torch.Tensor, rule: Rule, trim_fraction: float) -> torch.Tensor:
    """Coordinate-wise median or trimmed mean over the first axis (the contributors). The median
    of an even count is the mean of the two middle values."""
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if rule == "median":
        return ordered[(n - 1) // 2 : n // 2 + 1].mean(dim=0)
    cut = int(trim_fraction * n)
    return ordered[cut : n - cut].mean(dim=0)


@dataclass
class NormBound:
    """Bounds on the norm of every tensor a client sends (docs/robustness.md).

    For a tensor with at least `MIN_PEERS` contributors this round the bound is `factor` times
    their median norm; with fewer (under heterogeneous allocation many layers have one or two
    contributors, where a median is no defence) it is `factor` times the median of the tensor's
    accepted norms in earlier rounds (`history`); where neither exists only `absolute` applies,
    which also caps every other bound. "clip" scales a tensor down to its bound; "reject" rejects
    the whole update. Accepted (post-clip) norms feed the history."""

    mode: Literal["clip", "reject"]
    factor: float = 10.0
    absolute: float | None = None
    history: dict[str, list[float]] = field(default_factory=dict)

    MIN_PEERS = 3
    HISTORY = 10  # rounds of median norms remembered per tensor

    def bound(self, key: str, norms: Sequence[float]) -> float | None:
        reference: float | None = None
        if len(norms) >= self.MIN_PEERS:
            reference = float(np.median(norms))
        elif self.history.get(key):
            reference = float(np.median(self.history[key]))
        bounds = [
            b
            for b in (None if reference is None else self.factor * reference, self.absolute)
            if b is not None
        ]
        return min(bounds) if bounds else None

    def apply(self, updates: Sequence[ClientUpdate]) -> tuple[list[ClientUpdate], dict[int, str]]:
        """The updates with their tensors bounded (or the offending updates rejected, with reasons)."""
        sizes = [{k: float(d.to(torch.float64).norm()) for k, d in u.deltas.items()} for u in updates]
        norms: dict[str, list[float]] = {}
        for size in sizes:
            for key, value in size.items():
                norms.setdefault(key, []).append(value)
        bounds = {key: self.bound(key, values) for key, values in norms.items()}
        kept: list[ClientUpdate] = []
        rejected: dict[int, str] = {}
        accepted: dict[str, list[float]] = {}
        for u, size in zip(updates, sizes, strict=True):
            over: dict[str, float] = {}
            for k, n in size.items():
                limit = bounds[k]
                if limit is not None and n > limit:
                    over[k] = limit
            if over and self.mode == "reject":
                key = next(iter(over))
                rejected[u.client_id] = (
                    f"tensor '{key}' has norm {size[key]:.3g}, above the bound {over[key]:.3g}"
                )
                log.warning("rejected update from client %d: %s", u.client_id, rejected[u.client_id])
                continue
            deltas = {k: d * (over[k] / size[k]) if k in over else d for k, d in u.deltas.items()}
            kept.append(ClientUpdate(u.client_id, deltas, u.num_samples, u.metrics))
            for k, n in size.items():
                accepted.setdefault(k, []).append(min(n, over.get(k) or n))
        for key, values in accepted.items():
            recent = [*self.history.get(key, []), float(np.median(values))]
            self.history[key] = recent[-self.HISTORY :]
        return kept, rejected

    def state_dict(self) -> dict[str, list[float]]:
        return dict(self.history)

    def load_state_dict(self, state: Mapping[str, Sequence[float]]) -> None:
        self.history = {k: [float(x) for x in v] for k, v in state.items()}
