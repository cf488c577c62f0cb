"""The coordinator's Prometheus endpoint reports tasks, waits and messages."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import processes
from tests.processes import VespidProcess
from tests.raw import RawPeer

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_metrics_show_tasks_by_status_queue_wait_and_rejected_messages(
        amqp_url: str, tmp_path: Path, start_node: Callable[..., VespidProcess],
        raw: RawPeer, started: list[VespidProcess]) -> None:
    port = free_port()
    coordinator = processes.coordinator(amqp_url, tmp_path / "coord",
                                        VESPID_METRICS_PORT=str(port)).start()
    started.append(coordinator)
    coordinator.wait_for_log("metrics_serving")
    start_node("box1")
    raw.request({"command": "task-create", "name": "counted", "executable_pyscript": "pass"})
    raw.wait_for("counted", lambda i: i["status"] == "complete")
    raw.request(b"{not json")

    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        if 'vespid_tasks{status="complete",success="ok"} 1.0' in text or \
                time.monotonic() > deadline:
            break
        time.sleep(0.3)

    assert 'vespid_tasks{status="complete",success="ok"} 1.0' in text
    assert "vespid_task_queue_wait_seconds_count 1.0" in text
    assert "vespid_task_run_seconds_count 1.0" in text
    assert 'vespid_messages_total{command="task-create"} 1.0' in text
    assert 'vespid_messages_rejected_total{error="invalid_json"} 1.0' in text
    assert 'vespid_nodes{state="up"} 1.0' in text
