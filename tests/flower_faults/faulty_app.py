"""A Flower app for fault tests: fedhello's ServerApp, and fedhello's ClientApp except that a
SuperNode whose node config says `fault='malformed'` replies without its tensors."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedhello.flower.client_app import client_train, query_reply
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
