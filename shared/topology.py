"""Every exchange and queue of the wire contract, as data, declared in one place.

Each process calls the `declare_*` function for what it uses after every (re)connect.
Declarations are idempotent as long as the arguments never change, which is why no other
module spells a queue name or its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

EXCHANGE = "vespid"
EVENTS_EXCHANGE = "vespid.events"
DEAD_EXCHANGE = "vespid.dead"
DEAD_QUEUE = "vespid.dead"
COORDINATOR_QUEUE = "vespid.coordinator"
COORDINATOR_KEY = "coordinator"
# The node channel (contract v1.1): nodes' node-set and task-complete apart from clients'
# requests, so a large farm's heartbeats never queue ahead of a request.
COORDINATOR_NODE_QUEUE = "vespid.coordinator.node"
COORDINATOR_NODE_KEY = "coordinator.node"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
ERROR_HEADER = "x-vespid-error"
LOGS_EXCHANGE = "vespid.logs"  # task output as it is written: key log.<task>
LOG_SERVER_QUEUE = "vespid.logserver"
LOG_REQUEST_KEY = "request"

# A message redelivered this often (its handler killed the coordinator each time) is poison:
# the broker dead-letters it instead of letting it stop all work.
COORDINATOR_DELIVERY_LIMIT = 20


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    kind: str


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any]
    bindings: tuple[tuple[str, str], ...] = field(default=())  # (exchange, routing key)


class DeclaringChannel(Protocol):
    """What both pika's blocking and asynchronous channels offer for declarations."""

    def exchange_declare(self, exchange: str, exchange_type: str, durable: bool) -> Any: ...

    def queue_declare(self, queue: str, durable: bool, arguments: dict[str, Any]) -> Any: ...

    def queue_bind(self, queue: str, exchange: str, routing_key: str) -> Any: ...


EXCHANGES = (
    ExchangeSpec(EXCHANGE, "topic"),
    ExchangeSpec(EVENTS_EXCHANGE, "topic"),
    ExchangeSpec(DEAD_EXCHANGE, "fanout"),
)

def _coordinator_queue(name: str, key: str) -> QueueSpec:
    return QueueSpec(
        name,
        {
            "x-queue-type": "quorum",
            # A second coordinator started by mistake waits instead of splitting the work
            # (and the state) in two.
            "x-single-active-consumer": True,
            "x-delivery-limit": COORDINATOR_DELIVERY_LIMIT,
            "x-dead-letter-exchange": DEAD_EXCHANGE,
        },
        ((EXCHANGE, key),),
    )


COORDINATOR_QUEUES = (
    _coordinator_queue(COORDINATOR_QUEUE, COORDINATOR_KEY),
    _coordinator_queue(COORDINATOR_NODE_QUEUE, COORDINATOR_NODE_KEY),
    QueueSpec(DEAD_QUEUE, {"x-queue-type": "quorum"}, ((DEAD_EXCHANGE, ""),)),
)


def node_key(node: str) -> str:
    return f"node.{node}"


def node_queue(node: str) -> str:
    return f"vespid.node.{node}"


def node_queue_spec(node: str) -> QueueSpec:
    # Exactly these arguments: the contract lets either side declare it first.
    return QueueSpec(
        node_queue(node),
        {"x-queue-type": "quorum", "x-single-active-consumer": True},
        ((EXCHANGE, node_key(node)),),
    )


def log_key(task: str) -> str:
    return f"log.{task}"


# A chunk that kills the log server each time it is delivered is dead-lettered, not retried
# forever (the log server rejects what it can judge bad itself, with the reason).
LOG_SERVER = QueueSpec(LOG_SERVER_QUEUE, {"x-queue-type": "quorum",
                                          "x-delivery-limit": COORDINATOR_DELIVERY_LIMIT,
                                          "x-dead-letter-exchange": DEAD_EXCHANGE},
                       ((LOGS_EXCHANGE, "log.#"), (LOGS_EXCHANGE, LOG_REQUEST_KEY)))


def declare_logs(channel: DeclaringChannel) -> None:
    channel.exchange_declare(exchange=LOGS_EXCHANGE, exchange_type="topic", durable=True)


def declare_log_server(channel: DeclaringChannel) -> None:
    declare_logs(channel)
    dead = EXCHANGES[2]  # where it dead-letters what it cannot keep
    channel.exchange_declare(exchange=dead.name, exchange_type=dead.kind, durable=True)
    declare_queue(channel, LOG_SERVER)


def event_key(event: str, task: str) -> str:
    return f"task.{event}.{task}"


def declare_exchanges(channel: DeclaringChannel) -> None:
    for spec in EXCHANGES:
        channel.exchange_declare(exchange=spec.name, exchange_type=spec.kind, durable=True)


def declare_queue(channel: DeclaringChannel, spec: QueueSpec) -> None:
    channel.queue_declare(queue=spec.name, durable=True, arguments=spec.arguments)
    for exchange, key in spec.bindings:
        channel.queue_bind(queue=spec.name, exchange=exchange, routing_key=key)


def declare_coordinator(channel: DeclaringChannel) -> None:
    declare_exchanges(channel)
    for spec in COORDINATOR_QUEUES:
        declare_queue(channel, spec)


def declare_node(channel: DeclaringChannel, node: str) -> None:
    """What a node needs: the main exchange and its own queue (vespid.dead and its queue
    belong to the coordinator, which declares them with arguments of its choosing)."""
    main = EXCHANGES[0]
    channel.exchange_declare(exchange=main.name, exchange_type=main.kind, durable=True)
    declare_queue(channel, node_queue_spec(node))
