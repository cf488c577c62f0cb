"""Starting, watching and killing task processes. No broker code here.

Each attempt runs with the agent's own Python in its own process group and, where the
machine allows, its own cgroup (containment.py), so ending it ends everything it spawned,
even processes that called setsid or double-forked. If the agent dies, even by SIGKILL, the
kernel sends the task the parent-death signal; a small bootstrap that runs before the script
turns it into SIGKILL for the whole cgroup (else the whole group), so no grandchild (a
compiler, a test runner, a build daemon) is left orphaned. Its stdout and stderr go to the
attempt's log file. Running time (`timeout`) and memory (what the task asked for times a
margin: the kernel's limit in the cgroup, else the polled resident memory of the group) are
enforced here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vespid.node_agent.containment import Cell, Containment, NoCell, ProcessGroupOnly
from vespid.shared.logs import get_logger
from vespid.shared.protocol import Severity, TaskRun

log = get_logger(__name__)
PR_SET_PDEATHSIG = 1
DEATH_SIGNAL = signal.SIGUSR2
MEMORY_POLL_SECONDS = 0.5
# Runs as `python -c BOOTSTRAP CELL script`: the script sees itself as __main__ with its own
# folder first on sys.path, as `python script` would give it. CELL says how to end the whole
# cgroup when the agent dies: `kill:<cgroup.kill>`, `procs:<cgroup.procs>`, or `-` (none).
BOOTSTRAP = (
    "import os, runpy, signal, sys\n"
    "cell = sys.argv[1]\n"
    "def end(*_):\n"
    "    if cell.startswith('kill:'):\n"
    "        try:\n"
    "            open(cell[5:], 'w').write('1')\n"
    "        except OSError:\n"
    "            pass\n"
    "    for _ in range(50 if cell.startswith('procs:') else 0):\n"
    "        try:\n"
    "            pids = [int(p) for p in open(cell[6:]).read().split()]\n"
    "        except (OSError, ValueError):\n"
    "            break\n"
    "        others = [p for p in pids if p != os.getpid()]\n"
    "        if not others:\n"
    "            break\n"
    "        for pid in others:\n"
    "            try:\n"
    "                os.kill(pid, signal.SIGKILL)\n"
    "            except OSError:\n"
    "                pass\n"
    "    os.killpg(0, signal.SIGKILL)\n"
    "signal.signal(signal.SIGUSR2, end)\n"
    "sys.argv = sys.argv[2:]\n"
    "sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@dataclass
class Running:
    run: TaskRun
    process: subprocess.Popen[bytes]
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


def _child_setup(join_files: list[Path]) -> Callable[[], None]:
    """What runs in the child between fork and exec: join the attempt's cgroup before the
    script can start anything, and ask the kernel to signal it when the agent dies, however
    it dies (the bootstrap then ends the whole cgroup, or group)."""
    def setup() -> None:
        for procs in join_files:
            with open(procs, "w") as handle:
                handle.write("0")
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, DEATH_SIGNAL)

    return setup


def _cell_spec(cell: Cell) -> str:
    if cell.kill_file is not None:
        return f"kill:{cell.kill_file}"
    return f"procs:{cell.procs_file}" if cell.procs_file is not None else "-"


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


@dataclass
class Supervisor:
    kill_grace: float
    memory_margin: float = 1.5
    containment: Containment = field(default_factory=ProcessGroupOnly)
    running: dict[str, Running] = field(default_factory=dict)
    # Called from a watcher thread as soon as a task's process exits, so the owner's loop
    # reaps it now rather than at its next poll (which was 0.2 s: a slot stood empty that
    # long after every task, and short tasks ran at a tenth of the machine's rate).
    on_exit: Callable[[], None] = lambda: None

    def start(self, run: TaskRun, launch: Launch) -> Finished | None:
        """Start a task; a task that cannot start is returned as finished (fatal)."""
        limit = run.memory * self.memory_margin if run.memory else None
        cell: Cell = NoCell()
        try:
            cell = self.containment.cell(f"{run.name}-a{run.attempt}", limit)
            launch.log_file.parent.mkdir(parents=True, exist_ok=True)
            with launch.log_file.open("ab") as log_handle:
                process = subprocess.Popen(
                    [sys.executable, "-c", BOOTSTRAP, _cell_spec(cell), str(launch.script)],
                    cwd=launch.cwd, env=launch.env,
                    stdin=subprocess.DEVNULL, stdout=log_handle, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=_child_setup(cell.join_files),
                )
        except (OSError, subprocess.SubprocessError) as exc:
            cell.remove()
            message = f"could not start the task: {exc}"
            log.error("task_start_failed", task=run.name, error=str(exc))
            return Finished(run.name, run.attempt, Severity.FATAL, message, "start")
        polled = None if cell.memory_limit_mb() is not None else limit
        self.running[run.name] = Running(run, process, time.time(), cell, polled)
        threading.Thread(target=self._watch, args=(process,), daemon=True,
                         name=f"watch-{run.name}").start()
        log.info("task_process_started", task=run.name, pid=process.pid, attempt=run.attempt,
                 contained=self.containment.kind)
        return None

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        # Popen serialises waitpid: reap()'s poll() sees the exit code once this returns.
        process.wait()
        self.on_exit()

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
        if entry.kill_reason is None and kernel_limit is not None and entry.cell.oom_kills():
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
