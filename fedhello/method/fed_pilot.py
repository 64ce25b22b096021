"""Fed-pilot (Zhang, Hu, Liu, Xu, arXiv 2410.10200): every client trains the layer set of the
largest summed importance that its resources allow, a 0/1 knapsack under its memory limit.

The cost of a set is not additive per layer: the backward pass reaches down to the set's lowest
block, so a set costs by (its lowest block, its size) and the LoRA bytes of its layers
(docs/budgets.md). The knapsack is therefore solved exactly per lowest block: with the lowest
block m fixed, every other layer above m costs the same, so the best set is m plus the n-1 most
important layers above it; `best_layer_set` tries every (n, m) the client's `LayerLimits` admit
(its device budgets through the calibrated cost model, and at most its group's layer budget) and
keeps the best. Without device budgets only the layer budget binds: the top layers by importance.

Choices where the paper could not be followed to the letter (docs/baselines.md): the importance
of a layer is its diagonal-Fisher layer score on the server's proxy set, of the current global
model, recomputed every round (fedhello's Fisher scores; `method_options` are `FisherOptions`);
aggregation is fedhello's per-layer mean over the clients that trained each layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from fedhello.method.base import Assignment, Method, RoundInputs, RoundPlan
from fedhello.method.budgets import LayerLimits
from fedhello.method.fisher import FisherOptions
from fedhello.method.registry import register_method
from fedhello.records import RoundExtra


class PilotScores(RoundExtra):
    """The layer importances a round's knapsacks maximised."""

    kind: ClassVar[str] = "importance"
    scores: list[float]


def best_layer_set(values: Sequence[float], budget: int, limits: LayerLimits | None) -> tuple[int, ...]:
    """The set of at most `budget` layers with the largest summed value that `limits` admit
    (exact: per lowest block m, m plus the best layers above it). Ties go to the set with the
    higher lowest block (cheaper), then the higher layers."""
    num_layers = len(values)
    best: tuple[float, tuple[int, ...]] = (-np.inf, ())
    for n in range(1, min(budget, num_layers) + 1):
        lowest = 0 if limits is None else limits.lowest[n - 1]
        if lowest is None:
            continue
        for m in range(num_layers - n, lowest - 1, -1):  # higher lowest blocks first: they win ties
            above = sorted(range(m + 1, num_layers), key=lambda i: (-values[i], -i))[: n - 1]
            chosen = tuple(sorted([m, *above]))
            total = float(sum(values[i] for i in chosen))
            if total > best[0]:
                best = (total, chosen)
    return best[1]


class FedPilot(Method):
    """Per client, the knapsack-optimal layer set for the layers' current Fisher importance."""

    def plan_round(self, inputs: RoundInputs) -> RoundPlan:
        scores = np.asarray(inputs.layer_scores(self.options), dtype=float)
        if not np.isfinite(scores).all() or (scores <= 0).all():
            scores = np.ones(self.ctx.num_layers)  # nothing to rank by: every layer counts the same
        assignments = {
            c: Assignment(c, best_layer_set(list(scores), p.budget, p.limits))
            for c, p in sorted(inputs.profiles.items())
        }
        return RoundPlan(
            inputs.round_number, assignments, extra=PilotScores(scores=[float(x) for x in scores])
        )

    @property
    def options(self) -> FisherOptions:
        options = self.ctx.options
        return options if isinstance(options, FisherOptions) else FisherOptions()


register_method(
    "fed-pilot",
    lambda ctx: FedPilot("fed-pilot", ctx),
    "Fed-pilot: per client the knapsack-optimal layer set by Fisher importance under its budgets",
    options=FisherOptions,
)
