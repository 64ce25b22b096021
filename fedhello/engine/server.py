"""The server's side of a round, as small steps any engine can drive.

configure_round -> (clients train, wherever they run) -> aggregate_round -> evaluate_global.
The in-process engine calls these in a loop; a Flower strategy calls the same steps
around its messages, so neither engine re-implements allocation or aggregation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fedhello.engine.client import ClientResult, evaluate, trained_keys
from fedhello.engine.setup import Experiment
from fedhello.method.aggregation import State, aggregate_per_layer, payload_bytes, screen_updates
from fedhello.method.allocation import Allocation, allocate_layers
from fedhello.method.groups import sample_clients


@dataclass
class RoundPlan:
    """Who trains in a round and which layers each trains."""

    round: int
    allocation: Allocation  # client -> layer indices

    @property
    def clients(self) -> list[int]:
        return sorted(self.allocation)


class FederatedServer:
    """Holds the global adapters and turns client results into the next global state."""

    def __init__(self, exp: Experiment, global_state: State | None = None) -> None:
        self.exp = exp
        initial = global_state if global_state is not None else exp.lm.lora_state()
        self.global_state: State = {k: v.detach().cpu().clone() for k, v in initial.items()}

    # -- step 1 ---------------------------------------------------------------------------
    def configure_round(self, round_number: int) -> RoundPlan:
        cfg = self.exp.cfg
        clients = sample_clients(
            cfg.partition.num_clients, cfg.federation.clients_per_round, cfg.seed, round_number
        )
        budgets = {c: self.exp.budget_of(c) for c in clients}
        allocation = allocate_layers(self.exp.strategy, round_number, budgets, cfg.seed)
        return RoundPlan(round_number, allocation)

    def download_state(self) -> State:
        """What a client receives: every adapter (untrained ones still shape its forward pass),
        and the head when the head is federated (a frozen head is re-created from the seed)."""
        if self.exp.train_head:
            return self.global_state
        head = set(self.exp.lm.head_params)
        return {k: v for k, v in self.global_state.items() if k not in head}

    def allowed_keys(self, plan: RoundPlan) -> dict[int, set[str]]:
        return {
            c: set(trained_keys(self.exp.lm, layers, self.exp.train_head))
            for c, layers in plan.allocation.items()
        }

    # -- step 2 ---------------------------------------------------------------------------
    def aggregate_round(self, plan: RoundPlan, results: list[ClientResult]) -> dict[str, Any]:
        """Screen and aggregate the replies; return the round's record (costs per client)."""
        accepted, rejected = screen_updates(
            [r.update for r in results], self.global_state, self.allowed_keys(plan)
        )
        self.global_state = aggregate_per_layer(
            self.global_state, accepted, self.exp.cfg.federation.weighting
        )
        down = payload_bytes(self.download_state())
        clients = []
        for r in results:
            c = r.update.client_id
            clients.append(
                {
                    "client": c,
                    "group": self.exp.groups[int(self.exp.client_group[c])].name,
                    "layers": list(r.layers),
                    "samples": r.update.num_samples,
                    "steps": r.steps,
                    "train_loss": r.train_loss,
                    "seconds": r.seconds,
                    "peak_memory_bytes": r.peak_memory_bytes,
                    "bytes_up": payload_bytes(r.update.deltas),
                    "bytes_down": down,
                    "accepted": c not in rejected,
                }
            )
        return {
            "round": plan.round,
            "clients": clients,
            "rejected": {str(k): v for k, v in rejected.items()},
            "missing": sorted(set(plan.clients) - {r.update.client_id for r in results}),
            "bytes_up": sum(c["bytes_up"] for c in clients),
            "bytes_down": down * len(results),
            "train_seconds": sum(r.seconds for r in results),
        }

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

    def should_evaluate(self, round_number: int) -> bool:
        return round_number % self.exp.cfg.eval.every == 0 or round_number == self.exp.cfg.federation.rounds
