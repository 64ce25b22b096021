"""The ClientApp: a SuperNode's side of a round. It answers the server's partition query (which
partition this node holds, the challenge signed when partitions are bound to keys) and trains
the client a TRAIN message names, replying with only the tensors it trained.

`client_app` is what `flwr run` loads (pyproject.toml, [tool.flwr.app.components]); its settings
come from the run config (run_config.py). Nothing of the server's loop is imported here.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import psutil
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedhello.config import config_from_dict
from fedhello.engine.client import ClientResult, train_assignment
from fedhello.engine.experiment import Experiment, prepare_experiment
from fedhello.flower import secure, wire
from fedhello.flower.identity import sign_claim
from fedhello.flower.run_config import config_of, settings_of

CACHED_EXPERIMENTS = 2  # experiments a ClientApp process keeps built (one per config it served)


@functools.lru_cache(maxsize=CACHED_EXPERIMENTS)
def _client_experiment(config_json: str) -> Experiment:
    """The model and data a ClientApp process needs; built once per process and config."""
    return prepare_experiment(config_from_dict(json.loads(config_json)))


def train_message(exp: Experiment, content: RecordDict, partition_id: int | None) -> ClientResult:
    """Train the client a TRAIN message names (it must be this node's partition)."""
    assignment, round_number, state = wire.decode_train_request(content)
    if partition_id is not None and partition_id != assignment.client:
        raise ValueError(
            f"message for client {assignment.client} reached the SuperNode of partition {partition_id}"
        )
    return train_assignment(exp, state, assignment, round_number)


def query_reply(node_config: Mapping[str, Any], content: RecordDict) -> RecordDict:
    """The partition this node holds; with `auth-key` in its node config (the private key its
    SuperNode authenticates with), the server's challenge signed with it (identity.py)."""
    pid = int(node_config["partition-id"])
    key = node_config.get("auth-key")
    challenge = wire.decode_challenge(content)
    return wire.encode_claim(pid, sign_claim(str(key), challenge, pid) if key and challenge else None)


def client_train(msg: Message, context: Context, defaults: Mapping[str, Any]) -> RecordDict:
    """What the ClientApp does with a TRAIN message: train the client it names on this node's
    partition and return the reply's content, with where the ClientApp's time went
    (`timings`: the process's age when the message reached it, i.e. start-up and imports; setup,
    i.e. model and data; training; building the reply)."""
    age = time.time() - psutil.Process().create_time()
    start = time.perf_counter()
    cfg = config_of(settings_of(context, defaults))
    exp = _client_experiment(json.dumps(cfg.model_dump(mode="json"), sort_keys=True))
    setup = time.perf_counter() - start
    pid = context.node_config.get("partition-id")
    result = train_message(exp, msg.content, None if pid is None else int(pid))
    start = time.perf_counter()
    public = None
    if exp.cfg.secure_aggregation.enabled:  # the update stays here until the protocol masks it
        public = secure.keep_update(exp, result.update.deltas, result.update.num_samples, context)
        update = replace(result.update, deltas={}, num_samples=1)
        result = replace(result, update=update)
    content = wire.encode_reply(result)
    if public is not None:
        content[secure.PUBLIC] = public
    timings = {
        "process-age": age,
        "setup": setup,
        "train": result.seconds,
        "serialise": time.perf_counter() - start,
    }
    content[wire.TIMINGS] = wire.timings_record(timings)
    return content


Answer = Callable[[Message, Context], RecordDict]


def register_secure_aggregation(app: ClientApp, unmask: Answer = secure.answer_unmask) -> None:
    """Secure aggregation's three message rounds (flower/secure.py) on a ClientApp; `unmask`
    replaces the last step (a fault test's ClientApp disappears there)."""
    for action, answer in [
        ("secagg_share", secure.answer_share),
        ("secagg_input", secure.answer_input),
        ("secagg_unmask", unmask),
    ]:

        def handler(msg: Message, context: Context, answer: Answer = answer) -> Message:
            return Message(answer(msg, context), reply_to=msg)

        app.query(action)(handler)


def make_client_app(defaults: Mapping[str, Any] | None = None) -> ClientApp:
    """The ClientApp: answers which partition it holds, and trains when asked; `defaults` (a
    config object, out-dir, resume) stand in for the run config."""
    app = ClientApp()
    base = dict(defaults or {})

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(query_reply(context.node_config, msg.content), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(client_train(msg, context, base), reply_to=msg)

    register_secure_aggregation(app)
    return app


# What `flwr run` loads (pyproject.toml, [tool.flwr.app.components]); settings from the run config.
client_app = make_client_app()
