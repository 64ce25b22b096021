"""Local training of one client on the shared base model, and evaluation of the global model.

Both engines call these functions. A client trains only the LoRA tensors of its layer set
(and the head when the head is trained): those alone require grad, the optimizer holds only
them, and the blocks below the lowest trained one run without autograd, so a client that
trains fewer, higher layers really uses less memory and time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from fedhello.config import HetLoRAConfig, TrainConfig
from fedhello.data import TokenizedExamples, pad_batch
from fedhello.method.aggregation import ClientUpdate
from fedhello.method.rank import is_lora_a, is_lora_b, rank_slice, tail_norm, tail_start, truncate_rank
from fedhello.models import LoraModel
from fedhello.seeding import Stream, derived_seed


@dataclass
class ClientResult:
    """A client's update plus what it cost."""

    update: ClientUpdate
    layers: tuple[int, ...]
    seconds: float
    peak_memory_bytes: int
    steps: int
    train_loss: float
    step_seconds: list[float] = field(default_factory=list)


def trained_keys(lm: LoraModel, layers: Sequence[int], train_head: bool) -> list[str]:
    """Names of the tensors a client with this layer set trains and uploads."""
    keys = [k for layer in sorted(layers) for k in lm.layer_params[layer]]
    return keys + (list(lm.head_params) if train_head else [])


def seed_torch(seed: int, stream: Stream, *keys: int) -> torch.Generator:
    """Seed torch's global RNG (dropout) and return a generator for data order."""
    s = derived_seed(seed, stream, *keys)
    torch.manual_seed(s)
    g = torch.Generator()
    g.manual_seed(s)
    return g


@contextmanager
def no_grad_below(blocks: Sequence[torch.nn.Module], lowest_trained: int) -> Iterator[None]:
    """Run blocks [0, lowest_trained) without autograd: no graph, no saved activations there."""
    if lowest_trained <= 0:
        yield
        return
    last_frozen = blocks[min(lowest_trained, len(blocks)) - 1]

    def _off(module: torch.nn.Module, args: object) -> None:
        torch.set_grad_enabled(False)

    def _on(module: torch.nn.Module, args: object, output: object) -> None:
        torch.set_grad_enabled(True)

    handles = [blocks[0].register_forward_pre_hook(_off), last_frozen.register_forward_hook(_on)]
    try:
        with torch.enable_grad():  # restores grad mode even if a forward pass fails midway
            yield
    finally:
        for h in handles:
            h.remove()


class MemoryMeter:
    """Peak training memory of a client.

    On CUDA: the allocator's peak. On CPU, where no per-client allocator peak exists, an exact
    account of what training adds on top of the frozen model: activations saved for backward
    (unique storages, parameters excluded), gradients and optimizer state.
    """

    def __init__(self, device: torch.device, params: Sequence[torch.nn.Parameter]) -> None:
        self.device = device
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.saved: dict[int, int] = {}
        self.peak = 0

    @contextmanager
    def step(self) -> Iterator[None]:
        self.saved = {}
        if self.device.type == "cuda":
            yield
            return

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.param_ptrs:
                self.saved[ptr] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def record(self, trainable: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            return
        grads = sum(p.numel() * p.element_size() for p in trainable)
        states = sum(
            v.numel() * v.element_size()
            for s in optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )
        self.peak = max(self.peak, sum(self.saved.values()) + grads + states)


def iterate_batches(
    data: TokenizedExamples, indices: np.ndarray, batch_size: int, order: torch.Generator | None, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of the given examples; shuffled by `order`, or in length order for evaluation."""
    if order is not None:
        idx = indices[torch.randperm(len(indices), generator=order).numpy()]
    else:
        lengths = np.array([len(data.input_ids[i]) for i in indices])
        idx = indices[np.argsort(lengths, kind="stable")]
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        batch = pad_batch([data.input_ids[i] for i in chunk], data.labels[chunk], pad_id)
        yield {k: torch.from_numpy(v) for k, v in batch.items()}


def train_client(
    lm: LoraModel,
    global_state: Mapping[str, torch.Tensor],
    client_id: int,
    layers: Sequence[int],
    data: TokenizedExamples,
    indices: np.ndarray,
    cfg: TrainConfig,
    *,
    train_head: bool,
    seed: int,
    round_index: int,
    pad_id: int,
    device: torch.device,
    rank: int | None = None,
    pruning: HetLoRAConfig | None = None,
) -> ClientResult:
    """Train one client from the global adapters and return the change of what it trained.

    With `rank` (HetLoRA, FlexLoRA) the client holds the adapters truncated to their first
    `rank` components, trains only those and uploads only those slices. With `pruning`
    (HetLoRA self-pruning) a penalty on the tail components is added to the loss, and if the
    tail's norm shrank during training the client prunes it (uploads zeros there) and reports
    the smaller rank it will use from now on.
    """
    if rank is not None:
        global_state = truncate_rank(global_state, rank)
    lm.load_lora_state(global_state)
    keys = trained_keys(lm, layers, train_head)
    params = dict(lm.model.named_parameters())
    if cfg.freezing == "real":
        requires = set(keys)
        lowest = min(layers) if layers else lm.num_layers
    else:  # released pseudo-freezing: every adapter trains, untrained ones at learning rate 0
        requires = set(trained_keys(lm, range(lm.num_layers), train_head))
        lowest = 0
    for name, p in params.items():
        p.requires_grad_(name in requires)
    trainable = [params[k] for k in keys]
    lora = {k: params[k] for k in keys if is_lora_a(k) or is_lora_b(k)}
    prune = pruning if rank is not None and pruning is not None and pruning.self_pruning else None
    with torch.no_grad():
        tail_before = float(tail_norm(lora, rank, prune.gamma)) if prune and rank else 0.0
    hooks = [] if rank is None else [params[k].register_hook(_rank_mask(k, rank)) for k in keys]
    groups: list[dict[str, object]] = [{"params": trainable}]
    if cfg.freezing == "lr0":
        groups.append({"params": [params[k] for k in sorted(requires - set(keys))], "lr": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    meter = MemoryMeter(device, list(params.values()))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    order = seed_torch(seed, Stream.LOCAL_TRAINING, round_index, client_id)
    lm.model.train()
    losses: list[float] = []
    step_seconds: list[float] = []
    steps = 0
    budget = cfg.local_steps
    start = time.perf_counter()
    with no_grad_below(lm.blocks, lowest):
        for _ in range(cfg.local_epochs):
            for batch in iterate_batches(data, indices, cfg.batch_size, order, pad_id):
                step_start = time.perf_counter()
                batch = {k: v.to(device) for k, v in batch.items()}
                with meter.step():
                    loss = lm.model(**batch).loss
                    objective = loss
                    if prune and rank:
                        objective = loss + prune.regularization * tail_norm(lora, rank, prune.gamma)
                    objective.backward()
                optimizer.step()
                meter.record([p for g in groups for p in g["params"]], optimizer)  # type: ignore[attr-defined]
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))  # also waits for the device
                step_seconds.append(time.perf_counter() - step_start)
                steps += 1
                if budget is not None and steps >= budget:
                    break
            if budget is not None and steps >= budget:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for h in hooks:
        h.remove()
    for p in params.values():
        p.requires_grad_(False)
    new_rank = rank
    with torch.no_grad():
        faded = (
            prune is not None and rank is not None and float(tail_norm(lora, rank, prune.gamma)) < tail_before
        )
    if faded and prune and rank:
        new_rank = max(prune.min_rank, tail_start(rank, prune.gamma))
        with torch.no_grad():
            for k, p in lora.items():
                (p[new_rank:rank] if is_lora_a(k) else p[:, new_rank:rank]).zero_()

    deltas = {k: (params[k].detach() - global_state[k].to(device)).cpu() for k in keys}
    if rank is not None:
        deltas = {k: rank_slice(k, d, rank).contiguous() for k, d in deltas.items()}
    train_loss = float(np.mean(losses)) if losses else float("nan")
    metrics = {"train_loss": train_loss} | ({} if new_rank is None else {"rank": float(new_rank)})
    update = ClientUpdate(client_id, deltas, len(indices), metrics)
    return ClientResult(update, tuple(sorted(layers)), seconds, meter.peak, steps, train_loss, step_seconds)


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


@torch.inference_mode()
def evaluate(
    lm: LoraModel,
    state: Mapping[str, torch.Tensor],
    data: TokenizedExamples,
    indices: np.ndarray,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the model with these adapters on the given examples."""
    lm.load_lora_state(state)
    lm.model.eval()
    correct, loss_sum = 0, 0.0
    for batch in iterate_batches(data, indices, batch_size, None, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    n = max(len(indices), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n}
