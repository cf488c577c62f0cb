"""Turns a batch of deliveries into one committed state change plus what to send.

No broker here: the service hands in raw deliveries and publishes what comes back, so the
whole decision path (decode, dispatch, schedule, persist) runs in unit tests without AMQP.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vespid.coordinator import engine, golem, handlers
from vespid.coordinator.effects import Effects, Reply
from vespid.coordinator.engine import Context
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.store import OutboxEntry, Store
from vespid.shared.blobs import BlobStore, chunk_messages
from vespid.shared.errors import ProtocolError
from vespid.shared.inbound import decode
from vespid.shared.logs import get_logger
from vespid.shared.protocol import ack_reply, error_reply

log = get_logger(__name__)


def default_hooks() -> engine.Hooks:
    """The extensions every coordinator runs: the Golem-style dialect."""
    hooks = engine.Hooks()
    golem.register(hooks)
    return hooks


@dataclass(frozen=True)
class Delivery:
    body: bytes
    reply_to: str | None = None
    correlation_id: str | None = None
    tag: int = 0
    user_id: str | None = None  # validated by RabbitMQ: who sent it
    message_id: str | None = None  # the sender's id of this message: a redelivery repeats it


@dataclass
class Outcome:
    replies: list[Reply] = field(default_factory=list)
    outbox: list[OutboxEntry] = field(default_factory=list)
    new_nodes: list[str] = field(default_factory=list)


class Processor:
    def __init__(self, store: Store, settings: CoordinatorSettings, now: float,
                 hooks: engine.Hooks | None = None) -> None:
        self.store = store
        self.settings = settings
        self.hooks = hooks if hooks is not None else default_hooks()
        self._started = now
        self.blobs = BlobStore(settings.blobs_path, settings.max_file_bytes)
        self._next_id = store.next_outbox_id()
        self._confirmed: list[int] = []
        # Observers (metrics): called with the command handled, the error code rejected.
        self.on_message: Callable[[str], None] = lambda _command: None
        self.on_reject: Callable[[str], None] = lambda _code: None
        self._reload()

    def _reload(self) -> None:
        self.state = self.store.load_state()
        self._forgive_downtime(self._started)

    def _forgive_downtime(self, now: float) -> None:
        # While the coordinator was down nobody heard the nodes: give every node and every
        # task in flight a full timeout from now before calling it lost.
        for node in self.state.nodes.values():
            node.last_seen = max(node.last_seen, now)
        for task in self.state.tasks.values():
            if task.dispatched_at is not None and not task.seen_on_node:
                task.dispatched_at = max(task.dispatched_at, now)

    def confirmed(self, outbox_ids: Sequence[int]) -> None:
        self._confirmed.extend(outbox_ids)

    def process(self, batch: Sequence[Delivery], now: float) -> Outcome:
        try:
            return self._in_transaction(lambda ctx: self._handle_all(ctx, batch), now)
        except Exception:
            log.exception("batch_failed_retrying_one_by_one", size=len(batch))
            self._reload()
            return self._one_by_one(batch, now)

    def tick(self, now: float) -> Outcome:
        """Periodic work: lose silent nodes, start what can start, forget confirmed sends."""
        return self._in_transaction(self._sweep, now)

    @staticmethod
    def _sweep(ctx: Context) -> None:
        engine.sweep_nodes(ctx)
        ctx.hooks.ticked(ctx)

    def _one_by_one(self, batch: Sequence[Delivery], now: float) -> Outcome:
        total = Outcome()
        for delivery in batch:
            outcome = self._handle_alone(delivery, now)
            total.replies += outcome.replies
            total.outbox += outcome.outbox
            total.new_nodes += outcome.new_nodes
        return total

    def _handle_alone(self, delivery: Delivery, now: float) -> Outcome:
        try:
            return self._in_transaction(lambda ctx: self._handle_all(ctx, [delivery]), now)
        except Exception as exc:
            log.exception("message_crashed_handler", body=delivery.body[:200])
            reason = f"the coordinator failed on this message: {exc!r}"
        self._reload()
        return self._in_transaction(
            lambda ctx: self._reject(ctx, delivery, "internal", reason), now)

    def _in_transaction(self, work: Callable[[Context], None], now: float) -> Outcome:
        ctx = Context(self.state, self.settings, Effects(), now, self.blobs, hooks=self.hooks)
        with self.store.transaction():
            work(ctx)
            if self.state.needs_scheduling:
                engine.schedule(ctx)
            self.store.flush(self.state)
            entries = self._entries(ctx.effects)
            self.store.add_outbox(entries)
            self.store.delete_outbox(self._confirmed)
        self._confirmed = []
        return Outcome(ctx.effects.replies, entries, ctx.effects.new_nodes)

    def _entries(self, effects: Effects) -> list[OutboxEntry]:
        entries = []
        for node, sha in reversed(effects.blobs):  # ahead of the task-runs that need them
            for chunk in reversed(list(chunk_messages(self.blobs.read(sha), sha))):
                effects.to_node_first(node, chunk)
        for out in effects.outgoing:
            entries.append(OutboxEntry(self._next_id, out.exchange, out.routing_key,
                                       out.command, out.body, out.headers))
            self._next_id += 1
        return entries

    def _handle_all(self, ctx: Context, batch: Sequence[Delivery]) -> None:
        for delivery in batch:
            self._handle(ctx, delivery)

    def _handle(self, ctx: Context, delivery: Delivery) -> None:
        ctx.sender, ctx.message_id = delivery.user_id, delivery.message_id
        try:
            if self.settings.require_user_id and delivery.user_id is None:
                raise ProtocolError("unauthenticated", "this coordinator requires the user_id "
                                    "property (your broker login) on every message; the "
                                    "project's client sets it")
            message = decode(delivery.body, self.settings.max_body_bytes)
            self.on_message(str(getattr(message, "command", None) or message.type))
            body = handlers.dispatch(ctx, message)
        except ProtocolError as exc:
            self._reject(ctx, delivery, exc.code, exc.message)
            return
        if delivery.reply_to:
            if body is None:
                body = ack_reply(getattr(message, "name", None))
            ctx.effects.reply(delivery.reply_to, delivery.correlation_id, body)

    def _reject(self, ctx: Context, delivery: Delivery, code: str, sentence: str) -> None:
        log.warning("message_rejected", error=code, reason=sentence)
        self.on_reject(code)
        if delivery.reply_to:
            ctx.effects.reply(delivery.reply_to, delivery.correlation_id,
                              error_reply(code, sentence))
        else:
            ctx.effects.dead_letter(delivery.body, f"{code}: {sentence}", _command_of(delivery))


def _command_of(delivery: Delivery) -> str:
    try:
        data: Any = json.loads(delivery.body)
        return str(data.get("command") or data.get("type") or "unknown")
    except Exception:  # noqa: BLE001 - this only labels a message already known to be bad
        return "unknown"
