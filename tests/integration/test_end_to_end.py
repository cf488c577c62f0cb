"""The core path with real processes: CLI, coordinator, node agent, task scripts."""

from __future__ import annotations

import json
import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.processes import VespidProcess, cli
from tests.raw import RawPeer

pytestmark = pytest.mark.integration


def test_a_task_submitted_through_the_cli_runs_on_a_node_and_completes_ok(
        amqp_url: str, coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        tmp_path: Path, raw: RawPeer) -> None:
    start_node("box1")
    marker = tmp_path / "marker.txt"
    script = tmp_path / "write_name.py"
    script.write_text(f"import os\nopen({str(marker)!r}, 'w').write(os.environ['VESPID_TASK'])\n")

    result = cli(amqp_url, "submit", str(script), "--memory", "100", "--cores", "1",
                 "--wait", "--timeout", "60", "--json")

    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout)
    assert marker.read_text() == reported["name"]
    info = raw.info(reported["name"])
    assert (info["status"], info["success"], info["node"]) == ("complete", "ok", "box1")
    assert info["time-create"] <= info["time-start"] <= info["time-finish"]
    assert info["log"].endswith(f"{reported['name']}/attempt-1.log")


def test_a_parent_creates_two_children_and_waits_for_them(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer) -> None:
    start_node("box1", {"memory": 4000, "cores": 3})
    parent_script = textwrap.dedent("""
        from vespid.client import Client, current_task
        with Client() as vespid:
            kids = [vespid.create_task(f"child{i}", "print('child')", requirements={"cores": 1})
                    for i in range(2)]
            states = vespid.wait_all([k.name for k in kids], timeout=60)
            assert all(s.ok for s in states.values()), states
            assert all(s.parent == current_task() for s in states.values())
    """)
    raw.request({"command": "task-create", "name": "tree-root",
                 "executable_pyscript": parent_script, "requirements": {"cores": 1},
                 "environment": {"BUILD_FLAVOUR": "release"}})

    root = raw.wait_for("tree-root", lambda i: i["status"] == "complete", timeout=60)

    assert root["success"] == "ok"
    assert len(root["children"]) == 2
    for child in root["children"]:
        info = raw.info(child)
        assert (info["status"], info["success"], info["parent"]) == ("complete", "ok",
                                                                      "tree-root")
        assert info["environment"] == {"BUILD_FLAVOUR": "release"}


def test_a_script_that_raises_ends_fatal(coordinator: VespidProcess,
                                         start_node: Callable[..., VespidProcess],
                                         raw: RawPeer) -> None:
    start_node("box1")
    raw.request({"command": "task-create", "name": "raises",
                 "executable_pyscript": "raise RuntimeError('broken build')"})

    info = raw.wait_for("raises", lambda i: i["status"] == "complete")

    assert info["success"] == "fatal"
    assert "status 1" in info["message"]


def test_a_task_needing_more_memory_than_any_node_has_stays_idle(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer) -> None:
    start_node("box1", {"memory": 1000, "cores": 2})
    raw.request({"command": "task-create", "name": "too-big", "executable_pyscript": "pass",
                 "requirements": {"memory": 64000}})
    raw.request({"command": "task-create", "name": "fits", "executable_pyscript": "pass",
                 "requirements": {"memory": 500}})

    raw.wait_for("fits", lambda i: i["status"] == "complete")

    big = raw.info("too-big")
    assert big["status"] is None and big["node"] is None and big["time-start"] is None


def test_a_cancelled_working_task_ends_terminated_and_its_process_is_gone(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, tmp_path: Path) -> None:
    start_node("box1")
    pid_file = tmp_path / "pid"
    raw.request({"command": "task-create", "name": "sleeper", "executable_pyscript":
                 f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                 "time.sleep(600)\n"})
    raw.wait_for("sleeper", lambda i: i["status"] == "working")
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the task never started its process"
        time.sleep(0.05)
    pid = int(pid_file.read_text())

    assert raw.request({"command": "task-cancel", "name": "sleeper"})["command"] == "ack"
    info = raw.wait_for("sleeper", lambda i: i["status"] == "complete")

    assert info["success"] == "terminated"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_cli_info_prints_a_task_readably_and_json_on_request(
        amqp_url: str, coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer) -> None:
    start_node("box1")
    raw.request({"command": "task-create", "name": "shown", "name_pretty": "Data build 1/40",
                 "executable_pyscript": "pass"})
    raw.wait_for("shown", lambda i: i["status"] == "complete")

    readable = cli(amqp_url, "info", "shown")
    as_json = cli(amqp_url, "info", "shown", "--json")
    missing = cli(amqp_url, "info", "no-such-task")

    assert readable.returncode == 0 and "complete / ok" in readable.stdout
    assert "Data build 1/40" in readable.stdout
    assert json.loads(as_json.stdout)["success"] == "ok"
    assert missing.returncode == 4 and "no task named 'no-such-task'" in missing.stderr


def test_cli_wait_draws_the_tree_and_tables_stay_plain_in_a_pipe(
        amqp_url: str, coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer) -> None:
    start_node("box1", {"memory": 4000, "cores": 3})
    parent = ("from vespid.client import Client\nwith Client() as v:\n"
              "    kids = [v.create_task(f'k{i}', 'import time; time.sleep(0.5)') "
              "for i in range(2)]\n    v.wait_all([k.name for k in kids], timeout=60)\n")
    raw.request({"command": "task-create", "name": "waited", "executable_pyscript": parent})

    waited = cli(amqp_url, "wait", "waited", "--timeout", "60")
    nodes = cli(amqp_url, "nodes")
    completion = cli(amqp_url, "completion")

    assert waited.returncode == 0 and "complete / ok" in waited.stdout
    assert "children   2" in waited.stdout
    assert nodes.stdout.splitlines()[0].split() == ["NODE", "STATE", "CORES", "FREE",
                                                    "MEMORY", "FREE", "TASKS", "VERSION"]
    assert "\x1b[" not in nodes.stdout  # no colour codes in a pipe
    assert "complete -F _vespid vespid" in completion.stdout


def test_a_request_nobody_answers_says_that_no_coordinator_consumes_the_queue(
        amqp_url: str, coordinator: VespidProcess) -> None:
    coordinator.kill()

    result = cli(amqp_url, "tasks", "--request-timeout", "2")

    assert result.returncode == 3
    assert "no coordinator consumes vespid.coordinator" in result.stderr
