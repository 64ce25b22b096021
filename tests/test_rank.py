"""Rank-heterogeneous aggregation (HetLoRA, FlexLoRA) and the layer baselines' allocations."""

from __future__ import annotations

import numpy as np
import torch
from helpers import allocate_layers, build_strategy

from fedhello.method.aggregation import ClientUpdate
from fedhello.method.base import ClientProfile, MethodContext, RoundInputs
from fedhello.method.flexlora import svd_mix
from fedhello.method.hetlora import norm_weighted_mix, product_norm
from fedhello.method.rank import aggregate_rank_slices, pad_rank, rank_slice
from fedhello.method.registry import build_method

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"


def truncate_rank(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The global adapters as a rank-`rank` client sees them: components >= rank set to zero."""
    return {k: pad_rank(k, rank_slice(k, v, rank).clone(), v.shape) for k, v in state.items()}


def test_truncation_and_slices() -> None:
    state = {A: torch.arange(6.0).reshape(3, 2), B: torch.arange(6.0).reshape(2, 3), "head": torch.ones(2)}
    t = truncate_rank(state, 1)
    torch.testing.assert_close(t[A], torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(t[B], torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]))
    torch.testing.assert_close(t["head"], state["head"])
    assert rank_slice(A, state[A], 2).shape == (2, 2) and rank_slice(B, state[B], 2).shape == (2, 2)


def test_hetlora_zero_padding_and_norm_weights_hand_example() -> None:
    g = {A: torch.eye(2), B: torch.zeros(2, 2), "head": torch.tensor([1.0])}
    # client 1, rank 1: A_1 = [[1, 0]], B_1 = [[1], [0]]  ->  B_1 A_1 = [[1, 0], [0, 0]], norm 1
    u1 = ClientUpdate(
        1, {A: torch.zeros(1, 2), B: torch.tensor([[1.0], [0.0]]), "head": torch.tensor([2.0])}, 10
    )
    # client 2, rank 2: A_2 = I, B_2 = [[0, 0], [0, 3]]  ->  norm 3
    u2 = ClientUpdate(
        2, {A: torch.zeros(2, 2), B: torch.tensor([[0.0, 0.0], [0.0, 3.0]]), "head": torch.tensor([0.0])}, 30
    )
    new = aggregate_rank_slices(g, [u1, u2], {1: 1, 2: 2}, "samples", norm_weighted_mix)
    # weights 1/4 and 3/4; client 1's second component is zero-padded
    torch.testing.assert_close(new[A], torch.tensor([[1.0, 0.0], [0.0, 0.75]]))
    torch.testing.assert_close(new[B], torch.tensor([[0.25, 0.0], [0.0, 2.25]]))
    torch.testing.assert_close(new["head"], torch.tensor([1.5]))  # head: sample-weighted mean change
    assert product_norm({A: torch.eye(2), B: torch.tensor([[0.0, 0.0], [0.0, 3.0]])}) == 3.0


def test_flexlora_svd_gives_the_best_low_rank_approximations() -> None:
    torch.manual_seed(0)
    r, out, inp = 4, 6, 5
    g = {A: torch.randn(r, inp), B: torch.zeros(out, r)}
    ranks = {1: 2, 2: 4, 3: 3}
    updates, products, sizes = [], [], {1: 10.0, 2: 20.0, 3: 10.0}
    for c, rk in ranks.items():
        da, db = torch.randn(rk, inp), torch.randn(out, rk)
        a = rank_slice(A, g[A], rk) + da
        b = db  # global B is zero
        products.append(sizes[c] * (b @ a))
        updates.append(ClientUpdate(c, {A: da, B: db}, int(sizes[c])))
    mean = sum(products) / sum(sizes.values())
    new = aggregate_rank_slices(g, updates, ranks, "samples", svd_mix)
    u, s, vh = torch.linalg.svd(mean.double(), full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    torch.testing.assert_close((new[B] @ new[A]).double(), best, atol=1e-5, rtol=1e-5)
    for rk in (1, 2, 3):  # a rank-rk client's truncation is the best rank-rk approximation
        t = truncate_rank(new, rk)
        err = torch.linalg.matrix_norm((t[B] @ t[A]).double() - mean.double())
        assert abs(float(err) - float(s[rk:].square().sum().sqrt())) < 1e-4
    # all singular values in B (B = U S), A = V^T with orthonormal rows, as in the official code
    torch.testing.assert_close(new[B].norm(dim=0).double(), s[:r], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[A] @ new[A].T, torch.eye(r), atol=1e-5, rtol=1e-5)


def test_layer_baselines_allocations() -> None:
    budgets = {0: 3, 1: 4, 2: 6}
    ex = allocate_layers(build_strategy("exclusive", 6, [3, 4, 6], [1, 1, 1]), 1, budgets, 0)
    assert ex == {0: (), 1: (), 2: (0, 1, 2, 3, 4, 5)}
    st = allocate_layers(build_strategy("straggler", 6, [3, 4, 6], [1, 1, 1]), 1, budgets, 0)
    assert set(st.values()) == {(0, 2, 4)}  # weakest budget, uniformly spaced, for everyone
    fedit = allocate_layers(build_strategy("fedit", 6, [3, 4, 6], [1, 1, 1]), 1, budgets, 0)
    assert set(fedit.values()) == {tuple(range(6))}
    profiles = {c: ClientProfile(budget=n, rank=n) for c, n in budgets.items()}
    for m in ("hetlora", "flexlora"):  # rank methods train every layer, at the group's rank
        method = build_method(m, MethodContext(6, [3, 4, 6], [1, 1, 1]))
        plan = method.plan_round(
            RoundInputs(1, profiles, np.random.default_rng(0), lambda _options: np.zeros(6))
        )
        assert {a.layers for a in plan.assignments.values()} == {tuple(range(6))}
        assert {c: a.rank for c, a in plan.assignments.items()} == budgets
