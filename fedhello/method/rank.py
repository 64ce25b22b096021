"""Rank heterogeneity (HetLoRA, FlexLoRA): clients train every layer at their own LoRA rank.

The global adapters have the full rank r. A client of rank r_k starts from them truncated to
their first r_k components (rows of A, columns of B), trains only those, and uploads only
those slices; the server zero-pads them back to r. Plain functions over {name: tensor} dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedhello.method.aggregation import ClientUpdate, State, aggregate_per_layer


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


def truncate_rank(state: Mapping[str, torch.Tensor], rank: int) -> State:
    """The global adapters as a rank-`rank` client sees them: components >= rank set to zero."""
    return {k: pad_rank(k, rank_slice(k, v, rank).clone(), v.shape) for k, v in state.items()}


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


def _split(
    global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], ranks: Mapping[int, int]
) -> tuple[list[dict[str, torch.Tensor]], list[ClientUpdate]]:
    """Each client's full-size LoRA values (zero-padded), and its non-LoRA (head) deltas."""
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


def product_norm(values: Mapping[str, torch.Tensor]) -> float:
    """||B A||_F over all adapted modules together: sqrt(sum over modules of ||B_m A_m||_F^2)."""
    total = 0.0
    for name, a in values.items():
        if is_lora_a(name):
            total += float(torch.linalg.matrix_norm(values[partner_b(name)].double() @ a.double()) ** 2)
    return total**0.5


def hetlora_aggregate(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    ranks: Mapping[int, int],
    weighting: str = "samples",
) -> State:
    """HetLoRA: zero-padded LoRA values averaged with weights proportional to each client's
    ||B_k A_k||_F (normalised to sum 1); the head is averaged as in every other method."""
    if not updates:
        return {k: v.clone() for k, v in global_state.items()}
    values, heads = _split(global_state, updates, ranks)
    norms = [product_norm(v) for v in values]
    total = sum(norms)
    weights = [n / total for n in norms] if total > 0 else [1.0 / len(values)] * len(values)
    new_state = aggregate_per_layer(global_state, heads, weighting)  # type: ignore[arg-type]
    for name in values[0]:
        mix = sum(w * v[name].double() for w, v in zip(weights, values, strict=True))
        new_state[name] = torch.as_tensor(mix).to(global_state[name].dtype)
    return new_state


def flexlora_aggregate(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    ranks: Mapping[int, int],
    weighting: str = "samples",
) -> State:
    """FlexLoRA: per module, average the full-size products B_k A_k (weighted by data size),
    take the SVD of the mean W = U S V^T and store its top-r part as B = U S, A = V^T (all singular
    values in B, as in the official code), so a rank-r_k client's truncation is the best rank-r_k
    approximation of W. Every client uses the global LoRA scaling alpha/r, so truncation and
    padding do not rescale anyone's update."""
    if not updates:
        return {k: v.clone() for k, v in global_state.items()}
    values, heads = _split(global_state, updates, ranks)
    sizes = [float(u.num_samples) if weighting == "samples" else 1.0 for u in updates]
    weights = [s / sum(sizes) for s in sizes]
    new_state = aggregate_per_layer(global_state, heads, weighting)  # type: ignore[arg-type]
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
