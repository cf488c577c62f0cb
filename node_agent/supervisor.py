"""Starting, watching and killing task processes. No broker code here.

Each task runs as `sys.executable script.py` in its own process group (so a kill reaches
everything it spawned) with the parent-death signal set (so it dies if the agent is
SIGKILLed). Its stdout and stderr go to the task's log file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vespid.shared.logs import get_logger
from vespid.shared.protocol import Severity, TaskRun

log = get_logger(__name__)
PR_SET_PDEATHSIG = 1


@dataclass
class Running:
    run: TaskRun
    process: subprocess.Popen[bytes]
    started: float
    kill_reason: str | None = None
    kill_deadline: float | None = None


@dataclass(frozen=True)
class Finished:
    name: str
    attempt: int
    success: Severity
    message: str | None


@dataclass
class Launch:
    """Where and how to start one task; the agent works these out from its settings."""

    script: Path
    cwd: Path
    env: dict[str, str]
    log_file: Path


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGKILL it when the agent
    # dies, however it dies.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Supervisor:
    kill_grace: float
    running: dict[str, Running] = field(default_factory=dict)

    def start(self, run: TaskRun, launch: Launch) -> Finished | None:
        """Start a task; a task that cannot start is returned as finished (fatal)."""
        try:
            launch.log_file.parent.mkdir(parents=True, exist_ok=True)
            with launch.log_file.open("ab") as log_handle:
                process = subprocess.Popen(
                    [sys.executable, str(launch.script)], cwd=launch.cwd, env=launch.env,
                    stdin=subprocess.DEVNULL, stdout=log_handle, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=_die_with_parent,
                )
        except OSError as exc:
            message = f"could not start the task: {exc}"
            log.error("task_start_failed", task=run.name, error=str(exc))
            return Finished(run.name, run.attempt, Severity.FATAL, message)
        self.running[run.name] = Running(run, process, time.time())
        log.info("task_process_started", task=run.name, pid=process.pid, attempt=run.attempt)
        return None

    def kill(self, name: str, reason: str) -> None:
        entry = self.running.get(name)
        if entry is None or entry.kill_reason is not None:
            return
        entry.kill_reason = reason
        entry.kill_deadline = time.time() + self.kill_grace
        log.info("task_killing", task=name, reason=reason)
        self._signal(entry, signal.SIGTERM)

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
                if entry.kill_deadline is not None and now > entry.kill_deadline:
                    self._signal(entry, signal.SIGKILL)
                continue
            del self.running[name]
            # The group may still hold processes the script left behind: end them too.
            self._signal(entry, signal.SIGKILL)
            finished.append(self._outcome(entry, code))
        return finished

    def _outcome(self, entry: Running, code: int) -> Finished:
        run = entry.run
        if entry.kill_reason is not None:
            result = Finished(run.name, run.attempt, Severity.TERMINATED,
                              f"killed: {entry.kill_reason}")
        elif code == 0:
            result = Finished(run.name, run.attempt, Severity.OK, None)
        elif code < 0:
            result = Finished(run.name, run.attempt, Severity.TERMINATED,
                              f"the process died of signal {signal.Signals(-code).name}")
        else:
            result = Finished(run.name, run.attempt, Severity.FATAL,
                              f"the script exited with status {code}")
        log.info("task_process_exited", task=run.name, code=code, success=result.success.value,
                 seconds=round(time.time() - entry.started, 3))
        return result

    @staticmethod
    def _signal(entry: Running, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(entry.process.pid, signum)
