"""How tasks and nodes look on the wire: task-info-response, list entries, events."""

from __future__ import annotations

from typing import Any

from vespid.coordinator.state import Node, State, Task
from vespid.shared.protocol import TaskStatus


def task_info(state: State, task: Task) -> dict[str, Any]:
    body: dict[str, Any] = {"command": "task-info-response"}
    definition = task.definition.model_dump(mode="json")
    body.update(definition)
    body["environment"] = task.environment
    # The effective requirements: a usage_user_ label the creator claimed is replaced by
    # its owner's, as the matcher sees it (unbounded cores_max as null, as always).
    asked = definition["requirements"]
    body["requirements"] = {k: asked.get(k, v) for k, v in task.requirements.items()}
    body["owner"] = task.owner
    body.update({
        "time-create": task.time_create,
        "time-start": task.time_start,
        "time-finish": task.time_finish,
        "status": None if task.status is TaskStatus.IDLE else task.status.value,
        "success": task.success.value if task.success else None,
        "node": task.node,
        "log": task.log,
        "path": task.path,
        "children": list(state.children.get(task.name, ())),
        "allocated": task.allocated or None,
        "attempt": task.attempt,
        "message": task.message,
        "holds": task.holds,
        "attempts": [a.to_record() for a in task.attempts],
        "lent_cores": task.lent_cores or None,
        **tree_outcome(state, task),
    })
    return body


def tree_outcome(state: State, task: Task) -> dict[str, Any]:
    """The worst severity in the task's tree (itself and all descendants, so far), and
    whether every task in it is complete: together, what a build's root should show."""
    worst = state.tree_worst.get(task.name)
    return {"tree_success": worst.value if worst else None,
            "tree_complete": state.tree_complete(task)}


FAILURES_SHOWN = 20


def tree_failures(state: State, task: Task) -> dict[str, Any]:
    """The descendants that ended error or worse, oldest first (the first FAILURES_SHOWN)."""
    tree = (state.tasks[name] for name in state.descendants(task.name))
    failed = [t for t in tree if t.success is not None and t.success.failed]
    failed.sort(key=lambda t: t.seq)
    return {"tree_failures": [{"name": t.name, "name_pretty": t.definition.name_pretty,
                               "success": t.success.value if t.success else None,
                               "message": t.message, "node": t.node}
                              for t in failed[:FAILURES_SHOWN]],
            "tree_failures_total": len(failed)}


def unknown_task(name: str) -> dict[str, Any]:
    return {"command": "task-info-response", "name": name, "status": "invalid", "success": None,
            "children": [], "node": None, "log": None}


def task_summary(state: State, task: Task) -> dict[str, Any]:
    return {
        "name": task.name,
        "name_pretty": task.definition.name_pretty,
        "parent": task.parent,
        "status": None if task.status is TaskStatus.IDLE else task.status.value,
        "success": task.success.value if task.success else None,
        "node": task.node,
        "priority": task.definition.priority,
        "attempt": task.attempt,
        "time-create": task.time_create,
        "time-start": task.time_start,
        "time-finish": task.time_finish,
        "children": len(state.children.get(task.name, ())),
        **tree_outcome(state, task),
    }


def node_summary(node: Node, accepting: bool, why_not: str | None) -> dict[str, Any]:
    return {
        "name": node.name,
        "alive": node.alive,
        "draining": node.draining,
        "left": node.left,
        "accepting": accepting,
        "why_not_accepting": why_not,
        "version": node.version,
        "protocol": node.protocol,
        "last_seen": node.last_seen,
        "capabilities": node.capabilities,
        "free": node.free_resources(),
        "repositories": node.repositories,
        "activetasks": sorted(node.running),
    }
