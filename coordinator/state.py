"""The coordinator's scheduling state in memory: tasks, nodes and the tree between tasks.

The store persists it; handlers change it only through these classes, which mark what
changed so the store writes just that at the end of each batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vespid.shared.protocol import Severity, TaskDefinition, TaskStatus


@dataclass
class Task:
    definition: TaskDefinition
    seq: int
    time_create: float
    status: TaskStatus = TaskStatus.IDLE
    success: Severity | None = None
    node: str | None = None
    allocated: dict[str, float] = field(default_factory=dict)
    attempt: int = 0
    time_start: float | None = None
    time_finish: float | None = None
    message: str | None = None
    log: str | None = None
    path: str | None = None
    dispatched_at: float | None = None
    seen_on_node: bool = False
    cancel_requested: bool = False

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def parent(self) -> str | None:
        return self.definition.parent

    def raise_severity(self, severity: Severity) -> bool:
        """Severity never goes down; True when it went up."""
        worse = severity.worst(self.success)
        changed = worse != self.success
        self.success = worse
        return changed

    def to_record(self) -> dict[str, Any]:
        return {
            "definition": self.definition.model_dump(mode="json"),
            "seq": self.seq,
            "time_create": self.time_create,
            "status": self.status.value,
            "success": self.success.value if self.success else None,
            "node": self.node,
            "allocated": self.allocated,
            "attempt": self.attempt,
            "time_start": self.time_start,
            "time_finish": self.time_finish,
            "message": self.message,
            "log": self.log,
            "path": self.path,
            "dispatched_at": self.dispatched_at,
            "seen_on_node": self.seen_on_node,
            "cancel_requested": self.cancel_requested,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Task:
        data = dict(record)
        data["definition"] = TaskDefinition.model_validate(data["definition"])
        data["status"] = TaskStatus(data["status"])
        data["success"] = Severity(data["success"]) if data["success"] else None
        return cls(**data)


@dataclass
class Node:
    name: str
    capabilities: dict[str, Any]
    repositories: dict[str, dict[str, Any]]
    last_seen: float
    alive: bool = True
    draining: bool = False
    version: str | None = None
    protocol: int | None = None
    used: dict[str, float] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)

    def resource(self, key: str) -> float:
        value = self.capabilities.get(key, 0)
        if value is None or isinstance(value, bool):
            return 0.0
        return float(value)

    def free(self, key: str) -> float:
        return self.resource(key) - self.used.get(key, 0.0)

    def resources(self) -> dict[str, float]:
        return {k: self.resource(k) for k, v in self.capabilities.items()
                if not k.startswith("usage_") and not isinstance(v, bool)}

    def free_resources(self) -> dict[str, float]:
        return {k: total - self.used.get(k, 0.0) for k, total in self.resources().items()}

    def reserve(self, allocated: dict[str, float]) -> None:
        for key, amount in allocated.items():
            self.used[key] = self.used.get(key, 0.0) + amount

    def release(self, allocated: dict[str, float]) -> None:
        for key, amount in allocated.items():
            left = self.used.get(key, 0.0) - amount
            self.used[key] = 0.0 if math.isclose(left, 0.0, abs_tol=1e-9) else left

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "capabilities": self.capabilities,
            "repositories": self.repositories,
            "last_seen": self.last_seen,
            "alive": self.alive,
            "draining": self.draining,
            "version": self.version,
            "protocol": self.protocol,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Node:
        return cls(**record)


@dataclass
class State:
    """All tasks and nodes, plus what changed since the last flush."""

    tasks: dict[str, Task] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)
    next_seq: int = 1
    dirty_tasks: set[str] = field(default_factory=set)
    dirty_nodes: set[str] = field(default_factory=set)
    needs_scheduling: bool = True

    def add_task(self, task: Task) -> None:
        self.tasks[task.name] = task
        self.next_seq = max(self.next_seq, task.seq + 1)
        if task.parent is not None:
            self.children.setdefault(task.parent, []).append(task.name)
        if task.status is TaskStatus.IDLE:
            self.waiting.add(task.name)
        elif task.status is TaskStatus.WORKING and task.node in self.nodes:
            node = self.nodes[task.node]
            node.reserve(task.allocated)
            node.running.add(task.name)

    def add_node(self, node: Node) -> None:
        self.nodes[node.name] = node

    def touch_task(self, task: Task) -> None:
        self.dirty_tasks.add(task.name)

    def touch_node(self, node: Node) -> None:
        self.dirty_nodes.add(node.name)

    def start(self, task: Task, node: Node, allocated: dict[str, float], now: float) -> None:
        task.status = TaskStatus.WORKING
        task.node = node.name
        task.allocated = allocated
        task.attempt += 1
        task.time_start = now
        task.dispatched_at = now
        task.seen_on_node = False
        self.waiting.discard(task.name)
        node.reserve(allocated)
        node.running.add(task.name)
        self.touch_task(task)

    def finish(self, task: Task, severity: Severity, now: float, message: str | None) -> None:
        if task.status is TaskStatus.WORKING and task.node in self.nodes:
            node = self.nodes[task.node]
            node.release(task.allocated)
            node.running.discard(task.name)
        task.status = TaskStatus.COMPLETE
        task.raise_severity(severity)
        task.time_finish = now
        if message:
            task.message = message
        self.waiting.discard(task.name)
        self.needs_scheduling = True
        self.touch_task(task)

    def descendants(self, name: str) -> list[str]:
        found: list[str] = []
        stack = list(self.children.get(name, ()))
        while stack:
            child = stack.pop()
            found.append(child)
            stack.extend(self.children.get(child, ()))
        return found
