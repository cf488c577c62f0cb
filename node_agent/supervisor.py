"""Starting, watching and killing task processes. No broker code here.

Each attempt runs as `python script` would with the agent's own Python: by default as a fork
of the agent's fork server (forks.py), which saves the interpreter's start, 22-25 ms of CPU a
task; spawned where the task's environment would start an interpreter otherwise, or the server
cannot help (`launch = "spawn"` spawns every task). Either way in its own process group and,
where the machine allows, its own cgroup (containment.py), which a fork joins before the
script's first line and a spawn is born in (cgroup v1: spawned by a thread that steps into the
cell) or joins between fork and exec (cgroup v2), so ending it ends everything it spawned, even
processes that called setsid or double-forked. If the agent dies, even by SIGKILL, its
keeper (keeper.py: one small process per agent, watching a pipe from it) ends every cell, or
process group, the agent left (where the child joins between fork and exec, the kernel's
parent-death signal also ends the task's own process at once; the fork server kills the
groups of its forks), so no grandchild (a compiler, a test runner, a build daemon) is left
orphaned. Exits are watched by one thread on the spawned tasks' pidfds, and reported by the
fork server for its forks (only a parent can learn a status). Its stdout and stderr go to the
attempt's log file. Running time (`timeout`) and memory (what the task asked for times a
margin: the kernel's limit in the cgroup, else the polled resident memory of the group) are
enforced here.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from vespid.node_agent.containment import Cell, Containment, NoCell, ProcessGroupOnly
from vespid.node_agent.forks import Forked, ForkServer
from vespid.shared.errors import ForkServerUnavailable
from vespid.shared.logs import get_logger
from vespid.shared.protocol import Severity, TaskRun

log = get_logger(__name__)
PR_SET_PDEATHSIG = 1
DEATH_SIGNAL = signal.SIGKILL
MEMORY_POLL_SECONDS = 0.5
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded once, called in each child


class TaskProcess(Protocol):
    """A task's process, however it was started: a Popen (spawned) or a Forked (forks.py)."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def kill(self) -> None: ...


@dataclass
class Running:
    run: TaskRun
    process: TaskProcess
    started: float
    cell: Cell
    memory_limit_mb: float | None = None  # polled (no kernel limit)
    kill_reason: str | None = None
    kill_cause: str = "killed"
    kill_severity: Severity = Severity.TERMINATED
    kill_deadline: float | None = None
    next_memory_check: float = 0.0


@dataclass(frozen=True)
class Finished:
    name: str
    attempt: int
    success: Severity
    message: str | None
    # Why it ended, as a word a program can test (task-complete `cause`): None (ran to its
    # end), "exit", "signal", "timeout", "memory", "killed", "start".
    cause: str | None = None


@dataclass
class Launch:
    """Where and how to start one task; the agent works these out from its settings."""

    script: Path
    cwd: Path
    env: dict[str, str]
    log_file: Path


class ChildSetup:
    """What runs in the child between fork and exec: ask the kernel to kill it when the
    agent dies (and die now if the agent is already gone: its keeper may have swept the
    cells before this one is joined), then join the attempt's cgroup before the script can
    start anything. The cgroup files are opened here, in the parent: the child only writes.
    """

    def __init__(self, join_files: list[Path]) -> None:
        self.parent = os.getpid()
        self.fds = [os.open(path, os.O_WRONLY | os.O_CLOEXEC) for path in join_files]

    def __call__(self) -> None:
        _prctl(PR_SET_PDEATHSIG, int(DEATH_SIGNAL))
        if os.getppid() != self.parent:
            os._exit(127)
        for fd in self.fds:
            os.write(fd, b"0")

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []



def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in a process group, in MB (Linux /proc)."""
    total_pages = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat, after pid and (comm)
            total_pages += int(fields[21])  # field 24: rss in pages
    return total_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


class ExitWatcher:
    """One thread waiting on the pidfds of every running task (epoll): a task's exit calls
    `on_exit` at once, so the owner's loop reaps it now rather than at its next poll."""

    def __init__(self, on_exit: Callable[[], None]) -> None:
        self.on_exit = on_exit
        self.epoll = select.epoll()
        self.thread: threading.Thread | None = None

    def add(self, pid: int) -> None:
        fd = os.pidfd_open(pid)
        self.epoll.register(fd, select.EPOLLIN | select.EPOLLONESHOT)
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, daemon=True, name="task-exits")
            self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                events = self.epoll.poll()
            except InterruptedError:
                continue
            for fd, _mask in events:
                self.epoll.unregister(fd)
                os.close(fd)
            if events:
                self.on_exit()


class Keeper:
    """The agent's side of its keeper (keeper.py): started at the first task, given the
    process groups to end where there is no cgroup; it goes when this process does."""

    def __init__(self, containment: Containment) -> None:
        self.containment = containment
        self.tracks_groups = not containment.contains_detached
        self.process: subprocess.Popen[bytes] | None = None

    def ensure(self, running: list[int]) -> None:
        """Start it, or start it again if it died (then tell it the `running` groups)."""
        if self.process is not None and self.process.poll() is None:
            return
        if self.process is not None:
            log.warning("keeper_restarted", code=self.process.returncode)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vespid.node_agent.keeper",
             json.dumps(self.containment.spec())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
        for pgid in running:
            self.started(pgid)

    def started(self, pgid: int) -> None:
        self._say(f"+{pgid}\n")

    def ended(self, pgid: int) -> None:
        self._say(f"-{pgid}\n")

    def _say(self, line: str) -> None:
        if self.tracks_groups and self.process is not None and self.process.stdin:
            with contextlib.suppress(OSError):
                os.write(self.process.stdin.fileno(), line.encode())

    def close(self) -> None:
        """Let it go (it ends what is left in the cells): at the agent's own exit."""
        if self.process is not None and self.process.stdin is not None:
            self.process.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)


@dataclass
class Supervisor:
    kill_grace: float
    memory_margin: float = 1.5
    containment: Containment = field(default_factory=ProcessGroupOnly)
    # "fork": from the fork server where the task's interpreter would start the same,
    # else (and with "spawn") a new `python script`.
    launch: Literal["fork", "spawn"] = "fork"
    running: dict[str, Running] = field(default_factory=dict)
    # Called from the watcher thread as soon as a task's process exits, so the owner's loop
    # reaps it now rather than at its next poll (which was 0.2 s: a slot stood empty that
    # long after every task, and short tasks ran at a tenth of the machine's rate).
    on_exit: Callable[[], None] = lambda: None
    _watcher: ExitWatcher | None = field(default=None, init=False, repr=False)
    _keeper: Keeper | None = field(default=None, init=False, repr=False)
    _spawner: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)
    _forks: ForkServer | None = field(default=None, init=False, repr=False)

    def start(self, run: TaskRun, launch: Launch) -> Finished | None:
        """Start a task; a task that cannot start is returned as finished (fatal)."""
        limit = run.memory * self.memory_margin if run.memory else None
        cell: Cell = NoCell()
        try:
            if self._keeper is None:
                self._keeper = Keeper(self.containment)
            self._keeper.ensure([entry.process.pid for entry in self.running.values()])
            cell = self.containment.cell(f"{run.name}-a{run.attempt}", limit)
            launch.log_file.parent.mkdir(parents=True, exist_ok=True)
            with launch.log_file.open("ab") as log_handle:
                process = self._begin(run, cell, launch, log_handle.fileno())
        except (OSError, subprocess.SubprocessError) as exc:
            cell.remove()
            message = f"could not start the task: {exc}"
            log.error("task_start_failed", task=run.name, error=str(exc))
            return Finished(run.name, run.attempt, Severity.FATAL, message, "start")
        self._keeper.started(process.pid)
        polled = None if self.containment.kernel_memory_limit else limit
        self.running[run.name] = Running(run, process, time.time(), cell, polled)
        if not isinstance(process, Forked):  # the fork server reports a fork's exit
            if self._watcher is None:
                self._watcher = ExitWatcher(lambda: self.on_exit())
            self._watcher.add(process.pid)
        log.info("task_process_started", task=run.name, pid=process.pid, attempt=run.attempt,
                 contained=self.containment.kind, forked=isinstance(process, Forked))
        return None

    def _begin(self, run: TaskRun, cell: Cell, launch: Launch, output: int) -> TaskProcess:
        """A fork of the fork server where it gives the task what `python script` would;
        else, or where it cannot, a spawn (said once a task, with why)."""
        if self.launch == "spawn":
            return self._spawn_from_thread(cell, launch, output)
        try:
            forks = self._fork_server()
            why = forks.refusal(launch.env)
            if why is None:
                return forks.start(launch.script, launch.cwd, launch.env, cell.join_files,
                                   output)
        except ForkServerUnavailable as exc:
            why = str(exc)
            cell.kill()  # anything of the task the server may have started before it went
        log.info("task_spawned_not_forked", task=run.name, reason=why)
        return self._spawn_from_thread(cell, launch, output)

    def _fork_server(self) -> ForkServer:
        """The fork server, started (again, if it ended) now."""
        if self._forks is not None and not self._forks.alive():
            log.warning("fork_server_restarted", code=self._forks.process.poll())
            self._forks.close()
            self._forks = None
        if self._forks is None:
            try:
                self._forks = ForkServer(lambda: self.on_exit())
            except OSError as exc:
                raise ForkServerUnavailable(f"the fork server could not start: {exc}") \
                    from exc
        return self._forks

    def _spawn_from_thread(self, cell: Cell, launch: Launch, output: int) -> TaskProcess:
        if not cell.join_files:
            return self._spawn(cell, launch, output)
        # From a thread of its own, never the main one: while a thread of the agent is in a
        # cell, memory the agent allocates is charged to the cell if that thread is the one
        # the kernel charges the process's memory to (its mm's owner, the main thread), and
        # could meet the task's limit.
        if self._spawner is None:
            self._spawner = ThreadPoolExecutor(1, thread_name_prefix="spawn")
        return self._spawner.submit(self._spawn, cell, launch, output).result()

    @staticmethod
    def _spawn(cell: Cell, launch: Launch, output: int) -> subprocess.Popen[bytes]:
        """`python script`, born in its cell: where the cgroup moves one thread (v1) the
        spawning thread steps into the cell for the spawn, so Python can vfork with no code run
        between fork and exec (about 2.7 ms a task less than a fork with a preexec_fn on
        this project's machine);
        else the child joins the cell between fork and exec."""
        entered = cell.enter()
        setup = ChildSetup(cell.join_files) if cell.join_files and not entered else None
        try:
            return subprocess.Popen(
                [sys.executable, str(launch.script)], cwd=launch.cwd, env=launch.env,
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=setup)
        finally:
            if entered:
                cell.leave()
            if setup is not None:
                setup.close()

    def close(self) -> None:
        """At the owner's exit: the fork server and the keeper go, ending whatever is left."""
        if self._forks is not None:
            self._forks.close()
            self._forks = None
        if self._spawner is not None:
            self._spawner.shutdown(wait=False)
            self._spawner = None
        if self._keeper is not None:
            self._keeper.close()

    def kill(self, name: str, reason: str, attempt: int | None = None,
             severity: Severity = Severity.TERMINATED, cause: str = "killed") -> None:
        entry = self.running.get(name)
        if entry is None or entry.kill_reason is not None:
            return
        if attempt is not None and entry.run.attempt > attempt:
            return  # meant for an older attempt than the one running here
        if entry.process.poll() is not None:
            return  # it ended on its own before the kill: its own result stands
        entry.kill_reason = reason
        entry.kill_cause = cause
        entry.kill_severity = severity
        # A task over its memory goes at once: a grace period is time to take the machine.
        over_memory = severity is Severity.FATAL
        entry.kill_deadline = time.time() + (0 if over_memory else self.kill_grace)
        log.info("task_killing", task=name, reason=reason)
        self._signal(entry, signal.SIGKILL if over_memory else signal.SIGTERM)

    def kill_all(self, reason: str) -> None:
        for name in list(self.running):
            self.kill(name, reason)

    def reap(self) -> list[Finished]:
        """Collect exited tasks; escalate to SIGKILL where the grace period ran out."""
        finished = []
        now = time.time()
        for name, entry in list(self.running.items()):
            code = entry.process.poll()
            if code is None:
                self._enforce(name, entry, now)
                continue
            del self.running[name]
            if self._keeper is not None:
                self._keeper.ended(entry.process.pid)
            # The group, and the cell, may still hold processes the script left behind
            # (a daemon it detached): end them too.
            self._signal(entry, signal.SIGKILL)
            entry.cell.kill()
            finished.append(self._outcome(entry, code))
            entry.cell.remove()
        return finished

    def _enforce(self, name: str, entry: Running, now: float) -> None:
        if entry.kill_deadline is not None:
            if now > entry.kill_deadline:
                self._signal(entry, signal.SIGKILL)
                entry.cell.kill()
            return
        timeout = entry.run.timeout
        if timeout is not None and now - entry.started > timeout:
            self.kill(name, f"it ran longer than its timeout of {timeout:g} s", cause="timeout")
        elif entry.memory_limit_mb is not None and now >= entry.next_memory_check:
            entry.next_memory_check = now + MEMORY_POLL_SECONDS
            used = group_rss_mb(entry.process.pid)
            if used > entry.memory_limit_mb:
                self.kill(name, f"it used {used:.0f} MB, more than the {entry.run.memory:g} MB "
                                f"it asked for times the node's margin of "
                                f"{self.memory_margin:g}", severity=Severity.FATAL,
                          cause="memory")

    def _outcome(self, entry: Running, code: int) -> Finished:
        run = entry.run
        kernel_limit = entry.cell.memory_limit_mb()
        if isinstance(entry.process, Forked) and entry.process.lost:
            result = Finished(run.name, run.attempt, Severity.TERMINATED,
                              "ended: the node's fork server, which watched it, died",
                              "killed")
        elif entry.kill_reason is None and kernel_limit is not None and entry.cell.oom_kills():
            result = Finished(run.name, run.attempt, Severity.FATAL,
                              f"killed by the kernel: it went over its memory limit of "
                              f"{kernel_limit:.0f} MB (the {run.memory:g} MB it asked for "
                              f"times the node's margin of {self.memory_margin:g})", "memory")
        elif entry.kill_reason is not None:
            result = Finished(run.name, run.attempt, entry.kill_severity,
                              f"killed: {entry.kill_reason}", entry.kill_cause)
        elif code == 0:
            result = Finished(run.name, run.attempt, Severity.OK, None)
        elif code < 0:
            result = Finished(run.name, run.attempt, Severity.TERMINATED,
                              f"the process died of signal {_signal_name(-code)}",
                              "signal")
        else:
            result = Finished(run.name, run.attempt, Severity.FATAL,
                              f"the script exited with status {code}", "exit")
        log.info("task_process_exited", task=run.name, code=code, success=result.success.value,
                 seconds=round(time.time() - entry.started, 3))
        return result

    @staticmethod
    def _signal(entry: Running, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(entry.process.pid, signum)


def _signal_name(number: int) -> str:
    # signal.Signals names only SIGRTMIN and SIGRTMAX of the real-time range: a task that
    # died of SIGRTMIN+1 must still be reported, not crash the reaper.
    try:
        return signal.Signals(number).name
    except ValueError:
        rtmin = int(signal.SIGRTMIN)
        return f"SIGRTMIN+{number - rtmin}" if number > rtmin else f"{number}"
