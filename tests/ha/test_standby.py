"""Standby coordinators on one PostgreSQL state: exactly one is active, a standby takes
over when it goes, and one that lost the lease never writes again (issue 15)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests import processes
from tests.faults.test_coordinator_faults import wait_all_complete
from tests.postgres import fresh_database
from tests.processes import VespidProcess, cli
from tests.raw import RawPeer

pytestmark = [pytest.mark.integration, pytest.mark.ha]

# A paused coordinator's broker connection is closed after about two heartbeats.
HA_ENV = {"VESPID_BROKER_HEARTBEAT": "2"}


@pytest.fixture
def state_url() -> Iterator[str]:
    with fresh_database("vespid_ha") as url:
        yield url


@pytest.fixture
def start_coordinator(amqp_url: str, tmp_path: Path, state_url: str,
                      started: list[VespidProcess]) -> Callable[[str], VespidProcess]:
    """A coordinator on the shared state, in a folder of its own (its log is its own)."""
    def start(name: str) -> VespidProcess:
        workdir = tmp_path / name
        proc = processes.coordinator(amqp_url, workdir, state=state_url,
                                     VESPID_BLOB_DIR=str(tmp_path / "blobs"),
                                     VESPID_RESULTS_DIR=str(tmp_path / "results"),
                                     **HA_ENV).start()
        started.append(proc)
        proc.wait_for_log("coordinator_consuming|coordinator_standing_by")
        return proc

    return start


def wait_active(candidates: list[VespidProcess], after: dict[int, int],
                timeout: float = 60) -> VespidProcess:
    """The one of `candidates` that logged coordinator_active since `after` (log offsets)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in candidates:
            if "coordinator_active" in proc.log()[after.get(id(proc), 0):]:
                return proc
        time.sleep(0.05)
    logs = "\n---\n".join(p.log()[-2000:] for p in candidates)
    raise AssertionError(f"no standby became active within {timeout} s:\n{logs}")


def first_decision_after(proc: VespidProcess, offset: int, timeout: float = 60) -> float:
    """When (Unix time, from the log) the coordinator started its first task after offset."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.log()[offset:].splitlines():
            if '"task_started"' in line:
                stamp = json.loads(line)["timestamp"].replace("Z", "+00:00")
                return datetime.fromisoformat(stamp).timestamp()
        time.sleep(0.05)
    raise AssertionError(f"no task started within {timeout} s:\n{proc.log()[-2000:]}")


def marker_script(folder: Path, seconds: float = 0.0) -> str:
    # Each run appends a line to a file named after its task: a file of two lines is a
    # script that ran twice. It then takes `seconds`, so that work is left however fast
    # the machine forks.
    return ("import os, pathlib, time; t = os.environ['VESPID_TASK']; "
            f"p = pathlib.Path({str(folder)!r}) / t; "
            f"p.open('a').write('ran\\n'); time.sleep({seconds})")


def assert_each_ran_once(done: list[dict[str, Any]], runs: Path, total: int) -> None:
    """Every task flow-0000 … completed ok, and its script left one line: ran once."""
    assert {t["name"] for t in done} == {f"flow-{i:04d}" for i in range(total)}
    assert {t["success"] for t in done} == {"ok"}
    ran = {path.name: path.read_text().count("ran") for path in runs.iterdir()}
    assert len(ran) == total
    twice = {name: n for name, n in ran.items() if n != 1}
    assert not twice, f"{twice}\n{story_of(twice, runs.parent)}"


def story_of(tasks: dict[str, int], folder: Path, most: int = 60) -> str:
    """What every process under `folder` logged about these tasks: why a task ran twice."""
    lines = []
    for log_file in sorted(folder.rglob("*.log")):
        for line in log_file.read_text(errors="replace").splitlines():
            if any(f'"{name}"' in line for name in tasks):
                lines.append(f"{log_file.parent.name}: {line}")
    return "\n".join(sorted(lines, key=lambda line: line.split('"timestamp"')[-1])[:most])


def test_three_sigkills_of_the_active_coordinator_lose_nothing_and_run_nothing_twice(
        amqp_url: str, tmp_path: Path, start_coordinator: Callable[[str], VespidProcess],
        start_node: Callable[..., VespidProcess], raw: RawPeer) -> None:
    coordinators = [start_coordinator("c1"), start_coordinator("c2")]
    for name in ("box1", "box2", "box3"):
        start_node(name, {"memory": 8000, "cores": 4})
    active = wait_active(coordinators, {})  # the first message woke one of them
    runs = tmp_path / "runs"
    runs.mkdir()
    # 2,000 tasks of 0.2 s on 12 cores: at least 33 s of work, so each of the three
    # takeovers (3 s apart, a few seconds each) finds tasks still to start. With tasks of no
    # length, a fast machine ran them all before the third and its test waited for a
    # decision that could not come.
    total = 2000
    for i in range(total):
        raw.send({"command": "task-create", "name": f"flow-{i:04d}",
                  "executable_pyscript": marker_script(runs, seconds=0.2)})
        if i % 400 == 399:
            raw.connection.process_data_events(time_limit=0)

    takeovers: list[float] = []
    spare = 3
    for _ in range(3):
        time.sleep(3)
        offsets = {id(p): len(p.log()) for p in coordinators}
        killed_at = time.time()
        active.kill()
        standbys = [p for p in coordinators if p is not active]
        active = wait_active(standbys, offsets)
        takeovers.append(first_decision_after(active, offsets[id(active)]) - killed_at)
        coordinators = [*standbys, start_coordinator(f"c{spare}")]  # the next standby
        spare += 1

    done = wait_all_complete(amqp_url, total, timeout=300)
    assert_each_ran_once(done, runs, total)
    check = cli(amqp_url, "coordinator", "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    print(f"\ntakeover, SIGKILL to the next decision: "
          f"{', '.join(f'{t:.1f} s' for t in takeovers)}")


def test_a_paused_coordinator_that_lost_the_lease_stops_and_decides_nothing(
        amqp_url: str, tmp_path: Path, start_coordinator: Callable[[str], VespidProcess],
        start_node: Callable[..., VespidProcess], raw: RawPeer) -> None:
    first, second = start_coordinator("c1"), start_coordinator("c2")
    start_node("box1", {"memory": 8000, "cores": 2})
    active = wait_active([first, second], {})
    standby = second if active is first else first
    runs = tmp_path / "runs"
    runs.mkdir()
    for i in range(20):
        raw.send({"command": "task-create", "name": f"before-{i:02d}",
                  "executable_pyscript": marker_script(runs)})

    offsets = {id(standby): len(standby.log())}
    paused_at = time.monotonic()
    active.pause()
    try:
        wait_active([standby], offsets, timeout=60)  # the broker gave it the queues
        taken_over = time.monotonic() - paused_at
        for i in range(20):
            raw.send({"command": "task-create", "name": f"after-{i:02d}",
                      "executable_pyscript": marker_script(runs)})
        paused_log = len(active.log())
    finally:
        active.resume()

    assert active.process is not None
    status = active.process.wait(timeout=60)
    assert status == 3, active.log()[-3000:]
    resumed = active.log()[paused_log:]
    stopped = [json.loads(line) for line in resumed.splitlines()
               if '"coordinator_stopping_store_lost"' in line]
    assert [record["superseded"] for record in stopped] == [True], resumed
    # Whatever it had in hand when it was paused, it committed and sent nothing since.
    assert '"task_started"' not in resumed, resumed

    done = wait_all_complete(amqp_url, 40, timeout=120)
    assert len(done) == 40 and {t["success"] for t in done} == {"ok"}
    assert {path.read_text().count("ran") for path in runs.iterdir()} == {1}
    print(f"\nSIGSTOP to the standby active: {taken_over:.1f} s "
          f"(broker heartbeat {HA_ENV['VESPID_BROKER_HEARTBEAT']} s)")
