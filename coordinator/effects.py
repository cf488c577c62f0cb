"""What handling a batch of messages causes, collected before anything is sent.

Handlers never publish: they record replies and outgoing messages here. The service
writes outgoing messages to the outbox in the same transaction as the state change, then
publishes them, and acks the batch only once the broker confirmed everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from vespid.coordinator.extension import Encoded
from vespid.shared import topology
from vespid.shared.protocol import NodeDrain, RepositoryClean, TaskKill, TaskRun, encode
from vespid.shared.wire import body_of

# Everything the coordinator sends a node is one of these models, never a dict.
NodeMessage = TaskRun | TaskKill | RepositoryClean | NodeDrain


@dataclass(frozen=True)
class Reply:
    reply_to: str
    correlation_id: str | None
    body: dict[str, Any]
    data: bytes  # encoded while handling, so a body that is not strict JSON fails there


@dataclass(frozen=True)
class Outgoing:
    exchange: str
    routing_key: str
    command: str
    body: bytes
    headers: dict[str, Any] | None = None
    run: tuple[str, int] | None = None  # a task-run: (task, attempt), told when it is confirmed


@dataclass(frozen=True)
class FileSend:
    """Send the kept file `sha256` to `node`. Recorded in the outbox as one small row; the
    service streams the file chunk by chunk from disk after the commit, never through the
    transaction or all at once in memory."""

    node: str
    sha256: str


@dataclass
class Effects:
    replies: list[Reply] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)
    new_nodes: list[str] = field(default_factory=list)
    files: list[FileSend] = field(default_factory=list)
    # Local disk work a decision implies (placing result files, say): run once the batch
    # committed, outside the transaction; each is idempotent, so a retry may repeat it.
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    handled: list[str] = field(default_factory=list)  # commands dispatched, for observers
    rejected: list[str] = field(default_factory=list)  # error codes of refused messages

    def send_file(self, node: str, sha256: str) -> None:
        self.files.append(FileSend(node, sha256))

    def announce(self, routing_key: str, kind: str, body: BaseModel) -> None:
        """An event of an extension's own on the events exchange (it picks the key)."""
        self.outgoing.append(Outgoing(topology.EVENTS_EXCHANGE, routing_key, kind,
                                      encode(body_of(body))))

    def reply(self, reply_to: str, correlation_id: str | None,
              message: BaseModel | dict[str, Any] | Encoded) -> None:
        if isinstance(message, Encoded):
            self.replies.append(Reply(reply_to, correlation_id, message.body, message.data))
            return
        body = message if isinstance(message, dict) else body_of(message)
        self.replies.append(Reply(reply_to, correlation_id, body, encode(body)))

    def to_node(self, node: str, message: NodeMessage) -> None:
        run = (message.name, message.attempt) if isinstance(message, TaskRun) else None
        self.outgoing.append(Outgoing(topology.EXCHANGE, topology.node_key(node),
                                      message.command, encode(message), run=run))

    def kill(self, node: str, task: str, attempt: int | None, reason: str) -> None:
        self.to_node(node, TaskKill(command="task-kill", name=task, attempt=attempt,
                                    reason=reason))

    def event(self, event: str, task: str, body: dict[str, Any]) -> None:
        self.outgoing.append(Outgoing(topology.EVENTS_EXCHANGE, topology.event_key(event, task),
                                      f"task.{event}", encode(body)))

    def dead_letter(self, body: bytes, reason: str, command: str) -> None:
        self.outgoing.append(Outgoing(topology.DEAD_EXCHANGE, "", command or "unknown", body,
                                      {topology.ERROR_HEADER: reason}))
