"""Every message on the wire, both ways, is a shared model (issue 13).

The client library is joined to a coordinator's Processor in this process by a loopback in
place of the broker: what the client publishes is handled exactly as the coordinator handles
it, and what the coordinator answers and announces comes back. So every request is checked
as the bytes the client really sends, decoded by shared/inbound.decode, and every reply and
event as the body the coordinator really builds, against the model shared/ has for it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from tests.unit.test_processor import T0, settings
from vespid.client.api import Client
from vespid.client.golem import VERIFIED, GolemClient, GolemTask
from vespid.coordinator.processor import Delivery, Processor
from vespid.coordinator.store import SqliteStore
from vespid.shared import golem, protocol, topology
from vespid.shared.blobs import BlobChunk, BlobGet, chunk_messages, digest
from vespid.shared.errors import ProtocolError, RemoteError, TaskNotFound
from vespid.shared.inbound import decode
from vespid.shared.wire import body_of

# What the coordinator decodes each request with.
REQUESTS: dict[str, type[BaseModel]] = {
    "task-create": protocol.TaskCreate, "task-info": protocol.TaskInfo,
    "task-cancel": protocol.TaskCancel, "task-update": protocol.TaskUpdate,
    "task-wait": protocol.TaskWait, "task-list": protocol.TaskList,
    "node-list": protocol.NodeList, "node-drain": protocol.NodeDrain,
    "state-check": protocol.StateCheck, "blob-get": BlobGet, "blob-chunk": BlobChunk,
    "CreateTask": golem.CreateTask, "VerifyResults": golem.VerifyResults,
    "AbortTask": golem.AbortTask, "GetTaskState": golem.GetTaskState,
    "ListTasks": golem.ListTasks, "RestartTask": golem.RestartTask,
    "RestartSubtasks": golem.RestartSubtasks,
}
# The model of each reply and event, by its `command` or `type`.
REPLIES: dict[str, type[BaseModel]] = {
    "ack": protocol.AckReply, "error": protocol.ErrorReply,
    "task-info-response": protocol.TaskInfoResponse,
    "task-list-response": protocol.TaskListResponse,
    "node-list-response": protocol.NodeListResponse,
    "state-check-response": protocol.StateCheckResponse, "blob-chunk": BlobChunk,
    "TaskCreatedEvent": golem.TaskCreatedEvent, "VerificationRequired": golem.VerificationRequired,
    "TaskResults": golem.TaskResults, "TaskFailedEvent": golem.TaskFailedEvent,
    "TaskTimeoutEvent": golem.TaskTimeoutEvent, "TaskAbortedEvent": golem.TaskAbortedEvent,
    "VerifyResultsAck": golem.VerifyResultsAck, "TaskAborted": golem.TaskAborted,
    "SubtasksRestarted": golem.SubtasksRestarted, "TaskList": golem.GolemTaskList,
    "TaskState": golem.GolemTaskState,
}


def kind_of(body: dict[str, Any]) -> str:
    return str(body.get("command") or body.get("type"))


@dataclass
class Loopback:
    """The broker as a client sees it (its connection and channel in one), with a
    coordinator's Processor behind the coordinator's routing key."""

    proc: Processor
    now: float = T0
    sent: list[bytes] = field(default_factory=list)  # what clients published, as published
    said: list[dict[str, Any]] = field(default_factory=list)  # replies and events
    runs: list[dict[str, Any]] = field(default_factory=list)  # task-runs sent to nodes
    is_open: bool = True
    _client: Client | None = None
    _bound: dict[str, list[str]] = field(default_factory=dict)
    _consumers: dict[str, Callable[..., None]] = field(default_factory=dict)

    def join(self, client: Client) -> Client:
        client._connection = client._channel = self
        client._coordinator_seen = True
        self._client = client
        return client

    # ---- the channel and connection calls the client makes ------------------------------
    def basic_publish(self, exchange: str, routing_key: str, body: bytes, props: Any,
                      mandatory: bool = True) -> None:
        assert (exchange, routing_key) == (topology.EXCHANGE, topology.COORDINATOR_KEY)
        self.sent.append(body)
        self.handle(Delivery(body, props.reply_to, props.correlation_id,
                             user_id=props.user_id, message_id=props.message_id))

    def queue_declare(self, _queue: str, **_arguments: Any) -> Any:
        name = f"q{len(self._bound)}"
        self._bound[name] = []
        return SimpleNamespace(method=SimpleNamespace(queue=name))

    def queue_bind(self, queue: str, exchange: str, key: str) -> None:
        assert exchange == topology.EVENTS_EXCHANGE
        self._bound[queue].append(key)

    def basic_consume(self, queue: str, callback: Callable[..., None],
                      auto_ack: bool = False) -> str:
        self._consumers[queue] = callback
        return queue

    def basic_cancel(self, tag: str) -> None:
        self._consumers.pop(tag, None)

    def queue_delete(self, queue: str) -> None:
        self._bound.pop(queue, None)

    def process_data_events(self, time_limit: float = 0) -> None:
        """Everything is delivered as it is published: there is never anything to wait for."""

    def close(self) -> None:
        self.is_open = False

    # ---- the coordinator's side --------------------------------------------------------
    def handle(self, delivery: Delivery) -> None:
        self.outcome(self.proc.process([delivery], self.now))

    def from_node(self, message: dict[str, Any]) -> None:
        self.handle(Delivery(json.dumps(message).encode()))

    def tick(self, now: float) -> None:
        self.now = now
        self.outcome(self.proc.tick(now))

    def outcome(self, outcome: Any) -> None:
        for reply in outcome.replies:
            self.said.append(json.loads(reply.data))
            assert self._client is not None
            self._client._on_reply(self, None, SimpleNamespace(
                correlation_id=reply.correlation_id), reply.data)
        for entry in outcome.outbox:
            if entry.exchange == topology.EVENTS_EXCHANGE:
                self.said.append(json.loads(entry.body))
                self._publish_event(entry.routing_key, entry.body)
            elif entry.command == "task-run":
                self.runs.append(json.loads(entry.body))

    def _publish_event(self, key: str, body: bytes) -> None:
        for queue, keys in list(self._bound.items()):
            bound = any(k == key or (k.endswith(".#") and key.startswith(k[:-1])) for k in keys)
            if bound and queue in self._consumers:
                self._consumers[queue](self, SimpleNamespace(routing_key=key), None, body)

    # ---- a node that runs what it is sent ------------------------------------------------
    def run_of(self, prefix: str) -> dict[str, Any]:
        return next(run for run in reversed(self.runs) if run["name"].startswith(prefix))

    def finish(self, run: dict[str, Any], success: str = "ok",
               files: dict[str, bytes] | None = None) -> None:
        results = []
        for name, data in (files or {}).items():
            for chunk in chunk_messages(data):
                self.handle(Delivery(protocol.encode(chunk)))
            results.append({"name": name, "sha256": digest(data), "size": len(data)})
        self.from_node({"command": "task-complete", "name": run["name"], "node": "n1",
                        "success": success, "attempt": run["attempt"], "results": results})


# ---- one working day of a client: every request it has, every answer there is -------------


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loopback]:
    folder = tmp_path_factory.mktemp("wire")
    store = SqliteStore(folder / "s.db")
    loop = Loopback(Processor(store, settings(folder), now=T0))
    loop.from_node({"command": "node-set", "name": "n1",
                    "capabilities": {"cores": 8, "memory": 8000}})
    with pytest.MonkeyPatch.context() as env:
        plain_requests(loop, env)
    golem_requests(loop, folder)
    golem_endings(loop)
    loop.tick(T0 + 1)
    drains(loop)
    yield loop
    store.close()


def plain_requests(loop: Loopback, env: pytest.MonkeyPatch) -> None:
    client = loop.join(Client())
    client.nodes()
    root = client.create_task("build", "print('hi')", requirements={"cores": 1})
    client.create_task("build", "print('hi')", key=root_key(loop))  # matches: existing
    client.create_task("wide", "pass", requirements={"cores": 1, "cores_max": math.inf,
                                                     "memory": 100_000})  # fits nowhere
    with pytest.raises(TaskNotFound):
        client.info("no such task")  # answered, though no task could have that name
    env.setenv("VESPID_TASK", root.name)
    env.setenv("VESPID_ATTEMPT", "1")
    env.setenv("VESPID_NODE", "n1")
    client.report("warning", "3 tests skipped")
    child = client.create_task("child", "pass", name_pretty="Child")
    loop.finish(loop.run_of("child"), "error")
    client.wait(child.name, timeout=5)
    env.delenv("VESPID_TASK")
    client.info(root.name)  # with its failed child in tree_failures
    client.tasks(status="working")
    client.tasks(parent=root.name, limit=10)
    client.request(protocol.StateCheck(command="state-check"))
    client.cancel(root.name)
    with pytest.raises(RemoteError):
        client.cancel("no-such-task")


def root_key(loop: Loopback) -> str:
    first = json.loads(next(b for b in loop.sent if b"task-create" in b))
    return str(first["key"])


def golem_requests(loop: Loopback, folder: Path) -> None:
    client = GolemClient()
    loop.join(client)
    resource = folder / "palette.txt"
    resource.write_text("blue")
    task = client.create_task({"type": "Python", "options": {"script": "pass"},
                               "resources": [str(resource)], "project": "kept as given",
                               "verification": {"type": "External"}})
    loop.finish(loop.run_of(f"golem-{task.task_id}"), files={"result.json": b"{}"})
    verify_and_download(task, folder)
    client.list_golem_tasks()
    again = client.restart(task.task_id)
    subtask = client.state(again.task_id)["subtasks"][0]["subtask_id"]
    client.restart_subtasks(again.task_id, [subtask])
    again.abort()


def verify_and_download(task: GolemTask, folder: Path) -> None:
    asked = next(task.events(timeout=1))
    assert asked["type"] == "VerificationRequired"
    task.verify(asked["subtask_id"], VERIFIED)
    assert list(task.events(timeout=1))[-1]["type"] == "TaskResults"
    assert [p.read_bytes() for p in task.download(folder / "out")] == [b"{}"]


def golem_endings(loop: Loopback) -> None:
    """A task that fails, and one that runs out of time: events only, no requests."""
    failing = {"type": "CreateTask", "task": {"type": "Python", "options": {"script": "x"}}}
    loop.handle(Delivery(json.dumps(failing).encode()))
    task_id = next(b["task_id"] for b in reversed(loop.said) if b.get("type") ==
                   "TaskCreatedEvent")
    for _ in range(3):
        loop.finish(loop.run_of(f"golem-{task_id}"), "fatal")
    slow = {"type": "CreateTask", "task": {"type": "Python", "timeout": "00:00:01"}}
    loop.handle(Delivery(json.dumps(slow).encode()))


def drains(loop: Loopback) -> None:
    client = loop.join(Client())
    client.drain("n1")
    with pytest.raises(RemoteError):
        client.drain("n9")


# ---- requests: the bytes the client sends are what the coordinator decodes ------------------


@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_every_request_the_client_sends_decodes_to_the_coordinators_model(
        day: Loopback, kind: str) -> None:
    sent = [body for body in day.sent if kind_of(json.loads(body)) == kind]
    assert sent, f"the client never sent {kind}"
    for body in sent:
        message = decode(body)
        assert type(message) is REQUESTS[kind]
        # Read back, the model says what the client wrote: nothing lost, nothing added.
        assert body_of(message) == json.loads(body)


def test_a_task_create_carries_what_the_client_always_sent_and_no_model_default(
        day: Loopback) -> None:
    create = json.loads(next(b for b in day.sent if b'"name":"wide_' in b))
    assert set(create) == {"command", "name", "name_pretty", "parent", "executable_pyscript",
                           "executable_pyfile", "requirements", "repositories",
                           "environment", "priority", "timeout", "retries", "key"}
    assert create["requirements"]["cores_max"] is None  # unbounded, as strict JSON
    assert create["parent"] is None and create["executable_pyfile"] is None


def test_a_task_update_from_inside_a_task_says_its_attempt_and_node(day: Loopback) -> None:
    update = json.loads(next(b for b in day.sent if b"task-update" in b))
    assert update == {"command": "task-update", "name": update["name"], "success": "warning",
                      "message": "3 tests skipped", "attempt": 1, "node": "n1"}


def test_a_create_task_leaves_the_task_defaults_to_the_coordinator(day: Loopback) -> None:
    create = json.loads(next(b for b in day.sent if b'"CreateTask"' in b))
    assert set(create["task"]) == {"type", "options", "resources", "project", "verification"}
    assert list(create["resource_digests"].values()) == [digest(b"blue")]


# ---- replies and events: the coordinator's bodies are its shared models -------------------


@pytest.mark.parametrize("kind", sorted(REPLIES))
def test_every_reply_and_event_is_its_model_and_round_trips(day: Loopback, kind: str) -> None:
    bodies = [body for body in day.said if kind_of(body) == kind]
    assert bodies, f"the coordinator never said {kind}"
    for body in bodies:
        model = REPLIES[kind].model_validate(body)
        assert model.model_dump(mode="json", by_alias=True) == body
        assert json.loads(protocol.encode(model)) == body


def test_the_three_task_info_bodies_keep_to_their_own_fields(day: Loopback) -> None:
    infos = [b for b in day.said if b.get("command") == "task-info-response"]
    unknown = next(b for b in infos if b["status"] == "invalid")
    assert set(unknown) == {"command", "name", "status", "success", "children", "node", "log"}
    replies = [b for b in infos if "waiting_reason" in b]
    events = [b for b in infos if b["status"] != "invalid" and "waiting_reason" not in b]
    assert replies and events
    assert all("tree_failures" in b for b in replies)
    assert any(b["tree_failures"] for b in replies)
    assert not any("tree_failures" in b for b in events)


def test_a_reply_model_refuses_a_field_the_coordinator_does_not_send() -> None:
    with pytest.raises(ValidationError):
        protocol.StateCheckResponse.model_validate({
            "command": "state-check-response", "ok": True, "problems": [], "tasks": 0,
            "nodes": 0, "waiting": 0, "extra": 1})
    with pytest.raises(ValidationError):
        golem.TaskAborted.model_validate({"type": "TaskAborted", "task_id": "t",
                                          "status": "paused"})


def test_acks_are_the_bytes_they_always_were() -> None:
    assert protocol.ack_reply("t") == {"command": "ack", "name": "t"}
    assert protocol.ack_reply(None) == {"command": "ack", "name": None}
    assert protocol.existing_reply("t") == {"command": "ack", "name": "t", "existing": True}
    assert protocol.error_reply("conflict", "no") == {"command": "error", "error": "conflict",
                                                      "message": "no"}
    # However a reply model is dumped, it never adds a default it was not given.
    assert protocol.encode(protocol.AckReply(command="ack", name="t")) == \
        b'{"command":"ack","name":"t"}'


# ---- what the coordinator would refuse, the client refuses the same way -------------------


def coordinators_sentence(message: dict[str, Any]) -> str:
    with pytest.raises(ProtocolError) as refused:
        decode(json.dumps(message).encode())
    return refused.value.message


def test_a_task_create_the_coordinator_would_refuse_is_refused_unsent(tmp_path: Path) -> None:
    loop = Loopback(Processor(SqliteStore(tmp_path / "s.db"), settings(tmp_path), now=T0))
    client = loop.join(Client())
    with pytest.raises(RemoteError) as refused:
        client.create_task("t", "pass", unique=False, requirements={"memory": "lots"}, key="k")
    assert refused.value.code == "invalid_message"
    assert refused.value.message == coordinators_sentence({
        "command": "task-create", "name": "t", "executable_pyscript": "pass",
        "requirements": {"memory": "lots"}})
    assert loop.sent == []


def test_a_golem_task_the_coordinator_would_refuse_uploads_and_sends_nothing(
        tmp_path: Path) -> None:
    loop = Loopback(Processor(SqliteStore(tmp_path / "s.db"), settings(tmp_path), now=T0))
    client = loop.join(GolemClient())
    with pytest.raises(RemoteError) as refused:
        client.create_task({"type": "Blender", "resources": ["/nowhere"]})
    assert refused.value.message == coordinators_sentence(
        {"type": "CreateTask", "task": {"type": "Blender"}})
    assert loop.sent == []
