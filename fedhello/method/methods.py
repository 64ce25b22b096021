"""Every method by name, with its defaults in one place.

A method is one configuration of the two allocation mechanisms (fixed sets, or sampling from
per-layer probabilities, optionally refreshed from Fisher scores); `build_strategy` in
`allocation.py` turns a spec into a strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PATTERNS = ("triangle", "inverted_triangle", "bottleneck", "uniform")

Mechanism = Literal[
    "all_layers", "geometric", "sampled", "uniform_random", "fisher", "straggler", "exclusive"
]
Aggregation = Literal["per_layer", "hetlora", "flexlora"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    mechanism: Mechanism
    pattern: str | None = None  # geometric pattern, or the prior of a sampled/Fisher method
    warmup_rounds: int | float = 0  # Fisher: rounds of prior sampling first (a float: fraction of rounds)
    refresh_every: int | float = 1  # Fisher: recompute the scores every E rounds (a float: fraction)
    aggregation: Aggregation = "per_layer"  # hetlora / flexlora: rank-heterogeneous clients
    summary: str = ""

    @property
    def rank_heterogeneous(self) -> bool:
        return self.aggregation != "per_layer"


def _registry() -> dict[str, MethodSpec]:
    methods = [
        MethodSpec(
            "fedhello",
            "fisher",
            "bottleneck",
            warmup_rounds=0.1,
            refresh_every=0.1,
            summary="Fed-HeLLo: RGD-HLA with a Bottleneck prior for the first 10% of rounds, then "
            "Fisher-driven probabilities refreshed every 10% of rounds (released: W=50, E=50 of 500)",
        ),
        MethodSpec(
            "fim",
            "fisher",
            "uniform",
            warmup_rounds=0,
            refresh_every=1,
            summary="FIM-HLA: Fisher-driven probabilities recomputed every round",
        ),
        MethodSpec("full", "all_layers", summary="every client trains every layer, whatever its budget"),
        MethodSpec(
            "fedit", "all_layers", summary="FedIT: homogeneous LoRA, all layers, FedAvg (ignores budgets)"
        ),
        MethodSpec(
            "fedra", "uniform_random", summary="FedRA: each round each client draws its budget uniformly"
        ),
        MethodSpec(
            "straggler",
            "straggler",
            "uniform",
            summary="every client trains the weakest budget, uniformly spaced",
        ),
        MethodSpec("exclusive", "exclusive", summary="only clients whose budget covers all layers train"),
        MethodSpec(
            "hetlora",
            "all_layers",
            aggregation="hetlora",
            summary="HetLoRA: all layers at group rank r_g, zero-padded norm-weighted aggregation",
        ),
        MethodSpec(
            "flexlora",
            "all_layers",
            aggregation="flexlora",
            summary="FlexLoRA: all layers at group rank r_g, SVD of the averaged products",
        ),
    ]
    for p in PATTERNS:
        methods.append(MethodSpec(f"gd-{p}", "geometric", p, summary=f"GD-HLA, fixed {p} layer sets"))
        methods.append(MethodSpec(f"rgd-{p}", "sampled", p, summary=f"RGD-HLA, sampled from the {p} prior"))
    return {m.name: m for m in methods}


METHODS = _registry()
DEFAULT_METHOD = "fedhello"


def method_spec(name: str) -> MethodSpec:
    """The spec of a method name; ValueError listing the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}' (choose from {', '.join(METHODS)})")
    return METHODS[name]


def resolve_rounds(value: int | float, total_rounds: int, minimum: int) -> int:
    """An int is a round count; a float a fraction of the run's rounds (rounded, at least `minimum`)."""
    if isinstance(value, float):
        return max(minimum, round(value * total_rounds))
    return max(minimum, value)
