"""How tasks and nodes look on the wire: task-info-response, list entries, events.

Replies are the models of shared/protocol.py. The body of a task event is the same
task-info-response, built here as the dict the model describes and not validated each time:
it is the hottest message the coordinator sends (three per task), and a pydantic round trip
costs more than building it (docs/architecture.md). tests/unit/test_wire_models.py holds
every event body to TaskInfoResponse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Literal

from vespid.coordinator.extension import Encoded
from vespid.coordinator.state import Listing, Node, State, Task
from vespid.shared.protocol import (
    NodeRepository,
    TaskInfoResponse,
    TaskStatus,
    TaskSummary,
    encode,
)


def task_info_reply(state: State, task: Task, waiting_reason: list[str] | None
                    ) -> TaskInfoResponse:
    """The reply to task-info: the event body, plus what is computed on request only."""
    body = task_info(state, task)
    body.update(tree_failures(state, task))
    body["waiting_reason"] = waiting_reason
    return TaskInfoResponse.model_validate(body)


def task_info(state: State, task: Task) -> dict[str, Any]:
    body: dict[str, Any] = {"command": "task-info-response"}
    definition = task.definition_json()  # shared: copied into the body, never changed
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
        "status": shown_status(task),
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


def unknown_task(name: str) -> TaskInfoResponse:
    return TaskInfoResponse(command="task-info-response", name=name, status="invalid",
                            success=None, children=[], node=None, log=None)


def task_summary(state: State, task: Task) -> TaskSummary:
    return TaskSummary(
        name=task.name, name_pretty=task.definition.name_pretty, parent=task.parent,
        status=shown_status(task), success=task.success, node=task.node,
        priority=task.definition.priority,
        attempt=task.attempt, time_create=task.time_create, time_start=task.time_start,
        time_finish=task.time_finish, children=len(state.children.get(task.name, ())),
        **tree_outcome(state, task))


def node_list(nodes: Iterable[Node], why_not: Callable[[Node], str | None]) -> Encoded:
    """The node-list-response from each node's kept entry (Node.listing), in the order
    given (by name: State.nodes_by_name); `why_not`: why a node takes no task now (None:
    it does)."""
    build = partial(_listing, why_not)
    entries = [node.listing(build) for node in nodes]
    body = {"command": "node-list-response", "nodes": [summary for summary, _ in entries]}
    data = b"".join((b'{"command":"node-list-response","nodes":[',
                     b",".join(encoded for _, encoded in entries), b"]}"))
    return Encoded(body, data)


def _listing(why_not: Callable[[Node], str | None], node: Node) -> Listing:
    reason = why_not(node)
    summary = node_summary(node, reason is None, reason)
    return summary, encode(summary)


def node_summary(node: Node, accepting: bool, why_not: str | None) -> dict[str, Any]:
    """One node-list entry, as the dict NodeSummary describes. Kept between requests
    (Node.listing) and shared by their bodies: never changed once built; it shares the
    node's own dicts (capabilities, repositories), which a node-set replaces."""
    return {
        "name": node.name, "alive": node.alive, "draining": node.draining, "left": node.left,
        "accepting": accepting, "why_not_accepting": why_not, "version": node.version,
        "protocol": node.protocol, "last_seen": node.last_seen,
        "capabilities": node.capabilities, "free": node.free_resources(),
        "repositories": {k: {f: v[f] for f in REPOSITORY_FIELDS if f in v}
                         for k, v in node.repositories.items()},
        "activetasks": sorted(node.running)}


# What a node-list shows of a repository (NodeRepository's fields, nothing a node added).
REPOSITORY_FIELDS = tuple(NodeRepository.model_fields)


def shown_status(task: Task) -> Literal["working", "complete"] | None:
    """As the wire shows it: an idle task has no status yet."""
    if task.status is TaskStatus.IDLE:
        return None
    return "working" if task.status is TaskStatus.WORKING else "complete"
