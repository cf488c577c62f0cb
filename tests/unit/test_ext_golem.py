"""The Golem-style dialect as an extension on its own: a Processor that runs only Files and
Golem, on a real SQLite file, with a fake clock (plain numbers) and no broker."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from vespid.coordinator.engine import Context
from vespid.coordinator.extensions.files import Files
from vespid.coordinator.extensions.golem import (
    Golem,
    GolemTask,
    Subtask,
    SubtaskAttempt,
)
from vespid.coordinator.processor import Delivery, Outcome, Processor
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.store import SqliteStore, Store, open_store
from vespid.shared.blobs import chunk_messages, digest
from vespid.shared.golem import GolemStatus, ListTasks, SubtaskState, SubtaskVerificationState
from vespid.shared.protocol import NodeList, TaskComplete

T0 = 1_000_000.0
MAX_FAILURES = 3
MAX_WRONG_ANSWERS = 2
VERIFIED = int(SubtaskVerificationState.VERIFIED)
WRONG_ANSWER = int(SubtaskVerificationState.WRONG_ANSWER)


@dataclass
class Rig:
    """One coordinator: its store, its two extensions and the processor that runs them."""

    settings: CoordinatorSettings
    store: Store
    files: Files
    golem: Golem
    proc: Processor

    def send(self, body: dict[str, Any], now: float = T0, *, user: str | None = None,
             message_id: str | None = None, reply_to: str | None = "client") -> Outcome:
        return self.proc.process([delivery(body, user, message_id, reply_to)], now)

    def ask(self, body: dict[str, Any], now: float = T0, **properties: Any) -> dict[str, Any]:
        """The one reply to `body`, as the requester decodes it from the wire."""
        outcome = self.send(body, now, **properties)
        assert len(outcome.replies) == 1
        reply: dict[str, Any] = json.loads(outcome.replies[0].data)
        return reply

    def upload(self, data: bytes, now: float = T0) -> str:
        """Send a file as a node or requester does: blob-chunks, no reply asked."""
        for chunk in chunk_messages(data):
            self.send(chunk.model_dump(), now, reply_to=None)
        return digest(data)

    def state_of(self, task_id: str, now: float = T0) -> dict[str, Any]:
        reply = self.ask({"type": "GetTaskState", "task_id": task_id}, now)
        assert reply["type"] == "TaskState"
        return reply

    def info(self, name: str, now: float = T0) -> dict[str, Any]:
        return self.ask({"command": "task-info", "name": name}, now)


def delivery(body: dict[str, Any], user: str | None = None, message_id: str | None = None,
             reply_to: str | None = "client") -> Delivery:
    return Delivery(json.dumps(body).encode(), reply_to=reply_to,
                    correlation_id="corr" if reply_to else None, user_id=user,
                    message_id=message_id)


def golem_settings(tmp_path: Path, **overrides: Any) -> CoordinatorSettings:
    # Nodes are never lost here: every tick is about the Golem deadline alone.
    values: dict[str, Any] = {
        "state": tmp_path / "state.db", "heartbeat_interval": 60.0, "missed_heartbeats": 100,
        "dispatch_grace": 15.0, "results_dir": tmp_path / "results",
        "blob_dir": tmp_path / "blobs", "golem_max_failures": MAX_FAILURES,
        "golem_max_wrong_answers": MAX_WRONG_ANSWERS, "admins": []}
    values.update(overrides)
    return CoordinatorSettings(**values)


@pytest.fixture
def open_rig(tmp_path: Path, state_location: Path | str) -> Iterator[Callable[..., Rig]]:
    """Opens a coordinator on the test's state file (again: a restart), closing all at the end."""
    stores: list[Store] = []

    def open_(now: float = T0, **overrides: Any) -> Rig:
        settings = golem_settings(tmp_path, **overrides)
        store = open_store(state_location)  # SQLite or PostgreSQL, as the fixture has it
        stores.append(store)
        files = Files(settings)
        golem = Golem(settings, files.store)
        return Rig(settings, store, files, golem,
                   Processor(store, settings, now, extensions=[files, golem]))

    yield open_
    for store in stores:
        store.close()


@pytest.fixture
def rig(open_rig: Callable[..., Rig]) -> Rig:
    return open_rig()


# --- messages and what comes out ------------------------------------------------------------


def node_set(name: str, cores: int = 1, **fields: Any) -> dict[str, Any]:
    return {"command": "node-set", "name": name, "capabilities": {"cores": cores},
            "repositories": {}, "activetasks": [], **fields}


def create_task(**task: Any) -> dict[str, Any]:
    spec = {"type": "Python", "options": {"script": "pass"}, **task}
    return {"type": "CreateTask", "task": spec}


def complete(name: str, node: str, success: str = "ok", *, cause: str | None = None,
             message: str | None = None,
             results: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"command": "task-complete", "name": name, "node": node, "success": success,
            "attempt": 1, "cause": cause, "message": message, "results": results or []}


def attempt(task_id: str, index: int, number: int = 1) -> str:
    return f"golem-{task_id}.{index}.{number}"


def to_nodes(outcome: Outcome, command: str) -> list[tuple[str, dict[str, Any]]]:
    """(node, body) of every message of that command the outcome sends to a node."""
    return [(e.routing_key.removeprefix("node."), json.loads(e.body)) for e in outcome.outbox
            if e.exchange == "vespid" and e.command == command]


def runs(outcome: Outcome) -> dict[str, str]:
    """Task-runs sent: attempt name -> node."""
    return {body["name"]: node for node, body in to_nodes(outcome, "task-run")}


def kills(outcome: Outcome) -> list[tuple[str, str]]:
    return [(node, body["name"]) for node, body in to_nodes(outcome, "task-kill")]


def golem_events(outcome: Outcome) -> list[tuple[str, dict[str, Any]]]:
    return [(e.routing_key, json.loads(e.body)) for e in outcome.outbox
            if e.exchange == "vespid.events" and e.routing_key.startswith("golem.")]


def create(rig: Rig, now: float = T0, *, user: str | None = None,
           message_id: str | None = None, **task: Any) -> tuple[str, Outcome]:
    outcome = rig.send(create_task(**task), now, user=user, message_id=message_id)
    body = json.loads(outcome.replies[0].data)
    assert body["type"] == "TaskCreatedEvent", body
    return body["task_id"], outcome


def results_file(rig: Rig, task_id: str, index: int, name: str) -> Path:
    return rig.settings.results_path / f"{task_id}-output" / str(index) / name


# --- creating -------------------------------------------------------------------------------


def test_create_task_with_three_subtasks_starts_one_attempt_per_index_on_nodes_with_room(
        rig: Rig) -> None:
    rig.send(node_set("n1", cores=2))
    rig.send(node_set("n2", cores=1))
    rig.send(node_set("drained", cores=8, draining=True))  # no room for new work

    outcome = rig.send(create_task(subtasks_count=3, task_name="three"), T0 + 1)

    reply = json.loads(outcome.replies[0].data)
    assert reply["type"] == "TaskCreatedEvent"
    task_id = reply["task_id"]
    assert reply["task"]["subtasks_count"] == 3
    assert reply["task"]["task_name"] == "three"
    assert reply["task"]["subtask_timeout"] == "00:10:00"  # defaults filled in
    assert golem_events(outcome) == [(f"golem.TaskCreatedEvent.{task_id}", reply)]
    started = to_nodes(outcome, "task-run")
    assert sorted(body["name"] for _, body in started) == [attempt(task_id, i) for i in range(3)]
    assert Counter(node for node, _ in started) == {"n1": 2, "n2": 1}
    assert sorted(body["environment"]["VESPID_SUBTASK_INDEX"] for _, body in started) == \
        ["0", "1", "2"]
    assert {body["environment"]["VESPID_GOLEM_TASK_ID"] for _, body in started} == {task_id}
    parent = rig.info(f"golem-{task_id}", T0 + 1)
    assert parent["status"] == "working"
    assert parent["node"] is None
    assert sorted(parent["children"]) == [attempt(task_id, i) for i in range(3)]
    state = rig.state_of(task_id, T0 + 1)
    assert state["status"] == "computing"
    assert [s["index"] for s in state["subtasks"]] == [0, 1, 2]
    assert [s["state"] for s in state["subtasks"]] == ["computing"] * 3
    assert {s["node"] for s in state["subtasks"]} == {"n1", "n2"}


def test_a_create_task_delivered_twice_with_the_same_message_id_makes_one_task(
        rig: Rig) -> None:
    rig.send(node_set("n1", cores=4))

    first = rig.send(create_task(subtasks_count=2), T0, message_id="req-1")
    again = rig.send(create_task(subtasks_count=2), T0 + 1, message_id="req-1")
    other = rig.send(create_task(subtasks_count=2), T0 + 2, message_id="req-2")

    first_body = json.loads(first.replies[0].data)
    assert json.loads(again.replies[0].data) == first_body
    assert again.outbox == []  # no task, no attempt, no event the second time
    assert json.loads(other.replies[0].data)["task_id"] != first_body["task_id"]
    listed = rig.ask({"type": "ListTasks"}, T0 + 3)["tasks"]
    assert sorted(t["task_id"] for t in listed) == sorted(
        [first_body["task_id"], json.loads(other.replies[0].data)["task_id"]])
    assert len(runs(first)) == 2 and len(runs(other)) == 2


def test_a_create_task_naming_a_resource_never_uploaded_is_refused_and_makes_nothing(
        rig: Rig) -> None:
    rig.send(node_set("n1"))

    reply = rig.ask({**create_task(resources=["in.txt"]),
                     "resource_digests": {"in.txt": "0" * 64}}, T0)

    assert reply["command"] == "error"
    assert reply["error"] == "missing_resource"
    assert "'in.txt'" in reply["message"]
    assert rig.ask({"type": "ListTasks"})["tasks"] == []
    assert rig.golem.tasks == {}


def test_an_uploaded_resource_travels_with_every_attempt_and_is_sent_once_per_node(
        rig: Rig) -> None:
    sha = rig.upload(b"palette\n")
    rig.send(node_set("n1", cores=2))

    outcome = rig.send({**create_task(subtasks_count=2, resources=["/home/u/palette.txt"],
                                      resources_mapped={"/home/u/palette.txt": "in/p.txt"}),
                        "resource_digests": {"/home/u/palette.txt": sha}}, T0)

    to_n1 = [e for e in outcome.outbox if e.routing_key == "node.n1"]
    assert [(e.command, e.file) for e in to_n1] == [
        ("blob-chunk", sha), ("task-run", None), ("task-run", None)]
    assert [body["resources"] for _, body in to_nodes(outcome, "task-run")] == \
        [[{"sha256": sha, "path": "in/p.txt"}]] * 2


# --- failures, timeouts, retries ------------------------------------------------------------


def test_a_failed_part_is_retried_on_another_node_until_the_task_fails_after_max_failures(
        rig: Rig) -> None:
    for name in ("n1", "n2", "n3"):
        rig.send(node_set(name))
    task_id, created = create(rig)
    nodes = [runs(created)[attempt(task_id, 0, 1)]]

    for number in (1, 2):
        outcome = rig.send(complete(attempt(task_id, 0, number), nodes[-1], "fatal",
                                    cause="exit", message="exited with status 1"),
                           T0 + 10 * number)
        assert golem_events(outcome) == []
        started = runs(outcome)
        assert list(started) == [attempt(task_id, 0, number + 1)]
        assert started[attempt(task_id, 0, number + 1)] not in nodes  # the avoid list
        nodes.append(started[attempt(task_id, 0, number + 1)])

    last = rig.send(complete(attempt(task_id, 0, 3), nodes[-1], "fatal", cause="exit",
                             message="exited with status 1"), T0 + 30)

    assert sorted(nodes) == ["n1", "n2", "n3"]
    assert runs(last) == {}
    [(key, event)] = golem_events(last)
    assert key == f"golem.TaskFailedEvent.{task_id}"
    assert event["type"] == "TaskFailedEvent"
    assert event["reason"] == (f"part 0 failure: exited with status 1; part 0 failed "
                               f"{MAX_FAILURES} times")
    state = rig.state_of(task_id, T0 + 30)
    assert state["status"] == "failed"
    assert state["reason"] == event["reason"]
    [subtask] = state["subtasks"]
    assert subtask["state"] == "failed"
    assert [(a["node"], a["state"]) for a in subtask["attempts"]] == \
        [(node, "failure") for node in nodes]
    parent = rig.info(f"golem-{task_id}", T0 + 30)
    assert (parent["status"], parent["success"]) == ("complete", "fatal")


def test_a_part_is_a_timeout_only_when_its_node_says_cause_timeout_whatever_the_names(
        rig: Rig) -> None:
    rig.send(node_set("timeout-box"))
    rig.send(node_set("n1"))
    task_id, created = create(rig, subtasks_count=2, timeout="01:00:00")
    placed = runs(created)
    on_box = next(name for name, node in placed.items() if node == "timeout-box")
    on_n1 = next(name for name, node in placed.items() if node == "n1")

    rig.send(complete(on_n1, "n1", "terminated", cause="timeout",
                      message="killed: it ran longer than its timeout of 600 s"), T0 + 600)
    rig.send(complete(on_box, "timeout-box", "fatal", cause="exit",
                      message="exited with status 1 on timeout-box"), T0 + 601)

    state = rig.state_of(task_id, T0 + 602)
    first_attempts = {s["attempts"][0]["task"]: s["attempts"][0]["state"]
                      for s in state["subtasks"]}
    assert first_attempts == {on_n1: "timeout", on_box: "failure"}
    assert state["status"] == "computing"  # one failure each is under the limit
    golem = rig.golem.tasks[task_id]
    assert sorted(s.failures for s in golem.subtasks.values()) == [1, 1]
    assert sorted(s.avoid for s in golem.subtasks.values()) == [["n1"], ["timeout-box"]]
    assert all(len(s.attempts) == 2 for s in golem.subtasks.values())


# --- results --------------------------------------------------------------------------------


def test_all_parts_ok_publish_task_results_with_files_and_copy_them_only_after_the_commit(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.send(node_set("n1", cores=2))
    task_id, _ = create(rig, subtasks_count=2)
    contents = {0: b"tile zero", 1: b"tile one"}
    shas = {i: rig.upload(data, T0 + 1) for i, data in contents.items()}
    seen_inside: list[bool] = []
    real = rig.proc.dispatch_table[TaskComplete]

    def spy(ctx: Context, msg: TaskComplete) -> Any:
        reply = real(ctx, msg)
        seen_inside.append(results_file(rig, task_id, 1, "tile.png").exists())
        return reply

    monkeypatch.setitem(rig.proc.dispatch_table, TaskComplete, spy)

    first = rig.send(complete(attempt(task_id, 0), "n1", results=[
        {"name": "tile.png", "sha256": shas[0], "size": len(contents[0])}]), T0 + 5)
    assert golem_events(first) == []
    assert not (rig.settings.results_path / f"{task_id}-output").exists()

    last = rig.send(complete(attempt(task_id, 1), "n1", results=[
        {"name": "tile.png", "sha256": shas[1], "size": len(contents[1])}]), T0 + 6)

    assert seen_inside == [False, False]  # nothing copied inside the transaction
    [(key, event)] = golem_events(last)
    assert key == f"golem.TaskResults.{task_id}"
    assert event["type"] == "TaskResults"
    assert event["results"] == [str(results_file(rig, task_id, i, "tile.png").resolve())
                                for i in (0, 1)]
    subtask_ids = [s["subtask_id"] for s in rig.state_of(task_id, T0 + 6)["subtasks"]]
    assert event["files"] == [
        {"name": "tile.png", "sha256": shas[i], "size": len(contents[i]),
         "subtask_id": subtask_ids[i], "index": i} for i in (0, 1)]
    for i, data in contents.items():
        assert results_file(rig, task_id, i, "tile.png").read_bytes() == data
    state = rig.state_of(task_id, T0 + 6)
    assert state["status"] == "finished"
    assert state["results"] == event["results"]
    assert [s["state"] for s in state["subtasks"]] == ["finished", "finished"]
    assert rig.info(f"golem-{task_id}", T0 + 6)["success"] == "ok"


def test_no_result_is_copied_when_the_batch_that_finished_the_task_is_rolled_back(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.send(node_set("n1"))
    task_id, _ = create(rig)
    sha = rig.upload(b"the answer", T0 + 1)
    target = results_file(rig, task_id, 0, "answer.txt")
    copied_at_rollback: list[bool] = []
    reload = rig.proc._reload

    def reload_spy() -> None:
        copied_at_rollback.append(target.exists())
        reload()

    def boom(ctx: Context, msg: Any) -> None:
        raise RuntimeError("a later handler in the same batch fails")

    monkeypatch.setattr(rig.proc, "_reload", reload_spy)
    monkeypatch.setitem(rig.proc.dispatch_table, NodeList, boom)
    batch = [delivery(complete(attempt(task_id, 0), "n1", results=[
        {"name": "answer.txt", "sha256": sha, "size": 10}]), reply_to=None),
             delivery({"command": "node-list"})]

    with capture_logs() as logged:  # (and no slow rendering of the tracebacks)
        outcome = rig.proc.process(batch, T0 + 5)

    assert [e["event"] for e in logged if e["log_level"] == "error"] == [
        "batch_failed_retrying_one_by_one", "message_crashed_handler"]
    # The batch was rolled back with the copy not made, then handled one by one: the
    # completion alone committed (and copied), the failing message alone was refused.
    assert copied_at_rollback == [False, True]  # at the rollback, then after the failure alone
    assert [json.loads(r.data)["error"] for r in outcome.replies] == ["internal"]
    assert [key for key, _ in golem_events(outcome)] == [f"golem.TaskResults.{task_id}"]
    assert target.read_bytes() == b"the answer"
    assert rig.state_of(task_id, T0 + 6)["status"] == "finished"


def test_a_completion_whose_transaction_fails_copies_nothing_and_changes_nothing(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.send(node_set("n1"))
    task_id, _ = create(rig)
    sha = rig.upload(b"the answer", T0 + 1)
    real = rig.proc.dispatch_table[TaskComplete]

    def then_fail(ctx: Context, msg: TaskComplete) -> None:
        real(ctx, msg)  # the task finished and its copy was queued; then the batch fails
        raise RuntimeError("disk full")

    done = complete(attempt(task_id, 0), "n1", results=[
        {"name": "answer.txt", "sha256": sha, "size": 10}])
    with monkeypatch.context() as patch, capture_logs() as logged:
        patch.setitem(rig.proc.dispatch_table, TaskComplete, then_fail)
        failed = rig.send(done, T0 + 5)

    assert json.loads(failed.replies[0].data)["error"] == "internal"
    assert "message_crashed_handler" in [e["event"] for e in logged]
    assert golem_events(failed) == []
    assert not results_file(rig, task_id, 0, "answer.txt").exists()
    state = rig.state_of(task_id, T0 + 5)
    assert state["status"] == "computing"
    assert state["subtasks"][0]["state"] == "computing"

    again = rig.send(done, T0 + 6)  # the redelivery, with the handler working

    assert [key for key, _ in golem_events(again)] == [f"golem.TaskResults.{task_id}"]
    assert results_file(rig, task_id, 0, "answer.txt").read_bytes() == b"the answer"


# --- external verification ------------------------------------------------------------------


def external_task(rig: Rig) -> tuple[str, str, str]:
    """A one-part task verified by its requester, computed once: (task_id, subtask_id, node)."""
    rig.send(node_set("n1"))
    rig.send(node_set("n2"))
    task_id, created = create(rig, verification={"type": "External"})
    node = runs(created)[attempt(task_id, 0)]
    subtask_id = next(iter(rig.golem.tasks[task_id].subtasks))
    return task_id, subtask_id, node


def compute(rig: Rig, task_id: str, number: int, node: str, data: bytes,
            now: float) -> Outcome:
    sha = rig.upload(data, now)
    return rig.send(complete(attempt(task_id, 0, number), node, results=[
        {"name": "result.json", "sha256": sha, "size": len(data)}]), now)


def verify(rig: Rig, task_id: str, subtask_id: str, verdict: int,
           now: float) -> tuple[dict[str, Any], Outcome]:
    outcome = rig.send({"type": "VerifyResults", "task_id": task_id, "subtask_id": subtask_id,
                        "verdict": verdict}, now)
    return json.loads(outcome.replies[0].data), outcome


def test_an_external_task_asks_for_a_verdict_and_verified_accepts_the_part(rig: Rig) -> None:
    task_id, subtask_id, node = external_task(rig)

    computed = compute(rig, task_id, 1, node, b'{"data": 42}', T0 + 5)

    [(key, event)] = golem_events(computed)
    assert key == f"golem.VerificationRequired.{task_id}"
    assert event["subtask_id"] == subtask_id
    target = results_file(rig, task_id, 0, "result.json")
    assert event["results"] == [str(target.resolve())]
    assert target.read_bytes() == b'{"data": 42}'  # copied for the verifier, after the commit
    state = rig.state_of(task_id, T0 + 5)
    assert (state["status"], state["subtasks"][0]["state"]) == ("computing", "verifying")

    reply, verified = verify(rig, task_id, subtask_id, VERIFIED, T0 + 6)

    assert reply == {"type": "VerifyResultsAck", "task_id": task_id, "subtask_id": subtask_id,
                     "verdict": VERIFIED, "acted": True, "message": None}
    assert [key for key, _ in golem_events(verified)] == [f"golem.TaskResults.{task_id}"]
    assert rig.state_of(task_id, T0 + 6)["status"] == "finished"
    repeated, outcome = verify(rig, task_id, subtask_id, VERIFIED, T0 + 7)
    assert repeated["acted"] is False
    assert "finished" in repeated["message"]
    assert golem_events(outcome) == []


def test_wrong_answers_are_recomputed_elsewhere_and_fail_the_task_at_the_limit(
        rig: Rig) -> None:
    task_id, subtask_id, first_node = external_task(rig)
    compute(rig, task_id, 1, first_node, b"wrong", T0 + 5)

    reply, judged = verify(rig, task_id, subtask_id, WRONG_ANSWER, T0 + 6)

    assert reply["acted"] is True
    [(second_name, second_node)] = runs(judged).items()
    assert second_name == attempt(task_id, 0, 2)
    assert second_node != first_node
    assert golem_events(judged) == []
    computed = compute(rig, task_id, 2, second_node, b"wrong again", T0 + 7)
    assert [key for key, _ in golem_events(computed)] == \
        [f"golem.VerificationRequired.{task_id}"]

    reply, failed = verify(rig, task_id, subtask_id, WRONG_ANSWER, T0 + 8)

    assert reply["acted"] is True
    assert runs(failed) == {}
    [(key, event)] = golem_events(failed)
    assert key == f"golem.TaskFailedEvent.{task_id}"
    assert event["reason"] == f"part 0 was judged WRONG_ANSWER {MAX_WRONG_ANSWERS} times"
    state = rig.state_of(task_id, T0 + 8)
    assert state["status"] == "failed"
    assert state["subtasks"][0]["wrong_answers"] == MAX_WRONG_ANSWERS


# --- the deadline ---------------------------------------------------------------------------


def test_the_deadline_ends_the_task_timeout_on_tick_and_cancels_its_parts(rig: Rig) -> None:
    rig.send(node_set("n1"))  # one core: part 0 runs, part 1 waits
    task_id, created = create(rig, subtasks_count=2, timeout="00:01:00")
    [(running, node)] = runs(created).items()
    waiting = next(name for name in (attempt(task_id, 0), attempt(task_id, 1))
                   if name != running)

    before = rig.proc.tick(T0 + 59.9)

    assert before.outbox == []
    assert rig.state_of(task_id, T0 + 59.9)["status"] == "computing"

    after = rig.proc.tick(T0 + 60)

    [(key, event)] = golem_events(after)
    assert key == f"golem.TaskTimeoutEvent.{task_id}"
    assert event == {"type": "TaskTimeoutEvent", "task_id": task_id,
                     "reason": "the task's timeout of 00:01:00 passed"}
    assert kills(after) == [(node, running)]
    assert runs(after) == {}
    state = rig.state_of(task_id, T0 + 60)
    assert state["status"] == "timeout"
    assert [s["state"] for s in state["subtasks"]] == ["timeout", "timeout"]
    assert rig.info(waiting, T0 + 60)["success"] == "terminated"
    assert rig.info(f"golem-{task_id}", T0 + 60)["success"] == "terminated"
    assert golem_events(rig.proc.tick(T0 + 61)) == []  # ended once


# --- the requester's controls ---------------------------------------------------------------


def test_abort_task_is_forbidden_to_others_and_ends_the_owners_task_aborted(rig: Rig) -> None:
    rig.send(node_set("n1"))
    task_id, created = create(rig, user="alice")
    [(running, node)] = runs(created).items()

    refused = rig.send({"type": "AbortTask", "task_id": task_id}, T0 + 1, user="bob")

    body = json.loads(refused.replies[0].data)
    assert (body["command"], body["error"]) == ("error", "forbidden")
    assert refused.outbox == []
    assert rig.state_of(task_id, T0 + 1)["status"] == "computing"

    aborted = rig.send({"type": "AbortTask", "task_id": task_id}, T0 + 2, user="alice")

    assert json.loads(aborted.replies[0].data) == {"type": "TaskAborted", "task_id": task_id,
                                                   "status": "aborted"}
    assert kills(aborted) == [(node, running)]
    assert golem_events(aborted) == [(f"golem.TaskAbortedEvent.{task_id}",
                                      {"type": "TaskAbortedEvent", "task_id": task_id})]
    state = rig.state_of(task_id, T0 + 2)
    assert (state["status"], state["reason"]) == ("aborted", "aborted by the requester")
    assert state["subtasks"][0]["state"] == "cancelled"


def test_restart_task_makes_a_copy_and_leaves_the_original_as_it_was(rig: Rig) -> None:
    rig.send(node_set("n1", cores=4))
    task_id, _ = create(rig, subtasks_count=2, task_name="original")
    rig.send({"type": "AbortTask", "task_id": task_id}, T0 + 1)

    outcome = rig.send({"type": "RestartTask", "task_id": task_id}, T0 + 2)

    copy = json.loads(outcome.replies[0].data)
    assert copy["type"] == "TaskCreatedEvent"
    assert copy["task_id"] != task_id
    assert copy["task"] == rig.state_of(task_id, T0 + 2)["task"]
    assert sorted(runs(outcome)) == [attempt(copy["task_id"], i) for i in range(2)]
    assert rig.state_of(task_id, T0 + 2)["status"] == "aborted"
    assert rig.state_of(copy["task_id"], T0 + 2)["status"] == "computing"


def test_restart_subtasks_reopens_a_finished_task_and_recomputes_only_the_named_part(
        rig: Rig) -> None:
    rig.send(node_set("n1", cores=2))
    task_id, _ = create(rig, subtasks_count=2)
    shas = [rig.upload(f"part {i}".encode(), T0 + 1) for i in range(2)]
    for i in range(2):
        rig.send(complete(attempt(task_id, i), "n1", results=[
            {"name": "out.txt", "sha256": shas[i], "size": 6}]), T0 + 2)
    first_id, second_id = (s["subtask_id"] for s in rig.state_of(task_id, T0 + 2)["subtasks"])

    outcome = rig.send({"type": "RestartSubtasks", "task_id": task_id,
                        "subtask_ids": [second_id]}, T0 + 10)

    assert json.loads(outcome.replies[0].data) == {
        "type": "SubtasksRestarted", "task_id": task_id, "subtask_ids": [second_id]}
    golem = rig.golem.tasks[task_id]
    new_parent = golem.parent
    assert new_parent.startswith(f"golem-{task_id}-r")
    assert runs(outcome) == {f"{new_parent}.1.2": "n1"}
    state = rig.state_of(task_id, T0 + 10)
    assert state["status"] == "computing"
    assert [s["state"] for s in state["subtasks"]] == ["finished", "computing"]
    assert golem.subtasks[first_id].results != [] and golem.subtasks[second_id].results == []
    assert golem.deadline == T0 + 10 + 600


# --- persistence ----------------------------------------------------------------------------


def test_a_restarted_coordinator_answers_with_the_same_subtasks_and_attempts_and_goes_on(
        open_rig: Callable[..., Rig]) -> None:
    rig = open_rig()
    rig.send(node_set("n1"))
    rig.send(node_set("n2"))
    task_id, created = create(rig, subtasks_count=2, message_id="create-1")
    placed = runs(created)
    sha = rig.upload(b"part 1", T0 + 1)
    rig.send(complete(attempt(task_id, 0), placed[attempt(task_id, 0)], "fatal",
                      cause="exit", message="exited with status 1"), T0 + 2)
    rig.send(complete(attempt(task_id, 1), placed[attempt(task_id, 1)], results=[
        {"name": "out.txt", "sha256": sha, "size": 6}]), T0 + 3)
    before = rig.state_of(task_id, T0 + 4)
    assert [len(s["attempts"]) for s in before["subtasks"]] == [2, 1]

    again = open_rig(T0 + 100)  # a new Processor, Files and Golem on the same state file

    assert again.state_of(task_id, T0 + 100) == before
    golem = again.golem.tasks[task_id]
    assert isinstance(golem, GolemTask) and golem.status is GolemStatus.ACTIVE
    for subtask in golem.subtasks.values():
        assert isinstance(subtask, Subtask) and isinstance(subtask.state, SubtaskState)
        assert all(isinstance(a, SubtaskAttempt) and isinstance(a.state, SubtaskState)
                   for a in subtask.attempts)
    redelivered = again.ask(create_task(subtasks_count=2), T0 + 100, message_id="create-1")
    assert redelivered["task_id"] == task_id  # what the request made is remembered too
    retry = golem.subtasks[before["subtasks"][0]["subtask_id"]].attempts[-1]
    assert (retry.task, retry.state) == (attempt(task_id, 0, 2), SubtaskState.COMPUTING)
    # The live attempt is still known for what it is: its completion finishes the task.
    sha0 = again.upload(b"part 0", T0 + 101)
    done = again.send(complete(retry.task, str(retry.node), results=[
        {"name": "out.txt", "sha256": sha0, "size": 6}]), T0 + 102)
    assert [key for key, _ in golem_events(done)] == [f"golem.TaskResults.{task_id}"]
    assert again.state_of(task_id, T0 + 102)["status"] == "finished"


# --- wiring ---------------------------------------------------------------------------------


def test_two_extensions_claiming_one_message_type_are_refused_when_the_processor_is_built(
        tmp_path: Path) -> None:
    settings = golem_settings(tmp_path)
    store = SqliteStore(settings.state)
    try:
        files = Files(settings)
        with pytest.raises(ValueError, match="golem handles CreateTask, which is already"):
            Processor(store, settings, T0, extensions=[
                files, Golem(settings, files.store), Golem(settings, files.store)])
        assert ListTasks in Processor(store, settings, T0, extensions=[
            files, Golem(settings, files.store)]).dispatch_table
    finally:
        store.close()


# --- found while writing these ----------------------------------------------------------------


def test_restart_subtasks_by_another_user_never_gives_them_control_of_the_task(
        rig: Rig) -> None:
    rig.send(node_set("n1"))
    task_id, _ = create(rig, user="alice")
    sha = rig.upload(b"done", T0 + 1)
    rig.send(complete(attempt(task_id, 0), "n1", results=[
        {"name": "out.txt", "sha256": sha, "size": 4}]), T0 + 2)
    subtask_id = rig.state_of(task_id, T0 + 2)["subtasks"][0]["subtask_id"]

    rig.send({"type": "RestartSubtasks", "task_id": task_id, "subtask_ids": [subtask_id]},
             T0 + 3, user="bob")

    reply = rig.ask({"type": "AbortTask", "task_id": task_id}, T0 + 4, user="bob")
    assert reply.get("error") == "forbidden"


def test_each_reopening_of_a_finished_task_gets_a_virtual_parent_of_its_own(
        rig: Rig) -> None:
    rig.send(node_set("n1"))
    task_id, _ = create(rig)
    sha = rig.upload(b"done", T0 + 1)
    result = [{"name": "out.txt", "sha256": sha, "size": 4}]
    rig.send(complete(attempt(task_id, 0), "n1", results=result), T0 + 2)
    subtask_id = rig.state_of(task_id, T0 + 2)["subtasks"][0]["subtask_id"]
    parents = []
    for now in (T0 + 10.1, T0 + 10.6):
        rig.send({"type": "RestartSubtasks", "task_id": task_id,
                  "subtask_ids": [subtask_id]}, now)
        golem = rig.golem.tasks[task_id]
        parents.append(golem.parent)
        live = golem.subtasks[subtask_id].current
        assert live is not None
        rig.send(complete(live, "n1", results=result), now + 0.1)
        assert golem.status is GolemStatus.FINISHED

    assert parents[0] != parents[1]
    assert rig.info(parents[0], T0 + 11)["status"] == "complete"
