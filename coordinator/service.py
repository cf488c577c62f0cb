"""The coordinator's broker loop: consume in batches, persist, publish with confirms, ack.

pika's SelectConnection lets one thread keep thousands of publishes in flight and take
their confirms as they come (one-by-one confirms cap at ~1k msg/s). A batch of deliveries
is acked only once every message it caused is confirmed by the broker; what was committed
but not confirmed stays in the outbox and is sent again after a reconnect or restart.
"""

from __future__ import annotations

import heapq
import itertools
import operator
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial, wraps
from typing import Any

import pika
import pika.exceptions
from pika.spec import Basic

from vespid.coordinator.extension import Extension
from vespid.coordinator.extensions import default_extensions
from vespid.coordinator.hearing import Hearing
from vespid.coordinator.marks import MARK_TYPE, QueueMarks
from vespid.coordinator.processor import Delivery, Outcome, Processor
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.store import OutboxEntry, default_holder, open_store
from vespid.shared import topology
from vespid.shared.blobs import BlobStore
from vespid.shared.errors import BrokerError, StoreError, Superseded
from vespid.shared.logs import get_logger
from vespid.shared.protocol import encode
from vespid.shared.transport import (
    close_quietly,
    connect,
    declared,
    keep_reconnecting,
    properties,
    rotation,
    user_of,
)

log = get_logger(__name__)
APP_ID = "vespid-coordinator"
TICK_SECONDS = 1.0
OUTBOX_MESSAGE_ID = "vespid-out-{}"
# File chunks (256 KB each) published and not yet confirmed, at most: a large file streams
# from disk at the broker's pace instead of piling up in pika's buffer.
FILE_WINDOW_CHUNKS = 16
# A node message in hand longer than this means the coordinator is behind on them: no node
# is declared lost until it catches up (_caught_up_with_nodes).
NODE_LAG_SECONDS = 1.0
# Node messages waiting longer than this in the broker (by the marks: a mark comes back about
# a tick after it was sent when nothing waits) mean the coordinator is behind on them too.
BROKER_LAG_SECONDS = 3.0
LAG_WARNING_SECONDS = 10.0
# The queues this process consumes, with the key that reaches each: a mark goes through
# both every tick (marks.py).
MARKED_QUEUES = {topology.COORDINATOR_QUEUE: topology.COORDINATOR_KEY,
                 topology.COORDINATOR_NODE_QUEUE: topology.COORDINATOR_NODE_KEY}
MARK_BODY = b"{}"
# A turn handles at least this many node messages, and its scheduling pass may start at
# least this many tasks, however slow they were lately.
MIN_NODE_BATCH = 10
MIN_TURN_DECISIONS = 20
# A pass may start this many times what fits a turn's time: the node messages taken are
# sized so that what they let start fits, and this bounds a turn they misjudged.
TURN_DECISIONS_FACTOR = 2
# The exit status of a coordinator that stopped because it may no longer write the state:
# a supervisor restarting it makes it a standby.
SUPERSEDED_EXIT = 3


@dataclass
class FileStream:
    """A file being sent to a node, chunk by chunk, for one outbox row."""

    entry: OutboxEntry
    total: int
    next: int = 0


def _stop_on_store_error(callback: Callable[..., None]) -> Callable[..., None]:
    """For the broker loop's callbacks that use the store: a store that failed (or fenced
    this coordinator out) stops the loop at once, and run() stops the process. Raised
    inside pika's frame dispatch, the error would be taken for a lost connection and the
    coordinator would reconnect and carry on."""
    @wraps(callback)
    def guarded(self: CoordinatorService, *args: Any) -> None:
        try:
            callback(self, *args)
        except StoreError as exc:
            self._store_lost = exc
            self._stopping = True
            self._connection.ioloop.stop()

    return guarded


class CoordinatorService:
    """One coordinator process. On a store that several coordinators share (PostgreSQL) it
    starts as a standby: it consumes like the active one, the broker's single active
    consumer gives it nothing, and the first delivery it does get means the active one is
    gone. Only then does it take the state over (a new epoch, which fences the old one out)
    and load it."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self._started = time.time()
        # Marked whenever the event loop runs: its stalls are no node's silence (hearing.py).
        self._hearing = Hearing()
        # Kept across links: a mark sent on the last one still dates what comes after it.
        self._marks = QueueMarks(tuple(MARKED_QUEUES))
        self.store = open_store(settings.state)
        self._processor: Processor | None = None
        if not self.store.shared:
            self._activate_store()
        self.files = BlobStore(settings.blobs_path, settings.max_file_bytes)
        self._stopping = False
        self._store_lost: StoreError | None = None
        self._user = user_of(settings.amqp_url)
        self._brokers = rotation(settings.broker_parameters(
            APP_ID, heartbeat=settings.broker_heartbeat))
        self._connection: Any = None
        self._next_lag_warning = 0.0
        # Set when the broker closed the channel: the next connection declares the known
        # nodes' queues one at a time first, so a queue it refuses is named (_declare_topology).
        self._check_node_queues = False
        self._reset_link()

    def _reset_link(self) -> None:
        # Two channels: one publishes (confirm mode), one consumes and acks. The broker
        # handles a channel's publishes and its deliveries in one process, in turn: on a
        # single channel a request waited there behind a burst of task-runs (1,000 nodes
        # joining at once), 40-100 ms, though this process was reading its socket.
        self._channel: Any = None
        self._inbox: Any = None
        self._marks.new_link()
        # Deliveries not handled yet, by queue: requests in the order they came, and the
        # nodes' messages, of which a turn takes what fits its time (_batch_size).
        self._requests: list[Delivery] = []
        self._from_nodes: deque[Delivery] = deque()
        self._flush_scheduled = False
        self._batch_due = False  # a turn answered reads: the next one handles a batch
        # What a message handled, or a task started, cost lately (a turn's commit and
        # scheduling pass shared among them).
        self._unit_seconds = 0.001
        self._starts_per_message = 1.0  # tasks a node message let start, lately
        self._seq = 0
        self._in_flight: dict[int, int | None] = {}  # publish seq -> outbox id (None: reply)
        self._in_flight_heap: list[int] = []
        # Delivery tags handled, once all published up to that seq is confirmed. Both queues
        # share the inbox channel's tags and a turn takes them out of order, so what is acked is
        # the prefix of settled tags (multiple=True up to the last of it), never beyond.
        self._ack_after: deque[tuple[int, list[int]]] = deque()  # (publish seq, tags)
        self._settled: set[int] = set()
        self._acked = 0  # every tag up to this one is acked
        # Tags of the nodes' messages not acked yet: with node_prefetch of them the window is
        # full, and the broker may hold more behind it (_caught_up_with_nodes).
        self._node_tags: deque[int] = deque()
        self._resend: set[int] = set()
        self._returned: set[int] = set()
        self._close_reason: str | None = None
        # Files on their way: streams in order, and per routing key what must wait behind
        # a file (the task-run that needs it, say) until the broker confirmed all of it, so
        # a node gets the whole file first even if a chunk has to go again.
        self._streams: deque[FileStream] = deque()
        self._held: dict[str, deque[OutboxEntry]] = {}
        self._holder: dict[str, OutboxEntry] = {}  # routing key -> the file holding it
        self._chunk_seqs: set[int] = set()  # publish seqs of file chunks in flight
        self._file_parts: dict[int, int] = {}  # outbox id -> its chunks not yet confirmed
        self._sending: set[int] = set()  # outbox ids whose chunks are not all published
        self._failed_files: set[int] = set()
        # Replies are in no outbox: what was published, by publish seq, to send again if
        # the broker refuses it (a nack), instead of leaving the client to time out.
        self._replies: dict[int, tuple[str, bytes, Any]] = {}
        # Events wait for the loop's next turn, in commit order (_send_events), and so do
        # the acks of the deliveries that caused them.
        self._events: deque[OutboxEntry] = deque()
        self._events_scheduled = False
        self._settle_after_events: list[int] = []

    @property
    def processor(self) -> Processor:
        assert self._processor is not None, "the coordinator is not active yet"
        return self._processor

    @property
    def active(self) -> bool:
        return self._processor is not None

    def _activate_store(self) -> None:
        epoch = self.store.take_over(default_holder())
        self._processor = Processor(self.store, self.settings, time.time(), self._extensions(),
                                    deaf_between=self._hearing.deaf_between)
        log.info("coordinator_active", epoch=epoch, state=self.store.location,
                 tasks=len(self.processor.state.tasks), nodes=len(self.processor.state.nodes),
                 seconds_since_start=round(time.time() - self._started, 3))

    def _extensions(self) -> list[Extension]:
        extensions = default_extensions(self.settings)
        if self.settings.metrics_port is not None:
            from vespid.coordinator.extensions.metrics import Metrics

            metrics = Metrics(self.settings.metrics_port)
            metrics.serve()
            extensions.append(metrics)
            log.info("metrics_serving", port=metrics.port)
        return extensions

    # ---- lifecycle -------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped; the exit status: 0, or SUPERSEDED_EXIT once this coordinator
        may no longer write (another took over, or the store is gone)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if not self.active:
            log.info("coordinator_standing_by", state=self.store.location)
        try:
            keep_reconnecting(self._run_connection, log)
        except StoreError as lost:
            # Whatever this process still holds in memory may be ahead of the store or
            # behind another coordinator: it must stop before it publishes anything more.
            exc = self.store.explain_loss(lost)
            log.error("coordinator_stopping_store_lost", reason=str(exc),
                      superseded=isinstance(exc, Superseded))
            return SUPERSEDED_EXIT
        finally:
            self.store.close()
        log.info("coordinator_stopped")
        return 0

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("coordinator_stopping", signal=signal.Signals(signum).name)
        self._stopping = True
        if self._connection is not None:
            self._connection.ioloop.add_callback_threadsafe(self._close)

    def _close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            self._connection.close()
        else:
            self._connection.ioloop.stop()

    def _run_connection(self) -> None:
        if self._stopping:
            return
        self._declare_topology()
        self._reset_link()
        params = next(self._brokers)  # after a lost connection, the cluster's next node
        self._connection = pika.SelectConnection(
            params, on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error, on_close_callback=self._on_closed)
        self._connection.ioloop.start()
        if self._store_lost is not None:
            raise self._store_lost
        if not self._stopping:
            raise BrokerError(self._close_reason or "connection closed")

    def _declare_topology(self) -> None:
        connection = connect(self.settings.broker_parameters(APP_ID + "-setup"),
                             give_up_after=10)
        try:
            channel = declared(connection.channel, "opening a channel")
            declared(lambda: topology.declare_coordinator(channel),
                     "declaring the coordinator's exchanges and queues")
            # The known nodes' queues are declared on the serving channel, pipelined
            # (_declare_nodes); one at a time here, each waiting for the broker, was a second
            # of every start at 1,000 nodes. Here only after the broker closed that channel:
            # if a node's queue was the cause, the sentence names it and the process stops.
            for node in self.processor.state.nodes if self._check_node_queues else ():
                declared(partial(topology.declare_node, channel, node),
                         f"declaring the queue of node {node}")
            self._check_node_queues = False
        finally:
            close_quietly(connection)

    def _declare_nodes(self) -> None:
        """Every known node's queue, on the publishing channel: no callback, so pika asks for
        no reply. Nothing else waits for a reply on that channel (the consumers are set up
        on the inbox), so they go out at once, at start and when a standby takes over, and
        the broker applies them in order, ahead of the task-runs published after them. A
        task-run that comes back unroutable all the same (its queue deleted by hand) goes
        again with its queue declared (_on_return, _tick)."""
        self._declare_node_queues(self.processor.state.nodes)

    def _declare_node_queues(self, nodes: Iterable[str]) -> None:
        if self._usable(self._channel):  # else closing with the link: the next one declares
            for node in nodes:
                topology.declare_node(self._channel, node)

    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, _connection: Any, error: Any) -> None:
        self._close_reason = f"could not open the connection: {error!r}"
        self._connection.ioloop.stop()

    def _on_closed(self, _connection: Any, reason: Any) -> None:
        self._close_reason = self._close_reason or f"connection closed: {reason!r}"
        self._connection.ioloop.stop()

    def _on_channel_closed(self, channel: Any, reason: Any) -> None:
        # Either channel's end ends the link, and closing the connection then closes the
        # other one too: the first reason is the one that explains it, and must stay.
        # Meanwhile the other channel is closing: pika still hands it replies and confirms,
        # and every callback that would use it checks that it is open (_link_open).
        self._close_reason = self._close_reason or f"channel closed: {reason!r}"
        # The publishing channel, closed by the broker: perhaps over a node's queue.
        if (self.active and channel is self._channel
                and isinstance(reason, pika.exceptions.ChannelClosedByBroker)):
            self._check_node_queues = True
        self._end_link()

    def _end_link(self) -> None:
        if self._connection.is_open:
            self._connection.close()

    def _on_consumer_cancelled(self, frame: Any) -> None:
        """The broker ended a consumer of ours (its queue was deleted): with the channel
        still open, nothing more would come, and the nodes' silence would be taken for
        their loss. The next connection declares the queues again and consumes anew."""
        log.error("coordinator_consumer_cancelled", consumer_tag=frame.method.consumer_tag)
        self._close_reason = self._close_reason or "the broker cancelled a consumer"
        self._end_link()

    @staticmethod
    def _usable(channel: Any) -> bool:
        """Made and open: pika refuses every call on a channel that is closing."""
        return channel is not None and bool(channel.is_open)

    def _link_open(self) -> bool:
        """Both channels open: neither is closing with the link."""
        return self._usable(self._channel) and self._usable(self._inbox)

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm,
                                 callback=lambda _frame: self._on_confirm_mode())

    def _on_confirm_mode(self) -> None:
        if self._usable(self._channel):
            self._connection.channel(on_open_callback=self._on_inbox)

    def _on_inbox(self, channel: Any) -> None:
        self._inbox = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        channel.basic_qos(prefetch_count=self.settings.prefetch,
                          callback=lambda _frame: self._on_ready())

    @_stop_on_store_error
    def _on_ready(self) -> None:
        if not self._link_open():
            return
        if self.active:
            self._declare_nodes()
            self._resume()
        # Requests first, the node channel once that consumer is registered: a coordinator
        # started second queues behind the first on both single-active-consumer queues.
        # Each consumer has its own prefetch window, so neither kind starves the other.
        self._inbox.basic_consume(topology.COORDINATOR_QUEUE, self._on_message,
                                  callback=lambda _frame: self._consume_nodes())

    def _resume(self) -> None:
        """Active on this connection: send what was decided and not confirmed, and tick.
        After a lost connection, first make sure no standby took over meanwhile: the outbox
        would be its decisions by now, not ours."""
        self.store.verify_lease()
        backlog = self.store.pending_outbox()
        if backlog:
            log.info("outbox_resent", messages=len(backlog))
        self._publish(Outcome(outbox=backlog), defer_events=False)  # all in order, at once
        self._connection.ioloop.call_later(TICK_SECONDS, self._tick)

    def _become_active(self) -> None:
        self._activate_store()
        self._declare_nodes()
        self._resume()

    def _consume_nodes(self) -> None:
        # The node channel's own window (the qos applies to consumers made after it); a
        # turn takes node_batch of them, so requests wait for no more than that.
        if not self._link_open():
            return
        self._inbox.basic_qos(prefetch_count=self.settings.node_prefetch,
                              callback=lambda _frame: self._consume_node_queue())

    def _consume_node_queue(self) -> None:
        if not self._link_open():
            return
        self._inbox.basic_consume(topology.COORDINATOR_NODE_QUEUE, self._on_node_message)
        log.info("coordinator_consuming",
                 queues=[topology.COORDINATOR_QUEUE, topology.COORDINATOR_NODE_QUEUE])

    # ---- consuming -------------------------------------------------------------------
    @_stop_on_store_error
    def _on_message(self, _channel: Any, method: Any, props: Any, body: bytes) -> None:
        """A request (the request queue)."""
        self._receive(self._requests, topology.COORDINATOR_QUEUE, method, props, body)

    @_stop_on_store_error
    def _on_node_message(self, _channel: Any, method: Any, props: Any, body: bytes) -> None:
        """A node's message (the node channel)."""
        self._node_tags.append(method.delivery_tag)
        self._receive(self._from_nodes, topology.COORDINATOR_NODE_QUEUE, method, props, body)

    def _receive(self, into: list[Delivery] | deque[Delivery], queue: str, method: Any,
                 props: Any, body: bytes) -> None:
        self._heard()
        if not self.active:  # the broker made this consumer the active one
            self._become_active()
        if self._took_mark(queue, method, props):
            self._settle([method.delivery_tag])  # acked in order with the rest
        else:
            # One delivered again was in hand on a lost link: queued before any mark seen.
            enqueued_after = 0.0 if method.redelivered else self._marks.through(queue)
            into.append(Delivery(body, props.reply_to, props.correlation_id,
                                 method.delivery_tag, props.user_id, props.message_id,
                                 time.time(), enqueued_after=enqueued_after))

        self._schedule_turn()

    def _took_mark(self, queue: str, method: Any, props: Any) -> bool:
        """Whether the delivery is a mark (marks.py), taken in: ours dates what follows it
        unless delivered again; another coordinator's (same login) is only dropped."""
        if props.type != MARK_TYPE:
            return False
        if self._marks.ours(props.message_id):
            if not method.redelivered:
                self._marks.received(queue, props.message_id)
            return True
        return self._user is not None and props.user_id == self._user

    def _heard(self) -> float:
        """The event loop runs now: a long gap since it last did is a stall, which the
        nodes' clocks leave out (hearing.py), and which an operator should know of."""
        now = time.time()
        self._stalled(self._hearing.mark(now))
        return now

    def _busy_since(self, began: float) -> None:
        """A turn of ours ran from `began` until now, reading nothing meanwhile."""
        self._stalled(self._hearing.busy(began, time.time()))

    def _stalled(self, seconds: float) -> None:
        if seconds > self._hearing.slack:
            log.warning("coordinator_stalled", seconds=round(seconds, 1))

    def _schedule_turn(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Runs after pika dispatched every frame it already read: a natural batch.
            self._connection.ioloop.call_later(0, self._process_pending)

    @_stop_on_store_error
    def _process_pending(self) -> None:
        """One turn, either of two kinds. Reads at the head of the requests are answered in
        a turn of their own, from the committed state (no batch in hand). Else a batch:
        the requests (writes, and reads sent after them), then the node messages that fit
        the turn's time, committed as one. Between two turns pika sends what was published
        and reads what came, so a request waits for at most one batch, and the turn after a
        read's is always a batch, so reads never starve the nodes."""
        began = self._heard()
        try:
            self._turn()
        finally:
            self._busy_since(began)

    def _turn(self) -> None:
        self._flush_scheduled = False
        if not self._usable(self._channel):
            self._requests, self._from_nodes = [], deque()
            return
        reads, writes = self.processor.split_reads(self._requests)
        if reads and not self._batch_due:
            self._requests = writes
            self._publish(self.processor.answer(reads, time.time()))
            self._settle([delivery.tag for delivery, _ in reads])
            self._batch_due = True  # the next turn is a batch, whatever came meanwhile
        else:
            batch, self._requests = (self._requests, []) if writes else ([], self._requests)
            nodes = [self._from_nodes.popleft()
                     for _ in range(min(self._batch_size(), len(self._from_nodes)))]
            batch += nodes
            going_on = self.processor.state.pass_stopped
            if batch or going_on:
                started = time.perf_counter()
                outcome = self.processor.process(
                    batch, time.time(), nodes_current=self._caught_up_with_nodes(),
                    decisions=self._decision_limit(len(batch)))
                self._publish(outcome)
                self._settle([delivery.tag for delivery in batch])
                # A pass going on starts what earlier messages let start, not these.
                self._learn_cost(time.perf_counter() - started, len(batch),
                                 outcome.count("task-run"), by_these=not going_on)
            self._batch_due = False
        self._go_on()
        self._ack_settled()

    def _go_on(self) -> None:
        """Another turn if anything waits, a pass stopped at its limit included (which a
        State reloaded after a failed batch never says: a pass that fails is not retried
        in a loop)."""
        if self._requests or self._from_nodes or self.processor.state.pass_stopped:
            self._schedule_turn()

    def _fits(self) -> int:
        """How many messages handled and tasks started fit a turn's time (turn_seconds),
        by what each cost lately."""
        return int(self.settings.turn_seconds / self._unit_seconds)

    def _batch_size(self) -> int:
        """How many node messages a turn takes: as many as fit its time with the tasks they
        let start (a task-complete lets about one start; when 1,000 nodes join a deep queue,
        a node-set lets several, and turns of messages alone took three times their time,
        which every request then waited for), never fewer than MIN_NODE_BATCH, so a slow
        machine still keeps up with its nodes."""
        most = self.settings.node_batch
        fits = int(self._fits() / (1 + self._starts_per_message))
        return max(min(MIN_NODE_BATCH, most), min(most, fits))

    def _decision_limit(self, taken: int) -> int:
        """How many tasks the pass of a turn that took `taken` messages may start; the pass
        goes on at the next turn. Only a turn its messages misjudged comes near: a pass
        that stops leaves more for the next to look over."""
        return max(MIN_TURN_DECISIONS, TURN_DECISIONS_FACTOR * self._fits() - taken)

    def _learn_cost(self, seconds: float, messages: int, started: int, by_these: bool) -> None:
        if messages + started:
            self._unit_seconds += (seconds / (messages + started) - self._unit_seconds) / 8
        if messages and by_these:
            # Up at once, down slowly: one turn too long is one too many.
            lately = started / messages
            self._starts_per_message = max(
                lately, self._starts_per_message + (lately - self._starts_per_message) / 8)

    def _settle(self, tags: list[int]) -> None:
        """These deliveries are handled: ack them once all published so far is confirmed
        (events waiting for the loop's next turn included)."""
        if self._events:
            self._settle_after_events += tags
        else:
            self._ack_after.append((self._seq, tags))

    @_stop_on_store_error
    def _tick(self) -> None:
        if not self._usable(self._channel):
            return
        began = self._heard()
        outcome = self.processor.tick(began, self._caught_up_with_nodes(),
                                      heard_through=self._heard_through(),
                                      decisions=self._decision_limit(0))
        self._busy_since(began)
        self._send_marks()
        resend = ([e for e in self.store.pending_outbox() if e.id in self._resend]
                  if self._resend else [])
        self._resend.clear()
        outcome.outbox = resend + outcome.outbox
        # An unroutable task-run means the node's queue vanished (deleted by hand?): declare
        # it again before sending once more.
        outcome.new_nodes += sorted({e.routing_key.removeprefix("node.") for e in resend
                                     if e.routing_key.startswith("node.")})
        self._publish(outcome)
        self._go_on()  # a pass the tick's scheduling stopped (a lost node's tasks, say)
        self._connection.ioloop.call_later(TICK_SECONDS, self._tick)

    def _send_marks(self) -> None:
        """On the inbox, outside the publishing channel's confirms: a mark that never comes
        back only leaves the next one to do its work."""
        if not self._usable(self._inbox):
            return
        for queue, key in MARKED_QUEUES.items():
            mark = self._marks.send(queue, time.time())
            self._inbox.basic_publish(
                topology.EXCHANGE, key, MARK_BODY,
                properties(MARK_TYPE, app_id=APP_ID, persistent=False, message_id=mark,
                           user_id=self._user))

    def _heard_through(self) -> float:
        """Every node message queued before this time is handled: in each queue, the mark
        the first one in hand came after, or with none in hand the latest mark back."""
        in_hand = {topology.COORDINATOR_QUEUE: self._requests,
                   topology.COORDINATOR_NODE_QUEUE: self._from_nodes}
        return min((waiting[0].enqueued_after or 0.0) if waiting else self._marks.through(queue)
                   for queue, waiting in in_hand.items())

    def _caught_up_with_nodes(self) -> bool:
        """Whether the nodes' messages are handled about as they come. If not (the oldest
        one in hand waited longer than NODE_LAG_SECONDS, or the node channel's window is
        full, so the broker may hold more behind it), no node may be declared lost: its
        heartbeat may be among them, or behind them in the queue; and a node-set that omits
        a task may be older than the task-run (engine._gone_from). Losing every node of a
        farm because this process fell behind ran each of their tasks twice."""
        now = time.time()
        # Both queues: a node of contract v1 sends its node-sets with the requests.
        oldest = min((queue[0].received for queue in (self._from_nodes, self._requests)
                      if queue), default=now)
        waited = now - oldest
        in_broker = self._broker_lag(now)
        window_full = len(self._node_tags) >= self.settings.node_prefetch
        if waited <= NODE_LAG_SECONDS and not window_full and in_broker <= BROKER_LAG_SECONDS:
            return True
        if now >= self._next_lag_warning:
            self._next_lag_warning = now + LAG_WARNING_SECONDS
            log.warning("node_sweep_deferred", behind_seconds=round(max(waited, in_broker), 1),
                        in_broker_seconds=round(in_broker, 1),
                        waiting=len(self._from_nodes) + len(self._requests),
                        window_full=window_full)
        return False

    def _broker_lag(self, now: float) -> float:
        """About how long the nodes' messages wait in the broker: the age of the latest
        mark back through the node queue (0.0 before the first: not known)."""
        through = self._marks.through(topology.COORDINATOR_NODE_QUEUE)
        return now - through if through else 0.0

    # ---- publishing ------------------------------------------------------------------
    def _publish(self, outcome: Outcome, defer_events: bool = True) -> None:
        # Same channel, so the broker declares and binds before the task-run arrives.
        self._declare_node_queues(outcome.new_nodes)
        for reply in outcome.replies:
            kind = str(reply.body.get("command") or reply.body.get("type"))  # either dialect
            self._send_reply(reply.reply_to, reply.data,
                             properties(kind, app_id=APP_ID, persistent=False,
                                        correlation_id=reply.correlation_id))
        if not defer_events:
            self._send_events()  # any still waiting first: events keep their order
        for entry in outcome.outbox:
            if defer_events and entry.exchange == topology.EVENTS_EXCHANGE:
                self._events.append(entry)
            else:
                self._send_entry(entry)
        if self._events and not self._events_scheduled:
            self._events_scheduled = True
            self._connection.ioloop.call_later(0, self._send_events)
        self._pump_files()

    def _send_events(self) -> None:
        """Events go out on the loop's next turn, after pika wrote what the batch sent to
        nodes: a task-run waited behind its task's created and started events before (a
        tenth of the time from task-create to task-run at light load). Their order among
        themselves stays the commit order, and the deliveries that caused them are acked
        only once they are confirmed too (_settle)."""
        self._events_scheduled = False  # (a call at once leaves a scheduled one nothing)
        if not self._usable(self._channel):
            return  # the outbox sends them again on the next connection
        while self._events:
            self._send_entry(self._events.popleft())
        if self._settle_after_events:
            self._ack_after.append((self._seq, self._settle_after_events))
            self._settle_after_events = []

    def _send_reply(self, reply_to: str, data: bytes, props: Any) -> None:
        self._send("", reply_to, data, props, None, mandatory=False)
        self._replies[self._seq] = (reply_to, data, props)

    def _send_entry(self, entry: OutboxEntry) -> None:
        key = entry.routing_key
        holder = self._holder.get(key)
        if holder is not None and holder.id != entry.id:
            self._held[key].append(entry)  # behind a file not yet all confirmed there
        elif entry.file is not None:
            self._holder[key] = entry
            self._held.setdefault(key, deque())
            self._sending.add(entry.id)
            self._streams.append(FileStream(entry, self._chunks_of(entry.file)))
        else:
            self._send(entry.exchange, key, entry.body, self._entry_properties(entry),
                       entry.id, mandatory=entry.exchange != topology.EVENTS_EXCHANGE)

    @staticmethod
    def _entry_properties(entry: OutboxEntry) -> Any:
        return properties(entry.command, app_id=APP_ID, headers=entry.headers,
                          message_id=OUTBOX_MESSAGE_ID.format(entry.id))

    def _chunks_of(self, sha: str) -> int:
        if self.files.has(sha):
            return self.files.chunks(sha)
        log.error("file_to_send_missing", sha256=sha,
                  folder=str(self.settings.blobs_path))
        return 0

    def _pump_files(self) -> None:
        """Publish file chunks while the window allows."""
        while self._streams:
            stream = self._streams[0]
            if stream.next < stream.total:
                if len(self._chunk_seqs) >= FILE_WINDOW_CHUNKS:
                    return
                self._send_chunk(stream)
                continue
            self._streams.popleft()
            self._sending.discard(stream.entry.id)
            self._file_settled(stream.entry.id)

    def _send_chunk(self, stream: FileStream) -> None:
        entry = stream.entry
        assert entry.file is not None
        try:
            chunk = self.files.read_chunk(entry.file, stream.next)
        except OSError as exc:
            log.error("file_to_send_unreadable", sha256=entry.file, error=str(exc))
            chunk = None
        if chunk is None:  # the file went or shrank under us: send what there is, and stop
            stream.total = stream.next
            return
        self._send(entry.exchange, entry.routing_key, encode(chunk),
                   self._entry_properties(entry), entry.id, mandatory=True)
        self._chunk_seqs.add(self._seq)
        self._file_parts[entry.id] = self._file_parts.get(entry.id, 0) + 1
        stream.next += 1

    def _file_settled(self, outbox_id: int) -> None:
        """Once every chunk of a file is published and confirmed, its row is done and what
        waited behind it goes; if any chunk was refused, the whole file is sent again on
        the next tick and the rest keeps waiting."""
        if outbox_id in self._sending or self._file_parts.get(outbox_id, 0) > 0:
            return
        self._file_parts.pop(outbox_id, None)
        if outbox_id in self._failed_files:
            self._failed_files.discard(outbox_id)
            self._returned.discard(outbox_id)
            self._resend.add(outbox_id)
            return
        self.processor.confirmed([outbox_id], time.time())
        key = next(k for k, holder in self._holder.items() if holder.id == outbox_id)
        del self._holder[key]
        held = self._held.pop(key)
        while held:
            self._send_entry(held.popleft())
            if key in self._holder:  # another file for that node: the rest waits for it
                self._held[key].extend(held)
                break

    def _send(self, exchange: str, key: str, body: bytes, props: Any, outbox_id: int | None,
              mandatory: bool) -> None:
        # RabbitMQ checks user_id against the login: nodes trust only the coordinator's.
        props.user_id = self._user
        # A channel closing with the link (the other one ended) still has confirms on their
        # way, which may free what waited (a file's window, a held entry, a refused reply):
        # pika refuses publishes there. What is not published now is in the outbox, and the
        # next connection sends it; the numbering is this link's, dropped with it.
        if self._usable(self._channel):
            self._channel.basic_publish(exchange, key, body, props, mandatory=mandatory)
        self._seq += 1
        self._in_flight[self._seq] = outbox_id
        heapq.heappush(self._in_flight_heap, self._seq)

    def _on_return(self, _channel: Any, method: Any, props: Any, _body: bytes) -> None:
        message_id = props.message_id or ""
        log.warning("message_unroutable", routing_key=method.routing_key,
                    exchange=method.exchange)
        if message_id.startswith("vespid-out-"):
            self._returned.add(int(message_id.removeprefix("vespid-out-")))

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, Basic.Ack)
        # Published in ascending seq, so the settled ones lead the dict: a multiple ack reads
        # only those, not every message still in flight.
        seqs = (list(itertools.takewhile(partial(operator.ge, method.delivery_tag),
                                         self._in_flight))
                if method.multiple else [method.delivery_tag])
        done: list[int] = []
        for seq in seqs:
            outbox_id = self._in_flight.pop(seq, None)
            reply = self._replies.pop(seq, None)
            if reply is not None and not acked:
                log.warning("reply_refused_sending_again", reply_to=reply[0])
                self._send_reply(*reply)
            elif seq in self._chunk_seqs:
                self._chunk_seqs.discard(seq)
                if outbox_id is not None:
                    self._chunk_confirmed(outbox_id, acked)
            elif outbox_id is None:
                continue
            elif acked and outbox_id not in self._returned:
                done.append(outbox_id)
            else:
                self._returned.discard(outbox_id)
                self._resend.add(outbox_id)
        self.processor.confirmed(done, time.time())
        self._ack_settled()
        self._pump_files()

    def _chunk_confirmed(self, outbox_id: int, acked: bool) -> None:
        self._file_parts[outbox_id] -= 1
        if not acked or outbox_id in self._returned:
            self._failed_files.add(outbox_id)
        self._file_settled(outbox_id)

    def _ack_settled(self) -> None:
        while self._in_flight_heap and self._in_flight_heap[0] not in self._in_flight:
            heapq.heappop(self._in_flight_heap)
        lowest_open = self._in_flight_heap[0] if self._in_flight_heap else self._seq + 1
        while self._ack_after and self._ack_after[0][0] < lowest_open:
            _seq, tags = self._ack_after.popleft()
            self._settled.update(tags)
        if not self._usable(self._inbox):
            return  # closing: the broker gives what was not acked to the next consumer
        acked = self._acked
        while acked + 1 in self._settled:
            acked += 1
            self._settled.discard(acked)
        if acked > self._acked:
            self._acked = acked
            self._inbox.basic_ack(delivery_tag=acked, multiple=True)
            while self._node_tags and self._node_tags[0] <= acked:
                self._node_tags.popleft()
