"""A natural Python API for the Golem-style dialect.

    with GolemClient() as golem:
        task = golem.create_task({"type": "Fractal", "subtasks_count": 4,
                                  "options": {"resolution": [400, 300]}})
        for event in task.events():          # TaskResults, VerificationRequired, ...
            if event["type"] == "VerificationRequired":
                task.verify(event["subtask_id"], VERIFIED)
        paths = task.download("out/")        # results, checked against their sha256

Resources are uploaded before CreateTask (chunked, sha256-checked); failure events are
raised as GolemTaskFailed, GolemTaskTimedOut or GolemTaskAborted.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vespid.client.api import Client, build, refused_as
from vespid.shared import golem as dialect  # the Golem-style dialect's models
from vespid.shared import topology
from vespid.shared.blobs import BlobGet, file_chunk_messages, file_digest
from vespid.shared.errors import (
    ConfigError,
    GolemTaskAborted,
    GolemTaskFailed,
    GolemTaskTimedOut,
    WaitTimeout,
)
from vespid.shared.golem import SubtaskVerificationState
from vespid.shared.protocol import encode, parse_body
from vespid.shared.transport import guarded, properties, publish_confirmed, user_of

VERIFIED = SubtaskVerificationState.VERIFIED
WRONG_ANSWER = SubtaskVerificationState.WRONG_ANSWER
FAILURES = {"TaskFailedEvent": GolemTaskFailed, "TaskTimeoutEvent": GolemTaskTimedOut,
            "TaskAbortedEvent": GolemTaskAborted}


@dataclass
class GolemTask:
    client: GolemClient
    task_id: str
    task: dict[str, Any]
    queue: str
    _pending: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] | None = None

    def events(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Every event of this task until TaskResults; a failure event raises."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._pending:
                event = self._pending.pop(0)
                if event["type"] in FAILURES:
                    raise FAILURES[event["type"]](self.task_id, event["type"],
                                                  event.get("reason"))
                yield event
                if event["type"] == "TaskResults":
                    self.results = event
                    return
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"task {self.task_id} gave no results within {timeout:g} s")
            self.client._pump(1.0)

    def wait(self, timeout: float | None = None, accept_all: bool = False) -> dict[str, Any]:
        for event in self.events(timeout):
            if event["type"] == "VerificationRequired" and accept_all:
                self.verify(event["subtask_id"], VERIFIED)
        assert self.results is not None
        return self.results

    def verify(self, subtask_id: str, verdict: int) -> dict[str, Any]:
        return self.client.request(dialect.VerifyResults(
            type="VerifyResults", task_id=self.task_id, subtask_id=subtask_id,
            verdict=int(verdict)))

    def abort(self) -> None:
        self.client.request(dialect.AbortTask(type="AbortTask", task_id=self.task_id))

    def state(self) -> dict[str, Any]:
        return self.client.state(self.task_id)

    def download(self, folder: Path | str) -> list[Path]:
        """Fetch every result file into folder/<subtask index>/, checking each digest."""
        if self.results is None:
            raise ConfigError("no results yet: wait() for the task first")
        return [self.client.fetch(f["sha256"], Path(folder) / str(f["index"]) / f["name"])
                for f in self.results["files"]]


class GolemClient(Client):
    def create_task(self, task: dict[str, Any]) -> GolemTask:  # type: ignore[override]
        # Checked before any upload: a task the coordinator would refuse sends nothing.
        with refused_as("CreateTask", "task"):
            spec = dialect.GolemTaskSpec.model_validate(task)
        digests = {source: self.upload(Path(source)) for source in spec.resources}
        self._events_queue()  # listening before asking: no event can be missed
        reply = self.request(dialect.CreateTask(type="CreateTask", task=spec,
                                                resource_digests=digests))
        return self._follow(reply)

    def _follow(self, reply: dict[str, Any]) -> GolemTask:
        handle = GolemTask(self, reply["task_id"], reply["task"], self._golem_queue)
        handle._pending.extend(self._early.pop(handle.task_id, []))
        self._golem_tasks[handle.task_id] = handle
        return handle

    def _events_queue(self) -> str:
        if not hasattr(self, "_golem_queue"):
            channel = self._ensure_channel()
            self._golem_tasks: dict[str, GolemTask] = {}
            self._early: dict[str, list[dict[str, Any]]] = {}  # events before the reply
            self._golem_queue: str = guarded(lambda: channel.queue_declare(
                "", exclusive=True, auto_delete=True)).method.queue
            guarded(lambda: channel.queue_bind(self._golem_queue, topology.EVENTS_EXCHANGE,
                                               "golem.#"))
            guarded(lambda: channel.basic_consume(self._golem_queue, self._on_golem_event,
                                                  auto_ack=True))
        return self._golem_queue

    def _on_golem_event(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        event = parse_body(body)
        task_id = str(event.get("task_id"))
        if event.get("type") == "TaskCreatedEvent":
            return
        handle = self._golem_tasks.get(task_id)
        if handle is not None:
            handle._pending.append(event)
        else:
            self._early.setdefault(task_id, []).append(event)

    def upload(self, path: Path) -> str:
        if not path.is_file():
            raise ConfigError(f"resource file {path} does not exist")
        channel = self._ensure_channel()
        sha = file_digest(path)
        for chunk in file_chunk_messages(path, sha):
            publish_confirmed(channel, topology.EXCHANGE, topology.COORDINATOR_KEY,
                              encode(chunk), properties("blob-chunk", app_id="vespid-client",
                                                        user_id=user_of(self.url or "")))
        return sha

    def fetch(self, sha: str, target: Path) -> Path:
        """Download a kept file to `target`, part by part, hashing as it goes: memory holds
        one part, and `target` appears only once the whole file matched its sha256."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        hashed, index, count = hashlib.sha256(), 0, 1
        try:
            with partial.open("wb") as handle:
                while index < count:
                    reply = self.request(BlobGet(command="blob-get", sha256=sha, index=index))
                    part = base64.b64decode(reply["data"])
                    hashed.update(part)
                    handle.write(part)
                    count, index = int(reply["count"]), index + 1
            if hashed.hexdigest() != sha:
                raise GolemTaskFailed(sha, "download", "a result file did not match its sha256")
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def state(self, task_id: str) -> dict[str, Any]:
        return self.request(dialect.GetTaskState(type="GetTaskState", task_id=task_id))

    def list_golem_tasks(self) -> list[dict[str, Any]]:
        return list(self.request(dialect.ListTasks(type="ListTasks"))["tasks"])

    def restart(self, task_id: str) -> GolemTask:
        self._events_queue()
        restart = dialect.RestartTask(type="RestartTask", task_id=task_id)
        return self._follow(self.request(restart))

    def restart_subtasks(self, task_id: str, subtask_ids: list[str]) -> None:
        self.request(build(dialect.RestartSubtasks, type="RestartSubtasks", task_id=task_id,
                           subtask_ids=subtask_ids))

