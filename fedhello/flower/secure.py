"""Secure aggregation on Flower's Message API: the protocol of `fedhello/privacy/secagg.py` as
message rounds after training (docs/privacy.md).

A TRAIN reply under secure aggregation carries no tensors: the ClientApp keeps its update and
its private keys in its node's `context.state` and sends its two public keys. The ServerApp then
sends three QUERY rounds, each answered by the clients still there: `query.secagg_share` (the
neighbours' public keys and the round's public layout; the reply is one encrypted share message
per neighbour), `query.secagg_input` (the shares addressed to the client; the reply is its masked
input) and `query.secagg_unmask` (who sent input and who dropped; the reply is the shares that
unmask them). A client that does not answer a stage counts as dropped there.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.serverapp import Grid

from fedhello.engine.experiment import Experiment
from fedhello.privacy.secagg import (
    RoundLayout,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    SkippedRound,
    fresh_keys,
    full_update,
    ring_neighbours,
)
from fedhello.seeding import Stream, derived_seed

log = logging.getLogger(__name__)

SHARE, INPUT, UNMASK = "query.secagg_share", "query.secagg_input", "query.secagg_unmask"
STATE, UPDATE = "secagg", "secagg-update"  # records of a node's context.state
PUBLIC = "secagg-public"  # the record of a TRAIN reply holding the two public keys


# -- the client's side -----------------------------------------------------------------------------
def keep_update(
    exp: Experiment, deltas: Mapping[str, torch.Tensor], num_samples: float, context: Context
) -> ConfigRecord:
    """After training: keep the update (in the global shapes) and fresh keys in `context.state`;
    the public keys go into the TRAIN reply."""
    shapes = {k: tuple(v.shape) for k, v in exp.adapted.lora_state(with_base=exp.method.changes_base).items()}
    update = full_update(deltas, shapes, exp.method.to_full)
    weight = int(num_samples) if exp.cfg.federation.weighting == "samples" else 1
    private, (cipher, mask) = fresh_keys()
    context.state[UPDATE] = ArrayRecord(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in update.items()}
    )
    context.state[STATE] = ConfigRecord({**private, "weight": weight})
    return ConfigRecord({"cipher": cipher, "mask": mask})


def _restored(content: RecordDict, context: Context) -> SecAggClient:
    config = content.config_records["secagg"]
    params, layout, neighbours, client = decode_setup(config)
    saved = context.state.config_records[STATE]
    sa = SecAggClient(client, params, layout, neighbours)
    sa.restore({k: v for k, v in saved.items() if isinstance(v, bytes)})
    return sa


def _save(sa: SecAggClient, context: Context) -> None:
    weight = context.state.config_records[STATE]["weight"]
    context.state[STATE] = ConfigRecord({**sa.saved(), "weight": weight})


def answer_share(msg: Message, context: Context) -> RecordDict:
    sa = _restored(msg.content, context)
    keys = msg.content.config_records["keys"]
    public = {
        int(k.split(".")[0]): (keys[k], keys[f"{k.split('.')[0]}.mask"])
        for k in keys
        if k.endswith(".cipher")
    }
    shares = sa.share_keys(public)  # type: ignore[arg-type]
    _save(sa, context)
    return RecordDict({"shares": ConfigRecord({str(j): v for j, v in shares.items()})})


def answer_input(msg: Message, context: Context) -> RecordDict:
    sa = _restored(msg.content, context)
    received = msg.content.config_records["shares"]
    update = {k: v.numpy() for k, v in context.state.array_records[UPDATE].to_torch_state_dict().items()}
    weight = int(context.state.config_records[STATE]["weight"])  # type: ignore[arg-type]
    seed = int(msg.content.config_records["secagg"]["quantise-seed"])  # type: ignore[arg-type]
    masked = sa.masked_input({int(k): v for k, v in received.items()}, update, weight, seed)  # type: ignore[misc]
    _save(sa, context)
    return RecordDict(
        {"masked": ArrayRecord({k: torch.from_numpy(np.asarray(v)) for k, v in masked.items()})}
    )


def answer_unmask(msg: Message, context: Context) -> RecordDict:
    sa = _restored(msg.content, context)
    lists = msg.content.config_records["unmask"]
    shares = sa.unmask_shares(list(lists["senders"]), list(lists["dropped"]))  # type: ignore[arg-type]
    del context.state[UPDATE]  # the round is over for this client
    return RecordDict({"shares": ConfigRecord({str(c): v for c, v in shares.items()})})


# -- the wire format of the round's public settings ------------------------------------------------
def encode_setup(
    params: SecAggParams, layout: RoundLayout, neighbours: Sequence[int], client: int, seed: int
) -> ConfigRecord:
    return ConfigRecord(
        {
            "params": json.dumps(
                [
                    params.threshold,
                    params.neighbours,
                    params.clipping_range,
                    params.field_bits,
                    params.weight_bound,
                    params.limbs,
                ]
            ),
            "layout": json.dumps(
                {
                    "tensors": {str(c): list(t) for c, t in layout.tensors.items()},
                    "shapes": {k: list(v) for k, v in layout.shapes.items()},
                    "weights": {k: list(v) for k, v in layout.weight_shapes.items()},
                }
            ),
            "neighbours": list(neighbours),
            "client": client,
            "quantise-seed": seed,
        }
    )


def decode_setup(config: ConfigRecord) -> tuple[SecAggParams, RoundLayout, list[int], int]:
    t, n, c, bits, bound, limbs = json.loads(str(config["params"]))
    raw = json.loads(str(config["layout"]))
    layout = RoundLayout(
        {int(k): tuple(v) for k, v in raw["tensors"].items()},
        {k: tuple(v) for k, v in raw["shapes"].items()},
        {k: tuple(v) for k, v in raw["weights"].items()},
    )
    neighbours = config["neighbours"]
    assert isinstance(neighbours, list)
    params = SecAggParams(int(t), int(n), float(c), int(bits), int(bound), int(limbs))
    return params, layout, [int(x) for x in neighbours], int(str(config["client"]))


# -- the server's side -----------------------------------------------------------------------------
def secure_stages(
    grid: Grid,
    nodes: Mapping[int, int],
    round_number: int,
    seed: int,
    params: SecAggParams,
    layout: RoundLayout,
    public_keys: Mapping[int, tuple[bytes, bytes]],
    timeout: float,
) -> tuple[dict[str, np.ndarray] | SkippedRound, dict[str, float]]:
    """Stages 2-4 with the clients that trained and advertised keys; the unmasked means (or why
    the round is skipped) and what the stages moved."""
    start = time.perf_counter()
    graph = ring_neighbours(layout.clients, params.neighbours)
    server = SecAggServer(params, layout, graph, dict(public_keys))
    stats = {
        "messages": float(len(public_keys)),
        "bytes": float(sum(len(a) + len(b) for a, b in public_keys.values())),
    }

    def ask(stage: str, contents: Mapping[int, RecordDict]) -> dict[int, RecordDict]:
        began = time.perf_counter()
        messages = [
            Message(content, dst_node_id=nodes[c], message_type=stage, group_id=str(round_number))
            for c, content in contents.items()
        ]
        by_node = {nodes[c]: c for c in contents}
        out = {}
        for reply in grid.send_and_receive(messages, timeout=timeout):
            c = by_node.get(reply.metadata.src_node_id)
            if c is not None and reply.has_error():
                log.warning("round %d: %s from client %d: %s", round_number, stage, c, reply.error.reason)
            elif c is not None:
                out[c] = reply.content
                stats["messages"] += 1
                stats["bytes"] += _record_bytes(reply.content)
        stats[f"{stage.removeprefix('query.secagg_')}_seconds"] = time.perf_counter() - began
        return out

    def setup(c: int) -> ConfigRecord:
        return encode_setup(
            params, layout, graph[c], c, derived_seed(seed, Stream.SECURE_AGGREGATION, round_number, c)
        )

    keys = {}
    for c in layout.clients:
        visible: dict[str, ConfigRecordValues] = {}
        for j in graph[c]:
            visible[f"{j}.cipher"], visible[f"{j}.mask"] = public_keys[j]
        keys[c] = RecordDict({"secagg": setup(c), "keys": ConfigRecord(visible)})
    shared = ask(SHARE, keys)
    routed = server.route_shares(
        {c: {int(j): v for j, v in r.config_records["shares"].items()} for c, r in shared.items()}  # type: ignore[misc]
    )
    inputs = ask(
        INPUT,
        {
            c: RecordDict(
                {"secagg": setup(c), "shares": ConfigRecord({str(j): v for j, v in routed[c].items()})}
            )
            for c in shared
        },
    )
    for c, reply in inputs.items():
        masked = {k: v.numpy() for k, v in reply.array_records["masked"].to_torch_state_dict().items()}
        problem = server.check_input(c, masked)
        if problem is None:
            server.inputs[c] = masked
        else:  # left out, as a client that dropped before its input
            log.warning("round %d: secure aggregation: client %d %s; left out", round_number, c, problem)
    lists = ConfigRecord({"senders": sorted(server.inputs), "dropped": server.dropped()})
    answers = ask(UNMASK, {c: RecordDict({"secagg": setup(c), "unmask": lists}) for c in shared})
    result = server.unmask(
        {c: {int(k): v for k, v in r.config_records["shares"].items()} for c, r in answers.items()},  # type: ignore[misc]
        {k: np.zeros(v) for k, v in layout.shapes.items()},
    )
    stats["seconds"] = time.perf_counter() - start
    return result, stats


def _record_bytes(content: RecordDict) -> int:
    total = sum(int(arrays.count_bytes()) for arrays in content.array_records.values())
    for config in content.config_records.values():
        total += sum(len(v) if isinstance(v, bytes) else 8 for v in config.values())
    return total


def public_keys_of(content: RecordDict) -> tuple[bytes, bytes] | None:
    record = content.config_records.get(PUBLIC)
    if record is None:
        return None
    return record["cipher"], record["mask"]  # type: ignore[return-value]
