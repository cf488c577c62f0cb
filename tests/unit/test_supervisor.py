"""The process supervisor on real child processes, no broker: how each way a script ends is
reported (severity, cause, message), where its output and environment go, and how it is
ended (SIGTERM, SIGKILL after the grace period, timeout, memory), with several at once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vespid.node_agent.agent import NodeAgent
from vespid.node_agent.containment import CgroupV1
from vespid.node_agent.settings import NodeSettings, RepositoryConfig
from vespid.node_agent.supervisor import Finished, Launch, Supervisor
from vespid.shared.protocol import Severity, TaskRun

GRACE = 0.3  # seconds between SIGTERM and SIGKILL in these tests
# Put before every test script: `mark(name, text)` writes a file in the task's folder in one
# step (the test never reads half of it), so a test knows when the script is ready.
PRELUDE = textwrap.dedent("""\
    import os, signal, subprocess, sys, time
    def mark(name, text='ready'):
        with open(name + '.tmp', 'w') as out:
            out.write(str(text))
        os.replace(name + '.tmp', name)
""")


def ignoring_sigterm(body: str) -> str:
    """A script body that first makes SIGTERM do nothing (only SIGKILL ends it)."""
    return "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + textwrap.dedent(body)


# ---- helpers ----------------------------------------------------------------------------
def task_run(name: str = "t", **fields: Any) -> TaskRun:
    return TaskRun(command="task-run", name=name, log=f"logs/{name}", cores=1, **fields)


def launch(tmp_path: Path, name: str, body: str, attempt: int = 1,
           env: dict[str, str] | None = None) -> Launch:
    """A script of PRELUDE + body, its own working folder, and a log file in a folder that
    does not exist yet (the supervisor makes it)."""
    script = tmp_path / "scripts" / f"{name}.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(PRELUDE + textwrap.dedent(body))
    cwd = tmp_path / "work" / name
    cwd.mkdir(parents=True, exist_ok=True)
    return Launch(script=script, cwd=cwd, env={**os.environ, **(env or {})},
                  log_file=tmp_path / "logs" / name / f"attempt-{attempt}.log")


def start(supervisor: Supervisor, tmp_path: Path, name: str, body: str,
          env: dict[str, str] | None = None, **fields: Any) -> Launch:
    run = task_run(name, **fields)
    planned = launch(tmp_path, name, body, run.attempt, env)
    assert supervisor.start(run, planned) is None
    assert supervisor.running[name].run is run
    return planned


def reap_until(supervisor: Supervisor, *names: str, timeout: float = 5.0) -> dict[str, Finished]:
    """Reap as the agent's loop does until every named task has ended; all that ended."""
    ended: dict[str, Finished] = {}
    deadline = time.monotonic() + timeout
    while not set(names) <= ended.keys():
        assert time.monotonic() < deadline, f"still running after {timeout} s: " \
                                            f"{sorted(set(names) - ended.keys())}"
        for finished in supervisor.reap():
            assert finished.name not in ended, f"{finished.name} reported twice"
            ended[finished.name] = finished
        time.sleep(0.02)
    return ended


def wait_for(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def wait_text(path: Path, timeout: float = 5.0) -> str:
    wait_for(path.exists, f"{path} written", timeout)
    return path.read_text()


def alive(pid: int) -> bool:
    """Running: an exited process its parent has not reaped yet (a zombie) does not count."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Tracked(Supervisor):
    """A supervisor that remembers every process group it started, for the teardown."""

    groups: list[int] = field(default_factory=list)

    def start(self, run: TaskRun, launch: Launch) -> Finished | None:
        failed = super().start(run, launch)
        if failed is None:
            self.groups.append(self.running[run.name].process.pid)
        return failed


def end_everything(supervisor: Tracked) -> None:
    """Teardown: nothing a test started outlives it, even where the test failed half-way
    (a grandchild left in a group whose task was already reaped)."""
    for entry in supervisor.running.values():
        entry.process.kill()
        entry.process.wait(timeout=10)
        entry.cell.kill()
        entry.cell.remove()
    supervisor.running.clear()
    for group in supervisor.groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    supervisor.close()  # its keeper too, before another test's cells share its folder


# ---- how a script ends ------------------------------------------------------------------
def test_a_script_that_exits_0_ends_ok_with_its_name_and_attempt(
        contained: Supervisor, tmp_path: Path) -> None:
    start(contained, tmp_path, "fine", "print('done')\n", attempt=3)

    ended = reap_until(contained, "fine")

    assert ended == {"fine": Finished("fine", 3, Severity.OK, None, None)}
    assert contained.running == {}


def test_a_script_that_exits_non_zero_ends_fatal_with_its_status(
        contained: Supervisor, tmp_path: Path) -> None:
    start(contained, tmp_path, "bad", "sys.exit(3)\n", attempt=2)

    ended = reap_until(contained, "bad")

    assert ended["bad"] == Finished("bad", 2, Severity.FATAL,
                                    "the script exited with status 3", "exit")


def test_an_uncaught_exception_ends_fatal_with_status_1_and_its_traceback_in_the_log(
        supervisor: Supervisor, tmp_path: Path) -> None:
    planned = start(supervisor, tmp_path, "raiser", "raise RuntimeError('boom')\n")

    ended = reap_until(supervisor, "raiser")

    assert (ended["raiser"].success, ended["raiser"].cause) == (Severity.FATAL, "exit")
    assert ended["raiser"].message == "the script exited with status 1"
    assert "RuntimeError: boom" in planned.log_file.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_a_script_killed_by_a_signal_ends_terminated_naming_the_signal(
        supervisor: Supervisor, tmp_path: Path, signum: signal.Signals) -> None:
    start(supervisor, tmp_path, "shot", f"os.kill(os.getpid(), {int(signum)})\n"
                                        "time.sleep(30)\n", attempt=4)

    ended = reap_until(supervisor, "shot")

    assert ended["shot"] == Finished("shot", 4, Severity.TERMINATED,
                                     f"the process died of signal {signum.name}", "signal")


def test_a_script_killed_by_a_real_time_signal_ends_terminated(
        supervisor: Supervisor, tmp_path: Path) -> None:
    start(supervisor, tmp_path, "rt", "os.kill(os.getpid(), signal.SIGRTMIN + 1)\n"
                                      "time.sleep(30)\n")

    ended = reap_until(supervisor, "rt")

    assert (ended["rt"].success, ended["rt"].cause) == (Severity.TERMINATED, "signal")
    assert ended["rt"].message == "the process died of signal SIGRTMIN+1"


# ---- output, environment, folder ----------------------------------------------------------
def test_stdout_and_stderr_go_in_order_to_the_attempts_log_file(
        supervisor: Supervisor, tmp_path: Path) -> None:
    planned = start(supervisor, tmp_path, "talker", """\
        print('to stdout', flush=True)
        print('to stderr', file=sys.stderr, flush=True)
        subprocess.run(['sh', '-c', 'echo from a child; echo child error >&2'], check=True)
        print('last line', flush=True)
    """, attempt=2)

    reap_until(supervisor, "talker")

    assert planned.log_file == tmp_path / "logs" / "talker" / "attempt-2.log"
    assert planned.log_file.read_text().splitlines() == [
        "to stdout", "to stderr", "from a child", "child error", "last line"]


def test_the_launch_environment_and_folder_reach_the_script_run_as_main(
        supervisor: Supervisor, tmp_path: Path) -> None:
    planned = launch(tmp_path, "env", """\
        import json, helper
        mark('seen.json', json.dumps({
            'only_here': os.environ.get('ONLY_HERE'), 'cwd': os.getcwd(),
            'name': __name__, 'argv0': sys.argv[0], 'helper': helper.VALUE}))
    """, env={"ONLY_HERE": "from the launch"})
    (planned.script.parent / "helper.py").write_text("VALUE = 'imported from beside'\n")

    assert supervisor.start(task_run("env"), planned) is None
    assert reap_until(supervisor, "env")["env"].success is Severity.OK

    seen = json.loads((planned.cwd / "seen.json").read_text())
    assert seen == {"only_here": "from the launch", "cwd": str(planned.cwd), "name": "__main__",
                    "argv0": str(planned.script), "helper": "imported from beside"}


# ---- from a task-run, as the agent plans it -----------------------------------------------
@pytest.fixture
def agent(tmp_path: Path) -> Iterator[NodeAgent]:
    """An agent that is never connected: only its planning and its supervisor are used."""
    settings = NodeSettings(
        name="unit", work_dir=tmp_path / "node", containment="process-group",
        kill_grace=GRACE, repositories={"repo": RepositoryConfig(path=tmp_path / "repo",
                                                                 type="general_1gb")})
    made = NodeAgent(settings)
    tracked = Tracked(kill_grace=GRACE, memory_margin=settings.memory_margin,
                      containment=made.containment)
    made.supervisor = tracked
    yield made
    end_everything(tracked)


REPORT_ENV = """\
    import json
    mark('seen.json', json.dumps({'cwd': os.getcwd(), **{k: os.environ.get(k) for k in (
        'VESPID_TASK', 'VESPID_ATTEMPT', 'VESPID_NODE', 'GREETING')}}))
"""


def test_the_task_name_and_its_environment_reach_the_script_in_its_scratch_folder(
        agent: NodeAgent) -> None:
    run = task_run("greeter", attempt=2, executable_pyscript=PRELUDE + textwrap.dedent(REPORT_ENV),
                   environment={"GREETING": "hello", "VESPID_TASK": "an impostor"})

    assert agent._launch(run) is None
    assert reap_until(agent.supervisor, "greeter")["greeter"] == Finished(
        "greeter", 2, Severity.OK, None)

    scratch = (agent.settings.work_dir / "scratch" / "greeter").resolve()
    assert json.loads((scratch / "seen.json").read_text()) == {
        "cwd": str(scratch), "VESPID_TASK": "greeter", "VESPID_ATTEMPT": "2",
        "VESPID_NODE": "unit", "GREETING": "hello"}


def test_a_task_with_a_path_runs_its_pyfile_in_that_repository(
        agent: NodeAgent, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "tools").mkdir()
    (repo / "tools" / "job.py").write_text(PRELUDE + textwrap.dedent(REPORT_ENV))
    run = task_run("in-repo", path="repo", executable_pyfile="tools/job.py")

    assert agent._launch(run) is None
    assert reap_until(agent.supervisor, "in-repo")["in-repo"].success is Severity.OK

    seen = json.loads((repo / "seen.json").read_text())
    assert (seen["cwd"], seen["VESPID_TASK"]) == (str(repo.resolve()), "in-repo")


def test_a_missing_pyfile_ends_fatal_at_start_saying_which_file_and_where(
        agent: NodeAgent, tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    run = task_run("lost", path="repo", executable_pyfile="missing.py", attempt=2)

    failed = agent._launch(run)

    assert failed == Finished(
        "lost", 2, Severity.FATAL, "could not prepare the task: executable_pyfile "
        f"'missing.py' is not a file in {(tmp_path / 'repo').resolve()}", "start")
    assert agent.supervisor.running == {}


def test_a_task_run_without_a_script_ends_fatal_at_start(agent: NodeAgent) -> None:
    failed = agent._launch(task_run("empty"))

    assert failed == Finished("empty", 1, Severity.FATAL,
                              "could not prepare the task: the task-run carries no script",
                              "start")
    assert agent.supervisor.running == {}


def test_a_missing_working_folder_ends_fatal_at_start_naming_it_and_does_not_raise(
        contained: Supervisor, tmp_path: Path) -> None:
    planned = launch(tmp_path, "nowhere", "print('never')\n")
    planned.cwd = tmp_path / "no-such-folder"

    failed = contained.start(task_run("nowhere", attempt=5), planned)

    assert failed is not None
    assert (failed.name, failed.attempt, failed.success, failed.cause) == (
        "nowhere", 5, Severity.FATAL, "start")
    assert failed.message is not None
    assert failed.message.startswith("could not start the task: ")
    assert str(tmp_path / "no-such-folder") in failed.message
    assert contained.running == {}
    if isinstance(contained.containment, CgroupV1):  # the cell made for it is gone again
        assert not any((base / "nowhere-a5").exists()
                       for base in contained.containment.bases.values())


def test_a_log_file_that_cannot_be_made_ends_fatal_at_start(
        supervisor: Supervisor, tmp_path: Path) -> None:
    planned = launch(tmp_path, "nolog", "print('never')\n")
    (tmp_path / "a-file").write_text("")
    planned.log_file = tmp_path / "a-file" / "attempt-1.log"  # its folder is a file

    failed = supervisor.start(task_run("nolog"), planned)

    assert failed is not None and (failed.success, failed.cause) == (Severity.FATAL, "start")
    assert failed.message is not None and "a-file" in failed.message
    assert supervisor.running == {}


def test_a_missing_script_ends_fatal_and_its_log_names_the_file(
        supervisor: Supervisor, tmp_path: Path) -> None:
    planned = launch(tmp_path, "ghost", "")
    planned.script.unlink()

    assert supervisor.start(task_run("ghost"), planned) is None
    ended = reap_until(supervisor, "ghost")

    assert (ended["ghost"].success, ended["ghost"].cause) == (Severity.FATAL, "exit")
    assert str(planned.script) in planned.log_file.read_text()


# ---- kill ---------------------------------------------------------------------------------
def test_kill_sends_sigterm_first_and_a_task_that_then_exits_is_reported_killed(
        contained: Supervisor, tmp_path: Path) -> None:
    planned = start(contained, tmp_path, "polite", """\
        def leave(*_):
            print('got SIGTERM, leaving', flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, leave)
        mark('ready')
        time.sleep(30)
    """, attempt=2)
    wait_text(planned.cwd / "ready")
    process = contained.running["polite"].process

    contained.kill("polite", "the coordinator asked")
    ended = reap_until(contained, "polite")

    assert ended["polite"] == Finished("polite", 2, Severity.TERMINATED,
                                       "killed: the coordinator asked", "killed")
    assert process.returncode == 0  # it ended itself on SIGTERM: no SIGKILL was needed
    assert "got SIGTERM, leaving" in planned.log_file.read_text()


def test_a_task_that_ignores_sigterm_is_sigkilled_once_the_grace_period_is_over(
        contained: Supervisor, tmp_path: Path) -> None:
    planned = start(contained, tmp_path, "stubborn", ignoring_sigterm("mark('ready')\n"
                                                                "time.sleep(30)\n"))
    wait_text(planned.cwd / "ready")
    process = contained.running["stubborn"].process

    killed_at = time.monotonic()
    contained.kill("stubborn", "cancelled")
    time.sleep(GRACE / 2)
    assert contained.reap() == []  # within the grace period: SIGTERM only, and ignored
    assert process.poll() is None
    ended = reap_until(contained, "stubborn")
    took = time.monotonic() - killed_at

    assert ended["stubborn"] == Finished("stubborn", 1, Severity.TERMINATED,
                                         "killed: cancelled", "killed")
    assert process.returncode == -signal.SIGKILL
    assert GRACE <= took < GRACE + 2


def test_kill_reaches_grandchildren_in_the_process_group(
        supervisor: Supervisor, tmp_path: Path) -> None:
    # One grandchild dies of the SIGTERM; the other ignores it and needs the SIGKILL.
    planned = start(supervisor, tmp_path, "parent", ignoring_sigterm("""\
        sleeper = subprocess.Popen(['sleep', '600'])
        stubborn = subprocess.Popen([sys.executable, '-c',
            'import signal, time, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); '
            'print(1, flush=True); time.sleep(600)'], stdout=subprocess.PIPE)
        stubborn.stdout.readline()  # its SIGTERM is ignored from here on
        mark('pids', f'{sleeper.pid} {stubborn.pid}')
        time.sleep(600)
    """))
    grandchildren = [int(p) for p in wait_text(planned.cwd / "pids").split()]
    assert all(os.getpgid(pid) == supervisor.running["parent"].process.pid
               for pid in grandchildren)

    supervisor.kill("parent", "cancelled")
    ended = reap_until(supervisor, "parent")

    assert (ended["parent"].success, ended["parent"].cause) == (Severity.TERMINATED, "killed")
    wait_for(lambda: not any(map(alive, grandchildren)), f"grandchildren {grandchildren} gone")


def test_a_child_left_running_by_a_script_that_exits_is_ended_when_it_is_reaped(
        supervisor: Supervisor, tmp_path: Path) -> None:
    planned = start(supervisor, tmp_path, "leaver", """\
        left = subprocess.Popen(['sleep', '600'])
        mark('pid', left.pid)
    """)
    left = int(wait_text(planned.cwd / "pid"))

    ended = reap_until(supervisor, "leaver")

    assert ended["leaver"].success is Severity.OK
    wait_for(lambda: not alive(left), f"the left-behind child {left} gone")


def test_a_kill_for_an_older_attempt_or_another_task_leaves_the_running_one_alone(
        supervisor: Supervisor, tmp_path: Path) -> None:
    planned = start(supervisor, tmp_path, "current", "mark('ready')\ntime.sleep(30)\n",
                    attempt=2)
    wait_text(planned.cwd / "ready")
    entry = supervisor.running["current"]

    supervisor.kill("current", "meant for attempt 1", attempt=1)
    supervisor.kill("someone-else", "not running here")
    time.sleep(0.1)

    assert supervisor.reap() == []
    assert (entry.kill_reason, entry.process.poll()) == (None, None)

    supervisor.kill("current", "meant for this one", attempt=2)
    supervisor.kill("current", "a second reason")  # the first kill's reason stays
    ended = reap_until(supervisor, "current")

    assert ended["current"].message == "killed: meant for this one"


def test_kill_all_ends_every_running_task_with_the_reason(
        supervisor: Supervisor, tmp_path: Path) -> None:
    for name in ("one", "two"):
        start(supervisor, tmp_path, name, "time.sleep(30)\n")

    supervisor.kill_all("the node agent was stopped")
    ended = reap_until(supervisor, "one", "two")

    assert {f.name: (f.success, f.message, f.cause) for f in ended.values()} == {
        name: (Severity.TERMINATED, "killed: the node agent was stopped", "killed")
        for name in ("one", "two")}
    assert supervisor.running == {}


# ---- timeout and memory -------------------------------------------------------------------
def test_a_task_over_its_timeout_is_killed_with_the_timeout_cause(
        supervisor: Supervisor, tmp_path: Path) -> None:
    began = time.monotonic()
    start(supervisor, tmp_path, "slow", ignoring_sigterm("time.sleep(30)\n"), timeout=0.5)
    process = supervisor.running["slow"].process

    ended = reap_until(supervisor, "slow")
    took = time.monotonic() - began

    assert ended["slow"] == Finished("slow", 1, Severity.TERMINATED,
                                     "killed: it ran longer than its timeout of 0.5 s",
                                     "timeout")
    assert process.returncode == -signal.SIGKILL  # it ignored SIGTERM: the grace ran out too
    assert 0.5 + GRACE <= took < 3


def test_a_task_that_ends_within_its_timeout_ends_ok(
        supervisor: Supervisor, tmp_path: Path) -> None:
    start(supervisor, tmp_path, "quick", "time.sleep(0.3)\n", timeout=5)

    assert reap_until(supervisor, "quick")["quick"] == Finished("quick", 1, Severity.OK, None)


HOG = """\
    blocks = []
    for _ in range(40):  # up to 400 MB, far over what it asked for
        blocks.append(bytearray(10 * 1024 * 1024))
        time.sleep(0.01)
    mark('allocated')
    time.sleep(30)
"""


def test_a_task_over_its_memory_is_killed_at_once_with_the_memory_cause(
        contained: Supervisor, tmp_path: Path) -> None:
    contained.kill_grace = 30  # a memory kill must not wait for the grace period
    kernel = contained.containment.kernel_memory_limit
    start(contained, tmp_path, "hog", ignoring_sigterm(HOG), memory=40)
    entry = contained.running["hog"]
    # Polled by the supervisor only where the kernel does not enforce it.
    assert entry.memory_limit_mb == (None if kernel else 60)

    ended = reap_until(contained, "hog", timeout=4)

    hog = ended["hog"]
    assert (hog.name, hog.attempt, hog.success, hog.cause) == (
        "hog", 1, Severity.FATAL, "memory")
    assert hog.message is not None
    if kernel:
        assert hog.message == ("killed by the kernel: it went over its memory limit of 60 MB "
                               "(the 40 MB it asked for times the node's margin of 1.5)")
    else:
        assert hog.message.startswith("killed: it used ")
        assert hog.message.endswith(" MB, more than the 40 MB it asked for times the node's "
                                    "margin of 1.5")
        assert int(hog.message.split()[3]) > 60
    assert entry.process.returncode == -signal.SIGKILL


def test_a_task_within_its_memory_is_left_alone(
        supervisor: Supervisor, tmp_path: Path) -> None:
    # 20 MB against a polled limit of 300 MB, over more than one poll.
    start(supervisor, tmp_path, "modest", "block = bytearray(20 * 1024 * 1024)\n"
                                          "time.sleep(1.2)\n", memory=200)

    assert reap_until(supervisor, "modest")["modest"] == Finished("modest", 1, Severity.OK, None)


# ---- several at once --------------------------------------------------------------------
def test_several_tasks_are_tracked_independently(
        supervisor: Supervisor, tmp_path: Path) -> None:
    quick = start(supervisor, tmp_path, "quick", """\
        print('quick here', flush=True)
        while not os.path.exists('go'):
            time.sleep(0.01)
        sys.exit(0)
    """)
    slow = start(supervisor, tmp_path, "slow", """\
        print('slow here', flush=True)
        mark('ready')
        time.sleep(30)
    """, attempt=3)
    wait_text(slow.cwd / "ready")
    assert supervisor.reap() == []
    assert sorted(supervisor.running) == ["quick", "slow"]

    (quick.cwd / "go").write_text("")
    ended = reap_until(supervisor, "quick")
    time.sleep(0.1)
    ended.update((f.name, f) for f in supervisor.reap())

    assert ended == {"quick": Finished("quick", 1, Severity.OK, None)}
    assert list(supervisor.running) == ["slow"]
    still = supervisor.running["slow"]
    assert (still.process.poll(), still.kill_reason) == (None, None)

    supervisor.kill("slow", "cancelled")
    assert reap_until(supervisor, "slow")["slow"] == Finished(
        "slow", 3, Severity.TERMINATED, "killed: cancelled", "killed")
    assert quick.log_file.read_text() == "quick here\n"
    assert slow.log_file.read_text() == "slow here\n"


def test_with_a_cgroup_each_attempt_runs_in_its_own_cell_which_goes_when_it_ends(
        tmp_path: Path) -> None:
    found = CgroupV1.detect("unit-supervisor")
    if found is None:
        pytest.skip("no writable cgroup-v1 hierarchy on this machine")
    supervisor = Tracked(kill_grace=GRACE, containment=found)
    try:
        planned = start(supervisor, tmp_path, "celled", "mark('ready')\n"
                                                        "while not os.path.exists('go'):\n"
                                                        "    time.sleep(0.01)\n", attempt=2)
        wait_text(planned.cwd / "ready")
        cells = [base / "celled-a2" for base in found.bases.values()]
        pid = supervisor.running["celled"].process.pid
        assert supervisor.running["celled"].cell.pids() == [pid]
        assert all((cell / "cgroup.procs").read_text().split() == [str(pid)] for cell in cells)

        (planned.cwd / "go").write_text("")
        assert reap_until(supervisor, "celled")["celled"].success is Severity.OK

        assert not any(cell.exists() for cell in cells)
    finally:
        end_everything(supervisor)
        found.release()


def test_the_supervisor_runs_the_agents_own_python(
        supervisor: Supervisor, tmp_path: Path) -> None:
    planned = start(supervisor, tmp_path, "which", "mark('python', sys.executable)\n")

    reap_until(supervisor, "which")

    assert (planned.cwd / "python").read_text() == sys.executable


def test_a_kill_that_comes_after_the_script_ended_leaves_its_own_result(
        supervisor: Supervisor, tmp_path: Path) -> None:
    start(supervisor, tmp_path, "quick", "pass\n")
    process = supervisor.running["quick"].process
    process.wait(timeout=10)

    supervisor.kill_all("the agent is stopping")
    ended = reap_until(supervisor, "quick")

    assert (ended["quick"].success, ended["quick"].message) == (Severity.OK, None)
