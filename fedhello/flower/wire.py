"""fedhello's messages on Flower's wire: one codec, with named keys, for both sides.

A round sends each client a TRAIN request (its assignment and the adapters it needs) and gets a
reply (the tensors it trained and what that cost). Before that, a partition query asks a node
which partition it holds (with a challenge to sign when partitions are bound to keys). Every
record name and field below is used by the sender and the receiver alike; readers check the
type of every field and raise ValueError or KeyError for anything else, which the server turns
into a rejected reply with the reason (docs/flower.md, "Faults").

Tensors travel packed (`pack_tensors`): one flat array per dtype plus a layout of names, dtypes
and shapes, because Flower sends every array as objects of their own, one request each on every
hop (docs/flower.md, "Cost").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues, MetricRecordValues

from fedhello.engine.client import ClientResult
from fedhello.method.aggregation import ClientUpdate
from fedhello.method.base import Assignment

# records of a message's content
ARRAYS, LAYOUT, CONFIG, METRICS, UPDATE_METRICS, TIMINGS = (
    "arrays",
    "layout",
    "config",
    "metrics",
    "update-metrics",
    "timings",
)
# fields of CONFIG
CLIENT, ROUND, LAYERS, RANK = "client", "round", "layers", "rank"
CHALLENGE, PARTITION_ID, PUBLIC_KEY, SIGNATURE = "challenge", "partition-id", "public-key", "signature"
# fields of METRICS
NUM_EXAMPLES, SECONDS, PEAK_MEMORY, STEPS, TRAIN_LOSS, STEP_SECONDS = (
    "num-examples",
    "seconds",
    "peak-memory-bytes",
    "steps",
    "train-loss",
    "step-seconds",
)
TENSORS = "tensors"  # the field of LAYOUT

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


# -- typed fields --------------------------------------------------------------------------
def _scalar(record: ConfigRecord | MetricRecord, key: str) -> int | float:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: {value!r} is not a number")
    return value


def _number(record: ConfigRecord | MetricRecord, key: str) -> float:
    return float(_scalar(record, key))


def _int(record: ConfigRecord | MetricRecord, key: str) -> int:
    value = _number(record, key)
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{key}: {value!r} is not a whole number")
    return int(value)


def _numbers(record: ConfigRecord | MetricRecord, key: str) -> list[float]:
    value = record[key]
    if not isinstance(value, list):
        raise ValueError(f"{key}: not a list of numbers")
    out = []
    for x in value:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ValueError(f"{key}: not a list of numbers")
        out.append(float(x))
    return out


def _ints(record: ConfigRecord, key: str) -> tuple[int, ...]:
    return tuple(int(x) for x in _numbers(record, key) if x == int(x))


def _text(record: ConfigRecord, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{key}: not text")
    return value


# -- tensors -------------------------------------------------------------------------------
def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, ConfigRecord]:
    """Tensors as one flat array per dtype, plus their layout (names, dtypes, shapes)."""
    layout: list[tuple[str, str, list[int]]] = []
    groups: dict[str, list[torch.Tensor]] = {}
    for name, t in tensors.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be sent (one of {sorted(WIRE_DTYPES)})")
        layout.append((name, dtype, list(t.shape)))
        groups.setdefault(dtype, []).append(t.detach().reshape(-1).cpu())
    flat = {dtype: torch.cat(parts) for dtype, parts in groups.items()}
    return ArrayRecord(flat), ConfigRecord({TENSORS: json.dumps(layout)})


def unpack_tensors(arrays: ArrayRecord, layout: ConfigRecord) -> dict[str, torch.Tensor]:
    """The tensors `pack_tensors` packed; ValueError naming what does not add up."""
    entries = json.loads(_text(layout, TENSORS))
    if not isinstance(entries, list):
        raise ValueError("layout: not a list of tensors")
    flat = arrays.to_torch_state_dict()
    used = dict.fromkeys(flat, 0)  # elements of each flat array handed out so far
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and entry[1] in WIRE_DTYPES
            and isinstance(entry[2], list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[2])
        ):
            raise ValueError(f"layout: {str(entry)[:80]} is not [name, dtype, shape]")
        name, dtype, shape = entry
        if name in out:
            raise ValueError(f"layout: tensor {name!r} twice")
        buffer = flat.get(dtype)
        if buffer is None or buffer.dim() != 1 or buffer.dtype != WIRE_DTYPES[dtype]:
            raise ValueError(f"tensor {name!r}: no flat {dtype} array")
        start, size = used[dtype], math.prod(shape)
        if start + size > buffer.numel():
            raise ValueError(f"array {dtype!r}: shorter than the layout")
        out[name] = buffer[start : start + size].reshape(shape).clone()  # its own storage
        used[dtype] = start + size
    unused = sorted(dtype for dtype, n in used.items() if n != flat[dtype].numel())
    if unused:
        raise ValueError(f"arrays {unused}: longer than the layout")
    return out


def _tensors(content: RecordDict) -> dict[str, torch.Tensor]:
    return unpack_tensors(content.array_records[ARRAYS], content.config_records[LAYOUT])


# -- a TRAIN request -----------------------------------------------------------------------
def encode_train_request(
    assignment: Assignment, round_number: int, tensors: Mapping[str, torch.Tensor]
) -> RecordDict:
    """What a client is sent: its assignment (rank 0: full rank) and the adapters it needs."""
    config: dict[str, ConfigRecordValues] = {
        CLIENT: assignment.client,
        ROUND: round_number,
        LAYERS: list(assignment.layers),
        RANK: assignment.rank or 0,
    }
    packed, layout = pack_tensors(tensors)
    return RecordDict({ARRAYS: packed, LAYOUT: layout, CONFIG: ConfigRecord(config)})


def decode_train_request(content: RecordDict) -> tuple[Assignment, int, dict[str, torch.Tensor]]:
    """(assignment, round, tensors) of a TRAIN request."""
    config = content.config_records[CONFIG]
    assignment = Assignment(_int(config, CLIENT), _ints(config, LAYERS), _int(config, RANK) or None)
    return assignment, _int(config, ROUND), _tensors(content)


# -- a reply -------------------------------------------------------------------------------
def encode_reply(result: ClientResult) -> RecordDict:
    """A client's reply: its trained tensors, and the numbers the server records."""
    metrics: dict[str, MetricRecordValues] = {
        NUM_EXAMPLES: result.update.num_samples,
        SECONDS: result.seconds,
        PEAK_MEMORY: result.peak_memory_bytes,
        STEPS: result.steps,
        TRAIN_LOSS: result.train_loss,
        STEP_SECONDS: list(result.step_seconds),
    }
    config: dict[str, ConfigRecordValues] = {CLIENT: result.update.client_id, LAYERS: list(result.layers)}
    packed, layout = pack_tensors(result.update.deltas)
    return RecordDict(
        {
            ARRAYS: packed,
            LAYOUT: layout,
            METRICS: MetricRecord(metrics),
            UPDATE_METRICS: MetricRecord(dict(result.update.metrics)),
            CONFIG: ConfigRecord(config),
        }
    )


def decode_reply(content: RecordDict, client: int) -> tuple[int, ClientResult]:
    """(the client the reply claims to be, its result booked to `client`). The sample count is
    passed on as sent: screening rejects one that is not a whole, finite count in range."""
    metrics, config = content.metric_records[METRICS], content.config_records[CONFIG]
    method_metrics = content.metric_records[UPDATE_METRICS]
    update = ClientUpdate(
        client_id=client,
        deltas=_tensors(content),
        num_samples=_scalar(metrics, NUM_EXAMPLES),  # as sent: screening checks it is a whole count
        metrics={k: _number(method_metrics, k) for k in method_metrics},
    )
    result = ClientResult(
        update,
        _ints(config, LAYERS),
        _number(metrics, SECONDS),
        _int(metrics, PEAK_MEMORY),
        _int(metrics, STEPS),
        _number(metrics, TRAIN_LOSS),
        _numbers(metrics, STEP_SECONDS),
    )
    if TIMINGS in content:  # where the ClientApp's time went (reported, not trusted for anything)
        timings = content.metric_records[TIMINGS]
        result.timings = {k: _number(timings, k) for k in timings}
    return _int(config, CLIENT), result


def timings_record(timings: Mapping[str, float]) -> MetricRecord:
    values: dict[str, MetricRecordValues] = dict(timings)
    return MetricRecord(values)


# -- a partition query ---------------------------------------------------------------------
def encode_query(challenge: str) -> RecordDict:
    return RecordDict({CONFIG: ConfigRecord({CHALLENGE: challenge})})


def decode_challenge(content: RecordDict) -> str | None:
    config = content.config_records.get(CONFIG)
    challenge = None if config is None else config.get(CHALLENGE)
    return challenge if isinstance(challenge, str) and challenge else None


def encode_claim(partition: int, signed: Sequence[str] | None = None) -> RecordDict:
    """A node's answer: the partition it holds, with (public key, signature) when it signs."""
    claim: dict[str, ConfigRecordValues] = {PARTITION_ID: partition}
    if signed is not None:
        claim[PUBLIC_KEY], claim[SIGNATURE] = signed
    return RecordDict({CONFIG: ConfigRecord(claim)})


def decode_claim(content: RecordDict) -> tuple[int, str | None, str | None]:
    """(partition, public key, signature) of a node's answer (None where it did not sign)."""
    config = content.config_records[CONFIG]
    signed = PUBLIC_KEY in config and SIGNATURE in config
    return (
        _int(config, PARTITION_ID),
        _text(config, PUBLIC_KEY) if signed else None,
        _text(config, SIGNATURE) if signed else None,
    )
