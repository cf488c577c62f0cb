"""A coordinator killed with SIGKILL loses nothing it acknowledged."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.processes import VespidProcess
from tests.raw import RawPeer

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
