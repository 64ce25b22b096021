"""The server's side of a round, as small steps any engine can drive.

configure_round -> (clients train, wherever they run) -> aggregate_round -> evaluate_global.
The in-process engine calls these in a loop; a Flower strategy calls the same steps
around its messages, so neither engine re-implements allocation or aggregation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhello.engine.client import ClientResult, evaluate, trained_keys
from fedhello.engine.setup import Experiment
from fedhello.method.aggregation import State, aggregate_per_layer, payload_bytes, screen_updates
from fedhello.method.allocation import Allocation, FisherAllocation, SampledAllocation, allocate_layers
from fedhello.method.fisher import FisherOptions, fisher_layer_scores
from fedhello.method.groups import sample_clients
from fedhello.method.methods import method_spec
from fedhello.method.rank import flexlora_aggregate, hetlora_aggregate, rank_slice
from fedhello.seeding import Stream, derived_seed


@dataclass
class RoundPlan:
    """Who trains in a round and which layers each trains."""

    round: int
    allocation: Allocation  # client -> layer indices (empty: the client sits this round out)
    ranks: dict[int, int | None]  # client -> LoRA rank for rank-heterogeneous methods, else None
    probabilities: list[float] | None = None  # per-layer sampling probabilities, for sampled methods
    fisher: dict[str, Any] | None = None  # the Fisher refresh made for this round, if any

    @property
    def clients(self) -> list[int]:
        """The clients that train this round."""
        return sorted(c for c, layers in self.allocation.items() if layers)

    @property
    def idle(self) -> list[int]:
        """Sampled clients with nothing to train (Exclusive: budget below L); not failures."""
        return sorted(c for c, layers in self.allocation.items() if not layers)


class FederatedServer:
    """Holds the global adapters and turns client results into the next global state."""

    def __init__(self, exp: Experiment, global_state: State | None = None) -> None:
        self.exp = exp
        initial = global_state if global_state is not None else exp.lm.lora_state()
        self.global_state: State = {k: v.detach().cpu().clone() for k, v in initial.items()}
        self.client_ranks: dict[int, int] = {}  # ranks that clients pruned themselves to (HetLoRA)

    # -- step 1 ---------------------------------------------------------------------------
    def configure_round(self, round_number: int) -> RoundPlan:
        cfg = self.exp.cfg
        clients = sample_clients(
            cfg.partition.num_clients, cfg.federation.clients_per_round, cfg.seed, round_number
        )
        budgets = {c: self.exp.budget_of(c) for c in clients}
        strategy = self.exp.strategy
        fisher = None
        if isinstance(strategy, FisherAllocation) and strategy.needs_scores(round_number):
            start = time.perf_counter()
            scores = self.fisher_scores(round_number)
            fisher = strategy.update_scores(round_number, scores)
            fisher["seconds"] = time.perf_counter() - start
        allocation = allocate_layers(strategy, round_number, budgets, cfg.seed)
        probabilities = None
        if isinstance(strategy, FisherAllocation):
            probabilities = [float(x) for x in strategy.probabilities(round_number)]
        elif isinstance(strategy, SampledAllocation):
            probabilities = [float(x) for x in strategy.probabilities]
        ranks = {c: self.client_ranks.get(c, self.exp.rank_of(c)) for c in clients}
        return RoundPlan(round_number, allocation, ranks, probabilities, fisher)

    def fisher_scores(self, round_number: int) -> np.ndarray:
        """Layer scores of the current global model on the proxy set (SPEC 2.3)."""
        exp, f = self.exp, self.exp.cfg.fisher
        exp.lm.load_lora_state(self.global_state)
        options = FisherOptions(f.objective, f.labels, f.reduction, f.batch_size)
        return fisher_layer_scores(
            exp.lm,
            exp.tokens,
            exp.splits["proxy"],
            exp.pad_id,
            exp.device,
            options,
            seed=derived_seed(exp.cfg.seed, Stream.FISHER, round_number),
            method=f.computation,
        )

    def download_state(self) -> State:
        """What a client receives: every adapter (untrained ones still shape its forward pass),
        and the head when the head is federated (a frozen head is re-created from the seed)."""
        if self.exp.train_head:
            return self.global_state
        head = set(self.exp.lm.head_params)
        return {k: v for k, v in self.global_state.items() if k not in head}

    @staticmethod
    def client_download(download: State, rank: int | None) -> State:
        """What one client receives: everything, or only its rank slices under HetLoRA/FlexLoRA."""
        if rank is None:
            return download
        return {k: rank_slice(k, v, rank) for k, v in download.items()}

    @classmethod
    def download_bytes(cls, download: State, rank: int | None) -> int:
        return payload_bytes(cls.client_download(download, rank))

    def expected_shapes(self, plan: RoundPlan) -> dict[int, dict[str, tuple[int, ...]]]:
        """For each client, the tensors it may send and their shapes (rank slices under HetLoRA/FlexLoRA)."""
        out = {}
        for c in plan.clients:
            keys = trained_keys(self.exp.lm, plan.allocation[c], self.exp.train_head)
            rank = plan.ranks[c]
            out[c] = {
                k: tuple(
                    self.global_state[k].shape
                    if rank is None
                    else rank_slice(k, self.global_state[k], rank).shape
                )
                for k in keys
            }
        return out

    # -- step 2 ---------------------------------------------------------------------------
    def aggregate_round(self, plan: RoundPlan, results: list[ClientResult]) -> dict[str, Any]:
        """Screen and aggregate the replies; return the round's record (costs per client)."""
        accepted, rejected = screen_updates(
            [r.update for r in results], self.global_state, self.expected_shapes(plan)
        )
        weighting = self.exp.cfg.federation.weighting
        aggregation = method_spec(self.exp.cfg.method).aggregation
        if aggregation == "per_layer":
            self.global_state = aggregate_per_layer(self.global_state, accepted, weighting)
        else:
            ranks = {c: int(r) for c, r in plan.ranks.items() if r is not None}
            rank_aggregate = hetlora_aggregate if aggregation == "hetlora" else flexlora_aggregate
            self.global_state = rank_aggregate(self.global_state, accepted, ranks, weighting)
            for u in accepted:
                if "rank" in u.metrics and int(u.metrics["rank"]) < ranks[u.client_id]:
                    self.client_ranks[u.client_id] = int(u.metrics["rank"])
        download = self.download_state()
        clients = []
        for r in results:
            c = r.update.client_id
            clients.append(
                {
                    "client": c,
                    "group": self.exp.groups[int(self.exp.client_group[c])].name,
                    "layers": list(r.layers),
                    "rank": plan.ranks.get(c),
                    "samples": r.update.num_samples,
                    "steps": r.steps,
                    "train_loss": r.train_loss,
                    "seconds": r.seconds,
                    "peak_memory_bytes": r.peak_memory_bytes,
                    "bytes_up": payload_bytes(r.update.deltas),
                    "bytes_down": self.download_bytes(download, plan.ranks.get(c)),
                    "accepted": c not in rejected,
                }
            )
        record: dict[str, Any] = {
            "round": plan.round,
            "clients": clients,
            "rejected": {str(k): v for k, v in rejected.items()},
            "missing": sorted(set(plan.clients) - {r.update.client_id for r in results}),
            "idle": plan.idle,
            "bytes_up": sum(c["bytes_up"] for c in clients),
            "bytes_down": sum(c["bytes_down"] for c in clients),
            "train_seconds": sum(r.seconds for r in results),
        }
        if plan.probabilities is not None:
            record["probabilities"] = plan.probabilities
        if plan.fisher is not None:
            record["fisher"] = plan.fisher
        return record

    # -- step 3 ---------------------------------------------------------------------------
    def evaluate_global(self) -> dict[str, float]:
        exp = self.exp
        start = time.perf_counter()
        out: dict[str, float] = {}
        for split in ("val", "test"):
            m = evaluate(
                exp.lm,
                self.global_state,
                exp.tokens,
                exp.splits[split],
                exp.cfg.eval.batch_size,
                exp.pad_id,
                exp.device,
            )
            out[f"{split}_accuracy"] = m["accuracy"]
            out[f"{split}_loss"] = m["loss"]
        out["eval_seconds"] = time.perf_counter() - start
        return out

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume besides the adapters: the strategy's Fisher probabilities,
        and the ranks clients pruned themselves to."""
        strategy_state = getattr(self.exp.strategy, "state_dict", None)
        return {
            "strategy": strategy_state() if strategy_state is not None else {},
            "client_ranks": {str(c): r for c, r in self.client_ranks.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load = getattr(self.exp.strategy, "load_state_dict", None)
        if load is not None and state.get("strategy"):
            load(state["strategy"])
        self.client_ranks = {int(c): int(r) for c, r in state.get("client_ranks", {}).items()}

    def should_evaluate(self, round_number: int) -> bool:
        return round_number % self.exp.cfg.eval.every == 0 or round_number == self.exp.cfg.federation.rounds
