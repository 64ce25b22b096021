"""Resource-capability groups: which share of the clients can afford how many LoRA layers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedhello.config import GroupConfig
from fedhello.errors import UserError
from fedhello.method.budgets import DeviceBudget
from fedhello.seeding import Stream, numpy_rng


@dataclass(frozen=True)
class ResourceGroup:
    """A group after its budget is resolved against the model's depth L."""

    name: str
    share: float
    budget: int  # how many LoRA layers a client of this group may train
    rank: int
    device_budget: DeviceBudget = field(
        default_factory=DeviceBudget
    )  # memory / seconds / upload budgets (none: unconstrained)


def resolve_budget(budget: int | float, num_layers: int, where: str = "budget") -> int:
    """An int is a layer count; a float in (0, 1] a fraction of L, rounded down (what fits), at least 1."""
    if isinstance(budget, float):
        return max(1, math.floor(budget * num_layers + 1e-9))
    if budget > num_layers:
        raise UserError(f"{where}: {budget} layers requested but the model has {num_layers}")
    return budget


def resolve_groups(groups: Sequence[GroupConfig], num_layers: int, lora_rank: int) -> list[ResourceGroup]:
    """Budgets resolved against L; each group's LoRA rank for rank-heterogeneous methods is its
    configured `rank`, or by default the rank whose trainable parameters on all L layers match
    its layer budget at the full rank (r * n_g / L: 8/12/16 for 6/9/12 of 12 at r=16)."""
    out = []
    for i, g in enumerate(groups):
        n = resolve_budget(g.budget, num_layers, f"groups.{i}.budget")
        rank = g.rank if g.rank is not None else max(1, round(lora_rank * n / num_layers))
        if rank > lora_rank:
            raise UserError(f"groups.{i}.rank: {rank} exceeds the global LoRA rank lora.r={lora_rank}")
        device = DeviceBudget(
            None if g.memory is None else int(g.memory),
            g.seconds_per_round,
            None if g.upload is None else int(g.upload),
            g.speed,
        )
        out.append(ResourceGroup(g.name, g.share, n, rank, device))
    return out


def group_sizes(num_clients: int, shares: Sequence[float]) -> list[int]:
    """Clients per group by largest remainder, so 20 clients at 6:3:1 give 12/6/2."""
    total = float(sum(shares))
    exact = [num_clients * s / total for s in shares]
    sizes = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: num_clients - sum(sizes)]:
        sizes[i] += 1
    return sizes


def assign_clients_to_groups(num_clients: int, groups: Sequence[ResourceGroup], seed: int) -> np.ndarray:
    """Group index of each client: sizes from the shares, membership shuffled by the seed."""
    sizes = group_sizes(num_clients, [g.share for g in groups])
    membership = np.repeat(np.arange(len(groups)), sizes)
    return numpy_rng(seed, Stream.GROUPS).permutation(membership)


def sample_clients(num_clients: int, per_round: int, seed: int, round_number: int) -> list[int]:
    """The clients of one round: uniform without replacement, sorted."""
    rng = numpy_rng(seed, Stream.CLIENT_SAMPLING, round_number)
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def poisson_sample_clients(num_clients: int, rate: float, seed: int, round_number: int) -> list[int]:
    """Each client independently with probability `rate` (Poisson sampling: what the privacy
    accountant assumes; docs/privacy.md). A round may sample no client at all."""
    rng = numpy_rng(seed, Stream.CLIENT_SAMPLING, round_number)
    return sorted(int(c) for c in np.flatnonzero(rng.random(num_clients) < rate))
