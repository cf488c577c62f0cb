"""One handler per command, and the one dispatch table that routes to them.

A handler changes state through the engine and returns the reply body for a requester
(None: the contract's plain `ack`). Invalid requests raise ProtocolError, which the service
turns into an `error` reply or a dead-letter.
"""

from __future__ import annotations

import re
from typing import Any

from vespid.coordinator import engine, views
from vespid.coordinator.check import check_state
from vespid.coordinator.engine import Context
from vespid.coordinator.extension import Handler, Reply
from vespid.coordinator.state import Node, Task, identity
from vespid.shared import PROTOCOL_VERSION
from vespid.shared.errors import ProtocolError
from vespid.shared.logs import get_logger
from vespid.shared.protocol import (
    AckReply,
    NodeDrain,
    NodeList,
    NodeSet,
    Severity,
    StateCheck,
    StateCheckResponse,
    TaskCancel,
    TaskComplete,
    TaskCreate,
    TaskDefinition,
    TaskInfo,
    TaskList,
    TaskListResponse,
    TaskStatus,
    TaskUpdate,
    TaskWait,
)

log = get_logger(__name__)


def handle_task_create(ctx: Context, msg: TaskCreate) -> Reply:
    definition = msg.definition()
    same_key = _keyed_match(ctx, definition)
    if same_key is not None:
        # A parent started again, or a client retrying: re-attach, make nothing new.
        log.info("task_create_matched_key", task=same_key, key=definition.key,
                 parent=definition.parent)
        return AckReply(command="ack", name=same_key, existing=True)
    existing = ctx.state.tasks.get(definition.name)
    if existing is not None:
        if existing.definition != definition:
            raise ProtocolError("conflict", f"a different task named {definition.name!r} "
                                "already exists; pick another name")
        return None
    if definition.parent is not None and definition.parent not in ctx.state.tasks:
        raise ProtocolError("unknown_parent", f"parent task {definition.parent!r} does not "
                            "exist; create the parent first or leave parent empty")
    engine.add_task(ctx, definition)
    return None


def _keyed_match(ctx: Context, definition: TaskDefinition) -> str | None:
    # A root's owner is its sender (engine.add_task), so this is the identity it would get.
    wanted = identity(definition.parent, ctx.sender, definition.key)
    return None if wanted is None else ctx.state.keys.get(wanted)


def handle_task_info(ctx: Context, msg: TaskInfo) -> Reply:
    task = ctx.state.tasks.get(msg.name)
    if task is None:
        return views.unknown_task(msg.name)
    waiting = engine.explain(ctx.state, task) if task.status is TaskStatus.IDLE else None
    return views.task_info_reply(ctx.state, task, waiting)


def handle_task_wait(ctx: Context, msg: TaskWait) -> Reply:
    task = _known_task(ctx, msg.name)
    node = ctx.state.nodes.get(task.node or "")
    if task.status is not TaskStatus.WORKING or node is None:
        return None
    if msg.waiting:
        ctx.state.lend_cores(task, node)
    else:
        ctx.state.take_back_cores(task, node)
    return None


def handle_task_cancel(ctx: Context, msg: TaskCancel) -> Reply:
    task = _known_task(ctx, msg.name)
    ctx.require_control(task.owner, f"task {task.name}")
    engine.cancel_tree(ctx, task)
    return None


def handle_task_update(ctx: Context, msg: TaskUpdate) -> Reply:
    task = _known_task(ctx, msg.name)
    if not _is_current(task, msg.node, msg.attempt) and (msg.attempt or msg.node):
        _record_late(ctx, task, msg.attempt, f"task-update {msg.success.value}", msg.node)
        return None
    # `ok` is only ever the verdict of a completed task, never a running one's claim.
    raised = msg.success is not Severity.OK and ctx.state.raise_severity(task, msg.success)
    if msg.message:
        ctx.state.note(task, msg.message)
    if raised or msg.message:
        ctx.event("updated", task)
    return None


def handle_task_complete(ctx: Context, msg: TaskComplete) -> Reply:
    task = ctx.state.tasks.get(msg.name)
    if task is None:
        log.info("unknown_task_complete_ignored", task=msg.name, node=msg.node)
        return None
    if _is_current(task, msg.node, msg.attempt):
        node = ctx.state.nodes.get(msg.node)
        if node is not None and msg.attempt == task.attempt:
            ctx.state.vouched_by(node, task)
        ctx.state.set_results(task, _results(msg))
        # A task cancelled while it ran ends terminated, whatever its process made of the kill.
        success = Severity.TERMINATED if task.cancel_requested else msg.success
        engine.end_task(ctx, task, success, msg.message, msg.cause)
    elif _repeat_of_last(task, msg.node, msg.attempt):
        log.info("repeated_complete_ignored", task=task.name, node=msg.node)
    elif _requeued_from(task, msg.node, msg.attempt) and msg.node in ctx.state.nodes:
        # Its node was declared lost, yet the attempt finished there: keep the result
        # rather than run the task twice.
        ctx.state.adopt(task, ctx.state.nodes[msg.node], ctx.now)
        ctx.state.set_results(task, _results(msg))
        engine.end_task(ctx, task, msg.success, msg.message, msg.cause)
    else:
        _record_late(ctx, task, msg.attempt, f"task-complete {msg.success.value}", msg.node)
    return None


def _results(msg: TaskComplete) -> list[dict[str, Any]]:
    """Result files a node reports; a name that could leave the results folder is dropped."""
    results = msg.results if isinstance(msg.results, list) else []
    return [r for r in results if isinstance(r, dict) and {"name", "sha256"} <= set(r)
            and _safe_name(r["name"]) and re.fullmatch(r"[0-9a-f]{64}", str(r["sha256"]))]


def _safe_name(name: Any) -> bool:
    parts = str(name).split("/")
    return bool(name) and not str(name).startswith("/") and ".." not in parts \
        and "\\" not in str(name)


def _is_current(task: Task, node: str | None, attempt: int | None) -> bool:
    return (task.status is TaskStatus.WORKING and node in (None, task.node)
            and attempt in (None, task.attempt))


def _repeat_of_last(task: Task, node: str, attempt: int | None) -> bool:
    """The same report again (at-least-once delivery): it changes nothing."""
    last = task.last_attempt
    return (task.status is TaskStatus.COMPLETE and last is not None and last.node == node
            and attempt in (None, last.attempt))


def _requeued_from(task: Task, node: str, attempt: int | None) -> bool:
    last = task.last_attempt
    return (task.status is TaskStatus.IDLE and last is not None and last.node == node
            and attempt == task.attempt)


def _record_late(ctx: Context, task: Task, attempt: int | None, what: str,
                 node: str | None) -> None:
    """A report from an attempt that is no longer current is kept, and changes nothing."""
    log.warning("stale_report_ignored", task=task.name, attempt=attempt, node=node,
                current=task.attempt, report=what)
    ctx.state.record_late(task, attempt, what)
    if node is not None and node in ctx.state.nodes and attempt is not None:
        ctx.effects.kill(node, task.name, attempt, "a newer attempt replaced it")


def handle_node_set(ctx: Context, msg: NodeSet) -> Reply:
    node = ctx.state.nodes.get(msg.name)
    if node is None:
        node = Node(name=msg.name, capabilities={}, repositories={}, last_seen=ctx.now)
        ctx.state.join(node)
        ctx.effects.new_nodes.append(msg.name)
        log.info("node_joined", node=msg.name, version=msg.version)
    if not node.alive:
        log.info("node_returned", node=msg.name)
    _refresh_node(ctx, node, msg)
    engine.reconcile_node(ctx, node, {name: _attempt_of(info)
                                      for name, info in msg.activetasks.items()})
    if msg.leaving:
        engine.node_left(ctx, node)
    return None


def _attempt_of(info: Any) -> int | None:
    attempt = info.get("attempt") if isinstance(info, dict) else None
    return attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None


def _refresh_node(ctx: Context, node: Node, msg: NodeSet) -> None:
    if msg.protocol is not None and msg.protocol != PROTOCOL_VERSION and \
            node.protocol != msg.protocol:
        log.error("node_protocol_mismatch", node=node.name, protocol=msg.protocol,
                  supported=PROTOCOL_VERSION)
    # A drain asked for with `vespid drain` lasts until this agent says so itself or a new
    # agent process (a restart, say after an upgrade) takes the node's name.
    same_agent = node.alive and (msg.started is None or msg.started == node.started)
    ctx.state.heard_from(
        node, capabilities=dict(msg.capabilities),
        repositories={k: v.model_dump() for k, v in msg.repositories.items()},
        draining=msg.draining or (node.draining and same_agent), started=msg.started,
        version=msg.version, log_dir=msg.log_dir, protocol=msg.protocol, now=ctx.now)


def handle_node_drain(ctx: Context, msg: NodeDrain) -> Reply:
    node = ctx.state.nodes.get(msg.name)
    if node is None:
        raise ProtocolError("not_found", f"no node named {msg.name!r}; `vespid nodes` lists them")
    ctx.state.drain(node)
    ctx.effects.to_node(node.name, NodeDrain(command="node-drain", name=node.name))
    log.info("node_drain_requested", node=node.name, running=sorted(node.running))
    return None


def handle_state_check(ctx: Context, msg: StateCheck) -> Reply:
    problems = check_state(ctx.state)
    return StateCheckResponse(command="state-check-response", ok=not problems,
                              problems=problems, tasks=len(ctx.state.tasks),
                              nodes=len(ctx.state.nodes), waiting=len(ctx.state.waiting_shape))


def handle_task_list(ctx: Context, msg: TaskList) -> Reply:
    wanted = None if msg.status is None else TaskStatus(msg.status)
    tasks = [t for t in ctx.state.tasks.values()
             if (wanted is None or t.status is wanted)
             and (msg.parent is None or t.parent == msg.parent)]
    tasks.sort(key=lambda t: t.seq, reverse=True)
    return TaskListResponse(command="task-list-response", total=len(tasks),
                            tasks=[views.task_summary(ctx.state, t) for t in tasks[: msg.limit]])


def handle_node_list(ctx: Context, msg: NodeList) -> Reply:
    # Built as the dicts NodeListResponse describes, not as models: at 1,000 nodes the
    # models cost 60 ms a request (tests/unit/test_wire_models.py holds the two equal).
    return views.node_list(ctx.state.nodes_by_name(), engine.why_not_accepting)


def _known_task(ctx: Context, name: str) -> Task:
    task = ctx.state.tasks.get(name)
    if task is None:
        raise ProtocolError("not_found", f"no task named {name!r}; `vespid tasks` lists them")
    return task


HANDLERS: dict[type, Handler] = {
    TaskCreate: handle_task_create,
    TaskInfo: handle_task_info,
    TaskCancel: handle_task_cancel,
    TaskUpdate: handle_task_update,
    TaskWait: handle_task_wait,
    NodeDrain: handle_node_drain,
    StateCheck: handle_state_check,
    TaskComplete: handle_task_complete,
    NodeSet: handle_node_set,
    TaskList: handle_task_list,
    NodeList: handle_node_list,
}

# The messages that only read: answered from the committed state, ahead of node traffic.
READS: frozenset[type] = frozenset({TaskInfo, TaskList, NodeList, StateCheck})
