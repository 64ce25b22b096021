"""Flower's floor for benchmarks/flower_overhead.py: a ServerApp that sends each of the first
`clients` nodes one TRAIN message per round for `rounds` rounds, and a ClientApp that imports
torch (the least any training ClientApp imports) and replies at once. Per round it records the
wall time and each reply's ClientApp process age (spawn, interpreter, flwr and torch imports)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    rounds, clients = int(context.run_config["rounds"]), int(context.run_config["clients"])
    deadline = time.monotonic() + 300
    while len(list(grid.get_node_ids())) < clients and time.monotonic() < deadline:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())[:clients]
    out = []
    for r in range(1, rounds + 1):
        start = time.perf_counter()
        messages = [
            Message(
                RecordDict({"config": ConfigRecord({"round": r})}),
                dst_node_id=n,
                message_type=MessageType.TRAIN,
            )
            for n in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=300))
        ages = [float(m.content["metrics"]["process-age"]) for m in replies if not m.has_error()]  # type: ignore[arg-type]
        out.append(
            {
                "round": r,
                "seconds": time.perf_counter() - start,
                "replies": len(replies),
                "process_ages": ages,
            }
        )
    Path(str(context.run_config["out"])).write_text(json.dumps(out, indent=2))


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    age = time.time() - psutil.Process().create_time()
    assert torch.zeros(1).sum() == 0
    return Message(RecordDict({"metrics": MetricRecord({"process-age": age})}), reply_to=msg)
