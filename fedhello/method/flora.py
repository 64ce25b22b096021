"""FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976): stacking instead of averaging, merged
into the base every round.

Each client trains every layer at its group's rank r_k (`rank.py`, as HetLoRA's groups set
the ranks), starting from fresh adapters (B = 0). FLoRA stacks the clients' modules, B = [B_1
... B_K] and A = [p_1 A_1; ...; p_K A_K], so that B A = sum_k p_k B_k A_k exactly, whatever the
ranks (averaging A and B separately is not exact: the mean of products is not the product of
means). The server never needs the stacked adapter itself: it merges the update into the
frozen base of every adapted linear,

    W <- W + s * sum_k p_k B_k A_k,   p_k = n_k / sum_j n_j (or 1/K with uniform weighting),

and every client of the next round restarts from fresh adapters on the merged base. s is the
LoRA scaling every client trained with: all clients share peft's alpha / r (a rank-r_k client
trains the first r_k components of the rank-r adapter), so each product is scaled exactly as
the client's own forward pass scaled it. The released code's heterogeneous mode rescaled the
stacked adapter by alpha over the stacked rank instead (ATP-1010/FederatedLLM issue #16);
`tests/test_flora.py` checks the merge against each client's own function.

What this costs and where it differs from the paper (docs/baselines.md): clients here hold no
state between rounds, so a client downloads the merged base weights of the adapted linears
(not the round's stacked adapter, which only a client that took part in every round could
apply); the export of a FLoRA run is the merged model, since no adapter represents it.
"""

from __future__ import annotations

import math

import torch

from fedhello.method.aggregation import State
from fedhello.method.base import RoundPlan, Updates, Weighting
from fedhello.method.rank import RankHeterogeneous, aggregate_rank_slices, is_lora_a, partner_b
from fedhello.method.registry import register_method
from fedhello.models.lora import base_weight_name
from fedhello.seeding import Stream, derived_seed


def merged_update(values: list[State], weights: list[float], name_a: str, scaling: float) -> torch.Tensor:
    """s * sum_k p_k B_k A_k for one adapted module, in float64, over the clients whose values
    hold it (their zero-padded A_k, B_k; p_k: `weights` normalised over those clients)."""
    name_b = partner_b(name_a)
    held = [(w, v) for w, v in zip(weights, values, strict=True) if name_a in v]
    total = sum(w for w, _ in held)
    delta = torch.zeros(held[0][1][name_b].shape[0], held[0][1][name_a].shape[1], dtype=torch.float64)
    for w, v in held:
        delta += (w / total) * (v[name_b].double() @ v[name_a].double())
    return scaling * delta


def fresh_adapters(state: State, seed: int, round_number: int) -> State:
    """The adapters the next round's clients start from: every lora_A drawn as peft draws it
    (Kaiming-uniform, a = sqrt(5)) from the round's own stream, every lora_B zero."""
    generator = torch.Generator().manual_seed(derived_seed(seed, Stream.FRESH_ADAPTERS, round_number))
    out = {}
    for name_a in sorted(k for k in state if is_lora_a(k)):
        a = torch.empty_like(state[name_a])
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        out[name_a] = a
        out[partner_b(name_a)] = torch.zeros_like(state[partner_b(name_a)])
    return out


class FLoRA(RankHeterogeneous):
    """Rank-heterogeneous clients, the stacked update merged into the base every round."""

    changes_base = True

    def central_privacy_refusal(self) -> str | None:
        return "flora merges the products B_k A_k of individual clients, not a sum of clipped updates"

    def aggregate(self, state: State, updates: Updates, plan: RoundPlan, weighting: Weighting) -> State:
        ranks = {c: int(a.rank) for c, a in plan.assignments.items() if a.rank is not None}

        def merge(state: State, values: list[State], updates: Updates, weighting: Weighting) -> State:
            weights = [float(u.num_samples) if weighting == "samples" else 1.0 for u in updates]
            out = fresh_adapters(state, self.ctx.seed, plan.round_number)
            for name_a in sorted({k for v in values for k in v if is_lora_a(k)}):
                base = base_weight_name(name_a)
                delta = merged_update(values, weights, name_a, self.ctx.lora_scaling)
                out[base] = (state[base].double() + delta).to(state[base].dtype)
            return out

        return aggregate_rank_slices(state, updates, ranks, weighting, merge)


register_method(
    "flora",
    lambda ctx: FLoRA("flora", ctx),
    "FLoRA: all layers at group rank r_g, stacked update merged into the base each round",
)
