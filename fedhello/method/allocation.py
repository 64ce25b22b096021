"""Heterogeneous LoRA allocation (HLA): which LoRA layers each client trains in a round.

Plain functions over plain data (no torch), shared by every engine. A strategy maps
{client: layer budget} to {client: sorted layer indices}; index 0 is the input side.

Two mechanisms cover every strategy:
- a fixed set per budget (geometric patterns, `full`);
- sequential weighted sampling without replacement from per-layer probabilities
  (RGD-HLA from a pattern's collective distribution, FedRA's uniform draw, and the
  co-designed schedule whose probabilities come from Fisher scores).
Method names and their defaults live in `methods.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from fedhello.config import FisherConfig
from fedhello.errors import UserError
from fedhello.method.importance import (
    fisher_probabilities,
    importance_levels,
    level_probabilities,
    released_levels,
)
from fedhello.method.methods import PATTERNS, method_spec, resolve_rounds
from fedhello.seeding import Stream, numpy_rng

Allocation = dict[int, tuple[int, ...]]


def geometric_layers(pattern: str, budget: int, num_layers: int) -> tuple[int, ...]:
    """The GD-HLA layer set of a budget (SPEC 2.1); sets of one pattern are nested in the budget."""
    n, L = budget, num_layers
    if not 1 <= n <= L:
        raise UserError(f"budget {n} must be between 1 and the number of layers {L}")
    layers: list[int]
    if pattern == "triangle":
        layers = list(range(n))
    elif pattern == "inverted_triangle":
        layers = list(range(L - n, L))
    elif pattern == "bottleneck":
        low, high = math.ceil(n / 2), n // 2
        layers = [*range(low), *range(L - high, L)]
    elif pattern == "uniform":
        layers = [(i * L) // n for i in range(n)]
    else:
        raise UserError(f"unknown pattern '{pattern}' (choose from {', '.join(PATTERNS)})")
    return tuple(sorted(layers))


def collective_distribution(
    pattern: str, budgets: Sequence[int], shares: Sequence[float], num_layers: int
) -> np.ndarray:
    """c_l = sum over groups of (share of clients in g) * [l in S_g]: the pattern's 'shape'."""
    total = float(sum(shares))
    c = np.zeros(num_layers)
    for n, s in zip(budgets, shares, strict=True):
        c[list(geometric_layers(pattern, n, num_layers))] += s / total
    return c


def pattern_prior(
    pattern: str, budgets: Sequence[int], shares: Sequence[float], num_layers: int
) -> np.ndarray:
    """RGD-HLA prior p_l = c_l / sum c (SPEC 2.2); the uniform pattern's prior is flat."""
    if pattern == "uniform":
        return np.full(num_layers, 1.0 / num_layers)
    c = collective_distribution(pattern, budgets, shares, num_layers)
    return c / c.sum()


def sample_layers(probabilities: np.ndarray, budget: int, rng: np.random.Generator) -> tuple[int, ...]:
    """Draw `budget` layers: draw, remove, renormalise (numpy's choice(replace=False, p=...))."""
    p = np.asarray(probabilities, dtype=float)
    p = p / p.sum()
    available = int(np.count_nonzero(p))
    if budget > available:
        # numpy cannot draw more distinct layers than have non-zero probability.
        raise UserError(f"budget {budget} exceeds the {available} layers with non-zero probability")
    drawn = rng.choice(len(p), size=budget, replace=False, p=p)
    return tuple(sorted(int(i) for i in drawn))


def inclusion_frequency(
    probabilities: np.ndarray, budget: int, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """Realised per-layer inclusion rate over many draws (flatter than p, see SPEC 2.2)."""
    counts = np.zeros(len(probabilities))
    for _ in range(draws):
        counts[list(sample_layers(probabilities, budget, rng))] += 1
    return counts / draws


class AllocationStrategy(Protocol):
    """Anything that turns this round's client budgets into layer sets."""

    name: str

    def allocate(
        self, round_index: int, budgets: Mapping[int, int], rng: np.random.Generator
    ) -> Allocation: ...


@dataclass
class FixedAllocation:
    """Each budget always trains the same set: GD-HLA patterns, or all layers (`full`)."""

    name: str
    num_layers: int
    pattern: str | None = None  # None: every client trains every layer, whatever its budget
    budget: int | None = None  # one budget for everyone (Straggler: the weakest group's)
    exclusive: bool = False  # clients whose budget is below L sit out (empty set)

    def layers_for(self, budget: int) -> tuple[int, ...]:
        if self.exclusive and budget < self.num_layers:
            return ()
        if self.pattern is None:
            return tuple(range(self.num_layers))
        return geometric_layers(self.pattern, self.budget or budget, self.num_layers)

    def allocate(self, round_index: int, budgets: Mapping[int, int], rng: np.random.Generator) -> Allocation:
        return {c: self.layers_for(n) for c, n in sorted(budgets.items())}


@dataclass
class SampledAllocation:
    """Each client draws its budget of layers from per-layer probabilities, every round."""

    name: str
    probabilities: np.ndarray = field(repr=False)

    def allocate(self, round_index: int, budgets: Mapping[int, int], rng: np.random.Generator) -> Allocation:
        return {c: sample_layers(self.probabilities, n, rng) for c, n in sorted(budgets.items())}


@dataclass(frozen=True)
class FisherSchedule:
    """When Fisher scores are refreshed and how long their probabilities hold (SPEC 2.4).

    Rounds are numbered from 1. Rounds 1..W sample from the prior; the scores are recomputed on
    rounds W+1, W+1+E, ...; between refreshes `hold` decides what is used:
    - persist_probs: keep sampling from the latest Fisher probabilities (project default);
    - persist_allocation: keep each client's layer set drawn at the refresh until the next one;
    - single_round: Fisher probabilities on the refresh round only, the prior otherwise (released).
    """

    warmup_rounds: int
    refresh_every: int
    hold: Literal["persist_probs", "persist_allocation", "single_round"] = "persist_probs"

    def is_refresh(self, round_index: int) -> bool:
        past = round_index - self.warmup_rounds - 1
        return past >= 0 and past % self.refresh_every == 0


@dataclass
class FisherAllocation:
    """Co-designed allocation: prior sampling during warm-up, then Fisher-driven probabilities.

    The server computes layer scores when `needs_scores(round)` and hands them to
    `update_scores`; everything here is plain numpy, so every engine drives it the same way.
    """

    name: str
    prior: np.ndarray = field(repr=False)
    schedule: FisherSchedule
    seed: int
    num_levels: int = 3
    prior_product: bool = False
    released_levels: bool = False  # the released code's unordered k-means labels (compatibility)
    fisher_probabilities: np.ndarray | None = field(default=None, repr=False)
    refreshed_at: int | None = None

    def needs_scores(self, round_index: int) -> bool:
        return self.schedule.is_refresh(round_index)

    def update_scores(self, round_index: int, scores: np.ndarray) -> dict[str, Any]:
        """Turn fresh layer scores into probabilities; returns what the run should log."""
        if self.released_levels:
            levels = released_levels(
                scores,
                self.num_levels,
                seed=int(numpy_rng(self.seed, Stream.ALLOCATION, round_index, 0).integers(2**31)),
            )
            prior = self.prior if self.prior_product else None
            p = (
                level_probabilities(levels)
                if prior is None
                else _normalise(prior * level_probabilities(levels))
            )
        else:
            levels = importance_levels(scores, self.num_levels)
            p = fisher_probabilities(scores, self.num_levels, self.prior if self.prior_product else None)
        self.fisher_probabilities = p
        self.refreshed_at = round_index
        return {
            "round": round_index,
            "scores": [float(x) for x in scores],
            "levels": [int(x) for x in levels],
            "probabilities": [float(x) for x in p],
        }

    def probabilities(self, round_index: int) -> np.ndarray:
        """The per-layer probabilities that govern `round_index`."""
        if self.fisher_probabilities is None or round_index <= self.schedule.warmup_rounds:
            return self.prior
        if self.schedule.hold == "single_round" and round_index != self.refreshed_at:
            return self.prior
        return self.fisher_probabilities

    def allocate(self, round_index: int, budgets: Mapping[int, int], rng: np.random.Generator) -> Allocation:
        p = self.probabilities(round_index)
        if (
            self.schedule.hold == "persist_allocation"
            and self.refreshed_at is not None
            and p is not self.prior
        ):
            # A client's draw depends only on (seed, refresh round, client): fixed until the next refresh.
            return {
                c: sample_layers(p, n, numpy_rng(self.seed, Stream.ALLOCATION, self.refreshed_at, c + 1))
                for c, n in sorted(budgets.items())
            }
        return {c: sample_layers(p, n, rng) for c, n in sorted(budgets.items())}

    def state_dict(self) -> dict[str, Any]:
        p = self.fisher_probabilities
        return {
            "fisher_probabilities": None if p is None else [float(x) for x in p],
            "refreshed_at": self.refreshed_at,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        p = state.get("fisher_probabilities")
        self.fisher_probabilities = None if p is None else np.asarray(p, dtype=float)
        self.refreshed_at = state.get("refreshed_at")


def _normalise(p: np.ndarray) -> np.ndarray:
    return p / p.sum()


def build_strategy(
    method: str,
    num_layers: int,
    budgets: Sequence[int],
    shares: Sequence[float],
    *,
    rounds: int = 1,
    seed: int = 0,
    fisher: FisherConfig | None = None,
) -> AllocationStrategy:
    """The strategy named by `method` for groups with these budgets and client shares."""
    try:
        spec = method_spec(method)
    except ValueError as e:
        raise UserError(f"method: {e}") from None
    if spec.mechanism == "all_layers":
        return FixedAllocation(method, num_layers)
    if spec.mechanism == "exclusive":
        return FixedAllocation(method, num_layers, exclusive=True)
    if spec.mechanism == "straggler":
        return FixedAllocation(method, num_layers, spec.pattern, budget=min(budgets))
    if spec.mechanism == "geometric":
        return FixedAllocation(method, num_layers, spec.pattern)
    if spec.mechanism == "uniform_random":
        return SampledAllocation(method, np.full(num_layers, 1.0 / num_layers))
    assert spec.pattern is not None
    prior = pattern_prior(spec.pattern, budgets, shares, num_layers)
    if spec.mechanism == "sampled":
        return SampledAllocation(method, prior)
    f = fisher or FisherConfig()
    warmup = resolve_rounds(f.warmup_rounds if f.warmup_rounds is not None else spec.warmup_rounds, rounds, 0)
    every = resolve_rounds(f.refresh_every if f.refresh_every is not None else spec.refresh_every, rounds, 1)
    return FisherAllocation(
        method,
        prior,
        FisherSchedule(warmup, every, f.hold),
        seed,
        num_levels=f.num_levels,
        prior_product=f.prior_product,
        released_levels=f.levels == "released",
    )


def allocate_layers(
    strategy: AllocationStrategy, round_index: int, budgets: Mapping[int, int], seed: int
) -> Allocation:
    """One round's allocation; the random stream depends only on (seed, round)."""
    return strategy.allocate(round_index, budgets, numpy_rng(seed, Stream.ALLOCATION, round_index))
