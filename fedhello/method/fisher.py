"""Fisher-information scores of the LoRA layers (FIM-HLA; docs/method.md, "Fisher scores").

On the server, with the current global model in eval mode and a small labelled proxy set, the
diagonal Fisher of every LoRA tensor is F = mean_n g_n^2, where g_n is the gradient of the
objective for example n with respect to that tensor. Only LoRA tensors get entries: the head and
the frozen base weights are constants here.

The per-example objective comes from the task (`Task.fisher_objective`); for classification:

Objective (`FisherOptions.objective`):
- "log_likelihood" (default): log p(y_n | x_n), the log-softmax of the true class;
- "true_class_logit": the raw logit z_{y_n}(x_n), what the released code differentiated.

Labels (`FisherOptions.labels`):
- "empirical" (default): y_n from the data (the empirical Fisher);
- "model": y_n sampled from the model's own predictive distribution (the true Fisher). The
  sampling uses one uniform draw per proxy example, all drawn up front from a `torch.Generator`
  seeded with `seed`, in the order of `indices`, and inverted through the example's predictive
  CDF. Both implementations below therefore sample the same labels for the same seed.

Two implementations with the same signature:
- `fisher_diagonal` (vectorised): one forward and one backward pass per batch of the summed
  objective. Every LoRA tensor is the weight of an `nn.Linear` (peft's `lora_A`/`lora_B`, no
  bias), so its per-example gradient is sum_t dL/dy[n, t] (outer) x[n, t]: forward hooks capture
  each LoRA linear's input x and output y, `torch.autograd.grad` returns dL/dy for all of them
  at once, and an einsum over the token axis forms the per-example gradients. This is exact
  because examples in a batch do not interact (eval mode, attention masks), and the LoRA scaling
  and dropout (inactive in eval mode) sit outside `lora_B`/inside its input, so they are included
  automatically. Padded positions are masked out with the attention mask (their output gradient
  is zero anyway when the mask is honoured; the mask makes it certain).
  Why not torch.func (vmap over grad): transformers builds attention masks with data-dependent
  Python control flow (e.g. skipping an all-ones mask), which vmap cannot trace, and that code
  changes between model families and versions; the hook method needs nothing from the model but
  that the LoRA linears are called as modules, which is how peft's vanilla LoRA works.
- `fisher_diagonal_loop`: one forward and backward pass per example, unpadded (the released
  approach); the reference the vectorised one is tested against.

`layer_scores` reduces the per-tensor Fisher to one score per block: "sum" is the trace (sum of
F over the block's LoRA tensors); "frobenius" sums the Frobenius norms of the
per-tensor F (the released code's reduction, kept as a compatibility option).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Protocol

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from fedhello.config import StrictModel
from fedhello.models import AdaptedModel
from fedhello.tasks import Task

Reduction = Literal["sum", "frobenius"]


def rounds_value(v: int | float | None, minimum: int) -> int | float | None:
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, float) and not 0 < v <= 1:
        raise ValueError("a fraction of the rounds must be in (0, 1]; use an int for a round count")
    if isinstance(v, int) and v < minimum:
        raise ValueError(f"a round count must be at least {minimum}")
    return v


class FisherOptions(StrictModel):
    """The options of the Fisher-driven methods (`fedhello`, `fim`): their schedule, and how the
    server scores layers on the proxy set (`data.proxy_size` / `data.proxy_path`). Also read from
    the `fisher:` section of older configs."""

    warmup_rounds: int | float | None = Field(
        None,
        description="W: rounds of prior sampling first (int, or fraction of rounds); null = method default.",
    )
    refresh_every: int | float | None = Field(
        None,
        description="E: recompute Fisher scores every E rounds (int, or fraction); null = method default.",
    )
    hold: Literal["persist_probs", "persist_allocation", "single_round"] = Field(
        "persist_probs",
        description="Between refreshes: keep the Fisher probabilities, keep the drawn layer sets, or use "
        "Fisher on the refresh round only (released code).",
    )
    prior_product: bool = Field(False, description="Sample from prior x Fisher probabilities (renormalised).")
    num_levels: int = Field(3, ge=1, description="Importance levels from 1-D k-means of the layer scores.")
    levels: Literal["ordered", "released"] = Field(
        "ordered", description="Levels by cluster centroid, or the released code's unordered k-means labels."
    )
    levels_over: Literal["all_layers", "feasible"] = Field(
        "all_layers",
        description="Importance levels from the scores of every layer, or (with device budgets) from those "
        "of the blocks each client may train, so that its draw tells its own feasible blocks apart.",
    )
    objective: Literal["log_likelihood", "true_class_logit"] = Field(
        "log_likelihood", description="Differentiate log p(y|x), or the raw true-class logit (released)."
    )
    labels: Literal["empirical", "model"] = Field(
        "empirical",
        description="Labels from the data (empirical Fisher) or sampled from the model (true Fisher).",
    )
    reduction: Literal["sum", "frobenius"] = Field(
        "sum",
        description="Layer score: sum of the diagonal Fisher, or sum of per-tensor Frobenius norms (released).",
    )
    computation: Literal["vectorised", "loop"] = Field(
        "vectorised", description="Batched per-sample gradients, or one backward pass per example (released)."
    )
    batch_size: int = Field(32, ge=1)

    @field_validator("warmup_rounds")
    @classmethod
    def _warmup(cls, v: int | float | None) -> int | float | None:
        return rounds_value(v, 0)

    @field_validator("refresh_every")
    @classmethod
    def _refresh(cls, v: int | float | None) -> int | float | None:
        return rounds_value(v, 1)


class HasLayerParams(Protocol):
    """What `layer_scores` needs of a model: the LoRA tensor names of every block."""

    @property
    def layer_params(self) -> list[list[str]]: ...


# --------------------------------------------------------------------------------------------
# shared pieces


@contextmanager
def _fisher_mode(lm: AdaptedModel) -> Iterator[dict[str, nn.Parameter]]:
    """Eval mode, gradients on the LoRA tensors only; restore every flag and mode afterwards."""
    params = dict(lm.model.named_parameters())
    lora = {name: params[name] for name in lm.lora_params}
    requires = {name: p.requires_grad for name, p in params.items()}
    modes = [(m, m.training) for m in lm.model.modules()]
    try:
        lm.model.eval()
        for name, p in params.items():
            p.requires_grad_(name in lora)
        with torch.enable_grad():
            yield lora
    finally:
        for name, p in params.items():
            p.requires_grad_(requires[name])
        for module, training in modes:
            module.training = training


def _uniforms(n: int, seed: int) -> Tensor:
    """One uniform per proxy example (in `indices` order) for sampling labels from the model."""
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64)


def _zero_accumulators(lora: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Float64 sums of squared gradients, one per LoRA tensor (float32 sums lose small terms)."""
    return {name: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for name, p in lora.items()}


def _check_indices(indices: np.ndarray) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("Fisher: the proxy set is empty")
    return idx


def _lora_linears(lm: AdaptedModel) -> dict[str, nn.Linear]:
    """LoRA tensor name -> the bias-free nn.Linear whose weight it is."""
    lora = set(lm.lora_params)
    found: dict[str, nn.Linear] = {}
    for mname, module in lm.model.named_modules():
        wname = f"{mname}.weight"
        if wname in lora and isinstance(module, nn.Linear) and module.bias is None:
            found[wname] = module
    missing = sorted(lora - set(found))
    if missing:
        raise ValueError(
            "Fisher (vectorised): only LoRA on linear layers without bias is supported; "
            f"not a bias-free nn.Linear weight: {missing[:3]} (use method='loop')"
        )
    return found


# --------------------------------------------------------------------------------------------
# implementations


def fisher_diagonal(
    lm: AdaptedModel,
    task: Task,
    data: Any,
    indices: np.ndarray,
    device: torch.device,
    options: FisherOptions | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Diagonal Fisher of every LoRA tensor, vectorised per batch (see the module docstring).

    Returns float64 CPU tensors shaped like the parameters, keyed by the names of
    `lm.model.named_parameters()` (exactly `lm.lora_params`).
    """
    options = options or FisherOptions()
    idx = _check_indices(indices)
    u = _uniforms(len(idx), seed)
    linears = _lora_linears(lm)
    module_name = {id(m): name for name, m in linears.items()}
    calls: list[tuple[str, Tensor, Tensor]] = []  # (param name, input x, output y) per call

    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        calls.append((module_name[id(module)], args[0].detach(), output))

    # Batch examples of similar length together (less padding); positions map back to `u`.
    order = np.argsort(task.lengths(data)[idx], kind="stable")
    with _fisher_mode(lm) as lora:
        acc = _zero_accumulators(lora)
        handles = [m.register_forward_hook(hook) for m in linears.values()]
        try:
            for start in range(0, len(order), options.batch_size):
                pos = order[start : start + options.batch_size]
                batch = {k: v.to(device) for k, v in task.collate(data, idx[pos]).items()}
                calls.clear()
                total = task.fisher_objective(lm.model, batch, options, u[pos]).sum()
                outs = [y for _, _, y in calls]
                grads = torch.autograd.grad(total, outs, allow_unused=True)
                _accumulate_batch(acc, calls, grads, batch.get("attention_mask"))
        finally:
            for h in handles:
                h.remove()
            calls.clear()
    return {name: (a / len(idx)).cpu() for name, a in acc.items()}


def _accumulate_batch(
    acc: dict[str, Tensor],
    calls: list[tuple[str, Tensor, Tensor]],
    grads: tuple[Tensor | None, ...],
    mask: Tensor | None,
) -> None:
    """Add sum_n g_n^2 for this batch, with g_n = sum over calls and tokens of dL/dy (outer) x."""
    per_example: dict[str, Tensor] = {}
    for (name, x, _), gy in zip(calls, grads, strict=True):
        if gy is None:  # this adapter did not influence the logits
            continue
        x32 = x.float()
        g32 = gy.float()
        batch = x32.shape[0] if mask is None else mask.shape[0]
        if mask is not None and x32.shape[:-1] == mask.shape:
            g32 = g32 * mask[..., None].to(g32.dtype)
        if x32.shape[0] != batch:
            raise ValueError(f"Fisher (vectorised): '{name}' input is not batch-first: {tuple(x.shape)}")
        x32 = x32.reshape(batch, -1, x32.shape[-1])
        g32 = g32.reshape(batch, -1, g32.shape[-1])
        g = torch.einsum("bto,bti->boi", g32, x32)
        per_example[name] = per_example[name] + g if name in per_example else g
    for name, g in per_example.items():
        acc[name] += g.double().square().sum(0)


def fisher_diagonal_loop(
    lm: AdaptedModel,
    task: Task,
    data: Any,
    indices: np.ndarray,
    device: torch.device,
    options: FisherOptions | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Same as `fisher_diagonal`, one unpadded forward/backward pass per example (released approach).

    `options.batch_size` is unused (kept for the common signature).
    """
    options = options or FisherOptions()
    idx = _check_indices(indices)
    u = _uniforms(len(idx), seed)
    with _fisher_mode(lm) as lora:
        names = list(lora)
        tensors = [lora[n] for n in names]
        acc = _zero_accumulators(lora)
        for n, i in enumerate(idx):
            batch = {k: v.to(device) for k, v in task.collate(data, [i]).items()}
            value = task.fisher_objective(lm.model, batch, options, u[n : n + 1]).sum()
            grads = torch.autograd.grad(value, tensors, allow_unused=True)
            for name, g in zip(names, grads, strict=True):
                if g is not None:
                    acc[name] += g.double().square()
    return {name: (a / len(idx)).cpu() for name, a in acc.items()}


# --------------------------------------------------------------------------------------------
# scores


def layer_scores(lm: HasLayerParams, fisher: dict[str, Tensor], reduction: Reduction = "sum") -> np.ndarray:
    """One score per block from the per-tensor Fisher.

    "sum": s_l = sum of F over all of block l's LoRA tensors (the trace of the block's diagonal
    Fisher). "frobenius": s_l = sum over block l's LoRA tensors of ||F_tensor||_F (released code).
    """
    if reduction not in ("sum", "frobenius"):
        raise ValueError(f"layer_scores: unknown reduction {reduction!r}")
    scores = np.zeros(len(lm.layer_params), dtype=np.float64)
    for layer, names in enumerate(lm.layer_params):
        for name in names:
            if name not in fisher:
                raise KeyError(f"layer_scores: no Fisher entry for '{name}' (block {layer})")
            f = fisher[name].detach().double()
            scores[layer] += float(f.sum()) if reduction == "sum" else float(torch.linalg.vector_norm(f))
    return scores


def fisher_layer_scores(
    lm: AdaptedModel,
    task: Task,
    data: Any,
    indices: np.ndarray,
    device: torch.device,
    options: FisherOptions | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Layer scores (length L) of the current model on the proxy examples `indices`;
    `options.computation` picks the vectorised or the per-example implementation."""
    options = options or FisherOptions()
    if options.computation == "vectorised":
        fisher = fisher_diagonal(lm, task, data, indices, device, options, seed)
    elif options.computation == "loop":
        fisher = fisher_diagonal_loop(lm, task, data, indices, device, options, seed)
    else:
        raise ValueError(f"fisher_layer_scores: unknown computation {options.computation!r}")
    return layer_scores(lm, fisher, options.reduction)
