"""Local training of one client on the shared base model.

Both engines train clients through `train_assignment`. A client trains only the LoRA tensors
of its layer set (and the head when the head is trained): those alone require grad, the
optimizer holds only them, and the blocks below the lowest trained one run without autograd,
so a client that trains fewer, higher layers really uses less memory and time. What a method
changes in local training (rank masks, penalties, what is uploaded) comes in as its
`LocalTraining` hooks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fedhello.config import TrainConfig
from fedhello.engine.experiment import Experiment
from fedhello.method.aggregation import ClientUpdate, State
from fedhello.method.base import Assignment, LocalTraining
from fedhello.models import AdaptedModel
from fedhello.models.precision import recomputed_storages_to
from fedhello.privacy import PrivacyAccounting, clip_update, noised
from fedhello.seeding import Stream, derived_seed
from fedhello.tasks import Task, batches


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
    activation_memory_bytes: int = 0  # CPU: the largest step's saved activations (part of the peak)
    timings: dict[str, float] | None = None  # Flower: where a ClientApp's time went (flower/client_app.py)


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

    Both devices report what training adds on top of the model it holds. On CUDA: the
    allocator's peak minus what was allocated when the client started. On CPU, where no
    per-client allocator peak exists, an exact account: activations saved for backward (unique
    storages, parameters excluded), gradients and optimizer state. With activation checkpointing
    the forward pass saves only each checkpointed block's inputs, and the backward pass holds one
    block's recomputed activations at a time: the largest such recomputation is added.
    """

    def __init__(self, device: torch.device, params: Sequence[torch.nn.Parameter]) -> None:
        self.device = device
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.saved: dict[int, int] = {}
        self.recomputed = 0  # the largest block recomputation of this step (checkpointing)
        self.peak = 0
        self.activation_peak = 0
        self.baseline = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.baseline = torch.cuda.memory_allocated(device)

    @contextmanager
    def step(self) -> Iterator[None]:
        self.saved = {}
        self.recomputed = 0
        if self.device.type == "cuda":
            yield
            return

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.param_ptrs:
                self.saved[ptr] = storage.nbytes()
            return t

        def recomputation(live: dict[int, int]) -> None:
            held = sum(n for ptr, n in live.items() if ptr not in self.param_ptrs and ptr not in self.saved)
            self.recomputed = max(self.recomputed, held)

        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            recomputed_storages_to(recomputation),
        ):
            yield

    def record(self, trainable: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - self.baseline)
            return
        grads = sum(p.numel() * p.element_size() for p in trainable)
        states = sum(
            v.numel() * v.element_size()
            for s in optimizer.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )
        activations = sum(self.saved.values()) + self.recomputed
        self.activation_peak = max(self.activation_peak, activations)
        self.peak = max(self.peak, activations + grads + states)


@dataclass
class TrainingSetup:
    """What a client trains this round: the state it starts from, the tensors it trains (names
    and parameters, with the optimizer over them) and the lowest block autograd must reach."""

    start_state: State
    keys: list[str]
    params: dict[str, torch.nn.Parameter]
    optimized: list[torch.nn.Parameter]  # what the optimizer holds (the trained tensors)
    optimizer: torch.optim.Optimizer
    lowest: int


@dataclass
class StepLog:
    """What the step loop measured."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0


def setup_training(
    lm: AdaptedModel,
    received: Mapping[str, torch.Tensor],
    assignment: Assignment,
    cfg: TrainConfig,
    local: LocalTraining,
    train_head: bool,
) -> TrainingSetup:
    """Load what the client received and make exactly its assigned tensors trainable (real
    freezing: the rest do not require grad and the optimizer never sees them)."""
    layers = assignment.layers
    start_state = local.start_state(received, {k: lm.parameter(k).shape for k in received})
    lm.load_lora_state(start_state)
    keys = lm.trained_names(layers, train_head)
    params = dict(lm.model.named_parameters())
    requires = set(keys)
    for name, p in params.items():
        p.requires_grad_(name in requires)
    local.begin({k: params[k] for k in keys})
    trained = [params[k] for k in keys]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lowest = min(layers) if layers else lm.num_layers
    return TrainingSetup(start_state, keys, params, trained, optimizer, lowest)


SetupTraining = Callable[
    [AdaptedModel, Mapping[str, torch.Tensor], Assignment, TrainConfig, LocalTraining, bool], TrainingSetup
]


def run_steps(
    lm: AdaptedModel,
    task: Task,
    batch_source: Iterable[dict[str, torch.Tensor]],
    setup: TrainingSetup,
    local: LocalTraining,
    meter: MemoryMeter,
    max_steps: int | None,
    device: torch.device,
) -> StepLog:
    """The local step loop: loss (+ the method's penalty), backward, AdamW, at most `max_steps`."""
    log = StepLog()
    lm.model.train()
    start = time.perf_counter()
    with no_grad_below(lm.blocks, setup.lowest):
        for batch in batch_source:
            step_start = time.perf_counter()
            batch = {k: v.to(device) for k, v in batch.items()}
            with meter.step():
                loss = task.loss(lm.model, batch)
                penalty = local.penalty()
                objective = loss if penalty is None else loss + penalty
                objective.backward()
            setup.optimizer.step()
            meter.record(setup.optimized, setup.optimizer)
            setup.optimizer.zero_grad(set_to_none=True)
            log.losses.append(float(loss.detach()))  # also waits for the device
            log.step_seconds.append(time.perf_counter() - step_start)
            if max_steps is not None and len(log.losses) >= max_steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    log.seconds = time.perf_counter() - start
    return log


def train_client(
    lm: AdaptedModel,
    task: Task,
    data: object,
    indices: np.ndarray,
    received: Mapping[str, torch.Tensor],
    assignment: Assignment,
    cfg: TrainConfig,
    *,
    local: LocalTraining | None = None,
    train_head: bool,
    seed: int,
    round_number: int,
    device: torch.device,
    batch_source: Iterable[dict[str, torch.Tensor]] | None = None,
    setup_fn: SetupTraining = setup_training,
) -> ClientResult:
    """Train one client from the adapters it received and return the change of what it trained.

    The client trains the LoRA tensors of `assignment.layers` (and the head when `train_head`);
    `local` holds the method's changes to local training (a rank mask, a penalty, what to
    upload; see `fedhello.method.base.LocalTraining`). `batch_source` replaces the client's
    shuffled batches (calibration's probe steps train on one worst-case batch); `setup_fn`
    replaces real freezing (benchmarks/freezing.py measures the released pseudo-freezing).
    """
    local = local or LocalTraining()
    setup = setup_fn(lm, received, assignment, cfg, local, train_head)
    meter = MemoryMeter(device, list(setup.params.values()))
    order = seed_torch(seed, Stream.LOCAL_TRAINING, round_number, assignment.client)
    if batch_source is None:
        batch_source = (
            b for _ in range(cfg.local_epochs) for b in batches(task, data, indices, cfg.batch_size, order)
        )
    log = run_steps(lm, task, batch_source, setup, local, meter, cfg.local_steps, device)
    local.end()
    for p in setup.params.values():
        p.requires_grad_(False)
    method_metrics = local.finish()
    deltas = {k: (setup.params[k].detach() - setup.start_state[k].to(device)).cpu() for k in setup.keys}
    train_loss = float(np.mean(log.losses)) if log.losses else float("nan")
    update = ClientUpdate(
        assignment.client, local.upload(deltas), len(indices), {"train_loss": train_loss} | method_metrics
    )
    return ClientResult(
        update,
        tuple(sorted(assignment.layers)),
        log.seconds,
        meter.peak,
        len(log.losses),
        train_loss,
        log.step_seconds,
        meter.activation_peak,
    )


def train_assignment(
    exp: Experiment, received: State, assignment: Assignment, round_number: int
) -> ClientResult:
    """One client's local training as the round plan assigned it; every engine trains through this."""
    cfg = exp.cfg
    result = train_client(
        exp.adapted,
        exp.task,
        exp.data,
        exp.client_indices[assignment.client],
        received,
        assignment,
        cfg.train,
        local=exp.method.local_training(assignment),
        train_head=exp.train_head,
        seed=cfg.seed,
        round_number=round_number,
        device=exp.device,
    )
    if exp.privacy is not None:
        result = private_result(result, exp.privacy, cfg.seed, round_number)
    return result


def private_result(
    result: ClientResult, privacy: PrivacyAccounting, seed: int, round_number: int
) -> ClientResult:
    """What a client sends under differential privacy (docs/privacy.md): its whole update clipped
    to C (in local mode also noised, by the client itself), a sample count of 1 instead of its
    data size, and no training loss or other metric of its data."""
    u = result.update
    deltas = clip_update(u.deltas, privacy.clip_norm)
    if privacy.mode == "local":
        key = derived_seed(seed, Stream.PRIVACY, round_number, u.client_id + 1)
        deltas = noised(deltas, privacy.noise_std, torch.Generator().manual_seed(key))
    return replace(result, update=ClientUpdate(u.client_id, deltas, 1), train_loss=float("nan"))
