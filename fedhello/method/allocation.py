"""Heterogeneous LoRA allocation (HLA): which LoRA layers each client trains in a round.

Plain functions over plain data (no torch), shared by every engine. A strategy maps
{client: layer budget} to {client: sorted layer indices}; index 0 is the input side.

Two mechanisms cover every strategy:
- a fixed set per budget (geometric patterns, `full`);
- sequential weighted sampling without replacement from per-layer probabilities
  (RGD-HLA from a pattern's collective distribution, uniform random, and later Fisher scores).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from fedhello.errors import UserError
from fedhello.seeding import Stream, numpy_rng

PATTERNS = ("triangle", "inverted_triangle", "bottleneck", "uniform")
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

    def layers_for(self, budget: int) -> tuple[int, ...]:
        if self.pattern is None:
            return tuple(range(self.num_layers))
        return geometric_layers(self.pattern, budget, self.num_layers)

    def allocate(self, round_index: int, budgets: Mapping[int, int], rng: np.random.Generator) -> Allocation:
        return {c: self.layers_for(n) for c, n in sorted(budgets.items())}


@dataclass
class SampledAllocation:
    """Each client draws its budget of layers from per-layer probabilities, every round."""

    name: str
    probabilities: np.ndarray = field(repr=False)

    def allocate(self, round_index: int, budgets: Mapping[int, int], rng: np.random.Generator) -> Allocation:
        return {c: sample_layers(self.probabilities, n, rng) for c, n in sorted(budgets.items())}


def parse_method(method: str) -> tuple[str, str | None]:
    """'gd-bottleneck' -> ('gd', 'bottleneck'); 'full' -> ('full', None); 'random' -> ('random', None)."""
    if method in ("full", "random"):
        return method, None
    kind, sep, pattern = method.partition("-")
    if sep and kind in ("gd", "rgd") and pattern in PATTERNS:
        return kind, pattern
    choices = ["full", "random"] + [f"{k}-{p}" for k in ("gd", "rgd") for p in PATTERNS]
    raise ValueError(f"unknown method '{method}' (choose from {', '.join(choices)})")


def build_strategy(
    method: str, num_layers: int, budgets: Sequence[int], shares: Sequence[float]
) -> AllocationStrategy:
    """The strategy named by `method` for groups with these budgets and client shares."""
    try:
        kind, pattern = parse_method(method)
    except ValueError as e:
        raise UserError(f"method: {e}") from None
    if kind == "full":
        return FixedAllocation(method, num_layers)
    if kind == "gd":
        return FixedAllocation(method, num_layers, pattern)
    if kind == "rgd":
        assert pattern is not None
        return SampledAllocation(method, pattern_prior(pattern, budgets, shares, num_layers))
    return SampledAllocation(method, np.full(num_layers, 1.0 / num_layers))


def allocate_layers(
    strategy: AllocationStrategy, round_index: int, budgets: Mapping[int, int], seed: int
) -> Allocation:
    """One round's allocation; the random stream depends only on (seed, round)."""
    return strategy.allocate(round_index, budgets, numpy_rng(seed, Stream.ALLOCATION, round_index))
