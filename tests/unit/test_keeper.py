"""The keeper: an agent SIGKILLed with tasks running leaves none of their processes: in a
cgroup cell not even one that left the task's session; without a cgroup, every process of
the task's process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.unit.test_supervisor import alive
from vespid.node_agent.containment import CgroupV1

# A stand-in agent: a supervisor that starts one task, then waits to be killed. The task
# starts a child (in a new session where a cgroup holds it) and writes its own pid, that
# child's, and its parent's (the agent's, or where it is a fork, the agent's fork server's).
AGENT = textwrap.dedent("""\
    import os, sys, time
    from pathlib import Path
    from vespid.node_agent import containment
    from vespid.node_agent.supervisor import Launch, Supervisor
    from vespid.shared.protocol import TaskRun

    kind, folder, launch = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    found = containment.detect("unit-keeper", kind)
    assert found.kind == kind, found.kind
    supervisor = Supervisor(kill_grace=0.3, containment=found, launch=launch)
    script = folder / "task.py"
    run = TaskRun(command="task-run", name="orphan", log="logs/orphan", cores=1)
    failed = supervisor.start(run, Launch(script=script, cwd=folder, env=dict(os.environ),
                                          log_file=folder / "task.log"))
    assert failed is None, failed
    time.sleep(600)
""")
TASK = textwrap.dedent("""\
    import os, subprocess, time
    child = subprocess.Popen(["sleep", "600"], start_new_session=DETACH)
    with open("pids.tmp", "w") as out:
        out.write(f"{os.getpid()} {child.pid} {os.getppid()}")
    os.replace("pids.tmp", "pids")
    time.sleep(600)
""")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("launch", ["fork", "spawn"])
@pytest.mark.parametrize("kind", ["cgroup-v1", "process-group"])
def test_an_agent_killed_by_sigkill_leaves_no_process_of_its_tasks(
        kind: str, launch: str, tmp_path: Path) -> None:
    if kind == "cgroup-v1":
        probe = CgroupV1.detect("unit-keeper")
        if probe is None:
            pytest.skip("no writable cgroup-v1 hierarchy on this machine")
        probe.release()
    detach = kind == "cgroup-v1"
    (tmp_path / "task.py").write_text(f"DETACH = {detach}\n" + TASK)
    agent = subprocess.Popen([sys.executable, "-c", AGENT, kind, str(tmp_path), launch])
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "pids").exists():
            assert agent.poll() is None, "the stand-in agent failed"
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.02)
        task, child, parent = (int(p) for p in (tmp_path / "pids").read_text().split())
        started_by = agent.pid if launch == "spawn" else parent_of(parent)
        assert started_by == agent.pid and (os.getsid(child) != os.getsid(task)) == detach

        agent.kill()
        agent.wait(timeout=10)

        deadline = time.monotonic() + 10
        while alive(task) or alive(child):
            assert time.monotonic() < deadline, (alive(task), alive(child))
            time.sleep(0.05)
    finally:
        agent.kill()
        agent.wait(timeout=10)
        if (tmp_path / "pids").exists():
            for pid in (int(p) for p in (tmp_path / "pids").read_text().split()[:2]):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
