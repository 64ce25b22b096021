"""Fisher-information scores of the LoRA layers (FIM-HLA, SPEC 2.3).

On the server, with the current global model in eval mode and a small labelled proxy set, the
diagonal Fisher of every LoRA tensor is F = mean_n g_n^2, where g_n is the gradient of the
objective for example n with respect to that tensor. Only LoRA tensors get entries: the head and
the frozen base weights are constants here.

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
F over the block's LoRA tensors, SPEC 2.3); "frobenius" sums the Frobenius norms of the
per-tensor F (the released code's reduction, kept as a compatibility option).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from fedhello.data import TokenizedExamples, pad_batch
from fedhello.models import LoraModel

Objective = Literal["log_likelihood", "true_class_logit"]
LabelMode = Literal["empirical", "model"]
Reduction = Literal["sum", "frobenius"]


@dataclass
class FisherOptions:
    """How the Fisher scores are computed; the defaults are the project's (SPEC 2.3)."""

    objective: Objective = "log_likelihood"
    labels: LabelMode = "empirical"
    reduction: Reduction = "sum"
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.objective not in ("log_likelihood", "true_class_logit"):
            raise ValueError(f"FisherOptions.objective: unknown value {self.objective!r}")
        if self.labels not in ("empirical", "model"):
            raise ValueError(f"FisherOptions.labels: unknown value {self.labels!r}")
        if self.reduction not in ("sum", "frobenius"):
            raise ValueError(f"FisherOptions.reduction: unknown value {self.reduction!r}")
        if self.batch_size < 1:
            raise ValueError(f"FisherOptions.batch_size: must be at least 1, got {self.batch_size}")


class HasLayerParams(Protocol):
    """What `layer_scores` needs of a model: the LoRA tensor names of every block."""

    @property
    def layer_params(self) -> list[list[str]]: ...


# --------------------------------------------------------------------------------------------
# shared pieces


@contextmanager
def _fisher_mode(lm: LoraModel) -> Iterator[dict[str, nn.Parameter]]:
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


def _labels(logits: Tensor, data_labels: Tensor, u: Tensor, mode: LabelMode) -> Tensor:
    """The labels the objective uses: the data's, or sampled by inverting the predictive CDF."""
    if mode == "empirical":
        return data_labels.to(logits.device)
    cdf = torch.softmax(logits.detach().double(), dim=-1).cumsum(-1).cpu()
    sampled = (cdf < u[:, None]).sum(-1).clamp_(max=logits.shape[-1] - 1)
    return sampled.to(logits.device)


def _objective(logits: Tensor, labels: Tensor, objective: Objective) -> Tensor:
    """Per-example objective: log p(y|x) or the raw true-class logit."""
    logits = logits.float()
    if objective == "log_likelihood":
        logits = torch.log_softmax(logits, dim=-1)
    return logits.gather(-1, labels[:, None].long()).squeeze(-1)


def _zero_accumulators(lora: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Float64 sums of squared gradients, one per LoRA tensor (float32 sums lose small terms)."""
    return {name: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for name, p in lora.items()}


def _check_indices(indices: np.ndarray) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError("Fisher: the proxy set is empty")
    return idx


def _lora_linears(lm: LoraModel) -> dict[str, nn.Linear]:
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
    lm: LoraModel,
    tokens: TokenizedExamples,
    indices: np.ndarray,
    pad_id: int,
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
    lengths = np.array([len(tokens.input_ids[i]) for i in idx])
    order = np.argsort(lengths, kind="stable")
    with _fisher_mode(lm) as lora:
        acc = _zero_accumulators(lora)
        handles = [m.register_forward_hook(hook) for m in linears.values()]
        try:
            for start in range(0, len(order), options.batch_size):
                pos = order[start : start + options.batch_size]
                chunk = idx[pos]
                batch = pad_batch([tokens.input_ids[i] for i in chunk], tokens.labels[chunk], pad_id)
                input_ids = torch.from_numpy(batch["input_ids"]).to(device)
                mask = torch.from_numpy(batch["attention_mask"]).to(device)
                calls.clear()
                logits = lm.model(input_ids=input_ids, attention_mask=mask).logits
                labels = _labels(logits, torch.from_numpy(batch["labels"]), u[pos], options.labels)
                total = _objective(logits, labels, options.objective).sum()
                outs = [y for _, _, y in calls]
                grads = torch.autograd.grad(total, outs, allow_unused=True)
                _accumulate_batch(acc, calls, grads, mask)
        finally:
            for h in handles:
                h.remove()
            calls.clear()
    return {name: (a / len(idx)).cpu() for name, a in acc.items()}


def _accumulate_batch(
    acc: dict[str, Tensor],
    calls: list[tuple[str, Tensor, Tensor]],
    grads: tuple[Tensor | None, ...],
    mask: Tensor,
) -> None:
    """Add sum_n g_n^2 for this batch, with g_n = sum over calls and tokens of dL/dy (outer) x."""
    batch, seq = mask.shape
    per_example: dict[str, Tensor] = {}
    for (name, x, _), gy in zip(calls, grads, strict=True):
        if gy is None:  # this adapter did not influence the logits
            continue
        x32 = x.float()
        g32 = gy.float()
        if x32.shape[:-1] == (batch, seq):
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
    lm: LoraModel,
    tokens: TokenizedExamples,
    indices: np.ndarray,
    pad_id: int,
    device: torch.device,
    options: FisherOptions | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Same as `fisher_diagonal`, one unpadded forward/backward pass per example (released approach).

    `pad_id` and `options.batch_size` are unused (kept for the common signature).
    """
    options = options or FisherOptions()
    idx = _check_indices(indices)
    u = _uniforms(len(idx), seed)
    with _fisher_mode(lm) as lora:
        names = list(lora)
        tensors = [lora[n] for n in names]
        acc = _zero_accumulators(lora)
        for n, i in enumerate(idx):
            input_ids = torch.from_numpy(np.asarray(tokens.input_ids[i], dtype=np.int64))[None].to(device)
            mask = torch.ones_like(input_ids)
            logits = lm.model(input_ids=input_ids, attention_mask=mask).logits
            data_label = torch.tensor([int(tokens.labels[i])])
            labels = _labels(logits, data_label, u[n : n + 1], options.labels)
            value = _objective(logits, labels, options.objective).sum()
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
    lm: LoraModel,
    tokens: TokenizedExamples,
    indices: np.ndarray,
    pad_id: int,
    device: torch.device,
    options: FisherOptions | None = None,
    seed: int = 0,
    method: Literal["vectorised", "loop"] = "vectorised",
) -> np.ndarray:
    """Layer scores (length L) of the current model on the proxy examples `indices`."""
    options = options or FisherOptions()
    if method == "vectorised":
        fisher = fisher_diagonal(lm, tokens, indices, pad_id, device, options, seed)
    elif method == "loop":
        fisher = fisher_diagonal_loop(lm, tokens, indices, pad_id, device, options, seed)
    else:
        raise ValueError(f"fisher_layer_scores: unknown method {method!r}")
    return layer_scores(lm, fisher, options.reduction)
