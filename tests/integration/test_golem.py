"""The Golem-style dialect against a real coordinator and two real node agents."""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from tests.processes import VespidProcess, cli
from tests.raw import RawPeer
from vespid.node_agent.executors import render_rows
from vespid.shared import png

pytestmark = pytest.mark.integration


class Requester:
    """A raw requester: CreateTask and controls by direct reply-to, events by its own queue."""

    def __init__(self, raw: RawPeer) -> None:
        self.raw = raw
        self.queue = raw.channel.queue_declare("", exclusive=True).method.queue
        raw.channel.queue_bind(self.queue, "vespid.events", "golem.#")
        self.events: list[dict[str, Any]] = []
        raw.channel.basic_consume(self.queue, lambda _c, _m, _p, body: self.events.append(
            json.loads(body)), auto_ack=True)

    def create(self, **task: Any) -> dict[str, Any]:
        reply = self.raw.request({"type": "CreateTask", "task": task})
        assert reply.get("type") == "TaskCreatedEvent", reply
        return reply

    def wait_event(self, kind: str, task_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["type"] == kind and event["task_id"] == task_id:
                    self.events.remove(event)
                    return event
            assert time.monotonic() < deadline, f"no {kind} for {task_id}: {self.events}"
            self.raw.connection.process_data_events(time_limit=0.2)

    def state(self, task_id: str) -> dict[str, Any]:
        return self.raw.request({"type": "GetTaskState", "task_id": task_id})


@pytest.fixture
def two_nodes(coordinator: VespidProcess, start_node: Callable[..., VespidProcess]) -> None:
    start_node("box1", {"memory": 4000, "cores": 2})
    start_node("box2", {"memory": 4000, "cores": 2})


@pytest.fixture
def requester(raw: RawPeer) -> Requester:
    return Requester(raw)


def test_a_four_part_render_stitches_to_the_single_process_image(
        two_nodes: None, requester: Requester, tmp_path: Path) -> None:
    created = requester.create(type="Fractal", subtasks_count=4,
                               options={"resolution": [64, 48], "format": "PNG"})

    done = requester.wait_event("TaskResults", created["task_id"])
    tiles = sorted((Path(p) for p in done["results"]), key=lambda p: p.name)
    stitched = png.stitch(tiles, tmp_path / "image.png")

    assert len(tiles) == 4
    assert png.decode(stitched.read_bytes()) == (64, render_rows(64, 48, 0, 48))
    state = requester.state(created["task_id"])
    assert state["status"] == "finished"
    assert [s["state"] for s in state["subtasks"]] == ["finished"] * 4
    assert {s["node"] for s in state["subtasks"]} <= {"box1", "box2"}


def glambda(function: Any, args: Any = None) -> dict[str, Any]:
    # By value: the node cannot import this test module.
    cloudpickle.register_pickle_by_value(sys.modules[function.__module__])
    return {"method": base64.b64encode(cloudpickle.dumps(function)).decode(),
            "args": base64.b64encode(cloudpickle.dumps(args)).decode()}


def answer_by_node(_args: Any) -> int:
    import os

    return 41 if os.environ["VESPID_NODE"] == "box1" else 42


def test_a_wrong_answer_is_caught_by_the_verifier_and_recomputed_on_the_other_node(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        requester: Requester) -> None:
    start_node("box1", {"memory": 4000, "cores": 2})
    created = requester.create(type="GLambda", options=glambda(answer_by_node),
                               verification={"type": "External"})
    task_id = created["task_id"]
    first = requester.wait_event("VerificationRequired", task_id)
    first_answer = json.loads(Path(next(p for p in first["results"]
                                        if p.endswith("result.json"))).read_text())
    start_node("box2", {"memory": 4000, "cores": 2})
    while len(requester.raw.request({"command": "node-list"})["nodes"]) < 2:
        time.sleep(0.05)

    reply = requester.raw.request({"type": "VerifyResults", "task_id": task_id,
                                   "subtask_id": first["subtask_id"], "verdict": 4})
    second = requester.wait_event("VerificationRequired", task_id)
    second_answer = json.loads(Path(next(p for p in second["results"]
                                         if p.endswith("result.json"))).read_text())
    requester.raw.request({"type": "VerifyResults", "task_id": task_id,
                           "subtask_id": second["subtask_id"], "verdict": 3})
    done = requester.wait_event("TaskResults", task_id)

    assert reply["acted"] is True
    assert (first_answer, second_answer) == ({"data": 41}, {"data": 42})
    [subtask] = requester.state(task_id)["subtasks"]
    assert [a["node"] for a in subtask["attempts"]] == ["box1", "box2"]
    assert any(p.endswith("result.json") for p in done["results"])


def test_a_subtask_that_hangs_past_its_timeout_succeeds_on_another_node(
        two_nodes: None, requester: Requester) -> None:
    script = ("import os, time\nif os.environ['VESPID_NODE'] == 'box1': time.sleep(600)\n"
              "open('results/done.txt', 'w').write(os.environ['VESPID_NODE'])\n")
    created = requester.create(type="Python", subtask_timeout="00:00:03",
                               options={"script": script}, resources=[],
                               **{"avoid_first": True})
    task_id = created["task_id"]

    done = requester.wait_event("TaskResults", task_id, timeout=90)

    [subtask] = requester.state(task_id)["subtasks"]
    assert Path(done["results"][0]).read_text() == "box2"
    if len(subtask["attempts"]) > 1:  # it went to box1 first, timed out, moved on
        assert [a["state"] for a in subtask["attempts"]] == ["timeout", "finished"]
    assert created["task"]["avoid_first"] is True  # unknown fields are carried through


def test_a_task_past_its_timeout_fails_with_an_event(two_nodes: None,
                                                    requester: Requester) -> None:
    created = requester.create(type="Python", timeout="00:00:02",
                               options={"script": "import time; time.sleep(600)"})

    event = requester.wait_event("TaskTimeoutEvent", created["task_id"], timeout=30)

    assert "00:00:02" in event["reason"]
    state = requester.state(created["task_id"])
    assert state["status"] == "timeout"
    assert state["subtasks"][0]["state"] == "timeout"


def test_resources_of_a_few_megabytes_arrive_intact_in_mapped_subfolders(
        amqp_url: str, two_nodes: None, tmp_path: Path) -> None:
    from vespid.client.golem import GolemClient

    data = bytes(range(256)) * (3 * 4096)  # 3 MB
    source = tmp_path / "model.bin"
    source.write_bytes(data)
    script = ("import hashlib, pathlib\n"
              "digest = hashlib.sha256(pathlib.Path('inputs/deep/model.bin').read_bytes())\n"
              "open('results/digest.txt', 'w').write(digest.hexdigest())\n")
    with GolemClient(amqp_url) as golem:  # uploads the file through the broker first
        task = golem.create_task({"type": "Python", "subtasks_count": 2,
                                  "resources": [str(source)],
                                  "resources_mapped": {str(source): "inputs/deep/model.bin"},
                                  "options": {"script": script}})
        done = task.wait(timeout=60)
        fetched = task.download(tmp_path / "out")

    import hashlib

    expected = hashlib.sha256(data).hexdigest()
    assert [Path(p).read_text() for p in done["results"]] == [expected, expected]
    assert [p.read_text() for p in fetched] == [expected, expected]


def test_a_resource_named_but_not_uploaded_is_refused_and_never_read_from_disk(
        coordinator: VespidProcess, raw: RawPeer, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("coordinator-side file")

    by_path = raw.request({"type": "CreateTask", "task": {"type": "Python",
                                                          "resources": [str(secret)]}})
    by_bad_digest = raw.request({"type": "CreateTask", "task": {"type": "Python",
                                 "resources": ["x"]}, "resource_digests": {"x": "/etc/hostname"}})

    assert by_path["error"] == "missing_resource"
    assert by_bad_digest["error"] == "invalid_message"


def test_restart_of_a_finished_task_and_of_one_subtask(two_nodes: None,
                                                      requester: Requester) -> None:
    created = requester.create(type="Python", subtasks_count=2, options={
        "script": "open('results/out.txt', 'w').write('x')"})
    task_id = created["task_id"]
    requester.wait_event("TaskResults", task_id)

    again = requester.raw.request({"type": "RestartTask", "task_id": task_id})
    requester.wait_event("TaskResults", again["task_id"])
    first = requester.state(task_id)["subtasks"][0]
    requester.raw.request({"type": "RestartSubtasks", "task_id": task_id,
                           "subtask_ids": [first["subtask_id"]]})
    requester.wait_event("TaskResults", task_id)

    assert again["task_id"] != task_id and again["task"]["options"] == created["task"]["options"]
    state = requester.state(task_id)
    assert state["status"] == "finished"
    assert len(state["subtasks"][0]["attempts"]) == 2
    assert len(state["subtasks"][1]["attempts"]) == 1


def test_abort_cancels_the_running_parts_with_an_event(two_nodes: None,
                                                      requester: Requester) -> None:
    created = requester.create(type="Python", subtasks_count=2,
                               options={"script": "import time; time.sleep(600)"})
    task_id = created["task_id"]
    deadline = time.monotonic() + 30
    while {s["state"] for s in requester.state(task_id)["subtasks"]} != {"computing"}:
        assert time.monotonic() < deadline
        time.sleep(0.1)

    requester.raw.request({"type": "AbortTask", "task_id": task_id})
    requester.wait_event("TaskAbortedEvent", task_id)

    state = requester.state(task_id)
    assert state["status"] == "aborted"
    assert {s["state"] for s in state["subtasks"]} == {"cancelled"}
    listed = requester.raw.request({"type": "ListTasks"})
    assert [t["status"] for t in listed["tasks"] if t["task_id"] == task_id] == ["aborted"]


@pytest.mark.parametrize(("message", "code"), [
    ({"type": "CreateTask", "task": {"type": "Python", "timeout": "ten minutes"}},
     "invalid_message"),
    ({"type": "CreateTask", "task": {"type": "Python", "resources": ["/no/such/file.bin"]}},
     "missing_resource"),
    ({"type": "CreateTask", "task": {"type": "Python", "resources_mapped": {"a": "/etc/x"}}},
     "invalid_message"),
    ({"type": "CreateTask", "task": {"type": "Blender"}}, "invalid_message"),
    ({"type": "CreateTask"}, "invalid_message"),
    ({"type": "VerifyResults", "task_id": "nope", "subtask_id": "x", "verdict": 3}, "not_found"),
    ({"type": "VerifyResults", "task_id": "nope", "subtask_id": "x", "verdict": "yes"},
     "invalid_message"),
    ({"type": "FlyToTheMoon"}, "unknown_type"),
])
def test_invalid_golem_messages_are_answered_with_errors(
        coordinator: VespidProcess, raw: RawPeer, message: dict[str, Any], code: str) -> None:
    reply = raw.request(message)

    assert (reply["command"], reply["error"]) == ("error", code), reply
    assert len(reply["message"]) > 20


def test_a_verdict_other_than_verified_or_wrong_is_answered_and_not_acted_on(
        two_nodes: None, requester: Requester) -> None:
    created = requester.create(type="GLambda", options=glambda(answer_by_node),
                               verification={"type": "External"})
    asked = requester.wait_event("VerificationRequired", created["task_id"])

    reply = requester.raw.request({"type": "VerifyResults", "task_id": created["task_id"],
                                   "subtask_id": asked["subtask_id"], "verdict": 5})

    assert reply["acted"] is False and "not acted on" in reply["message"]
    assert requester.state(created["task_id"])["subtasks"][0]["state"] == "verifying"


def test_the_cli_submits_a_render_downloads_and_stitches_it(
        amqp_url: str, two_nodes: None, tmp_path: Path) -> None:
    resource = tmp_path / "palette.txt"
    resource.write_text("blue")
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps({"type": "CreateTask", "task": {
        "type": "Fractal", "subtasks_count": 3, "resources": [str(resource)],
        "options": {"resolution": [40, 30], "format": "PNG"}}}))

    result = cli(amqp_url, "golem", "submit", str(task_file), "--out", str(tmp_path / "out"),
                 "--timeout", "60")
    task_id = result.stdout.split()[1]
    status = cli(amqp_url, "golem", "status", task_id)

    assert result.returncode == 0, result.stderr
    image = tmp_path / "out" / "image.png"
    assert png.decode(image.read_bytes()) == (40, render_rows(40, 30, 0, 30))
    assert status.returncode == 0 and "finished  3/3 finished" in status.stdout


def test_the_client_library_raises_a_timed_out_task_as_an_exception(
        amqp_url: str, two_nodes: None) -> None:
    from vespid.client.golem import GolemClient
    from vespid.shared.errors import GolemTaskTimedOut

    with GolemClient(amqp_url) as golem:
        task = golem.create_task({"type": "Python", "timeout": "00:00:02",
                                  "options": {"script": "import time; time.sleep(60)"}})
        with pytest.raises(GolemTaskTimedOut, match="timeout"):
            task.wait(timeout=30)
        assert task.state()["status"] == "timeout"
