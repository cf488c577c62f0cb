"""The coordinator's broker loop (CoordinatorService) driven by hand, with no broker.

A fake channel records every publish and ack in order; confirms, nacks and returns are fed
in as pika's own frames. What is pinned down: a batch of deliveries is acked only once all
it caused is confirmed; a nacked or returned outbox message stays in the outbox and goes out
again on the next tick; replies never enter the outbox; a file is streamed chunk by chunk
from the blob store within a window, ahead of what follows it to the same node, and its
outbox row is done only once every chunk is confirmed.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pika.exceptions import ChannelClosedByBroker, ChannelClosedByClient
from pika.spec import Basic
from structlog.testing import capture_logs

from vespid.coordinator import service as service_module
from vespid.coordinator.marks import MARK_TYPE
from vespid.coordinator.processor import Outcome
from vespid.coordinator.service import CoordinatorService
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.store import OutboxEntry
from vespid.shared import topology
from vespid.shared.blobs import CHUNK_BYTES, BlobChunk

USER = "coord"

# --- fakes ----------------------------------------------------------------------------------


@dataclass
class Published:
    seq: int  # the delivery tag the broker's confirm for it carries (1, 2, ... per channel)
    exchange: str
    routing_key: str
    body: bytes
    properties: Any
    mandatory: bool

    @property
    def outbox_id(self) -> int | None:
        message_id = self.properties.message_id or ""
        if message_id.startswith("vespid-out-"):
            return int(message_id.removeprefix("vespid-out-"))
        return None

    def chunk(self) -> BlobChunk:
        return BlobChunk.model_validate_json(self.body)


@dataclass
class FakeChannel:
    is_open: bool = True
    published: list[Published] = field(default_factory=list)
    acks: list[tuple[int, bool]] = field(default_factory=list)  # (delivery tag, multiple)
    declared_queues: list[str] = field(default_factory=list)
    consuming: list[str] = field(default_factory=list)
    prefetch: list[int] = field(default_factory=list)  # qos windows, in order
    # Everything in call order, publishes as ("publish", routing key): shows declare-first.
    calls: list[tuple[str, str]] = field(default_factory=list)

    def _usable(self) -> None:
        """pika refuses any call on a channel that is closing or closed."""
        assert self.is_open, "a call on a channel that is closing"

    def basic_publish(self, exchange: str, routing_key: str, body: bytes, properties: Any,
                      mandatory: bool = False) -> None:
        self._usable()
        self.published.append(Published(len(self.published) + 1, exchange, routing_key, body,
                                         properties, mandatory))
        self.calls.append(("publish", routing_key))

    def basic_ack(self, delivery_tag: int = 0, multiple: bool = False) -> None:
        self._usable()
        assert self.consuming, "acked on a channel that consumes nothing (a delivery tag " \
            "belongs to the channel it came on)"
        self.acks.append((delivery_tag, multiple))

    confirming: bool = False
    closed_callbacks: int = 0
    on_cancel: Any = None

    def add_on_close_callback(self, _callback: Any) -> None:
        self.closed_callbacks += 1

    def add_on_return_callback(self, _callback: Any) -> None:
        pass

    def add_on_cancel_callback(self, callback: Any) -> None:
        self.on_cancel = callback

    def confirm_delivery(self, ack_nack_callback: Any,
                         callback: Callable[[Any], None] | None = None) -> None:
        self.confirming = True
        if callback is not None:
            callback(SimpleNamespace())

    def basic_qos(self, prefetch_count: int,
                  callback: Callable[[Any], None] | None = None) -> None:
        self._usable()
        self.prefetch.append(prefetch_count)
        if callback is not None:  # qos-ok, at once
            callback(SimpleNamespace())

    def basic_consume(self, queue: str, on_message_callback: Any,
                      callback: Callable[[Any], None] | None = None) -> None:
        self._usable()
        self.consuming.append(queue)
        if callback is not None:  # the broker's consume-ok, at once
            callback(SimpleNamespace())

    def exchange_declare(self, exchange: str, exchange_type: str, durable: bool) -> None:
        self.calls.append(("exchange_declare", exchange))

    def queue_declare(self, queue: str, durable: bool, arguments: dict[str, Any]) -> None:
        self._usable()
        self.declared_queues.append(queue)
        self.calls.append(("queue_declare", queue))

    def queue_bind(self, queue: str, exchange: str, routing_key: str) -> None:
        self.calls.append(("queue_bind", queue))


@dataclass
class FakeIOLoop:
    later: list[tuple[float, Callable[[], None]]] = field(default_factory=list)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.later.append((delay, callback))

    def run_soon(self) -> int:
        """Run the callbacks asked for with no delay (a batch), as pika's loop would next."""
        soon = [cb for delay, cb in self.later if delay == 0]
        self.later = [(delay, cb) for delay, cb in self.later if delay != 0]
        for callback in soon:
            callback()
        return len(soon)

    def run_events(self, send_events: Callable[[], None]) -> None:
        """Run the events' turn the batch asked for, and nothing else."""
        events = [cb for delay, cb in self.later if delay == 0 and cb == send_events]
        self.later = [(delay, cb) for delay, cb in self.later if cb not in events]
        for callback in events:
            callback()


@dataclass
class FakeConnection:
    ioloop: FakeIOLoop = field(default_factory=FakeIOLoop)
    is_open: bool = True

    def close(self) -> None:
        self.is_open = False


# --- driving the service --------------------------------------------------------------------


def make_service(tmp_path: Path, **options: Any) -> CoordinatorService:
    settings = CoordinatorSettings(state=tmp_path / "s.db", blob_dir=tmp_path / "blobs",
                                   amqp_url=f"amqp://{USER}:secret@localhost:5672/", **options)
    made = CoordinatorService(settings)
    made._connection = FakeConnection()
    made._channel = FakeChannel()  # publishes
    made._inbox = FakeChannel(consuming=[topology.COORDINATOR_QUEUE,
                                         topology.COORDINATOR_NODE_QUEUE])
    return made


@pytest.fixture
def service(tmp_path: Path) -> Iterator[CoordinatorService]:
    made = make_service(tmp_path)
    yield made
    made.store.close()


@pytest.fixture
def small_turns(tmp_path: Path) -> Iterator[CoordinatorService]:
    """A coordinator that handles at most 2 node messages a turn."""
    made = make_service(tmp_path, node_batch=2)
    yield made
    made.store.close()


@pytest.fixture
def least_passes(tmp_path: Path) -> Iterator[CoordinatorService]:
    """A coordinator whose turns fit nothing: each pass starts MIN_TURN_DECISIONS at most."""
    made = make_service(tmp_path, turn_seconds=1e-6)
    yield made
    made.store.close()


def channel_of(service: CoordinatorService) -> FakeChannel:
    channel = service._channel
    assert isinstance(channel, FakeChannel)
    return channel


def inbox_of(service: CoordinatorService) -> FakeChannel:
    """The channel the service consumes and acks on."""
    inbox = service._inbox
    assert isinstance(inbox, FakeChannel)
    return inbox


def marks_come_back(service: CoordinatorService, first_tag: int, redelivered: bool = False,
                    sent_on: FakeChannel | None = None) -> int:
    """The marks the service sent through its queues (on `sent_on`, default its inbox),
    and not yet back, arrive through them (nothing queued before them); returns the next
    free delivery tag."""
    tag = first_tag
    for mark in (sent_on or inbox_of(service)).published:
        if mark.properties.type != MARK_TYPE or getattr(mark, "back", False):
            continue
        mark.back = True  # type: ignore[attr-defined]
        handler = (service._on_node_message if mark.routing_key == topology.COORDINATOR_NODE_KEY
                   else service._on_message)
        handler(service._inbox, SimpleNamespace(delivery_tag=tag, redelivered=redelivered),
                mark.properties, mark.body)
        tag += 1
    return tag


def new_link(service: CoordinatorService) -> FakeChannel:
    """The connection is lost and a new one is ready (both channels open, consuming);
    returns the old inbox."""
    old_inbox = inbox_of(service)
    service._reset_link()
    service._channel, service._inbox = FakeChannel(), FakeChannel()
    service._on_ready()
    return old_inbox


def loop_of(service: CoordinatorService) -> FakeIOLoop:
    connection = service._connection
    assert isinstance(connection, FakeConnection)
    return connection.ioloop


def deliver(service: CoordinatorService, tag: int, message: dict[str, Any],
            reply_to: str | None = None) -> None:
    props = SimpleNamespace(reply_to=reply_to, correlation_id=f"corr-{tag}" if reply_to else None,
                            user_id=None, message_id=None, type="task-create")
    service._on_message(service._channel, SimpleNamespace(delivery_tag=tag, redelivered=False),
                        props, json.dumps(message).encode("utf-8"))


def deliver_from_node(service: CoordinatorService, tag: int, message: dict[str, Any],
                      redelivered: bool = False) -> None:
    """A message on the node channel (`vespid.coordinator.node`)."""
    props = SimpleNamespace(reply_to=None, correlation_id=None, user_id=None, message_id=None,
                            type=message.get("command"))
    service._on_node_message(service._channel,
                             SimpleNamespace(delivery_tag=tag, redelivered=redelivered), props,
                             json.dumps(message).encode("utf-8"))


def run_batch(service: CoordinatorService) -> list[Published]:
    """Let the loop run the batch it scheduled; what that published."""
    channel = channel_of(service)
    before = len(channel.published)
    assert loop_of(service).run_soon() == 1
    loop_of(service).run_events(service._send_events)  # the loop's next turn
    return channel.published[before:]


def tick(service: CoordinatorService) -> list[Published]:
    channel = channel_of(service)
    before = len(channel.published)
    service._tick()
    return channel.published[before:]


def ack(service: CoordinatorService, seq: int, multiple: bool = False) -> None:
    service._on_confirm(SimpleNamespace(method=Basic.Ack(delivery_tag=seq, multiple=multiple)))


def nack(service: CoordinatorService, seq: int, multiple: bool = False) -> None:
    service._on_confirm(SimpleNamespace(method=Basic.Nack(delivery_tag=seq, multiple=multiple)))


def returned(service: CoordinatorService, message: Published) -> None:
    method = Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange=message.exchange,
                          routing_key=message.routing_key)
    service._on_return(service._channel, method, message.properties, message.body)


def confirm_all(service: CoordinatorService) -> list[Published]:
    """The broker confirms whatever is in flight, and then what that lets go, until nothing
    new is published; returns what went out meanwhile."""
    channel = channel_of(service)
    before = len(channel.published)
    for _ in range(100):
        if not service._in_flight:
            return channel.published[before:]
        ack(service, max(service._in_flight), multiple=True)
    raise AssertionError("publishing never settles")


def pending_ids(service: CoordinatorService) -> list[int]:
    return [e.id for e in service.store.pending_outbox()]


def node_set(name: str = "n1") -> dict[str, Any]:
    return {"command": "node-set", "name": name, "capabilities": {"cores": 4, "memory": 8000},
            "repositories": {}, "activetasks": []}


def task_create(name: str = "t1") -> dict[str, Any]:
    return {"command": "task-create", "name": name, "executable_pyscript": "print('hi')",
            "requirements": {"cores": 1}}


def join_node(service: CoordinatorService, tag: int = 1) -> None:
    """A node joins: nothing to publish, so its batch is acked at once."""
    deliver(service, tag, node_set())
    assert run_batch(service) == []
    assert inbox_of(service).acks[-1] == (tag, True)


def add_rows(service: CoordinatorService, *rows: tuple[str, str | None]) -> list[OutboxEntry]:
    """Outbox rows (routing key, file sha or None), committed as the processor would."""
    first = service.store.next_outbox_id()
    entries = [
        OutboxEntry(first + i, topology.EXCHANGE, key, "blob-chunk" if sha else "task-run",
                    b"" if sha else json.dumps({"command": "task-run", "n": i}).encode(),
                    file=sha)
        for i, (key, sha) in enumerate(rows)
    ]
    with service.store.transaction():
        service.store.add_outbox(entries)
    return entries


def a_file(service: CoordinatorService, chunks: int) -> tuple[bytes, str]:
    """A file of `chunks` chunks (the last one short) in the coordinator's blob store."""
    data = os.urandom(CHUNK_BYTES * (chunks - 1) + 1234)
    return data, service.files.put_bytes(data)


def unconfirmed_chunks(service: CoordinatorService, acked: set[int]) -> int:
    return sum(1 for p in channel_of(service).published
               if p.properties.type == "blob-chunk" and p.seq not in acked)


# --- acking a batch -------------------------------------------------------------------------


@dataclass
class OpeningConnection(FakeConnection):
    """Opens channels at once, as the broker would, keeping them in order."""

    opened: list[FakeChannel] = field(default_factory=list)

    def channel(self, on_open_callback: Callable[[Any], None]) -> None:
        self.opened.append(FakeChannel())
        on_open_callback(self.opened[-1])


def test_requests_and_node_messages_come_and_are_acked_on_a_channel_that_publishes_nothing(
        tmp_path: Path) -> None:
    """The broker works through a channel's publishes and deliveries in turn: a request on
    the channel that sent a burst of task-runs waited behind them."""
    service = make_service(tmp_path)
    connection = OpeningConnection()
    service._connection = connection
    try:
        service._on_open(connection)

        publishing, inbox = connection.opened
        assert (service._channel, service._inbox) == (publishing, inbox)
        assert publishing.confirming and publishing.consuming == []
        assert not inbox.confirming
        assert inbox.consuming == [topology.COORDINATOR_QUEUE, topology.COORDINATOR_NODE_QUEUE]
        assert inbox.prefetch == [service.settings.prefetch, service.settings.node_prefetch]
        assert publishing.closed_callbacks == inbox.closed_callbacks == 1  # either ends the link

        join_node(service, tag=1)
        deliver(service, 2, task_create())
        sent = run_batch(service)
        assert [p.routing_key for p in sent] == ["node.n1", "task.created.t1", "task.started.t1"]
        assert inbox.published == []
        confirm_all(service)
        assert inbox.acks == [(1, True), (2, True)] and publishing.acks == []
    finally:
        service.store.close()


def test_the_channel_the_broker_closed_explains_the_link_not_the_one_closed_with_it(
        service: CoordinatorService) -> None:
    """A known node's queue the broker refuses closes the publishing channel; closing the
    connection then closes the inbox too. The next connection must still declare the nodes'
    queues one at a time, so the refusal is named and the process stops (it retried forever
    when the second close overwrote the first)."""
    refused = ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg "
                                         "'x-queue-type' for queue 'vespid.node.box1'")
    service._on_channel_closed(service._channel, refused)
    service._on_channel_closed(service._inbox, ChannelClosedByClient(200, "Normal shutdown"))

    assert service._check_node_queues
    assert service._close_reason is not None and "inequivalent arg" in service._close_reason
    assert not service._connection.is_open


def test_a_consume_ok_that_arrives_while_the_link_closes_touches_no_channel(
        service: CoordinatorService) -> None:
    """The broker refused a node's queue on the publishing channel; the inbox's consume-ok
    was already on its way and arrives while the inbox closes with the connection."""
    service._inbox.consuming.clear()
    refused = ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg")
    service._channel.is_open = False
    service._on_channel_closed(service._channel, refused)
    service._inbox.is_open = False  # closing, with the connection

    service._consume_nodes()  # would raise inside pika's frame dispatch
    service._consume_node_queue()
    service._on_ready()

    assert service._inbox.consuming == [] and service._inbox.prefetch == []
    assert service._check_node_queues and not service._connection.is_open


def test_confirms_on_a_publishing_channel_closing_with_the_link_publish_nothing(
        service: CoordinatorService) -> None:
    """The broker closed the inbox (a consumer's ack timed out, say): the publishing channel
    closes with the connection while confirms still come, and a refused reply would go
    again. Nothing is published there, nothing is acked, and no node queue is checked one
    at a time next (the inbox declares none)."""
    channel, [reply] = a_request_answered(service)
    timed_out = ChannelClosedByBroker(406, "PRECONDITION_FAILED - delivery acknowledgement "
                                           "on channel 2 timed out")
    service._inbox.is_open = False
    service._on_channel_closed(service._inbox, timed_out)
    channel.is_open = False  # closing, with the connection
    acks_before = list(inbox_of(service).acks)

    nack(service, reply.seq)

    assert [p.seq for p in channel.published] == [reply.seq]  # not sent again here
    assert inbox_of(service).acks == acks_before
    assert not service._check_node_queues
    assert "timed out" in (service._close_reason or "")


def test_a_consumer_the_broker_cancels_ends_the_link(service: CoordinatorService) -> None:
    """Its queue deleted, the broker cancels the consumer and keeps the channel open: nothing
    would come any more, and the nodes' silence would be taken for their loss."""
    connection = OpeningConnection()
    service._connection = connection
    service._on_open(connection)
    _publishing, inbox = connection.opened

    inbox.on_cancel(SimpleNamespace(method=SimpleNamespace(consumer_tag="ctag1.0")))

    assert not connection.is_open
    assert service._close_reason == "the broker cancelled a consumer"


def test_a_batch_is_acked_with_its_last_tag_only_once_every_publish_is_confirmed_in_any_order(
        service: CoordinatorService) -> None:
    join_node(service, tag=1)
    inbox = inbox_of(service)

    # Two deliveries in one batch: a single ioloop callback runs them together.
    deliver(service, 2, task_create(), reply_to="client")
    deliver(service, 3, {"command": "task-info", "name": "t1"}, reply_to="client")
    sent = run_batch(service)

    # Two replies and the task-run, then (the loop's next turn) created and started events.
    assert [p.seq for p in sent] == [1, 2, 3, 4, 5]
    assert [p.routing_key for p in sent] == ["client", "client", "node.n1", "task.created.t1",
                                             "task.started.t1"]
    assert all(p.properties.user_id == USER for p in sent)
    assert inbox.acks == [(1, True)]
    for seq in (4, 2, 1, 3):  # out of order, and all but the batch's last publish
        ack(service, seq)
        assert inbox.acks == [(1, True)], f"acked early, after the confirm of {seq}"
    ack(service, 5)
    assert inbox.acks == [(1, True), (3, True)]


def test_a_batch_sends_to_nodes_at_once_and_its_events_on_the_loops_next_turn_in_order(
        service: CoordinatorService) -> None:
    join_node(service, tag=1)
    channel, inbox = channel_of(service), inbox_of(service)
    deliver(service, 2, task_create(), reply_to="client")
    assert loop_of(service).run_soon() == 1  # the batch alone
    assert [p.routing_key for p in channel.published] == ["client", "node.n1"]
    deliver(service, 3, task_create("t2"))  # a second batch before the events' turn
    assert loop_of(service).run_soon() == 2  # the events' turn, then the second batch
    assert [p.routing_key for p in channel.published] == [
        "client", "node.n1", "task.created.t1", "task.started.t1", "node.n1"]
    loop_of(service).run_events(service._send_events)
    assert [p.routing_key for p in channel.published[5:]] == ["task.created.t2",
                                                              "task.started.t2"]
    for seq in range(1, 7):  # all but the second batch's last event
        ack(service, seq)
    assert inbox.acks == [(1, True), (2, True)]  # the first batch, once its events were
    ack(service, 7)
    assert inbox.acks == [(1, True), (2, True), (3, True)]


def test_a_later_batch_confirmed_first_waits_for_the_earlier_one(
        service: CoordinatorService) -> None:
    join_node(service, tag=1)
    inbox = inbox_of(service)
    deliver(service, 2, task_create(), reply_to="client")
    first = run_batch(service)
    deliver(service, 3, {"command": "task-info", "name": "t1"}, reply_to="client")
    second = run_batch(service)
    assert [p.seq for p in first] == [1, 2, 3, 4]
    assert [p.seq for p in second] == [5]

    ack(service, 5)
    assert inbox.acks == [(1, True)]  # the batch of tag 3 waits behind the one of tag 2
    ack(service, 4, multiple=True)
    assert inbox.acks == [(1, True), (3, True)]  # both batches settled: one ack for both


def test_a_multiple_confirm_settles_every_publish_up_to_its_tag_and_no_further(
        service: CoordinatorService) -> None:
    join_node(service, tag=1)
    inbox = inbox_of(service)
    deliver(service, 2, task_create("t1"), reply_to="client")
    run_batch(service)  # seqs 1-4: reply + 3 outbox rows
    deliver(service, 3, task_create("t2"), reply_to="client")
    run_batch(service)  # seqs 5-8
    rows_of_t2 = pending_ids(service)[3:]
    assert len(pending_ids(service)) == 6

    ack(service, 2)  # one of them alone first: the multiple one below covers it again
    ack(service, 4, multiple=True)
    assert inbox.acks == [(1, True), (2, True)]
    tick(service)  # the next transaction forgets the rows confirmed
    assert pending_ids(service) == rows_of_t2

    ack(service, 8, multiple=True)
    assert inbox.acks == [(1, True), (2, True), (3, True)]
    tick(service)
    assert pending_ids(service) == []


# --- nacks and returns ----------------------------------------------------------------------


def test_a_nacked_outbox_message_stays_in_the_outbox_and_goes_again_on_the_next_tick(
        service: CoordinatorService) -> None:
    join_node(service, tag=1)
    channel, inbox = channel_of(service), inbox_of(service)
    deliver(service, 2, task_create())
    sent = run_batch(service)
    run = next(p for p in sent if p.routing_key == "node.n1")
    assert run.mandatory  # to a node queue: an unroutable one must come back
    assert not next(p for p in sent if p.routing_key == "task.created.t1").mandatory

    for p in sent:
        (nack if p is run else ack)(service, p.seq)
    # The outbox row keeps it safe, so the delivery need not be redelivered: acked.
    assert inbox.acks[-1] == (2, True)
    assert service._in_flight == {}

    calls_before = len(channel.calls)
    again = tick(service)
    assert pending_ids(service) == [run.outbox_id]  # the other two were deleted, not it
    assert [(p.routing_key, p.body, p.outbox_id) for p in again] == [
        ("node.n1", run.body, run.outbox_id)]
    # Its queue is declared again first, in case it vanished.
    queue = topology.node_queue("n1")
    assert channel.calls[calls_before:] == [
        ("exchange_declare", topology.EXCHANGE), ("queue_declare", queue),
        ("queue_bind", queue), ("publish", "node.n1")]
    assert tick(service) == []  # not once per tick: once per nack

    ack(service, again[0].seq)
    assert pending_ids(service) == [run.outbox_id]  # deleted in the next transaction only
    assert tick(service) == []
    assert pending_ids(service) == []


def test_a_returned_message_then_acked_is_not_delivered_and_goes_again(
        service: CoordinatorService) -> None:
    join_node(service, tag=1)
    deliver(service, 2, task_create())
    sent = run_batch(service)
    run = next(p for p in sent if p.routing_key == "node.n1")

    returned(service, run)  # the broker returns it, then acks it (as RabbitMQ does)
    ack(service, sent[-1].seq, multiple=True)
    assert inbox_of(service).acks[-1] == (2, True)

    again = tick(service)
    assert [(p.routing_key, p.outbox_id) for p in again] == [("node.n1", run.outbox_id)]
    assert pending_ids(service) == [run.outbox_id]
    ack(service, again[0].seq)  # routed this time: the earlier return is forgotten
    assert tick(service) == []
    assert pending_ids(service) == []


def a_request_answered(service: CoordinatorService) -> tuple[FakeChannel, list[Published]]:
    """A node joined (tag 1), then a task-info with reply_to (tag 2): what its batch sent."""
    join_node(service, tag=1)
    deliver(service, 2, {"command": "task-info", "name": "nope"}, reply_to="amq.rabbitmq.reply-to")
    return channel_of(service), run_batch(service)


def test_replies_are_published_to_reply_to_and_never_enter_the_outbox(
        service: CoordinatorService) -> None:
    _channel, sent = a_request_answered(service)

    assert len(sent) == 1
    reply = sent[0]
    assert (reply.exchange, reply.routing_key, reply.mandatory) == (
        "", "amq.rabbitmq.reply-to", False)
    assert reply.properties.correlation_id == "corr-2"
    assert reply.properties.delivery_mode == 1
    assert reply.outbox_id is None
    assert pending_ids(service) == []
    inbox = inbox_of(service)
    assert inbox.acks == [(1, True)]  # the batch waits for its reply's confirm all the same

    ack(service, reply.seq)
    assert inbox.acks == [(1, True), (2, True)]
    assert tick(service) == []
    assert pending_ids(service) == []


def test_a_refused_reply_is_sent_again_at_once(
        service: CoordinatorService) -> None:
    channel, [reply] = a_request_answered(service)

    nack(service, reply.seq)

    again = channel.published[-1]
    assert again.seq != reply.seq
    assert (again.routing_key, again.body) == (reply.routing_key, reply.body)
    assert again.properties.correlation_id == "corr-2"
    ack(service, again.seq)
    assert tick(service) == []  # once is enough: nothing else goes again


def test_after_a_reconnect_the_unconfirmed_outbox_goes_again_in_order_files_first(
        service: CoordinatorService) -> None:
    _, sha = a_file(service, chunks=2)
    join_node(service, tag=1)
    deliver(service, 2, task_create())
    run_batch(service)  # published, never confirmed: the link drops
    file_row, run_row = add_rows(service, ("node.n1", sha), ("node.n1", None))

    new_link(service)

    channel = channel_of(service)
    assert inbox_of(service).consuming == [topology.COORDINATOR_QUEUE,
                                           topology.COORDINATOR_NODE_QUEUE]
    assert channel.consuming == []  # the publishing channel consumes nothing
    confirm_all(service)
    keys = [(p.routing_key, p.outbox_id) for p in channel.published]
    assert keys == [("task.created.t1", 1), ("node.n1", 2), ("task.started.t1", 3),
                    ("node.n1", file_row.id), ("node.n1", file_row.id),
                    ("node.n1", run_row.id)]
    assert [p.seq for p in channel.published] == [1, 2, 3, 4, 5, 6]  # a new channel
    tick(service)
    assert pending_ids(service) == []


# --- files ----------------------------------------------------------------------------------


def test_a_file_is_streamed_in_chunk_order_before_what_follows_it_to_the_same_node(
        service: CoordinatorService) -> None:
    data, sha = a_file(service, chunks=5)  # ~1.05 MB
    file_row, run_row, other_row = add_rows(
        service, ("node.n1", sha), ("node.n1", None), ("node.n2", None))

    service._publish(Outcome(outbox=[file_row, run_row, other_row]))
    assert channel_of(service).published[0].outbox_id == other_row.id  # not held back
    confirm_all(service)

    sent = channel_of(service).published
    # The other node's message is not held back; this node's waits for the last chunk.
    assert [(p.routing_key, p.outbox_id) for p in sent] == [
        ("node.n2", other_row.id)] + [("node.n1", file_row.id)] * 5 + [("node.n1", run_row.id)]
    chunks = [p.chunk() for p in sent[1:6]]
    assert [c.index for c in chunks] == [0, 1, 2, 3, 4]
    assert {(c.sha256, c.count, c.size) for c in chunks} == {(sha, 5, len(data))}
    assert b"".join(base64.b64decode(c.data) for c in chunks) == data
    assert all(p.mandatory and p.properties.type == "blob-chunk" for p in sent[1:6])
    assert sent[6].body == run_row.body


def test_no_more_than_the_window_of_chunks_is_in_flight_and_what_waits_goes_after_the_last(
        service: CoordinatorService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "FILE_WINDOW_CHUNKS", 4)
    data, sha = a_file(service, chunks=20)
    file_row, run_row, other_row = add_rows(
        service, ("node.n1", sha), ("node.n1", None), ("node.n2", None))
    channel = channel_of(service)

    service._publish(Outcome(outbox=[file_row, run_row, other_row]))

    # The other node is not held back behind the file; this node's task-run is.
    assert [p.routing_key for p in channel.published] == ["node.n2"] + ["node.n1"] * 4
    acked: set[int] = set()
    most = unconfirmed_chunks(service, acked)
    steps = 0
    while True:
        chunk_seqs = [p.seq for p in channel.published
                      if p.properties.type == "blob-chunk" and p.seq not in acked]
        if not chunk_seqs:
            break
        # Confirms one by one, the latest first, or two at once with multiple=True.
        if steps % 3 == 2 and len(chunk_seqs) >= 2:
            ack(service, chunk_seqs[1], multiple=True)
            acked.update(range(1, chunk_seqs[1] + 1))
        else:
            ack(service, chunk_seqs[-1])
            acked.add(chunk_seqs[-1])
        most = max(most, unconfirmed_chunks(service, acked))
        steps += 1
        assert steps < 100

    assert most == 4
    confirm_all(service)
    chunks = [p.chunk() for p in channel.published if p.properties.type == "blob-chunk"]
    assert [c.index for c in chunks] == list(range(20))
    assert b"".join(base64.b64decode(c.data) for c in chunks) == data
    last_chunk = max(p.seq for p in channel.published if p.properties.type == "blob-chunk")
    run = [p for p in channel.published if p.outbox_id == run_row.id]
    assert len(run) == 1
    assert run[0].seq == last_chunk + 1


def test_a_file_row_is_done_only_once_every_chunk_is_confirmed(
        service: CoordinatorService) -> None:
    _, sha = a_file(service, chunks=5)
    other_row, file_row = add_rows(service, ("node.n2", None), ("node.n1", sha))
    service._publish(Outcome(outbox=[other_row, file_row]))
    sent = channel_of(service).published
    assert [(p.seq, p.outbox_id) for p in sent] == [(1, other_row.id)] + [
        (seq, file_row.id) for seq in (2, 3, 4, 5, 6)]

    ack(service, 6)  # the last chunk first
    ack(service, 4, multiple=True)  # the other node's message and chunks 0-2
    tick(service)
    assert pending_ids(service) == [file_row.id]  # chunk 3 (seq 5) is not confirmed yet
    ack(service, 5)
    assert pending_ids(service) == [file_row.id]  # deleted by the next transaction
    assert tick(service) == []
    assert pending_ids(service) == []


def test_a_nacked_chunk_sends_the_whole_file_again_on_the_next_tick(
        service: CoordinatorService) -> None:
    data, sha = a_file(service, chunks=5)
    (file_row,) = add_rows(service, ("node.n1", sha))
    service._publish(Outcome(outbox=[file_row]))

    nack(service, 2)
    ack(service, 1)
    assert tick(service) == []  # chunks 2-4 still unconfirmed: not yet
    ack(service, 5, multiple=True)

    again = tick(service)
    assert [(p.routing_key, p.outbox_id) for p in again] == [("node.n1", file_row.id)] * 5
    chunks = [p.chunk() for p in again]
    assert [c.index for c in chunks] == [0, 1, 2, 3, 4]
    assert b"".join(base64.b64decode(c.data) for c in chunks) == data
    assert pending_ids(service) == [file_row.id]
    ack(service, again[-1].seq, multiple=True)
    assert tick(service) == []
    assert pending_ids(service) == []


def test_a_returned_chunk_sends_the_whole_file_again(service: CoordinatorService) -> None:
    data, sha = a_file(service, chunks=3)
    (file_row,) = add_rows(service, ("node.n1", sha))
    service._publish(Outcome(outbox=[file_row]))
    sent = channel_of(service).published

    returned(service, sent[2])
    ack(service, 3, multiple=True)

    again = tick(service)
    assert [p.chunk().index for p in again] == [0, 1, 2]
    assert b"".join(base64.b64decode(p.chunk().data) for p in again) == data
    assert pending_ids(service) == [file_row.id]
    ack(service, again[-1].seq, multiple=True)  # routed this time
    assert tick(service) == []
    assert pending_ids(service) == []


def test_a_message_resent_while_a_file_streams_to_its_node_waits_behind_the_file(
        service: CoordinatorService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "FILE_WINDOW_CHUNKS", 2)
    join_node(service, tag=1)
    deliver(service, 2, task_create())
    sent = run_batch(service)
    run = next(p for p in sent if p.routing_key == "node.n1")
    nack(service, run.seq)
    _, sha = a_file(service, chunks=3)
    (file_row,) = add_rows(service, ("node.n1", sha))
    service._publish(Outcome(outbox=[file_row]))  # chunks 0 and 1 go out, 2 must wait

    assert tick(service) == []  # the task-run goes again, but behind the file

    channel = channel_of(service)
    confirm_all(service)
    tail = [(p.routing_key, p.properties.type, p.outbox_id)
            for p in channel.published[len(sent) + 2:]]
    assert tail == [("node.n1", "blob-chunk", file_row.id), ("node.n1", "task-run", run.outbox_id)]


def test_a_missing_file_does_not_hold_back_what_follows_it(
        service: CoordinatorService) -> None:
    missing = "ab" * 32
    file_row, run_row = add_rows(service, ("node.n1", missing), ("node.n1", None))

    service._publish(Outcome(outbox=[file_row, run_row]))

    sent = channel_of(service).published
    assert [(p.routing_key, p.outbox_id) for p in sent] == [("node.n1", run_row.id)]
    ack(service, sent[0].seq)
    # Nothing to send it from: the row is given up, not retried at every tick.
    assert tick(service) == []
    assert pending_ids(service) == []
    assert service._held == {}
    assert not service._streams


def test_after_a_nacked_chunk_the_node_still_gets_the_whole_file_before_its_task_run(
        service: CoordinatorService) -> None:
    _, sha = a_file(service, chunks=3)
    file_row, run_row = add_rows(service, ("node.n1", sha), ("node.n1", None))
    channel = channel_of(service)
    delivered: dict[int, bool] = {}  # publish seq -> did the broker take it

    service._publish(Outcome(outbox=[file_row, run_row]))
    nack(service, 2)  # chunk 1: the broker could not take it; the others it does
    delivered[2] = False
    for _ in range(5):  # the broker takes everything else, as the loop goes on
        open_seqs = [p.seq for p in channel.published if p.seq not in delivered]
        if open_seqs:
            ack(service, max(open_seqs), multiple=True)
            delivered.update(dict.fromkeys(open_seqs, True))
        tick(service)
    assert pending_ids(service) == []

    # What reached the node's queue, in order: its task-run must come after every chunk.
    reached = [p for p in channel.published if delivered[p.seq]]
    first_run = next(i for i, p in enumerate(reached) if p.outbox_id == run_row.id)
    assert {p.chunk().index for p in reached[:first_run]} == {0, 1, 2}


# --- requests beside the nodes' traffic ---------------------------------------------------


def test_a_read_is_answered_first_from_the_committed_state_and_node_messages_wait_their_turn(
        small_turns: CoordinatorService) -> None:
    service = small_turns
    join_node(service, tag=1)
    inbox = inbox_of(service)
    for tag in range(2, 7):  # five node-sets on the node channel, then a request
        deliver_from_node(service, tag, node_set(f"m{tag}"))
    deliver(service, 7, {"command": "node-list"}, reply_to="client")

    [reply] = run_batch(service)  # a turn of its own, ahead of the five
    listed = [n["name"] for n in json.loads(reply.body)["nodes"]]
    assert (reply.routing_key, listed) == ("client", ["n1"])
    assert sorted(service.processor.state.nodes) == ["n1"]
    ack(service, 1)
    assert inbox.acks == [(1, True)]  # 7 is settled, but 2-6 come before it

    assert run_batch(service) == []  # the next turn came by itself: a batch of two
    assert sorted(service.processor.state.nodes) == ["m2", "m3", "n1"]
    assert inbox.acks[-1] == (3, True)
    assert run_batch(service) == []  # 4 and 5
    assert inbox.acks[-1] == (5, True)
    assert run_batch(service) == []  # 6, and with it the prefix reaches 7
    assert inbox.acks[-1] == (7, True)
    assert loop_of(service).run_soon() == 0
    assert sorted(service.processor.state.nodes) == ["m2", "m3", "m4", "m5", "m6", "n1"]


def test_reads_never_starve_the_nodes_a_batch_follows_every_turn_of_reads(
        small_turns: CoordinatorService) -> None:
    service = small_turns
    for tag in range(1, 4):
        deliver_from_node(service, tag, node_set(f"m{tag}"))
    deliver(service, 4, {"command": "node-list"}, reply_to="client")
    run_batch(service)  # the read
    deliver(service, 5, {"command": "node-list"}, reply_to="client")  # came meanwhile
    assert run_batch(service) == []  # a batch all the same
    assert sorted(service.processor.state.nodes) == ["m1", "m2"]
    [reply] = run_batch(service)  # then the read that waited
    assert [n["name"] for n in json.loads(reply.body)["nodes"]] == ["m1", "m2"]


def test_a_read_never_shows_a_write_not_yet_committed_and_one_sent_after_a_write_sees_it(
        service: CoordinatorService) -> None:
    join_node(service, tag=1)
    deliver(service, 2, {"command": "task-info", "name": "t1"}, reply_to="client")
    deliver(service, 3, task_create(), reply_to="client")
    deliver(service, 4, {"command": "task-info", "name": "t1"}, reply_to="client")
    [first] = run_batch(service)
    assert json.loads(first.body)["status"] == "invalid"  # answered ahead of the write

    ack_reply, after = (json.loads(p.body) for p in run_batch(service)[:2])
    assert ack_reply["command"] == "ack"
    # Behind the write, in its batch: sees the task made (the batch's decision to start it
    # comes after, at the end of the batch)
    assert after["name"] == "t1" and after["status"] is None
    confirm_all(service)
    assert inbox_of(service).acks[-1] == (4, True)


def test_the_same_read_twice_in_a_turn_is_built_once_and_answered_twice(
        service: CoordinatorService) -> None:
    join_node(service, tag=1)
    deliver(service, 2, {"command": "node-list"}, reply_to="a")
    deliver(service, 3, {"command": "node-list"}, reply_to="b")
    one, two = run_batch(service)
    assert (one.routing_key, two.routing_key) == ("a", "b")
    assert one.body == two.body
    assert (one.properties.correlation_id, two.properties.correlation_id) == ("corr-2", "corr-3")


def test_no_node_is_lost_while_node_messages_wait_unhandled_longer_than_a_second(
        service: CoordinatorService) -> None:
    deliver_from_node(service, 1, node_set("quiet"))
    run_batch(service)
    nodes = service.processor.state.nodes
    nodes["quiet"].last_seen -= 1000  # silent far past the heartbeat timeout
    deliver_from_node(service, 2, node_set("busy"))  # in hand, not handled yet
    service._from_nodes[0] = dataclasses.replace(service._from_nodes[0],
                                                 received=time.time() - 5)

    tick(service)
    assert nodes["quiet"].alive, "lost while its heartbeat may have been waiting in hand"

    run_batch(service)  # caught up, but no mark back yet: its heartbeats may be queued
    tick(service)
    assert nodes["quiet"].alive, "lost with no mark back to say the queues hold nothing older"

    marks_come_back(service, 3)
    run_batch(service)
    tick(service)
    assert not nodes["quiet"].alive
    assert nodes["busy"].alive


def test_no_node_is_lost_while_requests_wait_unhandled_either(
        service: CoordinatorService) -> None:
    # A node of contract v1 sends its node-sets with the requests, not on the node channel.
    deliver(service, 1, node_set("quiet"))
    run_batch(service)
    service.processor.state.nodes["quiet"].last_seen -= 1000
    deliver(service, 2, node_set("busy"))
    service._requests[0] = dataclasses.replace(service._requests[0],
                                               received=time.time() - 5)

    tick(service)
    assert service.processor.state.nodes["quiet"].alive


# ---- marks through the coordinator's own queues (marks.py) -------------------------------------
def test_each_tick_sends_a_mark_through_each_queue_on_the_inbox_outside_the_confirms(
        service: CoordinatorService) -> None:
    published_before = len(channel_of(service).published)

    tick(service)

    marks = [(m.exchange, m.routing_key, m.properties.type, m.properties.user_id)
             for m in inbox_of(service).published]
    assert marks == [(topology.EXCHANGE, topology.COORDINATOR_KEY, MARK_TYPE, service._user),
                     (topology.EXCHANGE, topology.COORDINATOR_NODE_KEY, MARK_TYPE,
                      service._user)]
    assert len(channel_of(service).published) == published_before  # no publish seq taken


def test_a_mark_that_comes_back_is_acked_and_dates_what_comes_after_it(
        service: CoordinatorService) -> None:
    before = time.time()
    tick(service)
    deliver_from_node(service, 1, node_set("early"))  # queued before any mark came back
    next_tag = marks_come_back(service, 2)
    deliver_from_node(service, next_tag, node_set("late"))

    early, late = service._from_nodes
    assert early.enqueued_after == 0.0  # as old as anything could be
    assert late.enqueued_after is not None and late.enqueued_after >= before
    assert [d.tag for d in service._requests] == []  # the marks are nobody's requests

    run_batch(service)
    assert inbox_of(service).acks[-1] == (next_tag, True)  # marks acked in order with the rest
    assert set(service.processor.state.nodes) == {"early", "late"}


def test_a_message_typed_as_a_mark_from_another_login_is_handled_as_what_it_is(
        service: CoordinatorService) -> None:
    def typed_as_a_mark(tag: int, user: str, message_id: str) -> None:
        props = SimpleNamespace(reply_to=None, correlation_id=None, user_id=user,
                                message_id=message_id, type=MARK_TYPE)
        service._on_message(service._inbox, SimpleNamespace(delivery_tag=tag,
                                                            redelivered=False), props, b"{}")

    typed_as_a_mark(1, "mallory", f"{MARK_TYPE}:not-ours:1")
    typed_as_a_mark(2, service._user or "", f"{MARK_TYPE}:another-coordinator:1")
    tick(service)
    [requests_mark, _] = inbox_of(service).published
    # A copy of a mark of ours, by anyone, comes after the mark was sent: it dates what
    # follows it no later than the truth, so it counts like the mark.
    typed_as_a_mark(3, "mallory", requests_mark.properties.message_id)

    assert [d.tag for d in service._requests] == [1]  # to be refused, not taken as a mark
    assert service._marks.through(topology.COORDINATOR_QUEUE) > 0


def test_after_a_reconnect_what_comes_again_is_dated_as_unknown_until_a_new_mark(
        service: CoordinatorService) -> None:
    """What the lost link had in hand comes again, from the front of the queue: it may
    have been queued long before the marks the lost link saw."""
    tick(service)
    marks_come_back(service, 1)
    old_inbox = new_link(service)
    deliver_from_node(service, 1, node_set("again"), redelivered=True)
    assert service._from_nodes[0].enqueued_after == 0.0
    assert service._heard_through() == 0.0  # no node is lost on the lost link's marks

    before = time.time()
    tick(service)
    next_tag = marks_come_back(service, 2)  # this link's marks
    deliver_from_node(service, next_tag, node_set("fresh"))
    fresh = service._from_nodes[-1]
    assert fresh.enqueued_after is not None and fresh.enqueued_after >= before
    assert old_inbox.published and all(getattr(m, "back", False) for m in old_inbox.published)


def test_a_mark_of_the_lost_link_still_dates_what_follows_it_unless_it_comes_again(
        service: CoordinatorService) -> None:
    sent = time.time()
    tick(service)  # these marks are still queued when the link is lost
    requests_mark, node_mark = new_link(service).published
    marks_come_back(service, 1, redelivered=True, sent_on=FakeChannel(published=[requests_mark]))
    assert service._marks.through(topology.COORDINATOR_QUEUE) == 0.0  # came again: nothing

    marks_come_back(service, 2, sent_on=FakeChannel(published=[node_mark]))
    assert service._marks.through(topology.COORDINATOR_NODE_QUEUE) >= sent


def test_without_a_login_in_the_url_the_coordinator_still_knows_its_own_marks(
        tmp_path: Path) -> None:
    made = make_service(tmp_path)
    try:
        made._user = None  # amqp://host/ logs in as pika's default, and sets no user_id
        tick(made)
        marks_come_back(made, 1)
        props = SimpleNamespace(reply_to=None, correlation_id=None, user_id=None,
                                message_id="vespid-mark:someone-else:1", type=MARK_TYPE)
        made._on_message(made._inbox, SimpleNamespace(delivery_tag=3, redelivered=False),
                         props, b"{}")

        assert made._marks.through(topology.COORDINATOR_QUEUE) > 0
        assert [d.tag for d in made._requests] == [3]  # not ours, from nobody: a message
    finally:
        made.store.close()


def test_the_marks_tell_how_long_node_messages_wait_in_the_broker(
        service: CoordinatorService) -> None:
    """Behind a backlog the window may look free and nothing in hand old (just acked): the
    latest mark back says how long the messages wait, and the warning says it too."""
    tick(service)
    marks_come_back(service, 1)
    assert service._caught_up_with_nodes()

    service._marks._through[topology.COORDINATOR_NODE_QUEUE] = time.time() - 30
    service._next_lag_warning = 0.0
    with capture_logs() as logged:
        assert not service._caught_up_with_nodes()

    [warning] = [e for e in logged if e["event"] == "node_sweep_deferred"]
    assert warning["in_broker_seconds"] >= 30 and warning["behind_seconds"] >= 30


# --- how much a turn takes on ----------------------------------------------------------------


def big_node(name: str) -> dict[str, Any]:
    return {**node_set(name), "capabilities": {"cores": 64, "memory": 64000}}


def task_runs(published: list[Published]) -> list[str]:
    return [json.loads(p.body)["name"] for p in published if p.routing_key.startswith("node.")]


def test_a_pass_stopped_at_its_limit_goes_on_in_a_turn_of_its_own(
        least_passes: CoordinatorService) -> None:
    service = least_passes
    count = service_module.MIN_TURN_DECISIONS + 5
    for tag in range(1, count + 1):
        deliver(service, tag, task_create(f"t{tag:02d}"))
    run_batch(service)
    deliver_from_node(service, 1, big_node("big"))

    first = task_runs(run_batch(service))
    rest = task_runs(run_batch(service))  # no message came: the turn came by itself

    assert first == [f"t{tag:02d}" for tag in range(1, service_module.MIN_TURN_DECISIONS + 1)]
    assert rest == [f"t{tag:02d}" for tag in range(len(first) + 1, count + 1)]
    assert loop_of(service).run_soon() == 0  # and then none


def test_node_messages_that_let_several_tasks_start_make_the_next_batch_smaller_at_once(
        service: CoordinatorService) -> None:
    service._learn_cost(0.010, 100, 100, by_these=True)  # a complete lets one start
    steady = service._batch_size()

    service._learn_cost(0.030, 20, 160, by_these=True)  # 20 nodes joined a deep queue

    assert service._starts_per_message == 8.0  # up at once, not by an eighth
    assert service._batch_size() == max(service_module.MIN_NODE_BATCH, service._fits() // 9)
    assert service._batch_size() < steady


def test_the_starts_of_a_pass_going_on_are_not_put_down_to_the_turns_messages(
        service: CoordinatorService) -> None:
    service._learn_cost(0.030, 1, 60, by_these=False)  # one cancel beside a continued pass

    assert service._starts_per_message == 1.0


def test_a_pass_the_tick_stopped_goes_on_in_a_turn_of_its_own(
        least_passes: CoordinatorService) -> None:
    service = least_passes
    count = service_module.MIN_TURN_DECISIONS + 5
    deliver_from_node(service, 1, big_node("n1"))
    deliver_from_node(service, 2, big_node("n2"))
    for tag in range(3, count + 3):
        deliver(service, tag, {**task_create(f"t{tag:02d}"), "retries": 3})
    while loop_of(service).run_soon():
        pass
    confirm_all(service)
    state = service.processor.state
    assert sum(t.node == "n1" for t in state.tasks.values()) == count
    tick(service)  # sends the marks
    marks_come_back(service, 1000)  # the node queue is heard through now
    while loop_of(service).run_soon():
        pass
    state.nodes["n1"].last_seen = time.time() - 10_000  # n1 falls silent
    state.nodes["n2"].last_seen = time.time()

    tick(service)  # loses n1: its tasks wait again, and the tick's pass stops

    assert not state.nodes["n1"].alive
    assert sum(t.node == "n2" for t in state.tasks.values()) == \
        service_module.MIN_TURN_DECISIONS
    while loop_of(service).run_soon():  # the turns that follow, with nothing received
        pass
    assert sum(t.node == "n2" for t in state.tasks.values()) == count


def test_a_pass_that_fails_is_not_retried_in_a_loop_of_empty_turns(
        least_passes: CoordinatorService, monkeypatch: pytest.MonkeyPatch) -> None:
    service = least_passes
    count = service_module.MIN_TURN_DECISIONS + 5
    for tag in range(1, count + 1):
        deliver(service, tag, task_create(f"t{tag:02d}"))
    loop_of(service).run_soon()
    extensions = service.processor.extensions
    real_started = extensions.started

    def started(ctx: Any, task: Any) -> None:  # an extension failing on one task's start
        if task.name == f"t{count:02d}":
            raise RuntimeError("extension bug")
        real_started(ctx, task)

    monkeypatch.setattr(extensions, "started", started)
    deliver_from_node(service, 100, big_node("big"))

    turns = 0
    while loop_of(service).run_soon() and turns < 50:
        turns += 1

    assert turns < 10  # the batch, the pass going on, the failure: then quiet
