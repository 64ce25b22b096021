"""The Flower engine's server side against hostile SuperNodes, without Flower processes: a fake
Grid answers queries and TRAIN messages with real (and tampered) ClientApp replies."""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedhello import load_config
from fedhello.engine.experiment import Experiment, prepare_experiment
from fedhello.engine.server import FederatedServer
from fedhello.errors import UserError
from fedhello.flower.client_app import query_reply, train_message
from fedhello.flower.server_app import FlowerTrainer
from fedhello.flower.wire import encode_reply, pack_tensors, unpack_tensors

Tamper = Callable[[RecordDict], RecordDict | None]


class Reply:
    def __init__(self, node: int, content: RecordDict | None = None, error: str | None = None) -> None:
        self.metadata = SimpleNamespace(src_node_id=node, reply_to_message_id="")
        self.content = content
        self.error = SimpleNamespace(reason=error)

    def has_error(self) -> bool:
        return self.error.reason is not None


class FakeGrid:
    """Nodes 100+i hold partition claims[i]; TRAIN replies are the real ClientApp's, then tampered.

    Queries are pushed and pulled as on a real Grid: a node in `slow` answers its query only at
    the pull numbered slow[node]; a node in `silent_from` sends no TRAIN reply from that round on."""

    def __init__(
        self,
        exp: Experiment,
        claims: dict[int, Any],
        tamper: dict[int, Tamper] | None = None,
        *,
        slow: dict[int, int] | None = None,
        silent_from: dict[int, int] | None = None,
    ) -> None:
        self.exp, self.claims, self.tamper = exp, claims, tamper or {}
        self.slow, self.silent_from = slow or {}, silent_from or {}
        self.extra: list[Reply] = []
        self.queued: dict[str, Message] = {}
        self.pulls = 0

    def get_node_ids(self) -> list[int]:
        return list(self.claims)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = message_id = f"query-{len(self.queued)}-{uuid.uuid4()}"
            self.queued[message_id] = m
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Any]:
        self.pulls += 1
        replies = []
        for message_id in message_ids:
            m = self.queued.get(message_id)
            if m is None or self.slow.get(m.metadata.dst_node_id, 0) > self.pulls:
                continue
            del self.queued[message_id]
            reply = self._answer_query(m)
            reply.metadata.reply_to_message_id = message_id
            replies.append(reply)
        return replies

    def _answer_query(self, m: Message) -> Reply:
        node = m.metadata.dst_node_id
        claim = self.claims[node]
        if isinstance(claim, dict):  # a node config: answered by the real ClientApp query
            return Reply(node, query_reply(claim, m.content))
        if claim == "error":
            return Reply(node, error="ClientApp crashed")
        return Reply(node, RecordDict({"config": ConfigRecord({"partition-id": claim})}))

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Any]:
        replies: list[Any] = []
        for m in messages:
            node = m.metadata.dst_node_id
            if int(m.content["config"]["round"]) >= self.silent_from.get(node, 10**9):  # type: ignore[arg-type]
                continue
            content = encode_reply(train_message(self.exp, m.content, None))
            content = self.tamper.get(node, lambda c: c)(content)
            if content is not None:
                replies.append(Reply(node, content))
        return replies + self.extra


@pytest.fixture(autouse=True)
def run_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's Message needs the id of the run it belongs to, as inside a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture
def exp(tiny_overrides: Callable[..., list[str]]) -> Experiment:
    cfg = load_config(
        None,
        tiny_overrides(
            "method=rgd-bottleneck", "flower.connect_timeout=0.5", "federation.clients_per_round=4"
        ),
    )
    return prepare_experiment(cfg)


def _without(key: str) -> Tamper:
    return lambda c: RecordDict({k: v for k, v in c.items() if k != key})


def _with(c: RecordDict, key: str, record: Any) -> RecordDict:
    """The reply `c` with its record `key` replaced."""
    return RecordDict({**dict(c.items()), key: record})


def _layout(edit: Callable[[list[Any]], list[Any]]) -> Tamper:
    """A reply whose tensor layout is edited (the packed arrays unchanged)."""

    def tamper(c: RecordDict) -> RecordDict:
        layout = json.loads(str(c["layout"]["tensors"]))  # type: ignore[index]
        return _with(c, "layout", ConfigRecord({"tensors": json.dumps(edit(layout))}))

    return tamper


def _examples(n: float) -> Tamper:
    """A reply that reports `n` training examples."""
    return lambda c: _with(c, "metrics", MetricRecord({**dict(c["metrics"]), "num-examples": n}))  # type: ignore[arg-type]


def _claims(client: int) -> Tamper:
    """A reply that claims to come from `client`."""
    return lambda c: _with(c, "config", ConfigRecord({**dict(c["config"]), "client": client}))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_without("arrays"), "malformed reply: 'arrays' missing"),
        (_without("metrics"), "malformed reply: 'metrics' missing"),
        (_without("layout"), "malformed reply: 'layout' missing"),
        (_layout(lambda t: [*t, t[0]]), "malformed reply: layout: tensor"),
        (_layout(lambda t: [[t[0][0], t[0][1], [10**6]], *t[1:]]), "shorter than the layout"),
        (_layout(lambda t: t[1:]), "longer than the layout"),
        (_layout(lambda t: [[t[0][0], "int64", t[0][2]], *t[1:]]), "is not [name, dtype, shape]"),
        (_examples(math.nan), "sample count nan is not a whole number"),
        (_examples(-5), "non-positive sample count -5"),
        (_examples(math.inf), "sample count inf is not a whole number"),
        (_claims(5), "the reply claims client 5"),
    ],
    ids=[
        "no arrays",
        "no metrics",
        "no layout",
        "a tensor twice",
        "layout longer than the arrays",
        "layout shorter than the arrays",
        "unknown dtype",
        "nan examples",
        "negative examples",
        "infinite examples",
        "claims another client",
    ],
)
def test_a_malformed_reply_is_rejected_and_the_rest_aggregated(
    exp: Experiment, tamper: Tamper, reason: str
) -> None:
    server = FederatedServer(exp)
    plan = server.configure_round(1)
    victim = plan.clients[0]
    grid = FakeGrid(exp, {100 + p: p for p in range(exp.cfg.partition.num_clients)}, {100 + victim: tamper})
    grid.extra = [Reply(999, RecordDict())]  # a node that was sent nothing this round
    results = FlowerTrainer(grid, exp)(plan, server)  # type: ignore[arg-type]
    before = {k: v.clone() for k, v in server.global_state.items()}
    record = server.aggregate_round(plan, results)
    assert reason in record.rejected[str(victim)]
    assert sorted(c.client for c in record.clients) == sorted(plan.clients)

    # the global model is the aggregate of the valid replies alone
    reference = FederatedServer(exp, before)
    honest = [r for r in results if r.update.client_id != victim]
    expected = reference.aggregate_round(plan, honest)
    assert expected.rejected == {}
    for k in before:
        torch.testing.assert_close(server.global_state[k], reference.global_state[k], atol=0, rtol=0)


def test_a_reply_with_tensors_outside_its_allocation_is_rejected(exp: Experiment) -> None:
    server = FederatedServer(exp)
    plan = server.configure_round(1)
    victim = next(c for c in plan.clients if len(plan.assignments[c].layers) < exp.num_layers)
    allowed = server.upload_shapes(plan)[victim]
    other = next(k for k in server.global_state if k not in allowed)  # a layer the victim does not train

    def tamper(c: RecordDict) -> RecordDict:
        tensors = unpack_tensors(c["arrays"], c["layout"])  # type: ignore[arg-type]
        tensors[other] = torch.zeros_like(server.global_state[other])
        arrays, layout = pack_tensors(tensors)
        return _with(_with(c, "arrays", arrays), "layout", layout)

    grid = FakeGrid(exp, {100 + p: p for p in range(exp.cfg.partition.num_clients)}, {100 + victim: tamper})
    record = server.aggregate_round(plan, FlowerTrainer(grid, exp)(plan, server))  # type: ignore[arg-type]
    assert f"tensor '{other}' is outside the client's allocation" in record.rejected[str(victim)]
    assert set(record.rejected) == {str(victim)}


def test_discovery_refuses_second_claims_and_foreign_partitions_and_logs_errors(
    exp: Experiment, caplog: pytest.LogCaptureFixture
) -> None:
    claims: dict[int, Any] = {100 + p: p for p in range(exp.cfg.partition.num_clients)}
    claims[200] = 0  # a second node claiming partition 0
    claims[201] = 999  # a partition that is not part of this federation
    claims[202] = "error"  # a ClientApp that fails to answer
    trainer = FlowerTrainer(FakeGrid(exp, claims), exp)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        trainer.discover(set(range(exp.cfg.partition.num_clients)))
    assert trainer.nodes == {p: 100 + p for p in range(exp.cfg.partition.num_clients)}
    assert "node 200 claims partition 0, already held by node 100; refused" in caplog.text
    assert "node 201 claims partition 999" in caplog.text
    assert "node 202: ClientApp crashed" in caplog.text
    assert {200, 201} <= trainer.refused


@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Discovery polls every 10 ms and names slow nodes every 0.1 s (the test's clock)."""
    import fedhello.flower.server_app as server_app

    monkeypatch.setattr(server_app, "QUERY_POLL_SECONDS", 0.01)
    monkeypatch.setattr(server_app, "SLOW_NOTE_SECONDS", 0.1)


def test_simulation_discovery_waits_for_slow_nodes_not_for_a_clock(
    exp: Experiment, fast_polls: None, caplog: pytest.LogCaptureFixture
) -> None:
    # nodes 100 and 101 answer only after ~200 polls (about 2 s), 4x flower.connect_timeout=0.5 s
    claims: dict[int, Any] = {100 + p: p for p in range(exp.cfg.partition.num_clients)}
    slow = {100: 200, 101: 200}
    wanted = set(range(exp.cfg.partition.num_clients))

    simulated = FlowerTrainer(FakeGrid(exp, claims, slow=slow), exp, simulated=True)  # type: ignore[arg-type]
    simulated.discover(wanted)
    assert simulated.nodes == {p: 100 + p for p in wanted}

    deployed = FlowerTrainer(FakeGrid(exp, claims, slow=slow), exp)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        deployed.discover(wanted)  # a deployment waits at most connect_timeout, naming the slow nodes
    assert set(deployed.nodes) == wanted - {0, 1}
    assert deployed.undiscovered == {0, 1}
    assert "waiting for partitions [0, 1]: nodes [100, 101] have not answered" in caplog.text


def test_too_few_replies_end_the_run_in_one_line_and_it_resumes(
    tiny_overrides: Callable[..., list[str]], tmp_path: Path
) -> None:
    from fedhello.engine.local import local_trainer
    from fedhello.engine.loop import run_federation

    cfg = load_config(None, tiny_overrides("method=rgd-bottleneck", "federation.rounds=3"))
    claims: dict[int, Any] = {100 + p: p for p in range(cfg.partition.num_clients)}
    every_node_silent = dict.fromkeys(claims, 2)  # no TRAIN reply from round 2 on
    run_dir = tmp_path / "run"

    def failing(exp: Experiment) -> FlowerTrainer:
        grid = FakeGrid(exp, claims, silent_from=every_node_silent)
        return FlowerTrainer(grid, exp, simulated=True, run_dir=run_dir)  # type: ignore[arg-type]

    with pytest.raises(UserError) as failure:
        run_federation(cfg, run_dir, failing)
    line = str(failure.value)
    assert "\n" not in line
    assert line.startswith("round 2: 0 replies, fewer than flower.min_replies=1; missing clients [")
    assert "sent no reply within flower.round_timeout" in line
    assert "raise flower.round_timeout (now 600 s)" in line
    assert f"fedhello run --resume --out {run_dir} continues" in line

    def healthy(exp: Experiment) -> FlowerTrainer:
        return FlowerTrainer(FakeGrid(exp, claims), exp, simulated=True)  # type: ignore[arg-type]

    run_federation(cfg, run_dir, healthy, resume=True)
    run_federation(cfg, tmp_path / "local", local_trainer)
    resumed, local = ((d / "metrics.jsonl").read_text().splitlines() for d in (run_dir, tmp_path / "local"))
    assert len(resumed) == 3
    for a, b in zip(resumed, local, strict=True):
        for split, metrics in json.loads(a)["metrics"].items():
            assert metrics == pytest.approx(json.loads(b)["metrics"][split], abs=1e-6)


def test_partitions_are_bound_to_the_keys_registered_for_them(
    exp: Experiment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedhello.deploy.certificates import make_supernode_keys, write_partition_keys

    keys = [make_supernode_keys(tmp_path, f"supernode-{i}") for i in range(5)]
    mapping = write_partition_keys(tmp_path / "partitions.yaml", [pub for _, pub in keys[:4]])
    cfg = exp.cfg.model_copy(
        update={"flower": exp.cfg.flower.model_copy(update={"partition_keys": str(mapping)})}
    )
    exp.cfg = cfg
    claims: dict[int, Any] = {
        100: {"partition-id": 0, "auth-key": str(keys[0][0])},  # its own key: bound
        101: {"partition-id": 1, "auth-key": str(keys[1][0])},
        102: {"partition-id": 2, "auth-key": str(keys[3][0])},  # partition 3's key, claims 2
        103: {"partition-id": 3},  # does not sign
        104: {"partition-id": 2, "auth-key": str(keys[4][0])},  # an unmapped key
    }
    trainer = FlowerTrainer(FakeGrid(exp, claims), exp)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        trainer.discover({0, 1, 2, 3})
    assert trainer.nodes == {0: 100, 1: 101}
    assert trainer.refused == {102, 103, 104}
    assert "node 102 claims partition 2, but its key is not the one registered for partition 2" in caplog.text
    assert "node 103 claims partition 3 without signing the challenge" in caplog.text


def test_a_signature_over_another_challenge_is_refused(tmp_path: Path) -> None:
    from fedhello.deploy.certificates import make_supernode_keys, write_partition_keys
    from fedhello.flower.identity import load_partition_keys, sign_claim, verify_claim

    private, public = make_supernode_keys(tmp_path, "supernode-0")
    keys = load_partition_keys(write_partition_keys(tmp_path / "p.yaml", [public]))
    key, signature = sign_claim(private, "aa" * 32, 0)
    assert verify_claim(keys, 0, "aa" * 32, key, signature) is None
    assert "does not verify" in str(verify_claim(keys, 0, "bb" * 32, key, signature))  # a replayed answer
    assert "no key is registered for partition 1" in str(verify_claim(keys, 1, "aa" * 32, key, signature))
    (tmp_path / "bad.yaml").write_text("'ssh-rsa AAAA': 0\n'ecdsa-sha2-nistp384 BBBB': 0\n")
    with pytest.raises(UserError, match="partition 0 is mapped to two keys"):
        load_partition_keys(tmp_path / "bad.yaml")


def test_packed_tensors_come_back_as_they_were() -> None:
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5, dtype=torch.float64),
        "c": torch.randn(2, 1, 3),
        "d": torch.randn(0, 7),
        "e": torch.randn(2).half(),
    }
    arrays, layout = pack_tensors(tensors)
    assert sorted(arrays) == ["float16", "float32", "float64"]  # one flat array per dtype
    back = unpack_tensors(arrays, layout)
    assert list(back) == list(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype
        torch.testing.assert_close(back[k], t, atol=0, rtol=0)
    assert unpack_tensors(*pack_tensors({})) == {}
    with pytest.raises(ValueError, match="dtype int64 cannot be sent"):
        pack_tensors({"n": torch.arange(3)})


def test_a_reply_is_a_few_flower_objects_however_many_tensors_it_carries() -> None:
    """Flower moves every object with a request of its own on each hop (docs/flower.md, "Cost")."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedhello.engine.client import ClientResult
    from fedhello.method.aggregation import ClientUpdate

    def objects(n: int) -> int:
        deltas = {f"layer.{i}.lora_A": torch.randn(4, 8) for i in range(n)}
        result = ClientResult(ClientUpdate(0, deltas, 10), (0,), 1.0, 0, 2, 0.5, [0.5, 0.5])
        return len(get_all_nested_objects(encode_reply(result)))

    assert objects(2) == objects(40) <= 10
