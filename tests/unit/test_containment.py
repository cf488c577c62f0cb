"""Cells on the real kernel: every process of a cell ends with it, however it detached."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vespid.node_agent import containment
from vespid.node_agent.containment import CgroupV1, CgroupV2, Containment
from vespid.node_agent.supervisor import ChildSetup

UNIFIED = Path("/sys/fs/cgroup/unified")  # a hybrid machine's v2 hierarchy (no controllers)
DETACH = ("import os, subprocess, sys, time\n"
          "child = subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
          "print(child.pid, flush=True)\n"
          "time.sleep(600)\n")


def backends() -> Iterator[tuple[str, Containment | None]]:
    yield "cgroup-v1", CgroupV1.detect("unit-test")
    yield "cgroup-v2", CgroupV2.detect("unit-test", UNIFIED) if UNIFIED.exists() else None


@pytest.mark.parametrize(("kind", "found"), list(backends()), ids=["v1", "v2"])
def test_killing_a_cell_ends_a_process_that_left_its_session(
        kind: str, found: Containment | None) -> None:
    if found is None:
        pytest.skip(f"no writable {kind} hierarchy on this machine")
    cell = found.cell("detacher-a1", None)
    process = subprocess.Popen([sys.executable, "-c", DETACH], stdout=subprocess.PIPE,
                               preexec_fn=ChildSetup(cell.join_files))
    assert process.stdout is not None
    detached = int(process.stdout.readline())
    assert os.getsid(detached) != os.getsid(process.pid)
    assert sorted(cell.pids()) == sorted([process.pid, detached])

    cell.kill()
    process.wait(timeout=10)

    assert cell.pids() == []
    assert not Path(f"/proc/{detached}").exists() or \
        Path(f"/proc/{detached}/stat").read_text().split(") ")[1][0] == "Z"
    cell.remove()
    found.release()


def test_a_cell_of_an_agent_that_died_is_swept_by_the_next(tmp_path: Path) -> None:
    found = CgroupV1.detect("unit-sweep")
    if found is None:
        pytest.skip("no writable cgroup-v1 hierarchy on this machine")
    dead_agent = {c: b.parent / "999999999" for c, b in found.bases.items()}  # no such pid
    stale = CgroupV1({c: d for c, d in dead_agent.items()}).cell("left-behind-a1", None)
    process = subprocess.Popen(["sleep", "600"], preexec_fn=ChildSetup(stale.join_files))
    time.sleep(0.1)

    ended = found.sweep()
    process.wait(timeout=10)

    found.release()
    assert ended == 1 and process.returncode == -9
    assert not any(d.exists() for d in dead_agent.values())


def test_a_sweep_goes_on_when_the_dead_agents_keeper_removes_its_folders_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The dead agent's keeper ends its cells while the agent started after it sweeps them:
    # each folder it lists may be gone by the time it looks inside.
    node_dir = tmp_path / "vespid" / "node1"
    for agent in ("999999998", "999999999"):  # no such pids: both stale
        (node_dir / agent / "cell-a1").mkdir(parents=True)
    found = CgroupV1({"freezer": node_dir / str(os.getpid())})
    listing = Path.iterdir

    def removed_when_listed(path: Path) -> Iterator[Path]:
        if path.name.startswith("99999999"):
            for child in listing(path):
                child.rmdir()
            path.rmdir()  # the keeper was first
        return listing(path)

    monkeypatch.setattr(Path, "iterdir", removed_when_listed)

    assert found.sweep() == 0
    assert list(listing(node_dir)) == []


def test_without_a_writable_cgroup_the_agent_says_what_is_not_contained() -> None:
    said = containment.describe(containment.ProcessGroupOnly())

    assert "outlives the task" in said and "polling" in said
