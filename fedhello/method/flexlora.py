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

import torch

from fedhello.method.aggregation import State
from fedhello.method.base import Updates, Weighting
from fedhello.method.rank import RankHeterogeneous, is_lora_a, partner_b
from fedhello.method.registry import register_method


def svd_mix(state: State, values: list[State], updates: Updates, weighting: Weighting) -> State:
    """Per module: the SVD of the weighted mean of the full-size products B_k A_k, top-r part
    stored as B = U S, A = V^T (see the module docstring)."""
    sizes = [float(u.num_samples) if weighting == "samples" else 1.0 for u in updates]
    weights = [s / sum(sizes) for s in sizes]
    out = {}
    for name_a in [k for k in values[0] if is_lora_a(k)]:
        name_b = partner_b(name_a)
        mean = sum(
            w * (v[name_b].double() @ v[name_a].double()) for w, v in zip(weights, values, strict=True)
        )
        u, s, vh = torch.linalg.svd(torch.as_tensor(mean), full_matrices=False)
        r = state[name_a].shape[0]
        out[name_b] = (u[:, :r] * s[:r]).to(state[name_b].dtype)
        out[name_a] = vh[:r].to(state[name_a].dtype)
    return out


class FlexLoRA(RankHeterogeneous):
    mix = staticmethod(svd_mix)


register_method(
    "flexlora",
    lambda ctx: FlexLoRA("flexlora", ctx),
    "FlexLoRA: all layers at group rank r_g, SVD of the averaged products",
)
