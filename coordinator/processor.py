"""Turns a batch of deliveries into one committed state change plus what to send.

No broker here: the service hands in raw deliveries and publishes what comes back, so the
whole decision path (decode, dispatch, schedule, persist) runs in unit tests without AMQP.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from pydantic import BaseModel

from vespid.coordinator import engine, handlers
from vespid.coordinator.effects import Effects, Reply
from vespid.coordinator.engine import Context
from vespid.coordinator.extension import Extension, Extensions, ReplyLater
from vespid.coordinator.extensions import default_extensions
from vespid.coordinator.hearing import DeafBetween, never_deaf
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.store import OutboxEntry, Store
from vespid.shared import topology
from vespid.shared.errors import ProtocolError, StoreError
from vespid.shared.inbound import decode
from vespid.shared.logs import get_logger, held_until_commit
from vespid.shared.protocol import AckReply, ErrorReply

log = get_logger(__name__)


@dataclass(frozen=True)
class Delivery:
    body: bytes
    reply_to: str | None = None
    correlation_id: str | None = None
    tag: int = 0
    user_id: str | None = None  # validated by RabbitMQ: who sent it
    message_id: str | None = None  # the sender's id of this message: a redelivery repeats it
    received: float = 0.0  # time.time() when the broker handed it over (0: not known)
    # A time it was queued after (marks.py; 0.0: no mark came before it; None: not measured)
    enqueued_after: float | None = None


@dataclass
class Outcome:
    replies: list[Reply] = field(default_factory=list)
    outbox: list[OutboxEntry] = field(default_factory=list)
    new_nodes: list[str] = field(default_factory=list)

    def count(self, command: str) -> int:
        """How many messages of this command it sends (task-run: how many tasks started)."""
        return sum(1 for entry in self.outbox if entry.command == command)


class Processor:
    def __init__(self, store: Store, settings: CoordinatorSettings, now: float,
                 extensions: Sequence[Extension] | None = None,
                 deaf_between: DeafBetween = never_deaf) -> None:
        self.store = store
        self.deaf_between = deaf_between  # this process's stalls (hearing.Hearing)
        self.settings = settings
        self.extensions = Extensions(default_extensions(settings) if extensions is None
                                     else extensions)
        self.dispatch_table = self.extensions.handlers(handlers.HANDLERS)
        self.read_types = self.extensions.reads(handlers.READS)
        self._started = now
        self._next_id = store.next_outbox_id()
        self._confirmed: list[int] = []
        self._runs: dict[int, tuple[str, int]] = {}  # outbox id of a task-run -> (task, attempt)
        self._reload()
        self._full_collections = gc.get_stats()[2]["collections"]

    def _reload(self) -> None:
        # Loading makes a million objects that live as long as the process: the cyclic
        # collector would walk them all again and again while they are made (half of the
        # load time at 100,000 tasks), and in every full collection after it (pauses of
        # 0.8 s). So it waits for the load, and what was loaded is frozen out of its sight.
        gc.disable()
        try:
            self.state = self.store.load_state()
            self.extensions.load(self.store, self.state)
        finally:
            gc.enable()
        gc.freeze()
        self.state.forgive_downtime(self._started)
        for name, attempt in self._runs.values():
            # Sent and not confirmed yet (a reload after a failed batch): still on its way.
            self.state.run_unconfirmed(name, attempt)

    def _freeze_survivors(self) -> None:
        """After a full collection, what it left (all reachable then) is frozen out of the
        collector's sight, as the loaded state is: the next full collection walks only what
        was made since, not every task the coordinator holds (at 10,000 tasks made at run
        time, a full collection was a 90-145 ms pause that every request waited behind)."""
        full = gc.get_stats()[2]["collections"]
        if full != self._full_collections:
            gc.collect(1)  # young cyclic garbage first: what is frozen is never collected
            gc.freeze()
            self._full_collections = full

    def confirmed(self, outbox_ids: Sequence[int], now: float) -> None:
        """The broker took these (publisher confirms): their rows go at the next commit, and
        a task-run among them is on its node's queue from `now`."""
        self._confirmed.extend(outbox_ids)
        if self._runs:
            for outbox_id in outbox_ids:
                run = self._runs.pop(outbox_id, None)
                if run is not None:
                    self.state.run_taken(*run, now)

    def process(self, batch: Sequence[Delivery], now: float, nodes_current: bool = True,
                decisions: int | None = None) -> Outcome:
        """Handle a batch as one transaction. `nodes_current`: whether this coordinator is
        up to date with the nodes' messages (Context.nodes_current); `decisions`: how many
        tasks its scheduling pass may start (Context.decision_limit)."""
        try:
            return self._in_transaction(lambda ctx: self._handle_all(ctx, batch), now,
                                        nodes_current, decisions=decisions)
        except StoreError:
            raise  # nothing about the messages: retrying them one by one cannot help
        except Exception:
            log.exception("batch_failed_retrying_one_by_one", size=len(batch))
            self._reload()
            return self._one_by_one(batch, now, nodes_current, decisions)

    def split_reads(self, requests: Sequence[Delivery]
                    ) -> tuple[list[tuple[Delivery, Any]], list[Delivery]]:
        """The reads at the head of the requests (each with its message), and the rest from
        the first message that is not one: a read sent after a write is answered after it,
        so a client sees its own writes."""
        reads: list[tuple[Delivery, Any]] = []
        for index, delivery in enumerate(requests):
            message = self._read_of(delivery)
            if message is None:
                return reads, list(requests[index:])
            reads.append((delivery, message))
        return reads, []

    def _read_of(self, delivery: Delivery) -> Any:
        """The message, if it is a read that asks for a reply; else None (the batch decodes
        and answers or refuses it as always)."""
        if not delivery.reply_to or (self.settings.require_user_id
                                     and delivery.user_id is None):
            return None
        try:
            message = decode(delivery.body, self.settings.max_body_bytes)
        except ProtocolError:
            return None
        return message if type(message) in self.read_types else None

    def answer(self, reads: Sequence[tuple[Delivery, Any]], now: float) -> Outcome:
        """Reads answered from the state as the last commit left it, outside any
        transaction: nothing they show is undecided, and they wait for no batch."""
        ctx = Context(self.state, self.settings, Effects(), now, extensions=self.extensions)
        # One state, one answer: the same read from the same sender twice in a turn (a
        # dashboard's node-list while the coordinator was busy, say) is built once.
        answered: dict[tuple[bytes, str | None], tuple[Reply, list[str], list[str]]] = {}
        effects = ctx.effects
        for delivery, message in reads:
            key = (delivery.body, delivery.user_id)
            if key in answered:
                reply, handled, rejected = answered[key]
                assert delivery.reply_to is not None
                effects.replies.append(replace(reply, reply_to=delivery.reply_to,
                                               correlation_id=delivery.correlation_id))
                effects.handled += handled
                effects.rejected += rejected
                continue
            marks = len(effects.replies), len(effects.handled), len(effects.rejected)
            try:
                self._handle(ctx, delivery, message)
            except Exception as exc:  # a read changed nothing: no rollback, just its reply
                log.exception("message_crashed_handler", body=delivery.body[:200])
                self._reject(ctx, delivery, "internal",
                             f"the coordinator failed on this message: {exc!r}")
            if len(effects.replies) == marks[0] + 1:  # answered now (not after a commit)
                answered[key] = (effects.replies[-1], effects.handled[marks[1]:],
                                 effects.rejected[marks[2]:])
        self._observe(ctx.effects)
        return Outcome(ctx.effects.replies)

    def tick(self, now: float, lose_silent_nodes: bool = True,
             heard_through: float | None = None, decisions: int | None = None) -> Outcome:
        """Periodic work: lose silent nodes (unless told their messages may be waiting
        unhandled; `heard_through`: Context.heard_through), start what can start (at most
        `decisions`), forget confirmed sends."""
        self._freeze_survivors()
        sweep = self._sweep if lose_silent_nodes else self._sweep_extensions
        try:
            return self._in_transaction(sweep, now, heard_through=heard_through,
                                        decisions=decisions)
        except StoreError:
            raise
        except Exception:
            # Rolled back: memory must not keep what the store does not have.
            log.exception("tick_failed")
            self._reload()
            return Outcome()

    @classmethod
    def _sweep(cls, ctx: Context) -> None:
        engine.sweep_nodes(ctx)
        cls._sweep_extensions(ctx)

    @staticmethod
    def _sweep_extensions(ctx: Context) -> None:
        ctx.extensions.tick(ctx)

    def _one_by_one(self, batch: Sequence[Delivery], now: float, nodes_current: bool,
                    decisions: int | None) -> Outcome:
        total = Outcome()
        for delivery in batch:
            outcome = self._handle_alone(delivery, now, nodes_current, decisions)
            total.replies += outcome.replies
            total.outbox += outcome.outbox
            total.new_nodes += outcome.new_nodes
        return total

    def _handle_alone(self, delivery: Delivery, now: float, nodes_current: bool,
                      decisions: int | None) -> Outcome:
        try:
            return self._in_transaction(lambda ctx: self._handle_all(ctx, [delivery]), now,
                                        nodes_current, decisions=decisions)
        except StoreError:
            raise
        except Exception as exc:
            log.exception("message_crashed_handler", body=delivery.body[:200])
            reason = f"the coordinator failed on this message: {exc!r}"
        self._reload()
        return self._in_transaction(partial(self._crashed, delivery, reason), now)

    def _crashed(self, delivery: Delivery, reason: str, ctx: Context) -> None:
        ctx.effects.handled.append(_command_of(delivery))  # it was handled, and failed
        self._reject(ctx, delivery, "internal", reason)

    def _in_transaction(self, work: Callable[[Context], None], now: float,
                        nodes_current: bool = True, heard_through: float | None = None,
                        decisions: int | None = None) -> Outcome:
        ctx = Context(self.state, self.settings, Effects(), now, nodes_current=nodes_current,
                      heard_through=heard_through, extensions=self.extensions,
                      deaf_between=self.deaf_between, decision_limit=decisions)
        with held_until_commit(), self.store.transaction():
            work(ctx)
            if self.state.needs_scheduling:
                engine.schedule(ctx)
            self.store.flush(self.state)
            self.extensions.flush(self.store)
            entries = self._entries(ctx.effects)
            self.store.add_outbox(entries)
            self.store.delete_outbox(self._confirmed)
        self._confirmed = []
        # Only task-runs that were committed will be sent and confirmed.
        self._runs.update((entry.id, out.run) for entry, out
                          in zip(entries[len(ctx.effects.files):], ctx.effects.outgoing,
                                 strict=True) if out.run is not None)
        # Counted once committed: a batch retried one by one does not count twice.
        self._observe(ctx.effects)
        return Outcome(ctx.effects.replies, entries, ctx.effects.new_nodes)

    def _observe(self, effects: Effects) -> None:
        for command in effects.handled:
            self.extensions.handled(command)
        for code in effects.rejected:
            self.extensions.rejected(code)
        for work_after in effects.after_commit:
            self._after_commit(work_after)

    @staticmethod
    def _after_commit(work: Callable[[], None]) -> None:
        # The decision stands whatever happens here: a failure is logged, never undone.
        try:
            work()
        except Exception:
            log.exception("after_commit_failed", work=getattr(work, "__qualname__", work))

    def _entries(self, effects: Effects) -> list[OutboxEntry]:
        # Files first: a node must have them before the task-run that needs them.
        first = self._next_id
        entries = [OutboxEntry(first + i, topology.EXCHANGE, topology.node_key(f.node),
                               "blob-chunk", b"", file=f.sha256)
                   for i, f in enumerate(effects.files)]
        entries += [OutboxEntry(first + len(entries) + i, out.exchange, out.routing_key,
                                out.command, out.body, out.headers)
                    for i, out in enumerate(effects.outgoing)]
        self._next_id = first + len(entries)
        return entries

    def _handle_all(self, ctx: Context, batch: Sequence[Delivery]) -> None:
        for delivery in batch:
            self._handle(ctx, delivery)

    def _handle(self, ctx: Context, delivery: Delivery, decoded: Any = None) -> None:
        """`decoded`: the message, when split_reads already decoded (and checked) it."""
        ctx.sender, ctx.message_id = delivery.user_id, delivery.message_id
        ctx.arrived, ctx.enqueued_after = delivery.received, delivery.enqueued_after
        try:
            if self.settings.require_user_id and delivery.user_id is None:
                raise ProtocolError("unauthenticated", "this coordinator requires the user_id "
                                    "property (your broker login) on every message; the "
                                    "project's client sets it")
            message = decoded if decoded is not None else \
                decode(delivery.body, self.settings.max_body_bytes)
            named_by = getattr(message, "command", None)  # else the other dialect's `type`
            command = str(named_by or message.type)
            handler = self.dispatch_table.get(type(message))
            if handler is None:  # a message of an extension this coordinator does not run
                raise ProtocolError("unknown_command" if named_by else "unknown_type",
                                    f"this coordinator does not serve {command} (the "
                                    "extension that answers it is not loaded)")
            ctx.effects.handled.append(command)
            body = handler(ctx, message)
        except ProtocolError as exc:
            self._reject(ctx, delivery, exc.code, exc.message)
            return
        if not delivery.reply_to:
            return
        if isinstance(body, ReplyLater):
            ctx.effects.after_commit.append(partial(self._reply_later, ctx, delivery, body))
            return
        if body is None:
            body = AckReply(command="ack", name=getattr(message, "name", None))
        ctx.effects.reply(delivery.reply_to, delivery.correlation_id, body)

    @staticmethod
    def _reply_later(ctx: Context, delivery: Delivery, later: ReplyLater) -> None:
        assert delivery.reply_to is not None
        try:
            body: BaseModel = later.produce()
        except ProtocolError as exc:
            body = ErrorReply(command="error", error=exc.code, message=exc.message)
        except Exception as exc:  # exactly one reply, whatever the disk did
            log.exception("reply_failed", body=delivery.body[:200])
            body = ErrorReply(command="error", error="internal",
                              message=f"the coordinator failed on this message: {exc!r}")
        ctx.effects.reply(delivery.reply_to, delivery.correlation_id, body)

    def _reject(self, ctx: Context, delivery: Delivery, code: str, sentence: str) -> None:
        log.warning("message_rejected", error=code, reason=sentence)
        ctx.effects.rejected.append(code)
        if delivery.reply_to:
            ctx.effects.reply(delivery.reply_to, delivery.correlation_id,
                              ErrorReply(command="error", error=code, message=sentence))
        else:
            ctx.effects.dead_letter(delivery.body, f"{code}: {sentence}", _command_of(delivery))


def _command_of(delivery: Delivery) -> str:
    try:
        data: Any = json.loads(delivery.body)
        return str(data.get("command") or data.get("type") or "unknown")
    except Exception:  # noqa: BLE001 - this only labels a message already known to be bad
        return "unknown"
