"""The server's side of a round, as small steps any engine can drive.

configure_round -> (clients train, wherever they run) -> aggregate_round -> evaluate_global.
The shared round loop (`loop.py`) calls these; what differs between methods is behind the
method's hooks (`fedhello/method/base.py`), and what differs between tasks behind the task's
(`fedhello/tasks/base.py`), so nothing here branches on either.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fedhello.engine.client import ClientResult
from fedhello.engine.experiment import Experiment
from fedhello.method.aggregation import State, payload_bytes, screen_updates
from fedhello.method.base import Assignment, RoundInputs, RoundPlan
from fedhello.method.fisher import fisher_layer_scores
from fedhello.method.groups import sample_clients
from fedhello.records import ClientRecord, RoundRecord
from fedhello.seeding import Stream, derived_seed, numpy_rng


class FederatedServer:
    """Holds the global adapters and turns client results into the next global state."""

    def __init__(self, exp: Experiment, global_state: State | None = None) -> None:
        self.exp = exp
        self.method = exp.method
        initial = global_state if global_state is not None else exp.lm.lora_state()
        self.global_state: State = {k: v.detach().cpu().clone() for k, v in initial.items()}

    # -- step 1 ---------------------------------------------------------------------------
    def configure_round(self, round_number: int) -> RoundPlan:
        """Sample the round's clients and let the method assign what each trains."""
        cfg = self.exp.cfg
        clients = sample_clients(
            cfg.partition.num_clients, cfg.federation.clients_per_round, cfg.seed, round_number
        )
        inputs = RoundInputs(
            round_number,
            profiles={c: self.exp.profile(c) for c in clients},
            rng=numpy_rng(cfg.seed, Stream.ALLOCATION, round_number),
            layer_scores=lambda: self.fisher_scores(round_number),
        )
        return self.method.plan_round(inputs)

    def fisher_scores(self, round_number: int) -> np.ndarray:
        """Layer scores of the current global model on the proxy set (docs/method.md, "Fisher scores")."""
        exp = self.exp
        exp.lm.load_lora_state(self.global_state)
        return fisher_layer_scores(
            exp.lm,
            exp.task,
            exp.data,
            exp.splits["proxy"],
            exp.device,
            exp.cfg.fisher,
            seed=derived_seed(exp.cfg.seed, Stream.FISHER, round_number),
        )

    def download_state(self) -> State:
        """What every client may receive: every adapter (untrained ones still shape its forward
        pass), and the head when the head is federated (a frozen head is re-created from the seed)."""
        if self.exp.train_head:
            return self.global_state
        head = set(self.exp.lm.head_params)
        return {k: v for k, v in self.global_state.items() if k not in head}

    def client_download(self, assignment: Assignment) -> State:
        """What one client receives (the method decides: everything, or rank slices)."""
        return self.method.download(self.download_state(), assignment)

    def upload_shapes(self, plan: RoundPlan) -> dict[int, dict[str, tuple[int, ...]]]:
        """For each client, the tensors it may send and their shapes."""
        out = {}
        for c in plan.clients:
            a = plan.assignments[c]
            keys = self.exp.lm.trained_names(a.layers, self.exp.train_head)
            out[c] = self.method.upload_shapes(self.global_state, keys, a)
        return out

    # -- step 2 ---------------------------------------------------------------------------
    def aggregate_round(self, plan: RoundPlan, results: list[ClientResult]) -> RoundRecord:
        """Screen and aggregate the replies; return the round's record (costs per client)."""
        accepted, rejected = screen_updates(
            [r.update for r in results], self.global_state, self.upload_shapes(plan)
        )
        self.global_state = self.method.aggregate(
            self.global_state, accepted, plan, self.exp.cfg.federation.weighting
        )
        clients = []
        for r in results:
            c = r.update.client_id
            a = plan.assignments[c]
            clients.append(
                ClientRecord(
                    client=c,
                    group=self.exp.group_of(c).name,
                    layers=list(r.layers),
                    rank=a.rank,
                    samples=r.update.num_samples,
                    steps=r.steps,
                    train_loss=r.train_loss,
                    seconds=r.seconds,
                    peak_memory_bytes=r.peak_memory_bytes,
                    bytes_up=payload_bytes(r.update.deltas),
                    bytes_down=payload_bytes(self.client_download(a)),
                    accepted=c not in rejected,
                )
            )
        return RoundRecord(
            round=plan.round_number,
            clients=clients,
            rejected={str(k): v for k, v in rejected.items()},
            missing=sorted(set(plan.clients) - {r.update.client_id for r in results}),
            idle=plan.idle,
            bytes_up=sum(c.bytes_up for c in clients),
            bytes_down=sum(c.bytes_down for c in clients),
            train_seconds=sum(r.seconds for r in results),
            primary_metric=self.exp.task.primary_metric,
            probabilities=plan.probabilities,
            fisher=plan.fisher,
        )

    # -- step 3 ---------------------------------------------------------------------------
    def evaluate_global(self) -> tuple[dict[str, dict[str, float]], float]:
        """The task's metrics of the global model on validation and test, and the seconds it took."""
        exp = self.exp
        start = time.perf_counter()
        exp.lm.load_lora_state(self.global_state)
        metrics = {
            split: exp.task.evaluate(
                exp.lm.model, exp.data, exp.splits[split], exp.cfg.eval.batch_size, exp.device
            )
            for split in ("val", "test")
        }
        return metrics, time.perf_counter() - start

    def should_evaluate(self, round_number: int) -> bool:
        every, rounds = self.exp.cfg.eval.every, self.exp.cfg.federation.rounds
        return round_number % every == 0 or round_number == rounds

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume besides the adapters: the method's own state."""
        return {"method": self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "method" in state:
            self.method.load_state_dict(state["method"])
        else:  # checkpoints written before the method interface
            self.method.load_state_dict(
                {**state.get("strategy", {}), "client_ranks": state.get("client_ranks", {})}
            )
