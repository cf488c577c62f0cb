"""Node agents that die, drain and come back: no task lost, no process orphaned."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.processes import VespidProcess, cli
from tests.raw import RawPeer

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_pids(path: Path, count: int, timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        pids = [int(p) for p in text.split()]
        if len(pids) >= count:
            return pids
        assert time.monotonic() < deadline, f"only {pids} written to {path}"
        time.sleep(0.05)


def test_an_agent_killed_mid_task_leaves_no_orphans_and_the_task_runs_again_elsewhere(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, tmp_path: Path) -> None:
    agent = start_node("box1")
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, subprocess, time
        if os.environ["VESPID_NODE"] == "box1":
            child = subprocess.Popen(["sleep", "600"])
            with open({str(pids)!r}, "w") as f:
                f.write(f"{{os.getpid()}} {{child.pid}}")
            time.sleep(600)
    """)
    raw.request({"command": "task-create", "name": "survivor", "executable_pyscript": script})
    task_pid, grandchild_pid = wait_pids(pids, 2)
    start_node("box2")

    killed_at = time.monotonic()
    agent.kill(signal.SIGKILL)
    info = raw.wait_for("survivor", lambda i: i["status"] == "complete", timeout=30)
    recovered = time.monotonic() - killed_at

    deadline = time.monotonic() + 5
    while (alive(task_pid) or alive(grandchild_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(task_pid) and not alive(grandchild_pid)
    assert (info["success"], info["node"], info["attempt"]) == ("ok", "box2", 2)
    first = info["attempts"][0]
    assert first["node"] == "box1" and first["lost"] and "lost" in first["why"]
    # 4 missed heartbeats of 0.5 s in these tests, plus the restart on box2.
    assert first["end"] - first["start"] < 15
    print(f"\nagent SIGKILL: recovered in {recovered:.1f} s")


def test_sigterm_drains_an_agent_which_finishes_its_task_then_exits(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, amqp_url: str) -> None:
    agent = start_node("box1")
    # Long enough that two CLI calls on a loaded machine see the node before it leaves.
    raw.request({"command": "task-create", "name": "finishing",
                 "executable_pyscript": "import time; time.sleep(8)"})
    raw.wait_for("finishing", lambda i: i["status"] == "working")

    assert agent.process is not None
    agent.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not json.loads(cli(amqp_url, "nodes", "--json").stdout)[0]["draining"]:
        assert time.monotonic() < deadline, "vespid nodes never showed the node draining"
    shown = cli(amqp_url, "nodes").stdout
    assert raw.info("finishing")["status"] == "working", "the task ended before the check"
    raw.request({"command": "task-create", "name": "after-drain", "executable_pyscript": "pass"})
    info = raw.wait_for("finishing", lambda i: i["status"] == "complete")
    code = agent.process.wait(timeout=30)

    assert code == 0 and info["success"] == "ok"
    assert "draining" in shown
    assert raw.info("after-drain")["status"] is None  # not given to the draining node


def test_an_agent_upgrade_is_drain_restart_rejoin_with_no_task_lost(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, amqp_url: str) -> None:
    agent = start_node("box1")
    for i in range(6):
        raw.request({"command": "task-create", "name": f"build-{i}",
                     "executable_pyscript": "import time; time.sleep(0.5)"})
    raw.wait_for("build-0", lambda i: i["status"] == "working")

    drained = cli(amqp_url, "drain", "box1")
    assert drained.returncode == 0, drained.stderr
    assert agent.process is not None
    agent.process.wait(timeout=30)  # exits once its running tasks finished
    agent.start()  # the "upgraded" agent rejoins under the same name
    agent.wait_for_log("node_connected", after=0)

    for i in range(6):
        info = raw.wait_for(f"build-{i}", lambda i: i["status"] == "complete", timeout=60)
        assert (info["success"], info["attempt"]) == ("ok", 1)
    assert agent.process.returncode is None


def test_a_task_over_its_timeout_is_killed_and_ends_terminated_saying_why(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer) -> None:
    start_node("box1")
    raw.request({"command": "task-create", "name": "slow", "timeout": 1,
                 "executable_pyscript": "import time; time.sleep(60)"})

    info = raw.wait_for("slow", lambda i: i["status"] == "complete", timeout=30)

    assert info["success"] == "terminated"
    assert "timeout of 1 s" in info["message"]
    assert info["time-finish"] - info["time-start"] < 10


@pytest.mark.parametrize("containment", ["auto", "process-group"])
def test_a_task_over_its_memory_is_killed_and_ends_fatal_saying_why(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, containment: str) -> None:
    agent = start_node("box1", {"memory": 8000, "cores": 2}, VESPID_CONTAINMENT=containment)
    raw.request({"command": "task-create", "name": "hog", "requirements": {"memory": 100},
                 "executable_pyscript":
                 "import time\nblocks = []\nfor _ in range(100):\n"
                 "    blocks.append(b'x' * (20 * 1024 * 1024))\n    time.sleep(0.05)\n"
                 "time.sleep(30)\n"})

    info = raw.wait_for("hog", lambda i: i["status"] == "complete", timeout=30)

    assert info["success"] == "fatal"
    if kernel_memory_limit(agent):  # a cgroup per task: the kernel's limit ended it
        assert info["message"].startswith("killed by the kernel: it went over its memory "
                                          "limit of 150 MB (the 100 MB it asked for"), info
    else:
        assert "more than the 100 MB it asked for" in info["message"]
    if containment == "process-group":
        assert not kernel_memory_limit(agent)


def kernel_memory_limit(agent: VespidProcess) -> bool:
    """What the agent said at start of the containment this machine gave it."""
    said = next(json.loads(line) for line in agent.log().splitlines()
                if '"task_containment"' in line)
    return "the kernel enforces" in said["detail"]


def test_cancelling_a_parent_cancels_its_whole_tree(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer) -> None:
    start_node("box1", {"memory": 4000, "cores": 4})
    parent = textwrap.dedent("""
        import time
        from vespid.client import Client
        with Client() as vespid:
            kids = [vespid.create_task(f"kid{i}", "import time; time.sleep(600)")
                    for i in range(2)]
            vespid.create_task("never", "pass", requirements={"memory": 999999})
            time.sleep(600)
    """)
    raw.request({"command": "task-create", "name": "tree-top", "executable_pyscript": parent})
    deadline = time.monotonic() + 30
    while len(raw.info("tree-top")["children"]) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for child in raw.info("tree-top")["children"]:
        if "never" not in child:
            raw.wait_for(child, lambda i: i["status"] == "working")

    raw.request({"command": "task-cancel", "name": "tree-top"})

    for name in ["tree-top", *raw.info("tree-top")["children"]]:
        info = raw.wait_for(name, lambda i: i["status"] == "complete", timeout=30)
        assert info["success"] == "terminated", info
