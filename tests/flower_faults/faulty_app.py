"""A Flower app for fault tests: fedhello's ServerApp, and fedhello's ClientApp except that a
SuperNode whose node config says `fault='malformed'` replies without its tensors, and one that
says `fault='gone-after-input-N'` disappears during round N's secure aggregation after its masked
input."""

from __future__ import annotations

import os

import psutil
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedhello.flower import secure
from fedhello.flower.client_app import client_train, query_reply, register_secure_aggregation
from fedhello.flower.server_app import server_app

__all__ = ["client_app", "server_app"]

client_app = ClientApp()


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(query_reply(context.node_config, msg.content), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    content = client_train(msg, context, {})
    if context.node_config.get("fault") == "malformed":
        content = RecordDict({k: v for k, v in content.items() if k != "arrays"})
    return Message(content, reply_to=msg)


# Secure aggregation's message rounds (fedhello/flower/secure.py). A SuperNode whose node config
# says `fault='gone-after-input-N'` sends its masked input in round N, then disappears: asked for
# its unmasking shares, its ClientApp kills its SuperNode and itself, as a machine that crashed would.
def unmask(msg: Message, context: Context) -> RecordDict:
    if context.node_config.get("fault") == f"gone-after-input-{msg.metadata.group_id}":
        for ancestor in psutil.Process().parents():  # the SuperNode that started this ClientApp
            if any("flower-supernode" in part for part in ancestor.cmdline()):
                ancestor.kill()
                break
        os._exit(1)
    return secure.answer_unmask(msg, context)


register_secure_aggregation(client_app, unmask)
