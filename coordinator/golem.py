"""The Golem-style dialect mapped onto Vespid tasks.

A CreateTask becomes one Vespid parent (virtual: it runs nowhere, it stands for the whole
task in task-info and trees) and, per subtask index, one Vespid child task per attempt.
A failed, timed-out or rejected attempt is handed out again under the same index, on
another node while others can serve; the task finishes once every index has an accepted
result. Golem's pains are designed out: every index is handed out at once, a computed
result is kept (blob store) the moment it arrives, verification is bounded by a count and
the task's deadline, and CreateTask answers its own errors.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from vespid.coordinator import engine
from vespid.coordinator.engine import Context
from vespid.coordinator.state import Task
from vespid.shared.errors import ProtocolError
from vespid.shared.golem import (
    AbortTask,
    CreateTask,
    GetTaskState,
    GolemTaskSpec,
    ListTasks,
    RestartSubtasks,
    RestartTask,
    SubtaskVerificationState,
    VerifyResults,
)
from vespid.shared.logs import get_logger
from vespid.shared.protocol import Severity, TaskDefinition, TaskStatus

log = get_logger(__name__)


class Status(StrEnum):
    """A Golem-style task's status, as the wire spells it."""

    ACTIVE = "computing"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"
    TIMEOUT = "timeout"


class Part(StrEnum):
    """A subtask's state, and each of its attempts' (the wire's strings, never typed by hand)."""

    WAITING = "waiting"
    STARTING = "starting"
    COMPUTING = "computing"
    VERIFYING = "verifying"
    FINISHED = "finished"
    FAILURE = "failure"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    FAILED = "failed"


EXECUTOR = "from vespid.node_agent.executors import main\nmain({spec!r})\n"
Reply = dict[str, Any] | None


@dataclass
class Subtask:
    subtask_id: str
    index: int
    state: str = Part.WAITING
    current: str | None = None  # the Vespid task of the live attempt
    attempts: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    wrong_answers: int = 0
    failures: int = 0
    avoid: list[str] = field(default_factory=list)


@dataclass
class GolemTask:
    task_id: str
    spec: dict[str, Any]
    created: float
    deadline: float
    parent: str
    resources: list[dict[str, str]]  # [{sha256, path}] as placed in the working folder
    subtasks: dict[str, Subtask]
    status: str = Status.ACTIVE
    reason: str | None = None
    results: list[str] = field(default_factory=list)
    request_id: str | None = None  # message_id of the CreateTask that made it

    @property
    def model(self) -> GolemTaskSpec:
        return GolemTaskSpec.model_validate(self.spec)

    def to_record(self) -> dict[str, Any]:
        record = dict(self.__dict__)
        record["subtasks"] = {k: dict(v.__dict__) for k, v in self.subtasks.items()}
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> GolemTask:
        data = dict(record)
        data["subtasks"] = {k: Subtask(**v) for k, v in data["subtasks"].items()}
        return cls(**data)


# ---- creating ----------------------------------------------------------------------------
def handle_create(ctx: Context, msg: CreateTask) -> Reply:
    # A CreateTask delivered again (the coordinator died before acking it) is the same
    # request: answer with the task it already made instead of making a second one.
    if ctx.message_id:
        for existing in ctx.state.golem.values():
            if existing.request_id == ctx.message_id:
                return {"type": "TaskCreatedEvent", "task_id": existing.task_id,
                        "task": existing.spec}
    spec = msg.task
    resources = _resources(ctx, spec, msg.resource_digests)
    task_id = str(uuid.uuid1())
    parent = engine.add_virtual_task(ctx, f"golem-{task_id}", spec.task_name)
    golem = GolemTask(task_id, spec.as_given(), ctx.now, ctx.now + spec.seconds, parent.name,
                      resources, {}, request_id=ctx.message_id)
    for index in range(spec.subtasks_count):
        subtask = Subtask(str(uuid.uuid1()), index)
        golem.subtasks[subtask.subtask_id] = subtask
    ctx.state.golem[task_id] = golem
    for subtask in golem.subtasks.values():
        _launch(ctx, golem, subtask)
    body = {"type": "TaskCreatedEvent", "task_id": task_id, "task": golem.spec}
    _event(ctx, "TaskCreatedEvent", task_id, body)
    log.info("golem_task_created", task=task_id, subtasks=spec.subtasks_count, kind=spec.type)
    return body


def _resources(ctx: Context, spec: GolemTaskSpec, digests: dict[str, str]
               ) -> list[dict[str, str]]:
    placed = []
    for source in spec.resources:
        # Only uploaded files: naming a path never makes the coordinator read its own disk.
        sha = digests.get(source, "")
        if ctx.blobs is None or not ctx.blobs.has(sha):
            raise ProtocolError("missing_resource", f"resource {source!r} was never uploaded, "
                                "or was refused for being over the limit of "
                                f"{ctx.settings.max_file_bytes} bytes; the client library "
                                "uploads resources before CreateTask")
        destination = spec.resources_mapped.get(source, Path(source).name)
        placed.append({"sha256": sha, "path": destination})
    return placed


def _launch(ctx: Context, golem: GolemTask, subtask: Subtask) -> None:
    spec = golem.model
    number = len(subtask.attempts) + 1
    name = f"{golem.parent}.{subtask.index}.{number}"
    left = max(golem.deadline - ctx.now, 1.0)
    definition = TaskDefinition(
        name=name, name_pretty=f"{spec.task_name} part {subtask.index + 1}/"
                               f"{spec.subtasks_count}",
        parent=golem.parent, executable_pyscript=EXECUTOR.format(spec=json.dumps(golem.spec)),
        requirements={"cores": 1, "bid": spec.bid},
        environment={"VESPID_SUBTASK_INDEX": str(subtask.index),
                     "VESPID_SUBTASK_COUNT": str(spec.subtasks_count),
                     "VESPID_GOLEM_TASK_ID": golem.task_id,
                     "VESPID_GOLEM_SUBTASK_ID": subtask.subtask_id},
        timeout=min(spec.subtask_seconds, left), retries=1, avoid_nodes=subtask.avoid)
    task = engine.add_task(ctx, definition)
    task.resources = golem.resources
    ctx.state.golem_attempts[name] = (golem.task_id, subtask.subtask_id)
    subtask.current, subtask.state = name, Part.STARTING
    subtask.attempts.append({"task": name, "node": None, "state": Part.STARTING,
                             "start": ctx.now, "end": None})
    ctx.state.touch_golem(golem.task_id)


# ---- an attempt ends ---------------------------------------------------------------------
def on_task_started(ctx: Context, task: Task) -> None:
    found = _attempt_of(ctx, task)
    if found is not None:
        golem, subtask = found
        subtask.state = Part.COMPUTING
        subtask.attempts[-1].update(node=task.node, state=Part.COMPUTING)
        ctx.state.touch_golem(golem.task_id)


def on_task_ended(ctx: Context, task: Task) -> None:
    found = _attempt_of(ctx, task)
    if found is None:
        return
    golem, subtask = found
    record = subtask.attempts[-1]
    record.update(end=ctx.now, node=task.node or record["node"])
    subtask.current = None
    if golem.status != Status.ACTIVE:
        record["state"] = Part.CANCELLED
    elif task.success is Severity.OK:
        record["state"] = Part.FINISHED
        subtask.results = task.results
        _computed(ctx, golem, subtask)
    else:
        # What the node said the attempt ended of, never a guess from its message (a node
        # named timeout-box would otherwise make every failure there a timeout).
        timed_out = task.last_cause == "timeout"
        record["state"] = Part.TIMEOUT if timed_out else Part.FAILURE
        subtask.state = record["state"]
        subtask.failures += 1
        _retry_elsewhere(ctx, golem, subtask, task.node,
                         f"part {subtask.index} {record['state']}: {task.message}")
    ctx.state.touch_golem(golem.task_id)


def _attempt_of(ctx: Context, task: Task) -> tuple[GolemTask, Subtask] | None:
    link = ctx.state.golem_attempts.get(task.name)
    if link is None:
        return None
    golem: GolemTask = ctx.state.golem[link[0]]
    subtask = golem.subtasks[link[1]]
    return (golem, subtask) if subtask.current == task.name else None


def _computed(ctx: Context, golem: GolemTask, subtask: Subtask) -> None:
    if golem.model.external:
        subtask.state = Part.VERIFYING
        _event(ctx, "VerificationRequired", golem.task_id, {
            "type": "VerificationRequired", "task_id": golem.task_id,
            "subtask_id": subtask.subtask_id, "task": golem.spec,
            "results": _materialise(ctx, golem, subtask)})
    else:
        _accept(ctx, golem, subtask)


def _accept(ctx: Context, golem: GolemTask, subtask: Subtask) -> None:
    subtask.state = Part.FINISHED
    if all(s.state == Part.FINISHED for s in golem.subtasks.values()):
        golem.results = [p for s in sorted(golem.subtasks.values(), key=lambda s: s.index)
                         for p in _materialise(ctx, golem, s)]
        _close(ctx, golem, Status.FINISHED, None, Severity.OK)
        _event(ctx, "TaskResults", golem.task_id, {
            "type": "TaskResults", "task_id": golem.task_id, "task": golem.spec,
            "results": golem.results, "files": _files(golem)})


def _retry_elsewhere(ctx: Context, golem: GolemTask, subtask: Subtask, node: str | None,
                     why: str) -> None:
    if node and node not in subtask.avoid:
        subtask.avoid.append(node)
    limit = ctx.settings.golem_max_failures
    if subtask.failures >= limit:
        _fail(ctx, golem, f"{why}; part {subtask.index} failed {limit} times")
        return
    _launch(ctx, golem, subtask)


def _materialise(ctx: Context, golem: GolemTask, subtask: Subtask) -> list[str]:
    """Result files where the coordinator keeps them: <results_dir>/<task_id>-output/<i>/."""
    folder = ctx.settings.results_path / f"{golem.task_id}-output" / str(subtask.index)
    paths = []
    for result in subtask.results:
        target = folder / result["name"]
        if ctx.blobs is not None and ctx.blobs.has(result["sha256"]):
            # A recomputed part replaces what an earlier (rejected) attempt left there.
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ctx.blobs.path(result["sha256"]), target)
        paths.append(str(target.resolve()))
    return paths


def _files(golem: GolemTask) -> list[dict[str, Any]]:
    return [{**r, "subtask_id": s.subtask_id, "index": s.index}
            for s in sorted(golem.subtasks.values(), key=lambda s: s.index) for r in s.results]


# ---- ending a whole task -----------------------------------------------------------------
def _close(ctx: Context, golem: GolemTask, status: str, reason: str | None,
           severity: Severity) -> None:
    golem.status, golem.reason = status, reason
    for subtask in golem.subtasks.values():
        _stop_attempt(ctx, subtask, Part.CANCELLED if status == Status.ABORTED else Part(status))
    engine.end_task(ctx, ctx.state.tasks[golem.parent], severity, reason)
    ctx.state.touch_golem(golem.task_id)
    log.info("golem_task_closed", task=golem.task_id, status=status, reason=reason)


def _stop_attempt(ctx: Context, subtask: Subtask, state: str) -> None:
    if subtask.current is not None:
        task = ctx.state.tasks[subtask.current]
        subtask.current = None
        subtask.attempts[-1].update(state=Part.CANCELLED, end=ctx.now)
        engine.cancel_tree(ctx, task)
    if subtask.state != Part.FINISHED:
        subtask.state = state


def _fail(ctx: Context, golem: GolemTask, reason: str) -> None:
    _close(ctx, golem, Status.FAILED, reason, Severity.FATAL)
    _event(ctx, "TaskFailedEvent", golem.task_id, {"type": "TaskFailedEvent",
                                                   "task_id": golem.task_id, "reason": reason})


def sweep(ctx: Context) -> None:
    """A task past its deadline ends timeout: unfinished parts too, with an event."""
    for golem in list(ctx.state.golem.values()):
        if golem.status == Status.ACTIVE and ctx.now >= golem.deadline:
            reason = f"the task's timeout of {golem.spec['timeout']} passed"
            _close(ctx, golem, Status.TIMEOUT, reason, Severity.TERMINATED)
            _event(ctx, "TaskTimeoutEvent", golem.task_id, {
                "type": "TaskTimeoutEvent", "task_id": golem.task_id, "reason": reason})


# ---- requester's controls ----------------------------------------------------------------
def _known(ctx: Context, task_id: str) -> GolemTask:
    golem: GolemTask | None = ctx.state.golem.get(task_id)
    if golem is None:
        raise ProtocolError("not_found", f"no Golem-style task {task_id!r}; ListTasks lists them")
    return golem


def _must_control(ctx: Context, golem: GolemTask) -> None:
    ctx.require_control(ctx.state.tasks[golem.parent].owner, f"task {golem.task_id}")


def handle_verify(ctx: Context, msg: VerifyResults) -> Reply:
    golem = _known(ctx, msg.task_id)
    _must_control(ctx, golem)
    subtask = golem.subtasks.get(msg.subtask_id)
    if subtask is None:
        raise ProtocolError("not_found", f"task {msg.task_id} has no subtask {msg.subtask_id!r}")
    verdict = msg.verdict
    if verdict not in (SubtaskVerificationState.VERIFIED, SubtaskVerificationState.WRONG_ANSWER):
        return _verdict_reply(msg, False, f"verdict {verdict} is answered but not acted on: only "
                                          "VERIFIED (3) and WRONG_ANSWER (4) are")
    if subtask.state != Part.VERIFYING or golem.status != Status.ACTIVE:
        return _verdict_reply(msg, False, f"subtask is {subtask.state}, not waiting for a "
                                          "verdict")
    if verdict == SubtaskVerificationState.VERIFIED:
        _accept(ctx, golem, subtask)
    else:
        subtask.wrong_answers += 1
        subtask.state = Part.FAILURE
        node = subtask.attempts[-1]["node"] if subtask.attempts else None
        if subtask.wrong_answers >= ctx.settings.golem_max_wrong_answers:
            _fail(ctx, golem, f"part {subtask.index} was judged WRONG_ANSWER "
                              f"{subtask.wrong_answers} times")
        else:
            subtask.failures = min(subtask.failures, ctx.settings.golem_max_failures - 1)
            _retry_elsewhere(ctx, golem, subtask, node, "wrong answer")
    ctx.state.touch_golem(golem.task_id)
    return _verdict_reply(msg, True, None)


def _verdict_reply(msg: VerifyResults, acted: bool, why: str | None) -> dict[str, Any]:
    return {"type": "VerifyResultsAck", "task_id": msg.task_id, "subtask_id": msg.subtask_id,
            "verdict": msg.verdict, "acted": acted, "message": why}


def handle_abort(ctx: Context, msg: AbortTask) -> Reply:
    golem = _known(ctx, msg.task_id)
    _must_control(ctx, golem)
    if golem.status == Status.ACTIVE:
        _close(ctx, golem, Status.ABORTED, "aborted by the requester", Severity.TERMINATED)
        _event(ctx, "TaskAbortedEvent", golem.task_id, {"type": "TaskAbortedEvent",
                                                        "task_id": golem.task_id})
    return {"type": "TaskAborted", "task_id": golem.task_id, "status": golem.status}


def handle_restart(ctx: Context, msg: RestartTask) -> Reply:
    golem = _known(ctx, msg.task_id)
    digests = {src: r["sha256"] for src, r in zip(golem.spec["resources"], golem.resources,
                                                   strict=True)}
    create = CreateTask(type="CreateTask", task=GolemTaskSpec.model_validate(golem.spec),
                        resource_digests=digests)
    return handle_create(ctx, create)


def handle_restart_subtasks(ctx: Context, msg: RestartSubtasks) -> Reply:
    golem = _known(ctx, msg.task_id)
    unknown = [s for s in msg.subtask_ids if s not in golem.subtasks]
    if unknown:
        raise ProtocolError("not_found", f"task {msg.task_id} has no subtask {unknown[0]!r}")
    if golem.status not in (Status.ACTIVE, Status.FINISHED):
        raise ProtocolError("conflict", f"task {msg.task_id} is {golem.status}; restart the "
                            "whole task instead")
    if golem.status == Status.FINISHED:
        golem.status = Status.ACTIVE
        golem.deadline = ctx.now + golem.model.seconds
        parent = engine.add_virtual_task(ctx, f"golem-{golem.task_id}-r{len(golem.results)}"
                                         f"-{int(ctx.now)}", golem.model.task_name)
        golem.parent = parent.name
    for subtask_id in msg.subtask_ids:
        subtask = golem.subtasks[subtask_id]
        _stop_attempt(ctx, subtask, "restarted")
        subtask.state, subtask.results, subtask.failures = "restarted", [], 0
        _launch(ctx, golem, subtask)
    return {"type": "SubtasksRestarted", "task_id": golem.task_id,
            "subtask_ids": msg.subtask_ids}


def handle_list(ctx: Context, msg: ListTasks) -> Reply:
    return {"type": "TaskList", "tasks": [_summary(g) for g in ctx.state.golem.values()]}


def handle_state(ctx: Context, msg: GetTaskState) -> Reply:
    golem = _known(ctx, msg.task_id)
    return {**_summary(golem), "type": "TaskState", "task": golem.spec, "results": golem.results,
            "reason": golem.reason, "subtasks": [
                {"subtask_id": s.subtask_id, "index": s.index, "state": s.state,
                 "node": s.attempts[-1]["node"] if s.attempts else None,
                 "attempts": s.attempts, "wrong_answers": s.wrong_answers}
                for s in sorted(golem.subtasks.values(), key=lambda s: s.index)]}


def _summary(golem: GolemTask) -> dict[str, Any]:
    done = sum(1 for s in golem.subtasks.values() if s.state == "finished")
    return {"task_id": golem.task_id, "task_name": golem.spec["task_name"],
            "task_type": golem.spec["type"], "status": golem.status, "created": golem.created,
            "subtasks_count": len(golem.subtasks), "subtasks_finished": done}


def _event(ctx: Context, kind: str, task_id: str, body: dict[str, Any]) -> None:
    ctx.effects.golem_event(kind, task_id, body)


HANDLERS: dict[type, Callable[[Context, Any], Reply]] = {
    CreateTask: handle_create, VerifyResults: handle_verify, AbortTask: handle_abort,
    RestartTask: handle_restart, RestartSubtasks: handle_restart_subtasks,
    ListTasks: handle_list, GetTaskState: handle_state,
}


def register(hooks: engine.Hooks) -> None:
    """Follow the plain tasks that stand for Golem-style subtasks."""
    hooks.on_end.append(on_task_ended)
    hooks.on_start.append(on_task_started)
    hooks.on_tick.append(sweep)
_ = TaskStatus
