"""Rank heterogeneity, the base of HetLoRA (`hetlora.py`) and FlexLoRA (`flexlora.py`):
clients train every layer at their own LoRA rank.

The global adapters have the full rank r. A client of rank r_k downloads their first r_k
components (rows of A, columns of B), zero-pads them back to r, trains only those components,
and uploads only those slices; the server zero-pads them back to r. The slicing functions are
plain functions over {name: tensor} dicts; `RankHeterogeneous` is the shared method base.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fedhello.errors import UserError
from fedhello.method.aggregation import ClientUpdate, State, aggregate_per_tensor
from fedhello.method.base import (
    Assignment,
    ClientProfile,
    LocalTraining,
    Method,
    MethodContext,
    RoundInputs,
    RoundPlan,
    Updates,
    Weighting,
)


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name


def partner_b(name_a: str) -> str:
    """The lora_B tensor that multiplies this lora_A tensor."""
    return name_a.replace(".lora_A.", ".lora_B.")


def rank_slice(name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """The part of a tensor that a rank-`rank` client holds: A[:rank], B[:, :rank]; others whole."""
    if is_lora_a(name):
        return tensor[:rank]
    if is_lora_b(name):
        return tensor[:, :rank]
    return tensor


def pad_rank(name: str, tensor: torch.Tensor, full_shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad a client's rank slice back to the global shape."""
    if tuple(tensor.shape) == tuple(full_shape):
        return tensor
    out = torch.zeros(tuple(full_shape), dtype=tensor.dtype)
    if is_lora_a(name):
        out[: tensor.shape[0]] = tensor
    else:
        out[:, : tensor.shape[1]] = tensor
    return out


def tail_start(rank: int, gamma: float) -> int:
    """First component of the tail that HetLoRA's self-pruning would cut: floor(gamma * rank)."""
    return int(gamma * rank)


def tail_norm(tensors: Mapping[str, torch.Tensor], rank: int, gamma: float) -> torch.Tensor:
    """sum over modules of ||B[:, t:r]||_F * ||A[t:r]||_F with t = floor(gamma r) (differentiable):
    HetLoRA's self-pruning regulariser, and the quantity compared before and after local training."""
    t = tail_start(rank, gamma)
    total = torch.zeros(())
    for name, a in tensors.items():
        if is_lora_a(name) and t < rank:
            b = tensors[partner_b(name)]
            total = total + torch.linalg.norm(b[:, t:rank]) * torch.linalg.norm(a[t:rank])
    return total


def split_updates(
    global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], ranks: Mapping[int, int]
) -> tuple[list[dict[str, torch.Tensor]], list[ClientUpdate]]:
    """Each client's full-size LoRA values (global + delta, zero-padded), and its non-LoRA (head) deltas."""
    values, heads = [], []
    for u in updates:
        r = ranks[u.client_id]
        lora = {k: d for k, d in u.deltas.items() if is_lora_a(k) or is_lora_b(k)}
        values.append(
            {
                k: pad_rank(k, rank_slice(k, global_state[k], r) + d, global_state[k].shape)
                for k, d in lora.items()
            }
        )
        heads.append(
            ClientUpdate(u.client_id, {k: d for k, d in u.deltas.items() if k not in lora}, u.num_samples)
        )
    return values, heads


def _rank_mask(name: str, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook that keeps only the first `rank` LoRA components trainable."""

    def mask(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        if is_lora_a(name):
            grad[rank:] = 0
        elif is_lora_b(name):
            grad[:, rank:] = 0
        return grad

    return mask


class RankLocalTraining(LocalTraining):
    """A rank-r_k client: starts from the zero-padded slices, trains only the first r_k
    components (a gradient mask), uploads only the slices."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.handles: list[Any] = []
        self.lora: dict[str, nn.Parameter] = {}

    def start_state(self, received: Mapping[str, Tensor], shapes: Mapping[str, torch.Size]) -> State:
        return {k: pad_rank(k, rank_slice(k, v, self.rank).clone(), shapes[k]) for k, v in received.items()}

    def begin(self, trained: Mapping[str, nn.Parameter]) -> None:
        self.lora = {k: p for k, p in trained.items() if is_lora_a(k) or is_lora_b(k)}
        self.handles = [p.register_hook(_rank_mask(k, self.rank)) for k, p in trained.items()]

    def end(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def finish(self) -> dict[str, float]:
        return {"rank": float(self.rank)}

    def upload(self, deltas: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: rank_slice(k, d, self.rank).contiguous() for k, d in deltas.items()}


Ranks = Mapping[int, int]  # client -> the rank it trained at
LoraMix = Callable[[State, list[State], Updates, Weighting], State]
"""(global state, each client's full-size LoRA values, the updates, weighting) -> new LoRA tensors."""


def aggregate_rank_slices(
    state: State, updates: Updates, ranks: Ranks, weighting: Weighting, mix: LoraMix
) -> State:
    """What HetLoRA and FlexLoRA share: the clients' rank slices zero-padded to full size
    (`split_updates`), the head averaged per tensor as in every other method, and the LoRA
    tensors from `mix`. No updates: the state is unchanged."""
    if not updates:
        return {k: v.clone() for k, v in state.items()}
    values, heads = split_updates(state, updates, ranks)
    new_state = aggregate_per_tensor(state, heads, weighting)
    new_state.update(mix(state, values, updates, weighting))
    return new_state


class RankHeterogeneous(Method):
    """Every client trains every layer, at its group's LoRA rank. Subclasses set `mix`, how the
    clients' zero-padded LoRA values become the new global ones (HetLoRA's norm weighting,
    FlexLoRA's SVD)."""

    mix: LoraMix

    def __init__(self, name: str, ctx: MethodContext) -> None:
        super().__init__(name, ctx)
        if ctx.aggregation != "mean":
            raise UserError(
                f"federation.aggregation: {name} combines zero-padded rank slices by its own rule; "
                "use mean (federation.norm_bound still applies to what clients send)"
            )

    def client_rank(self, client: int, profile: ClientProfile) -> int:
        return profile.rank

    def assign(self, client: int, profile: ClientProfile) -> Assignment:
        """Every layer at the client's rank; with device budgets, at most the largest rank that
        fits them, and nothing (the client sits out) when all layers never fit."""
        rank = self.client_rank(client, profile)
        if profile.limits is not None:
            if profile.limits.max_rank is None:
                return Assignment(client, ())
            rank = min(rank, profile.limits.max_rank)
        return Assignment(client, tuple(range(self.ctx.num_layers)), rank)

    def plan_round(self, inputs: RoundInputs) -> RoundPlan:
        assignments = {c: self.assign(c, p) for c, p in sorted(inputs.profiles.items())}
        return RoundPlan(inputs.round_number, assignments)

    def aggregate(self, state: State, updates: Updates, plan: RoundPlan, weighting: Weighting) -> State:
        ranks = {c: int(a.rank) for c, a in plan.assignments.items() if a.rank is not None}
        new_state = aggregate_rank_slices(state, updates, ranks, weighting, type(self).mix)
        self.after_aggregate(updates, ranks)
        return new_state

    def after_aggregate(self, updates: Updates, ranks: Ranks) -> None:
        """What a method learns from the accepted updates besides the new state (HetLoRA: ranks)."""
        return None

    def download(self, state: Mapping[str, Tensor], assignment: Assignment) -> State:
        rank = _rank(assignment)
        return {k: rank_slice(k, v, rank) for k, v in state.items()}

    def upload_shapes(
        self, global_state: Mapping[str, Tensor], keys: Sequence[str], assignment: Assignment
    ) -> dict[str, tuple[int, ...]]:
        rank = _rank(assignment)
        return {k: tuple(rank_slice(k, global_state[k], rank).shape) for k in keys}

    def local_training(self, assignment: Assignment) -> LocalTraining:
        return RankLocalTraining(_rank(assignment))

    def to_full(self, name: str, sent: Tensor, shape: torch.Size) -> Tensor:
        return pad_rank(name, sent, shape)


def _rank(assignment: Assignment) -> int:
    if assignment.rank is None:
        raise ValueError(f"client {assignment.client}: a rank-heterogeneous method needs a rank")
    return assignment.rank
