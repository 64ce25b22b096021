"""FlexLoRA (Bai et al., 2024): rank-heterogeneous LoRA aggregated through the SVD of the
averaged full-size products.

Each client trains every layer at its group's rank r_k (`rank.py`). Per adapted module the
server averages the clients' products B_k A_k (weighted by data size), takes the SVD of the mean
W = U S V^T and stores its top-r part as B = U S, A = V^T (all singular values in B, as in the
official code), so a rank-r_k client's truncation is the best rank-r_k approximation of W.
Every client uses the global LoRA scaling alpha/r, so truncation and padding do not rescale
anyone's update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedhello.method.aggregation import ClientUpdate, State, aggregate_per_layer
from fedhello.method.base import Weighting
from fedhello.method.rank import RankHeterogeneous, is_lora_a, partner_b, split_updates
from fedhello.method.registry import register_method


def flexlora_aggregate(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    ranks: Mapping[int, int],
    weighting: Weighting = "samples",
) -> State:
    """The FlexLoRA aggregation described in the module docstring; the head is averaged as in
    every other method."""
    if not updates:
        return {k: v.clone() for k, v in global_state.items()}
    values, heads = split_updates(global_state, updates, ranks)
    sizes = [float(u.num_samples) if weighting == "samples" else 1.0 for u in updates]
    weights = [s / sum(sizes) for s in sizes]
    new_state = aggregate_per_layer(global_state, heads, weighting)
    for name_a in [k for k in values[0] if is_lora_a(k)]:
        name_b = partner_b(name_a)
        mean = sum(
            w * (v[name_b].double() @ v[name_a].double()) for w, v in zip(weights, values, strict=True)
        )
        u, s, vh = torch.linalg.svd(torch.as_tensor(mean), full_matrices=False)
        r = global_state[name_a].shape[0]
        new_state[name_b] = (u[:, :r] * s[:r]).to(global_state[name_b].dtype)
        new_state[name_a] = vh[:r].to(global_state[name_a].dtype)
    return new_state


class FlexLoRA(RankHeterogeneous):
    combine = staticmethod(flexlora_aggregate)


register_method(
    "flexlora",
    lambda ctx: FlexLoRA("flexlora", ctx),
    "FlexLoRA: all layers at group rank r_g, SVD of the averaged products",
)
