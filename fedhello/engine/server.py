"""The server's side of a round, as small steps any engine can drive.

configure_round -> (clients train, wherever they run) -> aggregate_round -> evaluate_global.
The shared round loop (`loop.py`) calls these; what differs between methods is behind the
method's hooks (`fedhello/method/base.py`), and what differs between tasks behind the task's
(`fedhello/tasks/base.py`), so nothing here branches on either.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedhello.engine.client import ClientResult
from fedhello.engine.experiment import Experiment
from fedhello.errors import UserError
from fedhello.method.aggregation import (
    ClientUpdate,
    Expected,
    NormBound,
    State,
    non_finite_tensors,
    payload_bytes,
    screen_updates,
)
from fedhello.method.base import Assignment, RoundInputs, RoundPlan
from fedhello.method.budgets import Cost
from fedhello.method.fisher import FisherOptions, fisher_layer_scores
from fedhello.method.groups import poisson_sample_clients, sample_clients
from fedhello.privacy.mechanism import clip_update, planned_coverage, private_mean
from fedhello.privacy.secagg import (
    WEIGHT,
    RoundLayout,
    SecAggParams,
    SkippedRound,
    full_update,
    secure_layout,
    secure_round,
)
from fedhello.records import ClientRecord, RoundRecord
from fedhello.seeding import Stream, derived_seed, numpy_rng

log = logging.getLogger(__name__)


class FederatedServer:
    """Holds the global adapters and turns client results into the next global state."""

    def __init__(self, exp: Experiment, global_state: State | None = None) -> None:
        self.exp = exp
        self.method = exp.method
        initial = (
            global_state
            if global_state is not None
            else exp.adapted.lora_state(with_base=self.method.changes_base)
        )
        self.global_state: State = {k: v.detach().cpu().clone() for k, v in initial.items()}
        self.secure_stats: dict[str, float] | None = None  # the last secure round's messages, bytes, seconds
        # (round, unmasked result): what an engine that ran the protocol itself (Flower) left here
        self.secure_result: tuple[int, dict[str, np.ndarray] | SkippedRound] | None = None
        fed = exp.cfg.federation
        self.norm_bound: NormBound | None = (
            None
            if fed.norm_bound == "none"
            else NormBound(fed.norm_bound, fed.norm_bound_factor, fed.norm_bound_max)
        )

    # -- step 1 ---------------------------------------------------------------------------
    def configure_round(self, round_number: int) -> RoundPlan:
        """Sample the round's clients and let the method assign what each trains."""
        cfg = self.exp.cfg
        privacy = self.exp.privacy
        if privacy is not None and privacy.mode == "central":
            # the accountant's sampling: each client independently (docs/privacy.md)
            clients = poisson_sample_clients(
                cfg.partition.num_clients, privacy.sample_rate, cfg.seed, round_number
            )
        else:
            clients = sample_clients(
                cfg.partition.num_clients, cfg.federation.clients_per_round, cfg.seed, round_number
            )
        inputs = RoundInputs(
            round_number,
            profiles={c: self.exp.profile(c) for c in clients},
            rng=numpy_rng(cfg.seed, Stream.ALLOCATION, round_number),
            layer_scores=functools.partial(self.fisher_scores, round_number),
        )
        return self.method.plan_round(inputs)

    def fisher_scores(self, round_number: int, options: FisherOptions) -> np.ndarray:
        """Layer scores of the current global model on the proxy set, as the method's Fisher
        options say (docs/method.md, "Fisher scores")."""
        exp = self.exp
        exp.adapted.load_lora_state(self.global_state)
        return fisher_layer_scores(
            exp.adapted,
            exp.task,
            exp.data,
            exp.splits["proxy"],
            exp.device,
            options,
            seed=derived_seed(exp.cfg.seed, Stream.FISHER, round_number),
        )

    def download_state(self) -> State:
        """What every client may receive: every adapter (untrained ones still shape its forward
        pass), and the head when the head is federated (a frozen head is re-created from the seed)."""
        if self.exp.train_head:
            return self.global_state
        head = set(self.exp.adapted.head_params)
        return {k: v for k, v in self.global_state.items() if k not in head}

    def client_download(self, assignment: Assignment) -> State:
        """What one client receives (the method decides: everything, or rank slices)."""
        return self.method.download(self.download_state(), assignment)

    def upload_shapes(self, plan: RoundPlan) -> dict[int, dict[str, tuple[int, ...]]]:
        """For each client, the tensors it may send and their shapes."""
        out = {}
        for c in plan.clients:
            a = plan.assignments[c]
            keys = self.exp.adapted.trained_names(a.layers, self.exp.train_head)
            out[c] = self.method.upload_shapes(self.global_state, keys, a)
        return out

    def expected_updates(self, plan: RoundPlan) -> dict[int, Expected]:
        """What each sampled client may send: its allocated tensors and at most its partition's size."""
        return {
            c: Expected(shapes, len(self.exp.client_indices[c]))
            for c, shapes in self.upload_shapes(plan).items()
        }

    # -- step 2 ---------------------------------------------------------------------------
    def aggregate_round(self, plan: RoundPlan, results: list[ClientResult]) -> RoundRecord:
        """Screen and aggregate the replies; return the round's record (costs per client).

        A rejected update is left out and its reason recorded; a round whose every update is
        rejected leaves the global model as it was."""
        if self.secure_result is not None and self.secure_result[0] == plan.round_number:
            # the engine ran the protocol (Flower): no plain update reached the server, the masked
            # inputs' slots and shapes were checked as they came (privacy/secagg.py)
            self.global_state = self.aggregate(plan, [])
            return self.round_record(plan, results, {})
        accepted, rejected = self.screen(plan, results)
        if accepted or (self.central_privacy and plan.clients):  # the noise is added in any case
            self.global_state = self.aggregate(plan, accepted)
        elif results:
            log.warning(
                "round %d: every update was rejected; the global model is unchanged", plan.round_number
            )
        return self.round_record(plan, results, rejected)

    def screen(
        self, plan: RoundPlan, results: list[ClientResult]
    ) -> tuple[list[ClientUpdate], dict[int, str]]:
        """The updates that pass the reliability rules (shapes, counts, finiteness, the method's
        own check, the norm bound), and the reason each other one was rejected."""

        def method_check(update: ClientUpdate) -> str | None:
            return self.method.check_update(update, plan.assignments[update.client_id])

        accepted, rejected = screen_updates(
            [r.update for r in results], self.global_state, self.expected_updates(plan), method_check
        )
        if self.norm_bound is not None:
            accepted, too_large = self.norm_bound.apply(accepted)
            rejected.update(too_large)
        if self.exp.privacy is not None:  # clients clipped already; a dishonest one is clipped here
            clip = self.exp.privacy.clip_norm
            accepted = [replace(u, deltas=clip_update(u.deltas, clip)) for u in accepted]
        return accepted, rejected

    def aggregate(self, plan: RoundPlan, accepted: list[ClientUpdate]) -> State:
        """The next global state, by the method's rule. A state that would hold NaN or inf is
        never adopted: the run stops with a one-line error naming the round and the clients
        (the last checkpoint, of the previous round, stays as it is). Under central differential
        privacy the rule is the noised mean of the clipped updates instead (`private_aggregate`)."""
        if self.secure:
            new_state = self.secure_aggregate(plan, accepted)
        elif self.central_privacy:
            new_state = self.private_aggregate(plan, accepted)
        else:
            new_state = self.method.aggregate(
                self.global_state, accepted, plan, self.exp.cfg.federation.weighting
            )
        broken = non_finite_tensors(new_state)
        if broken:
            r_no = plan.round_number
            senders = sorted(u.client_id for u in accepted if broken[0] in u.deltas)
            raise UserError(
                f"round {r_no}: aggregating the updates of clients {senders} makes '{broken[0]}' "
                f"non-finite ({len(broken)} tensors); the checkpoint keeps round {r_no - 1}; "
                "rerun with federation.norm_bound"
            )
        return new_state

    @property
    def secure(self) -> bool:
        return self.exp.cfg.secure_aggregation.enabled

    def secure_aggregate(self, plan: RoundPlan, accepted: list[ClientUpdate]) -> State:
        """Secure aggregation (docs/privacy.md): the clients run SecAgg+ per tensor with the server,
        which learns only each tensor's weighted sum and summed weight. The Flower engine runs the
        protocol as message rounds and leaves its result in `secure_result`; in process, both
        sides run here, in memory (`secure_round`) on the accepted updates."""
        if self.secure_result is not None and self.secure_result[0] == plan.round_number:
            return self.apply_secure(plan, self.secure_result[1])
        cfg = self.exp.cfg
        params, layout = self.secure_setup(plan, [u.client_id for u in accepted])
        shapes = {k: tuple(v.shape) for k, v in self.global_state.items()}
        updates = {u.client_id: full_update(u.deltas, shapes, self.method.to_full) for u in accepted}
        weights = {u.client_id: self.secure_weight(u.num_samples) for u in accepted}
        current = {k: np.zeros(shape) for k, shape in shapes.items()}
        start = time.perf_counter()
        result, traffic = secure_round(
            params,
            layout,
            updates,
            weights,
            current,
            lambda c: derived_seed(cfg.seed, Stream.SECURE_AGGREGATION, plan.round_number, c),
        )
        self.secure_stats = {**traffic, "seconds": time.perf_counter() - start}
        return self.apply_secure(plan, result)

    def secure_weight(self, num_samples: float) -> int:
        """A client's integer weight in the secure mean (its sample count, or 1 under uniform weighting)."""
        return int(num_samples) if self.exp.cfg.federation.weighting == "samples" else 1

    def secure_setup(self, plan: RoundPlan, clients: list[int]) -> tuple[SecAggParams, RoundLayout]:
        """The round's public protocol settings and layout, for the clients that trained: the
        bound on a tensor's summed weight is their partitions' sizes (1 each when uniform)."""
        shapes = self.upload_shapes(plan)
        layout = secure_layout({c: shapes[c] for c in clients}, self.global_state)
        bound = sum(self.secure_weight(len(self.exp.client_indices[c])) for c in clients)
        s = self.exp.cfg.secure_aggregation
        return SecAggParams(
            s.threshold, s.neighbours, s.clipping_range, s.field_bits, max(1, bound), s.limbs
        ), layout

    def apply_secure(self, plan: RoundPlan, result: dict[str, np.ndarray] | SkippedRound) -> State:
        """The next state from the unmasked means: the current one plus each mean (under central
        privacy: plus the noised sum over the planned contributors); a round the server could not
        unmask (too few neighbours answered) leaves the state as it was."""
        if isinstance(result, SkippedRound):
            if self.secure_stats is not None:
                self.secure_stats["skipped"] = 1
            log.warning("round %d: %s", plan.round_number, result.describe())
            return {k: v.clone() for k, v in self.global_state.items()}
        out = {k: v.clone() for k, v in self.global_state.items()}
        privacy = self.exp.privacy if self.central_privacy else None
        noise = torch.Generator().manual_seed(
            derived_seed(self.exp.cfg.seed, Stream.PRIVACY, plan.round_number, 0)
        )
        shapes = self.upload_shapes(plan)
        coverage = planned_coverage(shapes, self.global_state, self.method.to_full) if privacy else {}
        sent = {k for k in result if not k.endswith(WEIGHT)}
        for name in sorted(sent | set(coverage)):  # under central privacy every planned tensor is noised
            zero = torch.zeros(self.global_state[name].shape, dtype=torch.float64)
            step = torch.from_numpy(result[name]) if name in sent else zero
            if privacy is not None:  # the sum (weights are 1 under DP), noised, over the planned contributors
                total = step * torch.from_numpy(result[name + WEIGHT]) if name in sent else zero
                total += torch.randn(total.shape, generator=noise, dtype=torch.float64) * privacy.noise_std
                step = torch.where(coverage[name] > 0, total / coverage[name].clamp(min=1.0), 0.0)
            out[name] = (self.global_state[name].double() + step).to(self.global_state[name].dtype)
        return out

    @property
    def central_privacy(self) -> bool:
        return self.exp.privacy is not None and self.exp.privacy.mode == "central"

    def private_aggregate(self, plan: RoundPlan, accepted: list[ClientUpdate]) -> State:
        """Central differential privacy (docs/privacy.md): per coordinate, the sum of the clipped
        updates plus N(0, (z C)^2), divided by how many clients the round's plan assigned to it."""
        privacy = self.exp.privacy
        assert privacy is not None
        coverage = planned_coverage(self.upload_shapes(plan), self.global_state, self.method.to_full)
        noise = torch.Generator().manual_seed(
            derived_seed(self.exp.cfg.seed, Stream.PRIVACY, plan.round_number, 0)
        )
        return private_mean(
            self.global_state, accepted, coverage, privacy.noise_std, noise, self.method.to_full
        )

    def round_record(
        self, plan: RoundPlan, results: list[ClientResult], rejected: dict[int, str]
    ) -> RoundRecord:
        """The round's record: every sampled client's costs, the rejections, the method's extra."""
        sampled = set(plan.clients)
        clients = [
            self.client_record(plan.assignments[r.update.client_id], r, r.update.client_id not in rejected)
            for r in results
            if r.update.client_id in sampled  # another client's reply: only its rejection is recorded
        ]
        return RoundRecord(
            round=plan.round_number,
            clients=clients,
            rejected={str(k): v for k, v in rejected.items()},
            missing=sorted(sampled - {r.update.client_id for r in results}),
            idle=plan.idle,
            bytes_up=sum(c.bytes_up for c in clients),
            bytes_down=sum(c.bytes_down for c in clients),
            train_seconds=sum(r.seconds for r in results),
            primary_metric=self.exp.task.primary_metric,
            probabilities=plan.probabilities,
            epsilon=None if self.exp.privacy is None else self.exp.privacy.epsilon(plan.round_number),
            extras=(
                {}
                if plan.extra is None
                else {plan.extra.kind: plan.extra.model_dump(mode="json", exclude_none=True)}
            )
            | ({} if self.secure_stats is None else {"secure_aggregation": dict(self.secure_stats)}),
        )

    def client_record(self, a: Assignment, r: ClientResult, accepted: bool) -> ClientRecord:
        c = r.update.client_id
        bytes_up = payload_bytes(r.update.deltas)
        samples = int(r.update.num_samples) if accepted else 0
        if self.secure:  # the server sees masked int64 tensors in global shapes, and no sample count
            keys = self.exp.adapted.trained_names(a.layers, self.exp.train_head)
            bytes_up, samples = 8 * sum(self.global_state[k].numel() for k in keys), 0
        return ClientRecord(
            client=c,
            group=self.exp.group_of(c).name,
            layers=list(r.layers),
            rank=a.rank,
            samples=samples,
            steps=r.steps,
            train_loss=None if self.exp.privacy is not None else r.train_loss,  # not sent under DP
            seconds=r.seconds,
            peak_memory_bytes=r.peak_memory_bytes,
            bytes_up=bytes_up,
            bytes_down=payload_bytes(self.client_download(a)),
            accepted=accepted,
            timings=r.timings,
            **self.budget_fields(c, r, a, bytes_up),
        )

    def budget_fields(
        self, client: int, result: ClientResult, a: Assignment, bytes_up: int
    ) -> dict[str, Any]:
        """With a cost model: the client's predicted worst case, its frozen model's bytes, and the
        budgets its measured cost exceeded (time as its device would take it: measured / speed)."""
        exp = self.exp
        predicted = exp.predicted_cost(client, result.layers, a.rank)
        if exp.costs is None or predicted is None:
            return {}
        device = exp.group_of(client).device_budget
        measured = Cost(
            exp.costs.model_bytes,
            result.peak_memory_bytes,
            result.seconds / max(1, result.steps),
            result.steps,
            bytes_up,
            device.speed,
        )
        return {
            "model_memory_bytes": exp.costs.model_bytes,
            "predicted_memory_bytes": predicted.memory_bytes,
            "predicted_seconds": predicted.seconds,
            "over_budget": measured.over(device),
        }

    # -- step 3 ---------------------------------------------------------------------------
    def evaluate_global(self) -> tuple[dict[str, dict[str, float]], float]:
        """The task's metrics of the global model on validation and test, and the seconds it took."""
        exp = self.exp
        start = time.perf_counter()
        exp.adapted.load_lora_state(self.global_state)
        metrics = {
            split: exp.task.evaluate(
                exp.adapted.model, exp.data, exp.splits[split], exp.cfg.eval.batch_size, exp.device
            )
            for split in ("val", "test")
        }
        return metrics, time.perf_counter() - start

    def should_evaluate(self, round_number: int) -> bool:
        every, rounds = self.exp.cfg.eval.every, self.exp.cfg.federation.rounds
        return round_number % every == 0 or round_number == rounds

    def state_dict(self) -> dict[str, Any]:
        """What must survive a resume besides the adapters: the method's own state (and the
        norm bound's history of accepted norms)."""
        state: dict[str, Any] = {"method": self.method.state_dict()}
        if self.norm_bound is not None:
            state["norm_history"] = self.norm_bound.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.norm_bound is not None:
            self.norm_bound.load_state_dict(state.get("norm_history", {}))
        if "method" in state:
            self.method.load_state_dict(state["method"])
        else:  # checkpoints written before the method interface
            self.method.load_state_dict(
                {**state.get("strategy", {}), "client_ranks": state.get("client_ranks", {})}
            )
