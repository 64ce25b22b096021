"""Heterogeneous LoRA allocation (HLA) and the layer-set baselines, as one method family.

Every method here gives each client a set of whole LoRA layers at full rank and averages each
tensor over the clients that trained it; they differ only in the allocation strategy
(`allocation.py`): fixed sets per budget (GD-HLA, full, FedIT, Straggler, Exclusive), sampling
from per-layer probabilities every round (RGD-HLA, FedRA), or probabilities refreshed from
Fisher scores (FIM-HLA and the co-designed Fed-HeLLo schedule).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedhello.method.allocation import (
    PATTERNS,
    AllocationStrategy,
    FisherAllocation,
    FisherSchedule,
    FixedAllocation,
    SampledAllocation,
    pattern_prior,
)
from fedhello.method.base import Assignment, Method, MethodContext, RoundInputs, RoundPlan
from fedhello.method.fisher import FisherOptions
from fedhello.method.registry import register_method


class LayerAllocation(Method):
    """Clients train the layer sets an allocation strategy draws for their budgets."""

    def __init__(self, name: str, ctx: MethodContext, strategy: AllocationStrategy) -> None:
        super().__init__(name, ctx)
        self.strategy = strategy

    def plan_round(self, inputs: RoundInputs) -> RoundPlan:
        r = inputs.round_number
        extra = self.strategy.prepare_round(r, lambda: inputs.layer_scores(self.ctx.options))
        budgets = {c: p.budget for c, p in inputs.profiles.items()}
        limits = {c: p.limits for c, p in inputs.profiles.items() if p.limits is not None}
        allocation = self.strategy.allocate(r, budgets, inputs.rng, limits or None)
        p = self.strategy.probabilities_for(r)
        return RoundPlan(
            r,
            {c: Assignment(c, layers) for c, layers in allocation.items()},
            None if p is None else [float(x) for x in p],
            extra,
        )

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.strategy.load_state_dict(state)


def resolve_rounds(value: int | float, total_rounds: int, minimum: int) -> int:
    """An int is a round count; a float a fraction of the run's rounds (rounded, at least `minimum`)."""
    if isinstance(value, float):
        return max(minimum, round(value * total_rounds))
    return max(minimum, value)


def fisher_strategy(
    name: str, ctx: MethodContext, prior_pattern: str, warmup: int | float, refresh: int | float
) -> FisherAllocation:
    """A Fisher-driven strategy; its options' `warmup_rounds` / `refresh_every` override the defaults."""
    f = ctx.options if isinstance(ctx.options, FisherOptions) else FisherOptions()
    prior = pattern_prior(prior_pattern, ctx.budgets, ctx.shares, ctx.num_layers)
    w = resolve_rounds(f.warmup_rounds if f.warmup_rounds is not None else warmup, ctx.rounds, 0)
    e = resolve_rounds(f.refresh_every if f.refresh_every is not None else refresh, ctx.rounds, 1)
    return FisherAllocation(
        name,
        prior,
        FisherSchedule(w, e, f.hold),
        ctx.seed,
        num_levels=f.num_levels,
        prior_product=f.prior_product,
        released_levels=f.levels == "released",
        feasible_levels=f.levels_over == "feasible",
    )


def _register() -> None:
    def fixed(name: str, **kw: Any) -> None:
        summary = kw.pop("summary")
        register_method(
            name,
            lambda ctx: LayerAllocation(
                name,
                ctx,
                FixedAllocation(
                    name,
                    ctx.num_layers,
                    kw.get("pattern"),
                    budget=min(ctx.budgets) if kw.get("weakest") else None,
                    exclusive=kw.get("exclusive", False),
                ),
            ),
            summary,
        )

    register_method(
        "fedhello",
        lambda ctx: LayerAllocation(
            "fedhello", ctx, fisher_strategy("fedhello", ctx, "bottleneck", 0.1, 0.1)
        ),
        "Fed-HeLLo: RGD-HLA with a Bottleneck prior for the first 10% of rounds, then Fisher-driven "
        "probabilities refreshed every 10% of rounds (released: W=50, E=50 of 500)",
        options=FisherOptions,
        legacy_section="fisher",
    )
    register_method(
        "fim",
        lambda ctx: LayerAllocation("fim", ctx, fisher_strategy("fim", ctx, "uniform", 0, 1)),
        "FIM-HLA: Fisher-driven probabilities recomputed every round",
        options=FisherOptions,
        legacy_section="fisher",
    )
    fixed("full", summary="every client trains every layer, whatever its budget")
    fixed("fedit", summary="FedIT: homogeneous LoRA, all layers, FedAvg (ignores budgets)")
    fixed(
        "straggler",
        pattern="uniform",
        weakest=True,
        summary="every client trains the weakest budget, uniformly spaced",
    )
    fixed("exclusive", exclusive=True, summary="only clients whose budget covers all layers train")
    register_method(
        "fedra",
        lambda ctx: LayerAllocation(
            "fedra", ctx, SampledAllocation("fedra", np.full(ctx.num_layers, 1.0 / ctx.num_layers))
        ),
        "FedRA: each round each client draws its budget uniformly",
    )
    for pattern in PATTERNS:
        fixed(f"gd-{pattern}", pattern=pattern, summary=f"GD-HLA, fixed {pattern} layer sets")

        def sampled(ctx: MethodContext, name: str = f"rgd-{pattern}", pattern: str = pattern) -> Method:
            prior = pattern_prior(pattern, ctx.budgets, ctx.shares, ctx.num_layers)
            return LayerAllocation(name, ctx, SampledAllocation(name, prior))

        register_method(f"rgd-{pattern}", sampled, f"RGD-HLA, sampled from the {pattern} prior")


_register()
