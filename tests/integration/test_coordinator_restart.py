"""A coordinator killed with SIGKILL loses nothing it acknowledged."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.processes import VespidProcess
from tests.raw import RawNode, RawPeer

pytestmark = pytest.mark.integration


def test_tasks_acknowledged_before_a_sigkill_survive_and_finish_after_restart(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer) -> None:
    names = [f"survivor-{i}" for i in range(30)]
    for name in names:
        assert raw.request({"command": "task-create", "name": name,
                            "executable_pyscript": "import time; time.sleep(0.2)"}
                           )["command"] == "ack"

    coordinator.kill()
    start_node("box1", {"memory": 4000, "cores": 4})  # work arrives while nobody coordinates
    coordinator.start()

    for name in names:
        info = raw.wait_for(name, lambda i: i["status"] == "complete", timeout=90)
        assert info["success"] == "ok", info
        assert info["node"] == "box1"


def test_a_coordinator_killed_while_tasks_run_finishes_them_after_restart(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer) -> None:
    start_node("box1", {"memory": 4000, "cores": 2})
    names = [f"inflight-{i}" for i in range(6)]
    for name in names:
        raw.request({"command": "task-create", "name": name,
                     "executable_pyscript": "import time; time.sleep(1.5)"})
    raw.wait_for(names[0], lambda i: i["status"] == "working")

    coordinator.kill()
    coordinator.start()

    for name in names:
        info = raw.wait_for(name, lambda i: i["status"] == "complete", timeout=90)
        assert info["success"] == "ok", info


def test_a_restarted_coordinator_declares_every_known_node_queue_before_it_answers(
        coordinator: VespidProcess, raw: RawPeer) -> None:
    # The queues are declared from a thread while the state loads: none may be missing
    # once the coordinator answers, or a task-run to that node would be unroutable.
    nodes = [RawNode(raw, f"gone{i}", {"cores": 1, "memory": 100}) for i in range(5)]
    for node in nodes:
        node.node_set([])
    listed = {n["name"] for n in raw.request({"command": "node-list"})["nodes"]}
    assert listed >= {node.name for node in nodes}
    coordinator.stop()
    for node in nodes:
        raw.channel.queue_delete(node.queue)

    coordinator.start()
    assert raw.request({"command": "node-list"})["command"] == "node-list-response"
    for node in nodes:
        declared = raw.channel.queue_declare(node.queue, passive=True)
        assert declared.method.queue == node.queue
