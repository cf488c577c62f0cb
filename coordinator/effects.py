"""What handling a batch of messages causes, collected before anything is sent.

Handlers never publish: they record replies and outgoing messages here. The service
writes outgoing messages to the outbox in the same transaction as the state change, then
publishes them, and acks the batch only once the broker confirmed everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vespid.shared import topology
from vespid.shared.blobs import BlobChunk
from vespid.shared.protocol import NodeDrain, RepositoryClean, TaskKill, TaskRun, encode

# Everything the coordinator sends a node is one of these models, never a dict.
NodeMessage = TaskRun | TaskKill | RepositoryClean | NodeDrain | BlobChunk


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


@dataclass
class Effects:
    replies: list[Reply] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)
    new_nodes: list[str] = field(default_factory=list)
    blobs: list[tuple[str, str]] = field(default_factory=list)  # (node, sha256) to send

    def golem_event(self, kind: str, task_id: str, body: dict[str, Any]) -> None:
        self.outgoing.append(Outgoing(topology.EVENTS_EXCHANGE, f"golem.{kind}.{task_id}", kind,
                                      encode(body)))

    def reply(self, reply_to: str, correlation_id: str | None, body: dict[str, Any]) -> None:
        self.replies.append(Reply(reply_to, correlation_id, body, encode(body)))

    def to_node(self, node: str, message: NodeMessage) -> None:
        self.outgoing.append(Outgoing(topology.EXCHANGE, topology.node_key(node),
                                      message.command, encode(message)))

    def to_node_first(self, node: str, message: NodeMessage) -> None:
        """Sent ahead of everything else of this batch (files a task-run will need)."""
        self.outgoing.insert(0, Outgoing(topology.EXCHANGE, topology.node_key(node),
                                         message.command, encode(message)))

    def kill(self, node: str, task: str, attempt: int | None, reason: str) -> None:
        self.to_node(node, TaskKill(command="task-kill", name=task, attempt=attempt,
                                    reason=reason))

    def event(self, event: str, task: str, body: dict[str, Any]) -> None:
        self.outgoing.append(Outgoing(topology.EVENTS_EXCHANGE, topology.event_key(event, task),
                                      f"task.{event}", encode(body)))

    def dead_letter(self, body: bytes, reason: str, command: str) -> None:
        self.outgoing.append(Outgoing(topology.DEAD_EXCHANGE, "", command or "unknown", body,
                                      {topology.ERROR_HEADER: reason}))
