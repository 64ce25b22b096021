"""HetLoRA (Cho et al., 2024): rank-heterogeneous LoRA with norm-weighted aggregation and
optional local rank self-pruning.

Each client trains every layer at its group's rank r_k (`rank.py`). The server zero-pads the
clients' adapters to the full rank and averages them with weights proportional to each
client's ||B_k A_k||_F. With self-pruning (`hetlora.self_pruning`), a client adds a penalty on
the tail components floor(gamma r_k)..r_k-1 to its loss; if the tail's norm shrank during local
training it cuts the tail (uploads zeros there) and uses the smaller rank from then on, which
the server remembers (and checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from fedhello.config import StrictModel
from fedhello.method.aggregation import ClientUpdate, State
from fedhello.method.base import (
    Assignment,
    ClientProfile,
    LocalTraining,
    MethodContext,
    RoundInputs,
    RoundPlan,
    Updates,
    Weighting,
)
from fedhello.method.rank import (
    RankHeterogeneous,
    RankLocalTraining,
    Ranks,
    is_lora_a,
    partner_b,
    tail_norm,
    tail_start,
)
from fedhello.method.registry import register_method
from fedhello.records import RoundExtra


class HetLoRAOptions(StrictModel):
    """HetLoRA's optional local rank self-pruning (Cho et al. 2024); also read from the `hetlora:`
    section of older configs."""

    self_pruning: bool = Field(
        False, description="Clients shrink their rank when the tail of their adapters fades."
    )
    gamma: float = Field(0.99, gt=0, lt=1, description="Decay: the tail is components floor(gamma r)..r-1.")
    regularization: float = Field(
        0.01, ge=0, description="lambda of the tail-norm penalty added to the loss."
    )
    min_rank: int = Field(1, ge=1, description="Never prune below this rank.")


def product_norm(values: Mapping[str, torch.Tensor]) -> float:
    """||B A||_F over all adapted modules together: sqrt(sum over modules of ||B_m A_m||_F^2)."""
    total = 0.0
    for name, a in values.items():
        if is_lora_a(name):
            total += float(torch.linalg.matrix_norm(values[partner_b(name)].double() @ a.double()) ** 2)
    return total**0.5


def norm_weighted_mix(state: State, values: list[State], updates: Updates, weighting: Weighting) -> State:
    """The zero-padded LoRA values averaged with weights proportional to each client's
    ||B_k A_k||_F (normalised to sum 1)."""
    norms = [product_norm(v) for v in values]
    total = sum(norms)
    weights = [n / total for n in norms] if total > 0 else [1.0 / len(values)] * len(values)
    out = {}
    for name in values[0]:
        mix = sum(w * v[name].double() for w, v in zip(weights, values, strict=True))
        out[name] = torch.as_tensor(mix).to(state[name].dtype)
    return out


class SelfPruning(RankLocalTraining):
    """A HetLoRA client with self-pruning: tail penalty during training, tail cut if it faded."""

    def __init__(self, rank: int, settings: HetLoRAOptions) -> None:
        super().__init__(rank)
        self.settings = settings
        self.tail_before = 0.0

    def begin(self, trained: Mapping[str, nn.Parameter]) -> None:
        super().begin(trained)
        with torch.no_grad():
            self.tail_before = float(tail_norm(self.lora, self.rank, self.settings.gamma))

    def penalty(self) -> Tensor | None:
        return self.settings.regularization * tail_norm(self.lora, self.rank, self.settings.gamma)

    def finish(self) -> dict[str, float]:
        new_rank = self.rank
        with torch.no_grad():
            faded = float(tail_norm(self.lora, self.rank, self.settings.gamma)) < self.tail_before
            if faded:
                new_rank = max(self.settings.min_rank, tail_start(self.rank, self.settings.gamma))
                for k, p in self.lora.items():
                    (p[new_rank : self.rank] if is_lora_a(k) else p[:, new_rank : self.rank]).zero_()
        return {"rank": float(new_rank)}


class HetLoRAPruning(RoundExtra):
    """With self-pruning, the ranks clients had pruned themselves to when the round was planned."""

    kind: ClassVar[str] = "pruning"
    pruned_ranks: dict[str, int]  # client id -> its pruned rank (clients that pruned)
    mean_rank: float  # mean rank of the round's clients


class HetLoRA(RankHeterogeneous):
    """HetLoRA: norm-weighted aggregation; remembers the ranks clients pruned themselves to."""

    def __init__(self, name: str, ctx: MethodContext) -> None:
        super().__init__(name, ctx)
        self.client_ranks: dict[int, int] = {}  # ranks that clients pruned themselves to

    def client_rank(self, client: int, profile: ClientProfile) -> int:
        return self.client_ranks.get(client, profile.rank)

    def plan_round(self, inputs: RoundInputs) -> RoundPlan:
        plan = super().plan_round(inputs)
        options = self.ctx.options
        if isinstance(options, HetLoRAOptions) and options.self_pruning:
            ranks = [int(a.rank) for a in plan.assignments.values() if a.rank is not None]
            plan.extra = HetLoRAPruning(
                pruned_ranks={str(c): r for c, r in sorted(self.client_ranks.items())},
                mean_rank=float(sum(ranks) / len(ranks)) if ranks else 0.0,
            )
        return plan

    def local_training(self, assignment: Assignment) -> LocalTraining:
        options = self.ctx.options
        if isinstance(options, HetLoRAOptions) and options.self_pruning:
            return SelfPruning(int(assignment.rank or 0), options)
        return super().local_training(assignment)

    mix = staticmethod(norm_weighted_mix)

    def central_privacy_refusal(self) -> str | None:
        options = self.ctx.options
        if isinstance(options, HetLoRAOptions) and options.self_pruning:
            return "hetlora's self-pruning has clients report the norms and ranks of their own updates"
        return None

    def check_update(self, update: ClientUpdate, assignment: Assignment) -> str | None:
        """A self-pruned rank must be a whole number from 1 to the client's rank."""
        if "rank" not in update.metrics:
            return None
        rank, limit = update.metrics["rank"], int(assignment.rank or 0)
        if not isinstance(rank, (int, float)) or not math.isfinite(rank) or rank != int(rank):
            return f"reported rank {rank!r} is not a whole number"
        if not 1 <= rank <= limit:
            return f"reported rank {int(rank)} is outside 1..{limit}"
        return None

    def after_aggregate(self, updates: Updates, ranks: Ranks) -> None:
        for u in updates:
            if "rank" in u.metrics and int(u.metrics["rank"]) < ranks[u.client_id]:
                self.client_ranks[u.client_id] = int(u.metrics["rank"])

    def state_dict(self) -> dict[str, Any]:
        return {"client_ranks": {str(c): r for c, r in self.client_ranks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.client_ranks = {int(c): int(r) for c, r in state.get("client_ranks", {}).items()}


register_method(
    "hetlora",
    lambda ctx: HetLoRA("hetlora", ctx),
    "HetLoRA: all layers at group rank r_g, zero-padded norm-weighted aggregation",
    options=HetLoRAOptions,
    legacy_section="hetlora",
)
