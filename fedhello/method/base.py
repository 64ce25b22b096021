"""The method interface: the hooks every engine calls, whatever the method.

A federated method decides, each round, what every sampled client trains (`plan_round`), what a
client downloads (`download`), which tensors of which shapes it may upload (`upload_shapes`), how
its local training differs from plain training (`local_training`), how accepted updates become
the next global state (`aggregate`), and what of its own state must survive a resume
(`state_dict`); a method may also change the frozen base (`changes_base`). The defaults are the per-layer FedAvg of heterogeneous LoRA allocation: full-rank
adapters, each tensor averaged over the clients that trained it. A method family overrides only
the steps it changes (as Flower's strategies do), and is registered once by name in
`fedhello/method/registry.py`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel
from torch import Tensor, nn

from fedhello.config import LoraFairSettings
from fedhello.method.aggregation import ClientUpdate, Rule, State, aggregate_per_tensor
from fedhello.method.budgets import LayerLimits
from fedhello.method.lora_fair import lora_fair
from fedhello.records import RoundExtra

log = logging.getLogger(__name__)

Weighting = Literal["samples", "uniform"]
Updates = Sequence[ClientUpdate]
LayerScores = Callable[[Any], np.ndarray]
"""Computes the Fisher layer scores of the current global model on the proxy set (the server's),
with the method's Fisher options (`fedhello.method.fisher.FisherOptions`)."""


@dataclass(frozen=True)
class Assignment:
    """What one client is asked to do in a round: train these LoRA layers, at this rank
    (None: the adapters' full rank). No layers: the client sits the round out."""

    client: int
    layers: tuple[int, ...]
    rank: int | None = None


@dataclass(frozen=True)
class ClientProfile:
    """What the server knows of a client when planning: its group's layer budget and LoRA rank,
    and the layer sets its device budgets allow (None: no device budget; docs/budgets.md)."""

    budget: int
    rank: int
    limits: LayerLimits | None = None


@dataclass(frozen=True)
class RoundInputs:
    """What the server hands a method to plan a round: the sampled clients' profiles, the round's
    allocation random stream, and a way to get Fisher layer scores when the method needs them."""

    round_number: int
    profiles: Mapping[int, ClientProfile]
    rng: np.random.Generator
    layer_scores: LayerScores


@dataclass
class RoundPlan:
    """Who trains in a round and what each trains."""

    round_number: int
    assignments: dict[int, Assignment]  # every sampled client
    probabilities: list[float] | None = None  # per-layer sampling probabilities, for sampled methods
    extra: RoundExtra | None = None  # the method's own record of the round (a Fisher refresh)

    @property
    def clients(self) -> list[int]:
        """The clients that train this round."""
        return sorted(c for c, a in self.assignments.items() if a.layers)

    @property
    def idle(self) -> list[int]:
        """Sampled clients with nothing to train (Exclusive: budget below L); not failures."""
        return sorted(c for c, a in self.assignments.items() if not a.layers)


@dataclass(frozen=True)
class MethodContext:
    """What a method is built from: the model's depth, the groups, the run's length and seed, how
    the federation combines updates, and the method's own options (`method_options`, validated by
    the model the method registered; None for a method without options)."""

    num_layers: int
    budgets: Sequence[int]  # layer budget of each resource group
    shares: Sequence[float]  # client share of each group
    rounds: int = 1
    seed: int = 0
    aggregation: Rule | Literal["lora_fair"] = "mean"  # how contributions combine (federation.aggregation)
    trim_fraction: float = 0.2
    lora_fair: LoraFairSettings = field(default_factory=LoraFairSettings)
    options: BaseModel | None = None
    lora_scaling: float = 1.0  # peft's alpha / r: every client's adapter output is scaling * B A x


class LocalTraining:
    """How a method changes a client's local training; the default changes nothing.

    The client calls, in order: `start_state` (what it trains from), `begin` (with its trained
    tensors, before the first step), `penalty` (added to every step's loss), `end` (after the
    last step), `finish` (returns metrics to report), and `upload` (what it sends)."""

    def start_state(self, received: Mapping[str, Tensor], shapes: Mapping[str, torch.Size]) -> State:
        return dict(received)

    def begin(self, trained: Mapping[str, nn.Parameter]) -> None:
        return None

    def penalty(self) -> Tensor | None:
        return None

    def end(self) -> None:
        return None

    def finish(self) -> dict[str, float]:
        return {}

    def upload(self, deltas: dict[str, Tensor]) -> dict[str, Tensor]:
        return deltas


class Method(ABC):
    """Base of every method family; subclasses implement `plan_round` and override what differs."""

    name: str = ""
    changes_base: ClassVar[bool] = False
    """True for a method whose aggregation changes the frozen base (FLoRA merges every round's
    update into it): the global state then also holds the adapted linears' base weights, which
    clients download, evaluation loads, checkpoints keep and `fedhello export` merges."""

    def __init__(self, name: str, ctx: MethodContext) -> None:
        self.name = name
        self.ctx = ctx

    @abstractmethod
    def plan_round(self, inputs: RoundInputs) -> RoundPlan:
        """Assign each sampled client (`inputs.profiles`) its layers (and rank)."""

    def download(self, state: Mapping[str, Tensor], assignment: Assignment) -> State:
        """What this client receives of the global adapters."""
        return dict(state)

    def upload_shapes(
        self, global_state: Mapping[str, Tensor], keys: Sequence[str], assignment: Assignment
    ) -> dict[str, tuple[int, ...]]:
        """The tensors this client may send back, with the shape each must have."""
        return {k: tuple(global_state[k].shape) for k in keys}

    def local_training(self, assignment: Assignment) -> LocalTraining:
        """The client-side hooks for this assignment."""
        return LocalTraining()

    def check_update(self, update: ClientUpdate, assignment: Assignment) -> str | None:
        """Why the method must reject an update that passed the common screening (e.g. a
        reported rank out of range), or None."""
        return None

    def aggregate(self, state: State, updates: Updates, plan: RoundPlan, weighting: Weighting) -> State:
        """The next global state from the accepted updates (per tensor: the weighted mean, or the
        robust rule of `federation.aggregation`; with lora_fair, the mean with each averaged B
        corrected as LoRA-FAIR does)."""
        if self.ctx.aggregation == "lora_fair":
            averaged = aggregate_per_tensor(state, updates, weighting)
            weights = [float(u.num_samples) if weighting == "samples" else 1.0 for u in updates]
            corrected, cosines = lora_fair(state, averaged, updates, weights, self.ctx.lora_fair)
            log.debug("round %d: LoRA-FAIR %s", plan.round_number, cosines)
            return corrected
        return aggregate_per_tensor(state, updates, weighting, self.ctx.aggregation, self.ctx.trim_fraction)

    def to_full(self, name: str, sent: Tensor, shape: torch.Size) -> Tensor:
        """A sent tensor in the global tensor's shape: what central differential privacy sums
        (docs/privacy.md). Layer-set methods send whole tensors; rank methods zero-pad slices."""
        return sent

    def central_privacy_refusal(self) -> str | None:
        """Why this method cannot be aggregated as a (noised) mean of updates, the rule that central
        differential privacy and secure aggregation replace `aggregate` with (it needs individual
        updates or client reports), or None when it can."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state that must survive a resume."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None
