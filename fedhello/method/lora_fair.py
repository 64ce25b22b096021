"""LoRA-FAIR (Bian et al., ICCV 2025, arXiv 2411.14961): a server-side correction of the
averaged LoRA factors, available to every layer-set method as `federation.aggregation=lora_fair`.

Averaging A and B separately is not averaging the clients' updates: mean(B_k) mean(A_k) differs
from the ideal update dW = sum_k p_k B_k A_k. LoRA-FAIR keeps the averaged A (so that clients
keep starting from the aggregate, "continuity of initialisation") and adds a residual dB to the
averaged B, the one that brings (B + dB) A closest in direction to dW while staying small:

    dB* = argmin_dB  S(dW, (B + dB) A) + lam * ||dB||_F^2

with S = 1 - cosine similarity of the flattened matrices (the paper's choice; `similarity=l2`
uses the squared Frobenius distance instead, whose minimiser has the closed form
dB = (dW - B A) A^T (A A^T + lam I)^-1). The paper solves its problem by gradient descent on
dB from zero; so does `correct_module`, plain gradient descent in float64 for a fixed number
of steps, its step size in units of ||B||^2 (the paper leaves the solver's settings open:
docs/baselines.md). Per module, only the clients that trained that layer count, with their
weights renormalised over them, as everywhere in fedhello; layers nobody trained stay as they
are, and the head is averaged as usual.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedhello.config import LoraFairSettings
from fedhello.method.aggregation import ClientUpdate, State

A_MARK, B_MARK = "lora_A", "lora_B"


def lora_fair(
    old_state: Mapping[str, torch.Tensor],
    averaged: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    weights: Sequence[float],
    settings: LoraFairSettings,
) -> tuple[State, dict[str, float]]:
    """The averaged state with every trained module's B corrected; also the mean cosine
    similarity of (B + dB) A to the ideal update before and after (logged at debug level each round)."""
    new_state = dict(averaged)
    before, after = [], []
    for a_key in sorted(k for k in averaged if A_MARK in k):
        b_key = a_key.replace(A_MARK, B_MARK)
        pairs = [
            (w, u) for w, u in zip(weights, updates, strict=True) if a_key in u.deltas and b_key in u.deltas
        ]
        if not pairs:
            continue
        total = sum(w for w, _ in pairs)
        a0, b0 = old_state[a_key].to(torch.float64), old_state[b_key].to(torch.float64)
        ideal = sum(
            (w / total)
            * ((b0 + u.deltas[b_key].to(torch.float64)) @ (a0 + u.deltas[a_key].to(torch.float64)))
            for w, u in pairs
        )
        assert isinstance(ideal, torch.Tensor)
        a_bar, b_bar = averaged[a_key].to(torch.float64), averaged[b_key].to(torch.float64)
        correction = correct_module(ideal, a_bar, b_bar, settings)
        before.append(_cosine(ideal, b_bar @ a_bar))
        after.append(_cosine(ideal, (b_bar + correction) @ a_bar))
        new_state[b_key] = (b_bar + correction).to(averaged[b_key].dtype)
    summary = {"cosine_before": _mean(before), "cosine_after": _mean(after)} if before else {}
    return new_state, summary


def correct_module(
    ideal: torch.Tensor, a_bar: torch.Tensor, b_bar: torch.Tensor, settings: LoraFairSettings
) -> torch.Tensor:
    """dB for one module (float64): the minimiser of S(ideal, (b_bar + dB) a_bar) + lam ||dB||^2."""
    if settings.similarity == "l2":
        rank = a_bar.shape[0]
        gram = a_bar @ a_bar.T + settings.lam * torch.eye(rank, dtype=torch.float64)
        return torch.linalg.solve(gram, ((ideal - b_bar @ a_bar) @ a_bar.T).T).T
    if float(ideal.norm()) == 0.0 or float((b_bar @ a_bar).norm()) == 0.0:
        return torch.zeros_like(b_bar)  # no direction to match (e.g. the first round's B = 0 everywhere)
    delta = torch.zeros_like(b_bar, requires_grad=True)
    # 1 - cos is scale-free in B, so its gradient shrinks as 1/||B||: a step size in units of
    # ||B||^2 moves B by the same fraction of itself whatever its scale
    optimizer = torch.optim.SGD([delta], lr=settings.step_size * float(b_bar.square().sum()))
    for _ in range(settings.steps):
        optimizer.zero_grad()
        loss = 1 - _cosine_t(ideal, (b_bar + delta) @ a_bar) + settings.lam * delta.square().sum()
        loss.backward()
        optimizer.step()
    return delta.detach()


def _cosine_t(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0)


def _cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(_cosine_t(x, y))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
