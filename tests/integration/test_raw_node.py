"""The coordinator against nodes and clients that speak only WIRE.md, with raw AMQP."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.processes import VespidProcess
from tests.raw import RawNode, RawPeer

pytestmark = pytest.mark.integration


@pytest.fixture
def raw_node(coordinator: VespidProcess, raw: RawPeer) -> RawNode:
    node = RawNode(raw, "rawbox", {"memory": 8000, "cores": 8})
    node.node_set([])
    return node


def test_a_raw_node_receives_a_task_run_and_its_task_complete_finishes_the_task(
        raw_node: RawNode, raw: RawPeer) -> None:
    raw.request({"command": "task-create", "name": "t1", "executable_pyscript": "print(1)",
                 "requirements": {"memory": 1000, "cores": 2, "cores_max": "inf"},
                 "environment": {"A": "b"}})

    run = raw_node.next_message()
    raw_node.node_set(["t1"])
    raw_node.complete("t1")
    info = raw.wait_for("t1", lambda i: i["status"] == "complete")

    assert run["command"] == "task-run" and run["name"] == "t1"
    assert run["executable_pyscript"] == "print(1)"
    assert run["cores"] == 8 and run["environment"] == {"A": "b"}
    assert "log" in run and "path" in run
    assert info["success"] == "ok" and info["node"] == "rawbox"
    assert info["allocated"] == {"memory": 1000, "cores": 8}
    assert info["requirements"]["cores_max"] is None


def test_a_task_the_node_stops_reporting_ends_terminated(raw_node: RawNode,
                                                        raw: RawPeer) -> None:
    raw.request({"command": "task-create", "name": "vanishing", "executable_pyscript": "x",
                 "retries": 0})
    raw_node.next_message()
    raw_node.node_set(["vanishing"])
    assert raw.wait_for("vanishing", lambda i: i["status"] == "working")["node"] == "rawbox"

    raw_node.node_set([])
    info = raw.wait_for("vanishing", lambda i: i["status"] == "complete")

    assert info["success"] == "terminated"
    assert "no longer reports" in info["message"]


def test_a_node_set_sent_before_the_task_run_arrived_does_not_end_the_task(
        raw_node: RawNode, raw: RawPeer) -> None:
    raw.request({"command": "task-create", "name": "in-flight", "executable_pyscript": "x"})
    raw.wait_for("in-flight", lambda i: i["status"] == "working")

    raw_node.node_set([])  # crossed the task-run on the wire
    time.sleep(0.5)

    assert raw.info("in-flight")["status"] == "working"


def test_a_silent_node_is_lost_and_its_tasks_end_terminated(raw_node: RawNode,
                                                           raw: RawPeer) -> None:
    raw.request({"command": "task-create", "name": "orphan", "executable_pyscript": "x",
                 "retries": 0})
    raw_node.next_message()
    raw_node.node_set(["orphan"])

    info = raw.wait_for("orphan", lambda i: i["status"] == "complete", timeout=20)
    nodes = raw.request({"command": "node-list"})["nodes"]

    assert info["success"] == "terminated" and "lost" in info["message"]
    assert [(n["name"], n["alive"], n["accepting"]) for n in nodes] == [("rawbox", False, False)]


def test_task_update_raises_severity_and_it_never_goes_down(raw_node: RawNode,
                                                           raw: RawPeer) -> None:
    raw.request({"command": "task-create", "name": "warns", "executable_pyscript": "x"})
    raw_node.next_message()
    raw_node.node_set(["warns"])

    raw.request({"command": "task-update", "name": "warns", "success": "warning",
                 "message": "3 flaky tests"})
    raw.request({"command": "task-update", "name": "warns", "success": "ok"})
    raw_node.complete("warns", "ok")
    info = raw.wait_for("warns", lambda i: i["status"] == "complete")

    assert info["success"] == "warning" and info["message"] == "3 flaky tests"


def test_every_change_of_a_task_is_published_as_an_event(raw_node: RawNode,
                                                        raw: RawPeer) -> None:
    channel = raw.channel
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, "vespid.events", "task.*.evented")

    raw.request({"command": "task-create", "name": "evented", "executable_pyscript": "x"})
    raw_node.next_message()
    raw_node.complete("evented", "error")
    events = []
    while len(events) < 3:
        props, body = raw.get(queue)
        events.append((props.type, json.loads(body)))

    assert [kind for kind, _ in events] == ["task.created", "task.started", "task.completed"]
    assert events[-1][1]["command"] == "task-info-response"
    assert (events[-1][1]["status"], events[-1][1]["success"]) == ("complete", "error")


def test_task_list_and_node_list_answer_for_dashboards(raw_node: RawNode,
                                                      raw: RawPeer) -> None:
    raw.request({"command": "task-create", "name": "listed-parent", "executable_pyscript": "x"})
    raw.request({"command": "task-create", "name": "listed-child", "parent": "listed-parent",
                 "executable_pyscript": "x", "requirements": {"memory": 99999}})

    children = raw.request({"command": "task-list", "parent": "listed-parent"})
    idle = raw.request({"command": "task-list", "status": "idle"})
    nodes = raw.request({"command": "node-list"})

    assert [t["name"] for t in children["tasks"]] == ["listed-child"]
    assert [t["name"] for t in idle["tasks"]] == ["listed-child"]
    assert nodes["nodes"][0]["name"] == "rawbox"
    assert nodes["nodes"][0]["free"]["cores"] == 7


def test_a_task_whose_node_is_lost_runs_again_elsewhere_as_a_new_attempt(
        raw_node: RawNode, raw: RawPeer) -> None:
    raw.request({"command": "task-create", "name": "retried", "executable_pyscript": "x"})
    first = raw_node.next_message()
    raw_node.node_set(["retried"])
    spare = RawNode(raw, "spare", {"memory": 8000, "cores": 8})

    deadline = time.monotonic() + 20
    second: dict[str, Any] | None = None
    while second is None:  # the spare keeps beating; rawbox has gone silent
        assert time.monotonic() < deadline, "the task never started again"
        spare.node_set([])
        raw.connection.process_data_events(time_limit=0.3)
        if spare.inbox:
            second = spare.next_message()
    spare.complete("retried")
    info = raw.wait_for("retried", lambda i: i["status"] == "complete")

    assert (first["attempt"], second["attempt"]) == (1, 2)
    assert info["success"] == "ok" and info["node"] == "spare"
    assert [(a["attempt"], a["node"], a["lost"]) for a in info["attempts"]] == [
        (1, "rawbox", True), (2, "spare", False)]
    assert "lost" in info["attempts"][0]["why"]


def test_a_late_result_from_a_superseded_attempt_changes_nothing(
        raw_node: RawNode, raw: RawPeer) -> None:
    raw.request({"command": "task-create", "name": "fenced", "executable_pyscript": "x"})
    raw_node.next_message()
    raw_node.node_set(["fenced"])
    raw_node.node_set([])  # vanished: requeued, and the only node takes it again
    second = raw_node.next_message()
    raw_node.node_set(["fenced"])

    raw.send({"command": "task-complete", "name": "fenced", "node": "rawbox",
              "success": "fatal", "attempt": 1})
    kill = raw_node.next_message()
    still = raw.info("fenced")

    assert second["attempt"] == 2
    assert (kill["command"], kill["attempt"]) == ("task-kill", 1)
    assert still["status"] == "working" and still["success"] is None
    assert still["attempts"][0]["late"] == ["task-complete fatal"]


def test_a_node_speaking_another_protocol_gets_no_work_and_nodes_says_why(
        coordinator: VespidProcess, raw: RawPeer) -> None:
    raw.send({"command": "node-set", "name": "future", "capabilities": {"cores": 8},
              "protocol": 99, "version": "9.0"})
    raw.request({"command": "task-create", "name": "refused", "executable_pyscript": "x"})

    time.sleep(0.5)
    [node] = raw.request({"command": "node-list"})["nodes"]

    assert raw.info("refused")["status"] is None
    assert node["accepting"] is False and "speaks protocol 99" in node["why_not_accepting"]
    assert "node_protocol_mismatch" in coordinator.log()
