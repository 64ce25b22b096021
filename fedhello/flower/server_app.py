"""The ServerApp: fedhello's round loop (`run_federation`) with a round's clients behind Flower
messages. `FlowerTrainer` learns which SuperNode holds which client partition (a query per node,
its claim checked against the registered keys when partitions are bound to keys), sends each
sampled client a TRAIN message and turns the replies into the ClientResults the loop aggregates;
a reply that cannot be read becomes a rejected result, and a round with too few replies ends
the run in one line.

`server_app` is what `flwr run` loads (pyproject.toml, [tool.flwr.app.components]); its settings
come from the run config (run_config.py).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedhello.engine.client import ClientResult
from fedhello.engine.experiment import Experiment
from fedhello.engine.server import FederatedServer
from fedhello.errors import UserError
from fedhello.flower import secure, wire
from fedhello.flower.identity import load_partition_keys, new_challenge, verify_claim
from fedhello.flower.run_config import ACCEPT_UNVERIFIED, OUT_DIR, RESUME, SIMULATION, config_of, settings_of
from fedhello.method.aggregation import ClientUpdate
from fedhello.method.base import RoundPlan

log = logging.getLogger(__name__)

QUERY_POLL_SECONDS = 0.2  # how often discovery looks for answers to partition queries
SLOW_NOTE_SECONDS = 10.0  # how often discovery names the nodes it is still waiting for
SIMULATED_NOTE_FACTOR = 3  # simulated nodes are still starting, not lost: named this many times less often


class FlowerTrainer:
    """A round's training as messages: one per sampled client, replies turned into ClientResults."""

    def __init__(
        self, grid: Grid, exp: Experiment, *, simulated: bool = False, run_dir: Path | None = None
    ) -> None:
        self.grid = grid
        self.exp = exp
        self.simulated = simulated  # Flower's simulation engine: every node exists and answers
        self.run_dir = run_dir
        self.nodes: dict[int, int] = {}  # partition-id (= fedhello client id) -> Flower node id
        self.refused: set[int] = set()  # nodes whose partition claim was refused (asked no more)
        self.first_round = True
        path = exp.cfg.flower.partition_keys
        self.keys = load_partition_keys(path) if path else None  # partition -> registered key
        self.challenges: dict[int, str] = {}  # node -> the challenge its last query carried
        self.last_error = ""  # the last problem a node reported (for the one-line failure)
        self.undiscovered: set[int] = set()  # partitions the last discovery found no node for

    def discover(self, wanted: set[int]) -> None:
        """Learn which node holds which partition, until every partition in `wanted` is known.

        Every online node not yet known is asked once which partition it holds (a cheap query: no
        model or data is loaded to answer it), and its answer is awaited while it stays online. In
        simulation every node exists from the start and always answers (or fails), so discovery
        waits for every answer however long a busy machine takes; no clock decides. In a
        deployment the first round also waits for nodes still to connect. `flower.connect_timeout`
        bounds the wait in a deployment; nodes slow to answer are named every SLOW_NOTE_SECONDS.
        A reply with an error, or a partition that is not a client of this federation, is logged
        with the node; a partition is bound to the first node that claims it."""
        flower = self.exp.cfg.flower
        start = time.monotonic()
        deadline = None if self.simulated else start + flower.connect_timeout
        await_connections = self.first_round and not self.simulated
        self.first_round = False
        pending: dict[str, int] = {}  # query message id -> node
        answered: set[int] = set()  # nodes that answered this discovery (asked no more in it)
        next_note = start + SLOW_NOTE_SECONDS
        while True:
            online = set(self.grid.get_node_ids())
            self.nodes = {p: n for p, n in self.nodes.items() if n in online}  # forget departed nodes
            pending = {m: n for m, n in pending.items() if n in online}
            known = set(self.nodes.values()) | self.refused | answered | set(pending.values())
            new = sorted(online - known)
            if new:
                pending.update(self._ask(new))
            if pending:
                for reply in self.grid.pull_messages(list(pending)):
                    node = pending.pop(reply.metadata.reply_to_message_id, None)
                    if node is not None:
                        answered.add(node)
                        self.last_error = self._register(reply) or self.last_error
            missing = sorted(wanted - set(self.nodes))
            now = time.monotonic()
            if not missing or (deadline is not None and now >= deadline):
                break
            if not pending and not await_connections:
                break  # every online node answered: the missing partitions have no node
            if now >= next_note:
                self._note_slow(missing, len(pending), sorted(pending.values()), now - start)
                next_note = now + SLOW_NOTE_SECONDS * (SIMULATED_NOTE_FACTOR if self.simulated else 1)
            time.sleep(QUERY_POLL_SECONDS)
        self.undiscovered = set(missing)
        if missing:
            log.warning(
                "no SuperNode answered for partitions %s%s",
                missing,
                f"; last error: {self.last_error}" if self.last_error else "",
            )

    def _note_slow(self, missing: list[int], count: int, nodes: list[int], waited: float) -> None:
        """One line naming what discovery still waits for (simulated node ids mean nothing: the
        engine is still starting its actors)."""
        if self.simulated:
            log.warning(
                "waiting for partitions %s: %d simulated nodes have not answered after %.0f s "
                "(a busy machine; the simulation waits for them)",
                missing,
                count,
                waited,
            )
        else:
            log.warning(
                "waiting for partitions %s: nodes %s have not answered after %.0f s (flower.connect_timeout=%g s)",
                missing,
                nodes,
                waited,
                self.exp.cfg.flower.connect_timeout,
            )

    def _ask(self, nodes: list[int]) -> dict[str, int]:
        """Send each node a partition query with a fresh challenge; message id -> node."""
        self.challenges.update({n: new_challenge() for n in nodes})
        queries = [
            Message(wire.encode_query(self.challenges[n]), dst_node_id=n, message_type=MessageType.QUERY)
            for n in nodes
        ]
        pushed = set(self.grid.push_messages(queries))
        return {
            q.metadata.message_id: q.metadata.dst_node_id for q in queries if q.metadata.message_id in pushed
        }

    def _register(self, reply: Message) -> str | None:
        """Bind the partition a query reply names to its node; the problem, if any, is returned."""
        node = reply.metadata.src_node_id
        if reply.has_error():
            problem = f"node {node}: {reply.error.reason}"
            log.warning("partition query failed: %s", problem)
            return problem
        try:
            pid, public, signature = wire.decode_claim(reply.content)
        except (KeyError, TypeError, ValueError):
            problem = f"node {node}: no readable partition-id in its reply"
            log.warning("partition query: %s", problem)
            return problem
        if not 0 <= pid < self.exp.cfg.partition.num_clients:
            problem = (
                f"node {node} claims partition {pid}, not one of 0..{self.exp.cfg.partition.num_clients - 1}"
            )
            log.warning("partition query: %s", problem)
            self.refused.add(node)
            return problem
        unproven = None if self.keys is None else self._unproven(node, pid, public, signature)
        if unproven is not None:
            log.warning("partition query: %s", unproven)
            self.refused.add(node)
            return unproven
        holder = self.nodes.get(pid)
        if holder is not None and holder != node:
            problem = f"node {node} claims partition {pid}, already held by node {holder}; refused"
            log.warning("partition query: %s", problem)
            self.refused.add(node)
            return problem
        self.nodes[pid] = node
        return None

    def _unproven(self, node: int, pid: int, public: str | None, signature: str | None) -> str | None:
        """Why a node's claim of `pid` is not proven by the key registered for it, or None."""
        assert self.keys is not None
        if public is None or signature is None:
            return f"node {node} claims partition {pid} without signing the challenge (no auth-key in its node config?)"
        why = verify_claim(self.keys, pid, self.challenges.get(node, ""), public, signature)
        return None if why is None else f"node {node} claims partition {pid}, but {why}; refused"

    def __call__(self, plan: RoundPlan, server: FederatedServer) -> list[ClientResult]:
        """The round's results, by client: each sampled client's node gets its TRAIN message; a
        round with fewer than `flower.min_replies` replies ends the run (UserError, one line)."""
        flower = self.exp.cfg.flower
        self.discover(set(plan.clients))
        messages = []
        sent: dict[int, int] = {}  # node id -> the client its message was for
        for c in plan.clients:
            if c not in self.nodes:
                log.warning(
                    "round %d: no SuperNode holds partition %d; client %d is missing", plan.round_number, c, c
                )
                continue
            assignment = plan.assignments[c]
            content = wire.encode_train_request(
                assignment, plan.round_number, server.client_download(assignment)
            )
            messages.append(
                Message(
                    content,
                    dst_node_id=self.nodes[c],
                    message_type=MessageType.TRAIN,
                    group_id=str(plan.round_number),
                )
            )
            sent[self.nodes[c]] = c
        results = []
        public_keys: dict[int, tuple[bytes, bytes]] = {}
        for reply in self.grid.send_and_receive(messages, timeout=flower.round_timeout):
            node = reply.metadata.src_node_id
            if node not in sent:
                log.warning(
                    "round %d: ignored a reply from node %d, which was sent no message",
                    plan.round_number,
                    node,
                )
                continue
            if reply.has_error():
                self.last_error = f"node {node} (client {sent.pop(node)}): {reply.error.reason}"
                log.warning("round %d: %s", plan.round_number, self.last_error)
                continue
            client = sent.pop(node)
            results.append(result_from_reply(reply.content, client))
            keys = secure.public_keys_of(reply.content)
            if keys is not None:
                public_keys[client] = keys
        if len(results) < flower.min_replies:
            raise UserError(self._too_few(plan, results, silent=sorted(sent.values())))
        if self.exp.cfg.secure_aggregation.enabled:
            self._secure(plan, server, public_keys)
        return sorted(results, key=lambda r: r.update.client_id)

    def _secure(
        self, plan: RoundPlan, server: FederatedServer, public_keys: dict[int, tuple[bytes, bytes]]
    ) -> None:
        """Secure aggregation's message rounds with the clients that trained (flower/secure.py);
        the server then applies the unmasked means (`FederatedServer.secure_result`)."""
        params, layout = server.secure_setup(plan, sorted(public_keys))
        result, stats = secure.secure_stages(
            self.grid,
            self.nodes,
            plan.round_number,
            self.exp.cfg.seed,
            params,
            layout,
            public_keys,
            self.exp.cfg.flower.round_timeout,
        )
        server.secure_result = (plan.round_number, result)
        server.secure_stats = stats

    def _too_few(self, plan: RoundPlan, results: list[ClientResult], silent: list[int]) -> str:
        """The one line a round with fewer than `flower.min_replies` replies ends the run with:
        the round, the missing clients and why, the last error, the setting to change, and how
        to resume (completed rounds are checkpointed)."""
        flower = self.exp.cfg.flower
        replied = {r.update.client_id for r in results}
        missing = sorted(set(plan.clients) - replied)
        undiscovered = sorted(self.undiscovered & set(missing))
        reasons, settings = [], []
        if undiscovered:
            reasons.append(f"no SuperNode answered for partitions {undiscovered}")
            if not self.simulated:
                settings.append(f"raise flower.connect_timeout (now {flower.connect_timeout:g} s)")
        if silent:
            reasons.append(f"clients {silent} sent no reply within flower.round_timeout")
            settings.append(f"raise flower.round_timeout (now {flower.round_timeout:g} s)")
        settings.append(
            f"or lower flower.min_replies (now {flower.min_replies})"
            if settings
            else f"lower flower.min_replies (now {flower.min_replies}) or fix the error"
        )
        resume = (
            f"fedhello run --resume --out {self.run_dir}"
            if self.simulated and self.run_dir is not None
            else "run again with resume=true"
        )
        return (
            f"round {plan.round_number}: {len(results)} replies, fewer than flower.min_replies={flower.min_replies}; "
            f"missing clients {missing} ({'; '.join(reasons) or 'their nodes replied with errors'}); "
            f"last error: {self.last_error or 'none'}; {' '.join(settings)}; "
            f"completed rounds are checkpointed ({resume} continues)"
        )


def result_from_reply(content: RecordDict, client: int) -> ClientResult:
    """The ClientResult of a reply to the message sent to `client`'s node. The client is the one
    the message went to, never what the reply says; a reply that cannot be read becomes a result
    whose update carries the problem, so that screening rejects it with that reason."""
    try:
        claimed, result = wire.decode_reply(content, client)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        what = f"'{e.args[0]}' missing" if isinstance(e, KeyError) and e.args else str(e) or type(e).__name__
        return rejected_result(client, f"malformed reply: {what}")
    if claimed != client:
        return rejected_result(
            client, f"the reply claims client {claimed}, but the message went to client {client}"
        )
    return result


def rejected_result(client: int, problem: str) -> ClientResult:
    """A result without tensors whose update carries `problem`, so that screening rejects it."""
    return ClientResult(ClientUpdate(client, {}, 0, problem=problem), (), 0.0, 0, 0, float("nan"))


def make_server_app(defaults: Mapping[str, Any] | None = None) -> ServerApp:
    """The ServerApp; `defaults` (a config object, out-dir, resume) stand in for the run config."""
    app = ServerApp()
    base = dict(defaults or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = settings_of(context, base)
        if not settings.get(OUT_DIR):
            raise UserError(f"run config '{OUT_DIR}': give the absolute path of the run directory")
        cfg = config_of(settings)
        # imported here: the server's loop (reports, plots, matplotlib) is no ClientApp's business, and
        # an app holding both sides in one module (tests/flower_faults) loads this module in ClientApps
        from fedhello.engine.loop import run_federation

        run_dir = Path(str(settings[OUT_DIR]))
        trainer = functools.partial(
            FlowerTrainer, grid, simulated=bool(settings.get(SIMULATION)), run_dir=run_dir
        )
        run_federation(
            cfg,
            run_dir,
            trainer,
            resume=bool(settings.get(RESUME)),
            accept_unverified=bool(settings.get(ACCEPT_UNVERIFIED)),
        )

    return app


# What `flwr run` loads (pyproject.toml, [tool.flwr.app.components]); settings from the run config.
server_app = make_server_app()
