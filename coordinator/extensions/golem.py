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
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from vespid.coordinator import engine
from vespid.coordinator.engine import Context
from vespid.coordinator.extension import Extension, Handler, Reply
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.state import State, Task
from vespid.coordinator.store import Store
from vespid.shared import golem as wire
from vespid.shared.blobs import BlobStore
from vespid.shared.errors import ProtocolError
from vespid.shared.golem import (
    AbortTask,
    CreateTask,
    GetTaskState,
    GolemStatus,
    GolemTaskSpec,
    ListTasks,
    RestartSubtasks,
    RestartTask,
    SubtaskState,
    SubtaskVerificationState,
    VerifyResults,
)
from vespid.shared.logs import get_logger
from vespid.shared.protocol import Severity, TaskDefinition

log = get_logger(__name__)
GolemEvent = (wire.TaskCreatedEvent | wire.VerificationRequired | wire.TaskResults
              | wire.TaskFailedEvent | wire.TaskTimeoutEvent | wire.TaskAbortedEvent)


EXECUTOR = "from vespid.node_agent.executors import main\nmain({spec!r})\n"
TABLE = "golem"  # one record per Golem-style task (the name state files already use)


@dataclass
class SubtaskAttempt:
    """One Vespid task run for a subtask index."""

    task: str
    node: str | None
    state: SubtaskState
    start: float
    end: float | None = None


@dataclass
class Subtask:
    subtask_id: str
    index: int
    state: SubtaskState = SubtaskState.WAITING
    current: str | None = None  # the Vespid task of the live attempt
    attempts: list[SubtaskAttempt] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    wrong_answers: int = 0
    failures: int = 0
    avoid: list[str] = field(default_factory=list)

    @property
    def last_node(self) -> str | None:
        return self.attempts[-1].node if self.attempts else None

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Subtask:
        data = dict(record)
        data["state"] = SubtaskState(data["state"])
        data["attempts"] = [SubtaskAttempt(**{**a, "state": SubtaskState(a["state"])})
                            for a in data["attempts"]]
        return cls(**data)


@dataclass
class GolemTask:
    task_id: str
    spec: dict[str, Any]
    created: float
    deadline: float
    parent: str
    resources: list[dict[str, str]]  # [{sha256, path}] as placed in the working folder
    subtasks: dict[str, Subtask]
    status: GolemStatus = GolemStatus.ACTIVE
    reason: str | None = None
    results: list[str] = field(default_factory=list)
    request_id: str | None = None  # message_id of the CreateTask that made it
    reopened: int = 0  # how often RestartSubtasks reopened it after it finished

    @property
    def model(self) -> GolemTaskSpec:
        return GolemTaskSpec.model_validate(self.spec)

    def by_index(self) -> list[Subtask]:
        return sorted(self.subtasks.values(), key=lambda s: s.index)

    def to_record(self) -> dict[str, Any]:
        record = {k: v for k, v in self.__dict__.items() if k != "subtasks"}
        record["subtasks"] = {k: v.to_record() for k, v in self.subtasks.items()}
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> GolemTask:
        data = dict(record)
        data["status"] = GolemStatus(data["status"])
        data["subtasks"] = {k: Subtask.from_record(v) for k, v in data["subtasks"].items()}
        return cls(**data)


class Golem(Extension):
    """The dialect's slice of state (its tasks, and which Vespid task is which attempt),
    its handlers, and the hooks that follow the plain tasks standing for its subtasks."""

    name = "golem"

    def __init__(self, settings: CoordinatorSettings, files: BlobStore) -> None:
        self.settings = settings
        self.files = files
        self.tasks: dict[str, GolemTask] = {}
        self.attempts: dict[str, tuple[str, str]] = {}  # Vespid task -> (task_id, subtask_id)
        self.dirty: set[str] = set()

    def handlers(self) -> Mapping[type, Handler]:
        return {CreateTask: self.handle_create, VerifyResults: self.handle_verify,
                AbortTask: self.handle_abort, RestartTask: self.handle_restart,
                RestartSubtasks: self.handle_restart_subtasks, ListTasks: self.handle_list,
                GetTaskState: self.handle_state}

    def reads(self) -> Collection[type]:
        return (ListTasks, GetTaskState)

    # ---- persistence -----------------------------------------------------------------
    def load(self, store: Store, state: State) -> None:
        self.tasks, self.attempts, self.dirty = {}, {}, set()
        for record in store.records(TABLE):
            golem = GolemTask.from_record(record)
            self.tasks[golem.task_id] = golem
            for subtask in golem.subtasks.values():
                for attempt in subtask.attempts:
                    self.attempts[attempt.task] = (golem.task_id, subtask.subtask_id)
            # Result files are placed after the commit that accepted them; a coordinator
            # stopped in between places them now.
            computed = (SubtaskState.VERIFYING, SubtaskState.FINISHED)
            try:
                self._place_results(golem, [s for s in golem.subtasks.values()
                                            if s.state in computed], missing_only=True)
            except OSError as exc:  # a full or read-only results folder must not stop start-up
                log.error("golem_results_not_placed", task=golem.task_id, error=str(exc))

    def flush(self, store: Store) -> None:
        store.put_records(TABLE, [(t, self.tasks[t].to_record()) for t in sorted(self.dirty)])
        self.dirty.clear()

    def _changed(self, golem: GolemTask) -> None:
        self.dirty.add(golem.task_id)

    # ---- creating --------------------------------------------------------------------
    def handle_create(self, ctx: Context, msg: CreateTask) -> Reply:
        # A CreateTask delivered again (the coordinator died before acking it) is the same
        # request: answer with the task it already made instead of making a second one.
        if ctx.message_id:
            for existing in self.tasks.values():
                if existing.request_id == ctx.message_id:
                    return _created(existing)
        spec = msg.task
        resources = self._resources(spec, msg.resource_digests)
        task_id = str(uuid.uuid1())
        parent = engine.add_virtual_task(ctx, f"golem-{task_id}", spec.task_name)
        golem = GolemTask(task_id, spec.as_given(), ctx.now, ctx.now + spec.seconds,
                          parent.name, resources, {}, request_id=ctx.message_id)
        for index in range(spec.subtasks_count):
            subtask = Subtask(str(uuid.uuid1()), index)
            golem.subtasks[subtask.subtask_id] = subtask
        self.tasks[task_id] = golem
        for subtask in golem.subtasks.values():
            self._launch(ctx, golem, subtask)
        body = _created(golem)
        _event(ctx, body)
        log.info("golem_task_created", task=task_id, subtasks=spec.subtasks_count,
                 kind=spec.type)
        return body

    def _resources(self, spec: GolemTaskSpec, digests: dict[str, str]) -> list[dict[str, str]]:
        placed = []
        for source in spec.resources:
            # Only uploaded files: naming a path never makes the coordinator read its disk.
            sha = digests.get(source, "")
            if not self.files.has(sha):
                raise ProtocolError("missing_resource", f"resource {source!r} was never "
                                    "uploaded, or was refused for being over the limit of "
                                    f"{self.settings.max_file_bytes} bytes; the client "
                                    "library uploads resources before CreateTask")
            destination = spec.resources_mapped.get(source, Path(source).name)
            placed.append({"sha256": sha, "path": destination})
        return placed

    def _launch(self, ctx: Context, golem: GolemTask, subtask: Subtask) -> None:
        spec = golem.model
        number = len(subtask.attempts) + 1
        name = f"{golem.parent}.{subtask.index}.{number}"
        left = max(golem.deadline - ctx.now, 1.0)
        definition = TaskDefinition(
            name=name, name_pretty=f"{spec.task_name} part {subtask.index + 1}/"
                                   f"{spec.subtasks_count}",
            parent=golem.parent,
            executable_pyscript=EXECUTOR.format(spec=json.dumps(golem.spec)),
            requirements={"cores": 1, "bid": spec.bid},
            environment={"VESPID_SUBTASK_INDEX": str(subtask.index),
                         "VESPID_SUBTASK_COUNT": str(spec.subtasks_count),
                         "VESPID_GOLEM_TASK_ID": golem.task_id,
                         "VESPID_GOLEM_SUBTASK_ID": subtask.subtask_id},
            timeout=min(spec.subtask_seconds, left), retries=1, avoid_nodes=subtask.avoid)
        task = engine.add_task(ctx, definition)
        ctx.state.set_resources(task, golem.resources)
        self.attempts[name] = (golem.task_id, subtask.subtask_id)
        subtask.current, subtask.state = name, SubtaskState.STARTING
        subtask.attempts.append(SubtaskAttempt(name, None, SubtaskState.STARTING, ctx.now))
        self._changed(golem)

    # ---- an attempt starts and ends ----------------------------------------------------
    def started(self, ctx: Context, task: Task) -> None:
        found = self._attempt_of(task)
        if found is not None:
            golem, subtask = found
            self._changed(golem)  # first: a failure half-way must still be written
            subtask.state = SubtaskState.COMPUTING
            subtask.attempts[-1].node = task.node
            subtask.attempts[-1].state = SubtaskState.COMPUTING

    def ended(self, ctx: Context, task: Task) -> None:
        found = self._attempt_of(task)
        if found is None:
            return
        golem, subtask = found
        self._changed(golem)  # first: a failure half-way must still be written
        record = subtask.attempts[-1]
        record.end, record.node = ctx.now, task.node or record.node
        subtask.current = None
        if golem.status != GolemStatus.ACTIVE:
            record.state = SubtaskState.CANCELLED
        elif task.success is Severity.OK:
            record.state = SubtaskState.FINISHED
            subtask.results = task.results
            self._computed(ctx, golem, subtask)
        else:
            # What the node said the attempt ended of, never a guess from its message (a
            # node named timeout-box would otherwise make every failure there a timeout).
            timed_out = task.last_cause == "timeout"
            record.state = SubtaskState.TIMEOUT if timed_out else SubtaskState.FAILURE
            subtask.state = record.state
            subtask.failures += 1
            self._retry_elsewhere(ctx, golem, subtask, task.node,
                                  f"part {subtask.index} {record.state}: {task.message}")

    def _attempt_of(self, task: Task) -> tuple[GolemTask, Subtask] | None:
        link = self.attempts.get(task.name)
        if link is None:
            return None
        golem = self.tasks[link[0]]
        subtask = golem.subtasks[link[1]]
        return (golem, subtask) if subtask.current == task.name else None

    def _computed(self, ctx: Context, golem: GolemTask, subtask: Subtask) -> None:
        if golem.model.external:
            subtask.state = SubtaskState.VERIFYING
            _event(ctx, wire.VerificationRequired(
                type="VerificationRequired", task_id=golem.task_id,
                subtask_id=subtask.subtask_id, task=golem.model,
                results=self._materialise(ctx, golem, [subtask])))
        else:
            self._accept(ctx, golem, subtask)

    def _accept(self, ctx: Context, golem: GolemTask, subtask: Subtask) -> None:
        subtask.state = SubtaskState.FINISHED
        if all(s.state == SubtaskState.FINISHED for s in golem.subtasks.values()):
            golem.results = self._materialise(ctx, golem, golem.by_index())
            self._close(ctx, golem, GolemStatus.FINISHED, None, Severity.OK)
            _event(ctx, wire.TaskResults(type="TaskResults", task_id=golem.task_id,
                                         task=golem.model, results=golem.results,
                                         files=_files(golem)))

    def _retry_elsewhere(self, ctx: Context, golem: GolemTask, subtask: Subtask,
                         node: str | None, why: str) -> None:
        if node and node not in subtask.avoid:
            subtask.avoid.append(node)
        limit = self.settings.golem_max_failures
        if subtask.failures >= limit:
            self._fail(ctx, golem, f"{why}; part {subtask.index} failed {limit} times")
            return
        self._launch(ctx, golem, subtask)

    # ---- result files ------------------------------------------------------------------
    def _materialise(self, ctx: Context, golem: GolemTask, subtasks: list[Subtask]
                     ) -> list[str]:
        """Where the results of these parts are kept: <results_dir>/<task_id>-output/<i>/.
        The paths are decided now; the copies are made once the batch committed."""
        ctx.effects.after_commit.append(partial(self._place_results, golem, subtasks))
        return [str(target.resolve()) for _sha, target in self._targets(golem, subtasks)]

    def _targets(self, golem: GolemTask, subtasks: list[Subtask]) -> list[tuple[str, Path]]:
        base = self.settings.results_path / f"{golem.task_id}-output"
        return [(r["sha256"], base / str(s.index) / r["name"])
                for s in subtasks for r in s.results]

    def _place_results(self, golem: GolemTask, subtasks: list[Subtask],
                       missing_only: bool = False) -> None:
        for sha, target in self._targets(golem, subtasks):
            if self.files.has(sha) and not (missing_only and target.is_file()):
                # A recomputed part replaces what an earlier (rejected) attempt left there.
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.files.path(sha), target)

    # ---- ending a whole task -----------------------------------------------------------
    def _close(self, ctx: Context, golem: GolemTask, status: GolemStatus, reason: str | None,
               severity: Severity) -> None:
        golem.status, golem.reason = status, reason
        unfinished = (SubtaskState.CANCELLED if status == GolemStatus.ABORTED
                      else SubtaskState(status))
        for subtask in golem.subtasks.values():
            self._stop_attempt(ctx, subtask, unfinished)
        engine.end_task(ctx, ctx.state.tasks[golem.parent], severity, reason)
        self._changed(golem)
        log.info("golem_task_closed", task=golem.task_id, status=status, reason=reason)

    @staticmethod
    def _stop_attempt(ctx: Context, subtask: Subtask, state: SubtaskState) -> None:
        if subtask.current is not None:
            task = ctx.state.tasks[subtask.current]
            subtask.current = None
            subtask.attempts[-1].state, subtask.attempts[-1].end = SubtaskState.CANCELLED, ctx.now
            engine.cancel_tree(ctx, task)
        if subtask.state != SubtaskState.FINISHED:
            subtask.state = state

    def _fail(self, ctx: Context, golem: GolemTask, reason: str) -> None:
        self._close(ctx, golem, GolemStatus.FAILED, reason, Severity.FATAL)
        _event(ctx, wire.TaskFailedEvent(type="TaskFailedEvent", task_id=golem.task_id,
                                         reason=reason))

    def tick(self, ctx: Context) -> None:
        """A task past its deadline ends timeout: unfinished parts too, with an event."""
        for golem in list(self.tasks.values()):
            if golem.status == GolemStatus.ACTIVE and ctx.now >= golem.deadline:
                reason = f"the task's timeout of {golem.spec['timeout']} passed"
                self._close(ctx, golem, GolemStatus.TIMEOUT, reason, Severity.TERMINATED)
                _event(ctx, wire.TaskTimeoutEvent(type="TaskTimeoutEvent",
                                                  task_id=golem.task_id, reason=reason))

    # ---- requester's controls ----------------------------------------------------------
    def _known(self, task_id: str) -> GolemTask:
        golem = self.tasks.get(task_id)
        if golem is None:
            raise ProtocolError("not_found",
                                f"no Golem-style task {task_id!r}; ListTasks lists them")
        return golem

    @staticmethod
    def _must_control(ctx: Context, golem: GolemTask) -> None:
        ctx.require_control(ctx.state.tasks[golem.parent].owner, f"task {golem.task_id}")

    def handle_verify(self, ctx: Context, msg: VerifyResults) -> Reply:
        golem = self._known(msg.task_id)
        self._must_control(ctx, golem)
        subtask = golem.subtasks.get(msg.subtask_id)
        if subtask is None:
            raise ProtocolError("not_found",
                                f"task {msg.task_id} has no subtask {msg.subtask_id!r}")
        verdict = msg.verdict
        if verdict not in (SubtaskVerificationState.VERIFIED,
                           SubtaskVerificationState.WRONG_ANSWER):
            return _verdict_reply(msg, False, f"verdict {verdict} is answered but not acted "
                                              "on: only VERIFIED (3) and WRONG_ANSWER (4) are")
        if subtask.state != SubtaskState.VERIFYING or golem.status != GolemStatus.ACTIVE:
            return _verdict_reply(msg, False, f"subtask is {subtask.state}, not waiting for "
                                              "a verdict")
        if verdict == SubtaskVerificationState.VERIFIED:
            self._accept(ctx, golem, subtask)
        else:
            self._wrong_answer(ctx, golem, subtask)
        self._changed(golem)
        return _verdict_reply(msg, True, None)

    def _wrong_answer(self, ctx: Context, golem: GolemTask, subtask: Subtask) -> None:
        subtask.wrong_answers += 1
        subtask.state = SubtaskState.FAILURE
        if subtask.wrong_answers >= self.settings.golem_max_wrong_answers:
            self._fail(ctx, golem, f"part {subtask.index} was judged WRONG_ANSWER "
                                   f"{subtask.wrong_answers} times")
        else:
            subtask.failures = min(subtask.failures, self.settings.golem_max_failures - 1)
            self._retry_elsewhere(ctx, golem, subtask, subtask.last_node, "wrong answer")

    def handle_abort(self, ctx: Context, msg: AbortTask) -> Reply:
        golem = self._known(msg.task_id)
        self._must_control(ctx, golem)
        if golem.status == GolemStatus.ACTIVE:
            self._close(ctx, golem, GolemStatus.ABORTED, "aborted by the requester",
                        Severity.TERMINATED)
            _event(ctx, wire.TaskAbortedEvent(type="TaskAbortedEvent", task_id=golem.task_id))
        return wire.TaskAborted(type="TaskAborted", task_id=golem.task_id, status=golem.status)

    def handle_restart(self, ctx: Context, msg: RestartTask) -> Reply:
        golem = self._known(msg.task_id)
        self._must_control(ctx, golem)  # its spec and files are its owner's
        digests = {src: r["sha256"] for src, r in zip(golem.spec["resources"], golem.resources,
                                                       strict=True)}
        create = CreateTask(type="CreateTask", task=GolemTaskSpec.model_validate(golem.spec),
                            resource_digests=digests)
        return self.handle_create(ctx, create)

    def handle_restart_subtasks(self, ctx: Context, msg: RestartSubtasks) -> Reply:
        golem = self._known(msg.task_id)
        self._must_control(ctx, golem)
        unknown = [s for s in msg.subtask_ids if s not in golem.subtasks]
        if unknown:
            raise ProtocolError("not_found", f"task {msg.task_id} has no subtask {unknown[0]!r}")
        if golem.status not in (GolemStatus.ACTIVE, GolemStatus.FINISHED):
            raise ProtocolError("conflict", f"task {msg.task_id} is {golem.status}; restart "
                                "the whole task instead")
        if golem.status == GolemStatus.FINISHED:
            self._reopen(ctx, golem)
        for subtask_id in msg.subtask_ids:
            subtask = golem.subtasks[subtask_id]
            self._stop_attempt(ctx, subtask, SubtaskState.RESTARTED)
            subtask.state, subtask.results, subtask.failures = SubtaskState.RESTARTED, [], 0
            self._launch(ctx, golem, subtask)
        return wire.SubtasksRestarted(type="SubtasksRestarted", task_id=golem.task_id,
                                      subtask_ids=msg.subtask_ids)

    @staticmethod
    def _reopen(ctx: Context, golem: GolemTask) -> None:
        """A finished task computes some parts again: a new parent stands for it, owned by
        whoever owned the task (never by whoever asked)."""
        owner = ctx.state.tasks[golem.parent].owner
        golem.status = GolemStatus.ACTIVE
        golem.deadline = ctx.now + golem.model.seconds
        golem.reopened += 1
        parent = engine.add_virtual_task(ctx, f"golem-{golem.task_id}-r{golem.reopened}",
                                         golem.model.task_name, owner=owner)
        golem.parent = parent.name

    def handle_list(self, ctx: Context, msg: ListTasks) -> Reply:
        return wire.GolemTaskList(type="TaskList",
                                  tasks=[_summary(g) for g in self.tasks.values()])

    def handle_state(self, ctx: Context, msg: GetTaskState) -> Reply:
        golem = self._known(msg.task_id)
        return wire.GolemTaskState(
            **_summary(golem).model_dump(), type="TaskState", task=golem.model,
            results=golem.results, reason=golem.reason,
            subtasks=[wire.SubtaskInfo(subtask_id=s.subtask_id, index=s.index, state=s.state,
                                       node=s.last_node, wrong_answers=s.wrong_answers,
                                       attempts=[wire.SubtaskAttempt(**asdict(a))
                                                 for a in s.attempts])
                      for s in golem.by_index()])


def _files(golem: GolemTask) -> list[wire.ResultFile]:
    return [wire.ResultFile(**{**r, "subtask_id": s.subtask_id, "index": s.index})
            for s in golem.by_index() for r in s.results]


def _created(golem: GolemTask) -> wire.TaskCreatedEvent:
    return wire.TaskCreatedEvent(type="TaskCreatedEvent", task_id=golem.task_id,
                                 task=golem.model)


def _verdict_reply(msg: VerifyResults, acted: bool, why: str | None) -> wire.VerifyResultsAck:
    return wire.VerifyResultsAck(type="VerifyResultsAck", task_id=msg.task_id,
                                 subtask_id=msg.subtask_id, verdict=msg.verdict, acted=acted,
                                 message=why)


def _summary(golem: GolemTask) -> wire.GolemTaskSummary:
    done = sum(1 for s in golem.subtasks.values() if s.state == SubtaskState.FINISHED)
    return wire.GolemTaskSummary(
        task_id=golem.task_id, task_name=golem.spec["task_name"], task_type=golem.spec["type"],
        status=golem.status, created=golem.created, subtasks_count=len(golem.subtasks),
        subtasks_finished=done)


def _event(ctx: Context, event: GolemEvent) -> None:
    ctx.effects.announce(f"golem.{event.type}.{event.task_id}", event.type, event)
