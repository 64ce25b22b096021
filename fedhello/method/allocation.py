"""Heterogeneous LoRA allocation (HLA): which LoRA layers each client trains in a round.

Plain functions over plain data (no torch), shared by every engine. A strategy maps
{client: layer budget} to {client: sorted layer indices}; index 0 is the input side.

Two mechanisms cover every strategy:
- a fixed set per budget (geometric patterns, `full`);
- sequential weighted sampling without replacement from per-layer probabilities
  (RGD-HLA from a pattern's collective distribution, FedRA's uniform draw, and the
  co-designed schedule whose probabilities come from Fisher scores).
Methods built on these strategies, and their names, live in `layers.py`.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from fedhello.errors import UserError
from fedhello.method.budgets import LayerLimits
from fedhello.method.importance import (
    fisher_probabilities,
    importance_levels,
    level_probabilities,
    released_levels,
)
from fedhello.records import RoundExtra
from fedhello.seeding import Stream, numpy_rng

log = logging.getLogger(__name__)

Allocation = dict[int, tuple[int, ...]]
Limits = Mapping[int, LayerLimits]  # client -> the layer sets its device budgets allow
PATTERNS = ("triangle", "inverted_triangle", "bottleneck", "uniform")


def geometric_layers(pattern: str, budget: int, num_layers: int) -> tuple[int, ...]:
    """The GD-HLA layer set of a budget (docs/method.md, "Allocation"); sets of one pattern are nested in the budget."""
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
    """RGD-HLA prior p_l = c_l / sum c (docs/method.md, "Allocation"); the uniform pattern's prior is flat."""
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


def sample_layers_within(
    probabilities: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    limits: LayerLimits | None,
    from_block: Callable[[int], np.ndarray] | None = None,
) -> tuple[int, ...]:
    """`sample_layers` restricted to the layer sets a client's device budgets allow: the largest
    count up to `budget` that some set fits, drawn from the blocks a set of that count may use.
    `from_block(lowest)` gives the probabilities over blocks lowest..L-1 (default: `probabilities`
    with the blocks below set to 0). Nothing fits: an empty set."""
    if limits is None:
        return sample_layers(probabilities, budget, rng)
    p = np.asarray(probabilities, dtype=float)
    for n in range(budget, 0, -1):
        lowest = limits.lowest[n - 1]
        if lowest is None:
            continue
        if from_block is None:
            allowed = p.copy()
            allowed[:lowest] = 0.0
        else:
            allowed = from_block(lowest)
        if np.count_nonzero(allowed) >= n:
            return sample_layers(allowed, n, rng)
    return ()


def inclusion_frequency(
    probabilities: np.ndarray, budget: int, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """Realised per-layer inclusion rate over many draws (flatter than p, see docs/method.md)."""
    counts = np.zeros(len(probabilities))
    for _ in range(draws):
        counts[list(sample_layers(probabilities, budget, rng))] += 1
    return counts / draws


class AllocationStrategy(Protocol):
    """Anything that turns this round's client budgets into layer sets."""

    name: str

    def prepare_round(self, round_number: int, layer_scores: Callable[[], np.ndarray]) -> RoundExtra | None:
        """Anything to do before allocating (a Fisher refresh); returns what the run should log."""
        ...

    def allocate(
        self,
        round_number: int,
        budgets: Mapping[int, int],
        rng: np.random.Generator,
        limits: Limits | None = None,
    ) -> Allocation:
        """Layer sets for these clients' layer budgets; with `limits`, only sets those clients'
        device budgets allow (an empty set where none of the strategy's sets fits)."""
        ...

    def probabilities_for(self, round_number: int) -> np.ndarray | None:
        """The per-layer sampling probabilities governing a round; None for fixed sets."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class PerClientAllocation(ABC):
    """Allocation one client at a time, in client order, from the round's stream: what every
    strategy shares. A strategy says how one client's set is drawn (`client_layers`)."""

    @abstractmethod
    def client_layers(
        self,
        round_number: int,
        client: int,
        budget: int,
        rng: np.random.Generator,
        limits: LayerLimits | None,
    ) -> tuple[int, ...]:
        """The layers of one client with this layer budget (within `limits` when given)."""

    def allocate(
        self,
        round_number: int,
        budgets: Mapping[int, int],
        rng: np.random.Generator,
        limits: Limits | None = None,
    ) -> Allocation:
        limits = limits or {}
        return {
            c: self.client_layers(round_number, c, n, rng, limits.get(c)) for c, n in sorted(budgets.items())
        }


class _Stateless(PerClientAllocation):
    """Strategies with nothing to prepare and nothing to checkpoint."""

    def prepare_round(self, round_number: int, layer_scores: Callable[[], np.ndarray]) -> RoundExtra | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


@dataclass
class FixedAllocation(_Stateless):
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

    def fitting_layers(self, budget: int, limits: LayerLimits | None) -> tuple[int, ...]:
        """The pattern's set for this budget, or its largest smaller set that the device budgets
        allow; () when none does (or when the strategy has only one set, e.g. all layers)."""
        layers = self.layers_for(budget)
        if limits is None or limits.fits(layers):
            return layers
        if self.pattern is not None:
            for n in range(len(layers) - 1, 0, -1):
                smaller = geometric_layers(self.pattern, n, self.num_layers)
                if limits.fits(smaller):
                    return smaller
        return ()

    def client_layers(
        self,
        round_number: int,
        client: int,
        budget: int,
        rng: np.random.Generator,
        limits: LayerLimits | None,
    ) -> tuple[int, ...]:
        return self.fitting_layers(budget, limits)

    def probabilities_for(self, round_number: int) -> np.ndarray | None:
        return None


@dataclass
class SampledAllocation(_Stateless):
    """Each client draws its budget of layers from per-layer probabilities, every round."""

    name: str
    probabilities: np.ndarray = field(repr=False)

    def client_layers(
        self,
        round_number: int,
        client: int,
        budget: int,
        rng: np.random.Generator,
        limits: LayerLimits | None,
    ) -> tuple[int, ...]:
        return sample_layers_within(self.probabilities, budget, rng, limits)

    def probabilities_for(self, round_number: int) -> np.ndarray | None:
        return self.probabilities


@dataclass(frozen=True)
class FisherSchedule:
    """When Fisher scores are refreshed and how long their probabilities hold (docs/method.md, "Allocation").

    Rounds are numbered from 1. Rounds 1..W sample from the prior; the scores are recomputed on
    rounds W+1, W+1+E, ...; between refreshes `hold` decides what is used:
    - persist_probs: keep sampling from the latest Fisher probabilities (project default);
    - persist_allocation: keep each client's layer set drawn at the refresh until the next one;
    - single_round: Fisher probabilities on the refresh round only, the prior otherwise (released).
    """

    warmup_rounds: int
    refresh_every: int
    hold: Literal["persist_probs", "persist_allocation", "single_round"] = "persist_probs"

    def is_refresh(self, round_number: int) -> bool:
        past = round_number - self.warmup_rounds - 1
        return past >= 0 and past % self.refresh_every == 0


class FisherRefresh(RoundExtra):
    """One Fisher refresh, as the round's record keeps it (`extras.fisher`)."""

    kind: ClassVar[str] = "fisher"
    round: int
    scores: list[float | None]  # per layer; None where a score was not finite
    levels: list[int]  # importance level per layer (empty when the refresh was skipped)
    probabilities: list[float]  # the per-layer probabilities from this refresh on
    skipped: str | None = None  # why the probabilities stayed as they were


@dataclass
class FisherAllocation(PerClientAllocation):
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
    feasible_levels: bool = False  # levels among each client's feasible blocks (levels_over: feasible)
    fisher_probabilities: np.ndarray | None = field(default=None, repr=False)
    refreshed_at: int | None = None
    scores: np.ndarray | None = field(default=None, repr=False)  # the latest finite layer scores

    def needs_scores(self, round_number: int) -> bool:
        return self.schedule.is_refresh(round_number)

    def prepare_round(
        self, round_number: int, layer_scores: Callable[[], np.ndarray]
    ) -> FisherRefresh | None:
        """On a refresh round: score the layers of the current global model and update the
        probabilities; returns the refresh's record (scores, levels, probabilities, seconds)."""
        if not self.needs_scores(round_number):
            return None
        start = time.perf_counter()
        refresh = self.update_scores(round_number, layer_scores())
        refresh.seconds = time.perf_counter() - start
        return refresh

    def probabilities_for(self, round_number: int) -> np.ndarray | None:
        return self.probabilities(round_number)

    def update_scores(self, round_number: int, scores: np.ndarray) -> FisherRefresh:
        """Turn fresh layer scores into probabilities; returns what the run should log.

        Scores that are not finite (a global model driven out of range, e.g. by a poisoned update
        that was let through) change nothing: the previous probabilities (or the prior) stay, and
        the record says why, so the run goes on."""
        if not np.isfinite(scores).all():
            log.warning(
                "round %d: Fisher scores are not finite; the layer probabilities stay as they were",
                round_number,
            )
            kept = self.probabilities(round_number)
            return FisherRefresh(
                round=round_number,
                scores=[float(x) if np.isfinite(x) else None for x in scores],
                levels=[],
                probabilities=[float(x) for x in kept],
                skipped="non-finite scores",
            )
        if self.released_levels:
            levels = released_levels(
                scores,
                self.num_levels,
                seed=int(numpy_rng(self.seed, Stream.ALLOCATION, round_number, 0).integers(2**31)),
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
        self.refreshed_at = round_number
        self.scores = np.asarray(scores, dtype=float)
        return FisherRefresh(
            round=round_number,
            scores=[float(x) for x in scores],
            levels=[int(x) for x in levels],
            probabilities=[float(x) for x in p],
        )

    def probabilities(self, round_number: int) -> np.ndarray:
        """The per-layer probabilities that govern `round_number`."""
        if self.fisher_probabilities is None or round_number <= self.schedule.warmup_rounds:
            return self.prior
        if self.schedule.hold == "single_round" and round_number != self.refreshed_at:
            return self.prior
        return self.fisher_probabilities

    def client_layers(
        self,
        round_number: int,
        client: int,
        budget: int,
        rng: np.random.Generator,
        limits: LayerLimits | None,
    ) -> tuple[int, ...]:
        p = self.probabilities(round_number)
        if (
            self.schedule.hold == "persist_allocation"
            and self.refreshed_at is not None
            and p is not self.prior
        ):
            # A client's draw depends only on (seed, refresh round, client): fixed until the next refresh.
            rng = numpy_rng(self.seed, Stream.ALLOCATION, self.refreshed_at, client + 1)
        feasible = self.feasible_levels and self.scores is not None and p is self.fisher_probabilities
        return sample_layers_within(p, budget, rng, limits, self.feasible_probabilities if feasible else None)

    def feasible_probabilities(self, lowest: int) -> np.ndarray:
        """The Fisher probabilities with importance levels found among blocks lowest..L-1 only
        (what a client whose budgets stop there may train), zero below: with device budgets the
        levels of all blocks can put every feasible block of a low-memory client in one level,
        and its draw is then uniform."""
        assert self.scores is not None
        p = np.zeros(len(self.scores))
        prior = self.prior[lowest:] if self.prior_product else None
        p[lowest:] = fisher_probabilities(self.scores[lowest:], self.num_levels, prior)
        return p

    def state_dict(self) -> dict[str, Any]:
        p = self.fisher_probabilities
        state: dict[str, Any] = {
            "fisher_probabilities": None if p is None else [float(x) for x in p],
            "refreshed_at": self.refreshed_at,
        }
        if self.feasible_levels and self.scores is not None:
            state["scores"] = [float(x) for x in self.scores]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        p = state.get("fisher_probabilities")
        self.fisher_probabilities = None if p is None else np.asarray(p, dtype=float)
        self.refreshed_at = state.get("refreshed_at")
        scores = state.get("scores")
        self.scores = None if scores is None else np.asarray(scores, dtype=float)


def _normalise(p: np.ndarray) -> np.ndarray:
    return p / p.sum()
