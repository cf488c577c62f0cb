"""The fork server on real processes: a fork of it runs a script as `python script` would
(status, signal, traceback, environment, folder, argv, path, output order), in its cell and
its own session; the server ends with the agent; the supervisor spawns where a fork would
not start the script's interpreter the same, and reports a start or a watcher that failed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.unit.test_supervisor import (
    GRACE,
    PRELUDE,
    Tracked,
    alive,
    end_everything,
    reap_until,
    start,
    task_run,
    wait_for,
    wait_text,
)
from vespid.node_agent.agent import NodeAgent
from vespid.node_agent.containment import Cell, NoCell, ProcessGroupOnly
from vespid.node_agent.forks import Forked, ForkServer
from vespid.node_agent.settings import NodeSettings
from vespid.node_agent.supervisor import Launch, Supervisor
from vespid.shared.errors import ConfigError
from vespid.shared.protocol import Severity


@pytest.fixture
def server() -> Iterator[ForkServer]:
    made = ForkServer(lambda: None)
    yield made
    made.close()


def fork(server: ForkServer, tmp_path: Path, body: str, env: dict[str, str] | None = None,
         join: list[Path] | None = None) -> tuple[Forked, Path, Path]:
    """Start PRELUDE + body as a task; its handle, its folder and its log file."""
    script = tmp_path / "scripts" / "task.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(PRELUDE + textwrap.dedent(body))
    cwd = tmp_path / "work"
    cwd.mkdir(exist_ok=True)
    log_file = tmp_path / "task.log"
    task_env = env if env is not None else {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_file.open("ab") as output:
        forked = server.start(script, cwd, task_env, join or [], output.fileno())
    return forked, cwd, log_file


def ended(server: ForkServer, tmp_path: Path, body: str, **kwargs: Any) -> tuple[int, str]:
    forked, _cwd, log_file = fork(server, tmp_path, body, **kwargs)
    return forked.wait(timeout=10), log_file.read_text()


# ---- how a script ends ------------------------------------------------------------------
def test_a_script_that_runs_to_its_end_exits_0(server: ForkServer, tmp_path: Path) -> None:
    assert ended(server, tmp_path, "print('done')\n") == (0, "done\n")


def test_sys_exit_gives_its_status(server: ForkServer, tmp_path: Path) -> None:
    assert ended(server, tmp_path, "sys.exit(7)\n") == (7, "")


def test_a_sys_exit_with_a_message_prints_it_and_exits_1(
        server: ForkServer, tmp_path: Path) -> None:
    assert ended(server, tmp_path, "sys.exit('gave up')\n") == (1, "gave up\n")


def test_an_uncaught_exception_exits_1_with_the_scripts_traceback_alone(
        server: ForkServer, tmp_path: Path) -> None:
    code, log = ended(server, tmp_path, """\
        def inner():
            raise RuntimeError('boom')
        inner()
    """)

    assert code == 1
    script = tmp_path / "scripts" / "task.py"
    assert log.splitlines()[0] == "Traceback (most recent call last):"
    assert log.splitlines()[-1] == "RuntimeError: boom"
    frames = [line for line in log.splitlines() if line.startswith("  File ")]
    assert [frame.split(",")[0] for frame in frames] == [f'  File "{script}"'] * 2
    assert "forkserver" not in log and "runpy" not in log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_death_by_a_signal_is_its_negative_number(
        server: ForkServer, tmp_path: Path, signum: signal.Signals) -> None:
    code, _log = ended(server, tmp_path, f"os.kill(os.getpid(), {int(signum)})\n"
                                         "time.sleep(30)\n")

    assert code == -signum


def test_an_uncaught_keyboard_interrupt_ends_as_sigint(
        server: ForkServer, tmp_path: Path) -> None:
    code, log = ended(server, tmp_path, "raise KeyboardInterrupt\n")

    assert code == -signal.SIGINT
    assert log.splitlines()[-1] == "KeyboardInterrupt"


def test_the_end_joins_threads_runs_atexit_and_flushes_an_unclosed_file(
        server: ForkServer, tmp_path: Path) -> None:
    forked, cwd, log_file = fork(server, tmp_path, """\
        import atexit, threading
        atexit.register(print, 'atexit ran')
        threading.Thread(target=lambda: (time.sleep(0.2), print('thread ended'))).start()
        left_open = open('unclosed.txt', 'w')
        left_open.write('flushed at exit')
    """)

    assert forked.wait(timeout=10) == 0
    assert log_file.read_text() == "thread ended\natexit ran\n"
    assert (cwd / "unclosed.txt").read_text() == "flushed at exit"


def test_the_end_copes_with_anything_in_sys_modules_and_reports_errors_in_atexit(
        server: ForkServer, tmp_path: Path) -> None:
    code, log = ended(server, tmp_path, """\
        import atexit
        sys.modules['not_a_module'] = type('NotAModule', (), {})  # its __dict__ is read-only
        def failing():
            raise ValueError('at exit')
        atexit.register(failing)
    """)

    assert code == 0
    assert "ValueError: at exit" in log and "forkserver" not in log


# ---- what the script sees ---------------------------------------------------------------
def test_the_environment_is_exactly_the_tasks(
        server: ForkServer, tmp_path: Path) -> None:
    assert "PATH" in os.environ  # the agent's, and so the server's
    reduced = {"ONLY_HERE": "task", "PYTHONUNBUFFERED": "1"}
    forked, cwd, _log = fork(server, tmp_path, "import json\n"
                             "mark('env.json', json.dumps(dict(os.environ)))\n", env=reduced)
    assert forked.wait(timeout=10) == 0

    assert json.loads((cwd / "env.json").read_text()) == reduced


def test_the_script_runs_as_main_in_its_folder_with_its_own_argv_and_path(
        server: ForkServer, tmp_path: Path) -> None:
    forked, cwd, _log = fork(server, tmp_path, """\
        import json, helper
        mark('seen.json', json.dumps({
            'cwd': os.getcwd(), 'name': __name__, 'argv': sys.argv, 'path0': sys.path[0],
            'file': __file__, 'helper': helper.VALUE}))
    """)
    (tmp_path / "scripts" / "helper.py").write_text("VALUE = 'beside the script'\n")
    assert forked.wait(timeout=10) == 0

    script = str(tmp_path / "scripts" / "task.py")
    assert json.loads((cwd / "seen.json").read_text()) == {
        "cwd": str(cwd), "name": "__main__", "argv": [script],
        "path0": str((tmp_path / "scripts").resolve()), "file": script,
        "helper": "beside the script"}


def test_unbuffered_stdout_and_stderr_keep_their_order(
        server: ForkServer, tmp_path: Path) -> None:
    code, log = ended(server, tmp_path, """\
        for n in range(5):
            print(f'out {n}')
            sys.stderr.write(f'err {n}\\n')
    """)

    assert code == 0
    assert log.splitlines() == [f"{kind} {n}" for n in range(5) for kind in ("out", "err")]


def test_the_child_leads_its_own_session_and_process_group(
        server: ForkServer, tmp_path: Path) -> None:
    forked, cwd, _log = fork(server, tmp_path, "mark('ids', f'{os.getsid(0)} {os.getpgrp()}')\n"
                                               "while not os.path.exists('go'):\n"
                                               "    time.sleep(0.01)\n")
    assert wait_text(cwd / "ids") == f"{forked.pid} {forked.pid}"
    (cwd / "go").write_text("")
    assert forked.wait(timeout=10) == 0


def test_a_folder_that_does_not_exist_fails_the_start_naming_it(
        server: ForkServer, tmp_path: Path) -> None:
    script = tmp_path / "task.py"
    script.write_text("print('never')\n")
    log_file = tmp_path / "task.log"
    with log_file.open("ab") as output, pytest.raises(OSError, match="no-such-folder"):
        server.start(script, tmp_path / "no-such-folder", dict(os.environ), [],
                     output.fileno())
    assert "the task could not start" in log_file.read_text()


# ---- the server's own life --------------------------------------------------------------
AGENT = """\
import os, sys, time
from pathlib import Path
from vespid.node_agent.forks import ForkServer
folder = Path(sys.argv[1])
server = ForkServer(lambda: None)
(folder / "task.py").write_text("import time\\ntime.sleep(600)\\n")
with open(folder / "task.log", "ab") as output:
    task = server.start(folder / "task.py", folder, dict(os.environ), [], output.fileno())
print("pids", server.process.pid, task.pid, flush=True)
time.sleep(600)
"""


STOPPED_AGENT = """\
import os, signal, sys, time
from pathlib import Path
from vespid.node_agent.forks import ForkServer
folder = Path(sys.argv[1])
server = ForkServer(lambda: None)
(folder / "short.py").write_text("import time\\ntime.sleep(0.3)\\n")
(folder / "long.py").write_text("import time\\ntime.sleep(600)\\n")
with open(folder / "task.log", "ab") as output:
    tasks = [server.start(folder / name, folder, dict(os.environ), [], output.fileno())
             for name in ("short.py", "long.py")]
print("pids", server.process.pid, tasks[1].pid, flush=True)
os.kill(os.getpid(), signal.SIGSTOP)  # the short task's end is never read
"""


@pytest.mark.parametrize("script", [AGENT, STOPPED_AGENT], ids=["running", "stopped"])
def test_the_server_and_its_tasks_end_when_the_agent_dies(tmp_path: Path, script: str) -> None:
    # Stopped, then killed (a node's operator, the OOM killer): the kernel gives the server
    # a reset, not an end of file, since the agent left what it sent unread.
    agent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        said = next(line for line in agent.stdout if line.startswith("pids "))
        server_pid, task_pid = map(int, said.split()[1:])
        assert alive(server_pid) and alive(task_pid)
        time.sleep(1.0)  # when stopped: the short task ended, and the server said so

        agent.kill()
        agent.wait(timeout=10)

        wait_for(lambda: not alive(server_pid), "the fork server ended")
        wait_for(lambda: not alive(task_pid), "its (long) task ended")
    finally:
        agent.kill()
        agent.wait(timeout=10)


def test_the_server_exits_when_its_channel_closes(tmp_path: Path) -> None:
    server = ForkServer(lambda: None)
    forked, _cwd, _log = fork(server, tmp_path, "time.sleep(600)\n")

    server.close()

    assert server.process.returncode == 0
    assert forked.wait(timeout=10) == -signal.SIGKILL
    wait_for(lambda: not alive(forked.pid), "the task ended")


# ---- in the supervisor --------------------------------------------------------------------
in_a_cgroup = pytest.mark.parametrize("contained", ["cgroup-v1"], indirect=True)


@in_a_cgroup
def test_a_forked_task_is_in_its_cell_and_a_setsid_grandchild_ends_with_it(
        contained: Supervisor, tmp_path: Path) -> None:
    planned = start(contained, tmp_path, "detacher", """\
        child = subprocess.Popen(['sleep', '600'], start_new_session=True)
        mark('child', child.pid)
        time.sleep(600)
    """)
    grandchild = int(wait_text(planned.cwd / "child"))
    entry = contained.running["detacher"]
    assert isinstance(entry.process, Forked)
    assert os.getsid(grandchild) != entry.process.pid
    assert sorted(entry.cell.pids()) == sorted([entry.process.pid, grandchild])

    contained.kill("detacher", "cancontained")
    finished = reap_until(contained, "detacher")["detacher"]

    assert (finished.success, finished.message) == (Severity.TERMINATED, "killed: cancontained")
    assert not alive(grandchild)


@in_a_cgroup
def test_a_task_over_its_memory_limit_in_its_cell_is_reported_as_the_kernels_kill(
        contained: Supervisor, tmp_path: Path) -> None:
    start(contained, tmp_path, "hog", "hoard = bytearray(400 * 1024 * 1024)\n"
                                   "hoard[::4096] = b'x' * len(hoard[::4096])\n", memory=50)

    finished = reap_until(contained, "hog", timeout=20)["hog"]

    assert (finished.success, finished.cause) == (Severity.FATAL, "memory")


class BrokenCells(ProcessGroupOnly):
    """Cells whose join files cannot be written."""

    def __init__(self, where: Path) -> None:
        super().__init__()
        self.where = where

    def cell(self, name: str, memory_limit_mb: float | None) -> Cell:
        return NoCell(join_files=[self.where / name / "cgroup.procs"])


def test_a_task_that_cannot_join_its_cell_fails_to_start_and_its_log_says_why(
        tmp_path: Path) -> None:
    supervisor = Tracked(kill_grace=GRACE, containment=BrokenCells(tmp_path / "no-cgroup"))
    try:
        run = task_run("unjoined", attempt=2)
        script = tmp_path / "task.py"
        script.write_text("print('never')\n")
        planned = Launch(script=script, cwd=tmp_path, env=dict(os.environ),
                         log_file=tmp_path / "task.log")

        failed = supervisor.start(run, planned)

        assert failed is not None
        assert (failed.success, failed.cause) == (Severity.FATAL, "start")
        assert failed.message is not None
        assert failed.message.startswith("could not start the task: could not join its "
                                         f"cgroup ({tmp_path / 'no-cgroup' / 'unjoined-a2'}")
        assert "could not join its cgroup" in planned.log_file.read_text()
        assert "never" not in planned.log_file.read_text()
        assert supervisor.running == {}
    finally:
        end_everything(supervisor)


def test_a_task_that_sets_pythonpath_is_spawned_and_sees_it(
        supervisor: Supervisor, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "only_on_pythonpath.py").write_text("WHERE = 'from PYTHONPATH'\n")
    with capture_logs() as logged:
        planned = start(supervisor, tmp_path, "pathy", """\
            import only_on_pythonpath
            mark('where', only_on_pythonpath.WHERE)
        """, env={"PYTHONPATH": str(extra)})
    assert isinstance(supervisor.running["pathy"].process, subprocess.Popen)

    assert reap_until(supervisor, "pathy")["pathy"].success is Severity.OK
    assert (planned.cwd / "where").read_text() == "from PYTHONPATH"
    fallbacks = [event for event in logged if event["event"] == "task_spawned_not_forked"]
    assert len(fallbacks) == 1 and "PYTHONPATH" in fallbacks[0]["reason"]


def test_a_task_with_the_agents_own_environment_is_forked(
        supervisor: Supervisor, tmp_path: Path) -> None:
    start(supervisor, tmp_path, "plain", "time.sleep(600)\n")

    assert isinstance(supervisor.running["plain"].process, Forked)


def test_with_launch_spawn_every_task_is_spawned(tmp_path: Path) -> None:
    supervisor = Tracked(kill_grace=GRACE, launch="spawn")
    try:
        start(supervisor, tmp_path, "spawned", "pass\n")
        assert isinstance(supervisor.running["spawned"].process, subprocess.Popen)
        assert reap_until(supervisor, "spawned")["spawned"].success is Severity.OK
    finally:
        end_everything(supervisor)


def test_a_task_whose_fork_server_died_is_ended_and_reported_and_the_next_is_forked(
        supervisor: Supervisor, tmp_path: Path) -> None:
    planned = start(supervisor, tmp_path, "orphan", "mark('ready')\ntime.sleep(600)\n")
    wait_text(planned.cwd / "ready")
    task_pid = supervisor.running["orphan"].process.pid
    forks = supervisor._forks
    assert forks is not None
    forks.process.kill()

    finished = reap_until(supervisor, "orphan")["orphan"]

    assert finished.success is Severity.TERMINATED
    assert finished.message == "ended: the node's fork server, which watched it, died"
    wait_for(lambda: not alive(task_pid), "the task ended")
    start(supervisor, tmp_path, "next", "pass\n")
    assert isinstance(supervisor.running["next"].process, Forked)
    assert reap_until(supervisor, "next")["next"].success is Severity.OK


def test_many_forks_in_turn_each_report_their_own_status(
        server: ForkServer, tmp_path: Path) -> None:
    started = [fork(server, tmp_path / str(n), f"sys.exit({n})\n") for n in range(20)]

    assert [forked.wait(timeout=10) for forked, _cwd, _log in started] == list(range(20))
    deadline = time.monotonic() + 5
    while server.children and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.children == {}


def test_the_launch_setting_comes_from_toml_or_env_and_reaches_the_supervisor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'name = "n1"\nwork_dir = "{tmp_path / "work"}"\nlaunch = "spawn"\n')
    assert NodeSettings.load(config).launch == "spawn"
    assert NodeSettings(name="n1").launch == "fork"
    monkeypatch.setenv("VESPID_LAUNCH", "spawn")
    settings = NodeSettings.load(None, name="n1", containment="process-group",
                                 work_dir=tmp_path / "work")
    assert NodeAgent(settings).supervisor.launch == "spawn"
    monkeypatch.setenv("VESPID_LAUNCH", "exec")
    with pytest.raises(ConfigError, match="launch"):
        NodeSettings.load(None, name="n1")
