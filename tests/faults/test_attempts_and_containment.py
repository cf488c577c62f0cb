"""Every attempt's output kept apart, every task process contained, node files cleaned up:
real agents, a real log server, real cgroups where the machine has them."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.test_node_faults import alive, wait_pids
from tests.processes import VespidProcess, cli
from tests.raw import RawPeer

pytestmark = pytest.mark.integration

COUNTER = """
import os, sys, time
attempt, node = os.environ["VESPID_ATTEMPT"], os.environ["VESPID_NODE"]
for i in range({lines}):
    print(f"attempt {{attempt}} on {{node}} line {{i}}", flush=True)
    time.sleep({pause})
"""


def counter(lines: int, pause: float) -> str:
    return textwrap.dedent(COUNTER.format(lines=lines, pause=pause))


def central(folder: Path, task: str, attempt: int, timeout: float = 30) -> list[str]:
    """The lines the log server kept of an attempt, once that attempt's end arrived."""
    meta = folder / task / f"attempt-{attempt}.json"
    deadline = time.monotonic() + timeout
    while not (meta.exists() and json.loads(meta.read_text()).get("complete")):
        assert time.monotonic() < deadline, f"the log server never got the end of {meta}"
        time.sleep(0.1)
    return (folder / task / f"attempt-{attempt}.log").read_text().splitlines()


def consecutive(lines: list[str], prefix: str) -> bool:
    """Every line is `<prefix> line <i>`, i counting from 0 with none missing."""
    return bool(lines) and lines == [f"{prefix} line {i}" for i in range(len(lines))]


# ---- logs, one file per attempt -----------------------------------------------------------
def test_a_stalled_node_that_comes_back_cannot_write_into_the_new_attempts_log(
        amqp_url: str, coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        logserver: Path, raw: RawPeer) -> None:
    node_b = start_node("nodeB")
    raw.request({"command": "task-create", "name": "stalled", "retries": 2,
                 "executable_pyscript": counter(lines=25, pause=0.2)})
    raw.wait_for("stalled", lambda i: i["status"] == "working" and i["node"] == "nodeB")
    start_node("nodeA")
    time.sleep(1)  # attempt 1 writes a few lines on B

    assert node_b.process is not None
    node_b.process.send_signal(signal.SIGSTOP)  # the agent stalls; its task goes on
    try:
        raw.wait_for("stalled", lambda i: i["attempt"] == 2 and i["node"] == "nodeA",
                     timeout=30)
    finally:
        node_b.process.send_signal(signal.SIGCONT)
    info = raw.wait_for("stalled", lambda i: i["status"] == "complete", timeout=60)

    first, second = central(logserver, "stalled", 1), central(logserver, "stalled", 2)
    assert info["success"] == "ok" and info["node"] == "nodeA", info
    assert consecutive(first, "attempt 1 on nodeB"), first
    assert consecutive(second, "attempt 2 on nodeA") and len(second) == 25, second
    latest = cli(amqp_url, "logs", "stalled")
    assert latest.stdout.splitlines() == second
    assert "also kept: attempt 1" in latest.stderr
    assert cli(amqp_url, "logs", "stalled", "--attempt", "1").stdout.splitlines() == first
    both = cli(amqp_url, "logs", "stalled", "--all")
    assert both.stdout.splitlines() == first + second
    assert "=== attempt 1 on nodeB ===" in both.stderr


def test_a_restarted_agent_ships_the_output_of_an_attempt_it_lost(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        logserver: Path, raw: RawPeer, tmp_path: Path) -> None:
    agent = start_node("box1")
    raw.request({"command": "task-create", "name": "lost-output", "retries": 1,
                 "executable_pyscript": counter(lines=1000, pause=0.05)})
    local = tmp_path / "nodes" / "box1" / "work" / "logs" / "lost-output" / "attempt-1.log"
    deadline = time.monotonic() + 20
    while not local.exists() or not local.read_text():  # the process runs and writes
        assert time.monotonic() < deadline, "the task never started writing"
        time.sleep(0.05)

    assert agent.process is not None
    agent.process.send_signal(signal.SIGSTOP)  # nothing streams from now on
    time.sleep(1.5)  # while attempt 1 writes lines only the local file has
    agent.kill(signal.SIGKILL)  # its task dies with it
    written = local.read_text().splitlines()
    agent.start()

    shipped = central(logserver, "lost-output", 1)
    assert len(written) > 10 and consecutive(written, "attempt 1 on box1")
    assert shipped == written


def test_a_malformed_log_chunk_is_dead_lettered_and_the_log_server_goes_on(
        amqp_url: str, coordinator: VespidProcess, logserver: Path, raw: RawPeer) -> None:
    bad = [b"not json", json.dumps({"command": "log-chunk", "task": "t", "offset": "x",
                                    "data": "a"}).encode(),
           json.dumps({"command": "log-chunk", "task": "t", "attempt": 1, "offset": 0,
                       "data_base64": "%%%"}).encode()]
    for body in bad:
        raw.channel.basic_publish("vespid.logs", "log.t", body)
    raw.channel.basic_publish("vespid.logs", "log.t", json.dumps(
        {"command": "log-chunk", "task": "t", "attempt": 1, "offset": 0, "data": "fine\n",
         "eof": True}).encode())

    assert central(logserver, "t", 1) == ["fine"]
    dead = []
    deadline = time.monotonic() + 15
    while len(dead) < len(bad):
        assert time.monotonic() < deadline, f"only {len(dead)} dead letters"
        method, props, body = raw.channel.basic_get("vespid.dead", auto_ack=True)
        if method is None:
            time.sleep(0.1)
            continue
        dead.append((body, props.headers["x-vespid-error"]))
    assert sorted(body for body, _ in dead) == sorted(bad)
    assert all(reason.startswith(("invalid_json", "invalid_message")) for _, reason in dead)


# ---- containment --------------------------------------------------------------------------
def contained(agent: VespidProcess) -> bool:
    said = next(json.loads(line) for line in agent.log().splitlines()
                if '"task_containment"' in line)
    return str(said["kind"]).startswith("cgroup")


@pytest.mark.parametrize("how", ["cancel", "timeout", "agent-sigkill"])
def test_processes_that_left_the_task_end_with_it(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess], raw: RawPeer,
        tmp_path: Path, how: str) -> None:
    agent = start_node("box1")
    if not contained(agent):
        pytest.skip("no writable cgroup on this machine: the agent keeps process groups only")
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, subprocess, time
        setsid_child = subprocess.Popen(["sleep", "600"], start_new_session=True)
        read, write = os.pipe()
        if os.fork() == 0:  # a daemon: fork, setsid, fork again, the middle one exits
            os.setsid()
            if os.fork() == 0:
                os.write(write, str(os.getpid()).encode())
                time.sleep(600)
            os._exit(0)
        daemon = int(os.read(read, 32))
        with open({str(pids)!r}, "w") as out:
            out.write(f"{{os.getpid()}} {{setsid_child.pid}} {{daemon}}")
        time.sleep(600)
    """)
    raw.request({"command": "task-create", "name": "detacher", "retries": 0,
                 "executable_pyscript": script, **({"timeout": 3} if how == "timeout" else {})})
    task_pid, setsid_pid, daemon_pid = wait_pids(pids, 3)
    assert os.getsid(setsid_pid) != os.getsid(task_pid) != os.getsid(daemon_pid)

    if how == "cancel":
        raw.request({"command": "task-cancel", "name": "detacher"})
    elif how == "agent-sigkill":
        agent.kill(signal.SIGKILL)
    if how != "agent-sigkill":
        info = raw.wait_for("detacher", lambda i: i["status"] == "complete", timeout=30)
        assert info["success"] == "terminated", info

    deadline = time.monotonic() + 10
    while any(map(alive_not_zombie, (task_pid, setsid_pid, daemon_pid))):
        assert time.monotonic() < deadline, [
            (pid, alive_not_zombie(pid)) for pid in (task_pid, setsid_pid, daemon_pid)]
        time.sleep(0.1)


def alive_not_zombie(pid: int) -> bool:
    """Running: an exited process whose parent has not reaped it yet does not count."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and alive(pid)


# ---- retention ----------------------------------------------------------------------------
def test_retention_removes_a_finished_tasks_files_and_never_a_running_ones(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        logserver: Path, raw: RawPeer, tmp_path: Path) -> None:
    start_node("box1", VESPID_RETAIN_AFTER_SHIPPED="2")
    work = tmp_path / "nodes" / "box1" / "work"
    raw.request({"command": "task-create", "name": "long", "executable_pyscript":
                 "import time; print('still here', flush=True); time.sleep(60)"})
    raw.request({"command": "task-create", "name": "short",
                 "executable_pyscript": "print('done')"})
    raw.wait_for("short", lambda i: i["status"] == "complete")
    raw.wait_for("long", lambda i: i["status"] == "working")
    files = {task: [work / "scratch" / task, work / "scripts" / f"{task}.py",
                    work / "logs" / task / "attempt-1.log"] for task in ("short", "long")}
    assert all(path.exists() for path in files["short"] + files["long"])
    central(logserver, "short", 1)

    deadline = time.monotonic() + 20
    while any(path.exists() for path in files["short"]):
        assert time.monotonic() < deadline, [p for p in files["short"] if p.exists()]
        time.sleep(0.2)
    time.sleep(3)  # longer than the retention: the running task's files stay all the same

    assert all(path.exists() for path in files["long"])
    assert (logserver / "short" / "attempt-1.log").read_text() == "done\n"


def test_without_a_log_server_an_ok_tasks_files_go_at_once_and_a_failed_ones_stay(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess], raw: RawPeer,
        tmp_path: Path) -> None:
    start_node("box1")
    work = tmp_path / "nodes" / "box1" / "work"
    raw.request({"command": "task-create", "name": "fine", "executable_pyscript": "pass"})
    raw.request({"command": "task-create", "name": "broken",
                 "executable_pyscript": "raise SystemExit(2)"})
    raw.wait_for("fine", lambda i: i["status"] == "complete")
    raw.wait_for("broken", lambda i: i["status"] == "complete")

    deadline = time.monotonic() + 10
    while (work / "logs" / "fine").exists():
        assert time.monotonic() < deadline, "the ok task's files were kept"
        time.sleep(0.1)
    assert (work / "logs" / "broken" / "attempt-1.log").exists()
    assert (work / "scripts" / "broken.py").exists()


def test_a_log_server_started_after_the_agent_is_seen_and_its_logs_are_kept(
        amqp_url: str, coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, tmp_path: Path, started: list[VespidProcess]) -> None:
    from tests.processes import base_env

    start_node("box1")  # connects while there is no log server
    folder = tmp_path / "late-central"
    server = VespidProcess(["logserver", "--dir", str(folder)], tmp_path / "late.log",
                           base_env(amqp_url), tmp_path).start()
    started.append(server)
    server.wait_for_log("logserver_started")
    time.sleep(1.5)  # a few heartbeats of the test agent (0.5 s)
    raw.request({"command": "task-create", "name": "after", "executable_pyscript":
                 "print('kept')"})
    raw.wait_for("after", lambda i: i["status"] == "complete")

    assert central(folder, "after", 1) == ["kept"]
    local = tmp_path / "nodes" / "box1" / "work" / "logs" / "after" / "attempt-1.json"
    deadline = time.monotonic() + 10
    while not local.exists() or '"shipped": null' in local.read_text():
        assert time.monotonic() < deadline, "the end of the log was never counted as shipped"
        time.sleep(0.1)
    assert json.loads(local.read_text())["logserver"] is True  # kept for the retention
