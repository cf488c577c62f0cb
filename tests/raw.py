"""A raw-AMQP peer speaking only WIRE.md, as third-party clients and nodes do."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pika

EXCHANGE = "vespid"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class RawPeer:
    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.replies: dict[str, bytes] = {}
        self.channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)

    def _on_reply(self, _ch: Any, _m: Any, props: Any, body: bytes) -> None:
        self.replies[props.correlation_id] = body

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def send(self, body: bytes | dict[str, Any], *, key: str = "coordinator",
             reply: bool = False, props: dict[str, Any] | None = None) -> str | None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        correlation_id = uuid.uuid4().hex if reply else None
        properties = pika.BasicProperties(
            content_type="application/json", delivery_mode=2,
            reply_to=DIRECT_REPLY_TO if reply else None, correlation_id=correlation_id,
            **(props or {}))
        self.channel.basic_publish(EXCHANGE, key, data, properties)
        return correlation_id

    def request(self, body: bytes | dict[str, Any], timeout: float = 15.0,
                props: dict[str, Any] | None = None) -> dict[str, Any]:
        correlation_id = self.send(body, reply=True, props=props)
        assert correlation_id is not None
        deadline = time.monotonic() + timeout
        while correlation_id not in self.replies:
            if time.monotonic() > deadline:
                raise AssertionError(f"no reply within {timeout} s to {body!r:.200}")
            self.connection.process_data_events(time_limit=0.1)
        reply: dict[str, Any] = json.loads(self.replies.pop(correlation_id))
        return reply

    def info(self, name: str) -> dict[str, Any]:
        return self.request({"command": "task-info", "name": name})

    def wait_for(self, name: str, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
        """Poll task-info until predicate(info) holds (tests may poll; the product doesn't)."""
        deadline = time.monotonic() + timeout
        info = self.info(name)
        while not predicate(info):
            if time.monotonic() > deadline:
                raise AssertionError(f"task {name} never reached the expected state: {info}")
            time.sleep(0.1)
            info = self.info(name)
        return info

    def get(self, queue: str, timeout: float = 10.0) -> tuple[Any, bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, props, body = self.channel.basic_get(queue, auto_ack=True)
            if method is not None:
                return props, body
            self.connection.process_data_events(time_limit=0.1)
        raise AssertionError(f"nothing arrived in {queue} within {timeout} s")


NODE_QUEUE_ARGS = {"x-queue-type": "quorum", "x-single-active-consumer": True}


class RawNode:
    """A third-party node: its own queue, node-set by hand, task-complete by hand."""

    def __init__(self, peer: RawPeer, name: str, capabilities: dict[str, Any],
                 repositories: dict[str, Any] | None = None, key: str = "coordinator") -> None:
        self.peer, self.name, self.capabilities = peer, name, capabilities
        self.key = key  # `coordinator.node`: the node channel of contract v1.1
        self.repositories = repositories or {}
        self.queue = f"vespid.node.{name}"
        channel = peer.channel
        channel.exchange_declare("vespid", "topic", durable=True)
        channel.queue_declare(self.queue, durable=True, arguments=NODE_QUEUE_ARGS)
        channel.queue_bind(self.queue, "vespid", f"node.{name}")
        self.inbox: list[bytes] = []
        # Single-active-consumer quorum queues refuse basic.get: consume, as a node does.
        channel.basic_consume(self.queue, lambda _c, _m, _p, body: self.inbox.append(body),
                              auto_ack=True)

    def node_set(self, active: list[str] | dict[str, int]) -> None:
        """Report what runs here: names, or names with the attempt of each."""
        tasks = {n: {"attempt": a} for n, a in active.items()} if isinstance(active, dict) \
            else {n: {} for n in active}
        self.peer.send({"command": "node-set", "name": self.name,
                        "capabilities": self.capabilities,
                        "repositories": self.repositories, "activetasks": tasks},
                       key=self.key)

    def next_message(self, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.inbox:
            assert time.monotonic() < deadline, f"no message for {self.name} in {timeout} s"
            self.peer.connection.process_data_events(time_limit=0.1)
        message: dict[str, Any] = json.loads(self.inbox.pop(0))
        return message

    def runs(self, count: int, timeout: float = 15.0) -> list[str]:
        """The names of the next `count` task-runs, in the order they arrived."""
        return [self.next_message(timeout)["name"] for _ in range(count)]

    def complete(self, name: str, success: str = "ok") -> None:
        self.peer.send({"command": "task-complete", "name": name, "node": self.name,
                        "success": success}, key=self.key)
