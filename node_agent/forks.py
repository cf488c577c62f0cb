"""The agent's side of its fork server (forkserver.py): tasks start as forks of one warm
interpreter, which saves the 22-25 ms of CPU an interpreter's start costs, a task.

One server per agent, started at the first task and again if it died; one thread reads what
it says: the pid of each child it started (or why not), then each child's exit status, which
it records on the child's handle and passes on at once (`on_exit`), as the pidfd watcher does
for spawned tasks. A task whose environment would start an interpreter otherwise than the
server's (a PYTHON* variable, or the locale, differs; PYTHONUNBUFFERED aside, which the child
honours) cannot be a fork of it: `refusal` says why, and the supervisor spawns it.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vespid.shared.errors import ForkServerUnavailable
from vespid.shared.logs import get_logger

log = get_logger(__name__)
SERVER_FILE = Path(__file__).with_name("forkserver.py")
REPLY_SECONDS = 30.0
LOCALE_VARIABLES = ("LANG", "LC_ALL", "LC_CTYPE")
LOST_STATUS = -int(signal.SIGKILL)  # the reaper ends a task whose status was lost


class Forked:
    """A task's process started by the fork server: what the supervisor uses of a Popen."""

    def __init__(self) -> None:
        self.pid = 0  # known once the server answers
        self.returncode: int | None = None
        self.lost = False  # the server died first: the status is unknown
        self._ended = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"task process {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)

    def end(self, code: int, lost: bool = False) -> None:
        self.lost = lost
        self.returncode = code
        self._ended.set()


def startup_variables(env: dict[str, str]) -> dict[str, str]:
    """The variables that shape an interpreter's start, PYTHONUNBUFFERED aside."""
    return {key: value for key, value in env.items()
            if (key.startswith("PYTHON") and key != "PYTHONUNBUFFERED")
            or key in LOCALE_VARIABLES}


class ForkServer:
    """One running fork server and the thread that listens to it."""

    def __init__(self, on_exit: Callable[[], None]) -> None:
        self.on_exit = on_exit
        self.startup = startup_variables(dict(os.environ))  # what the server starts with
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [sys.executable, str(SERVER_FILE), str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.channel = ours
        self.null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.children: dict[int, Forked] = {}  # request id -> its child
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lock = threading.Lock()  # one request at a time, so the next reply is its
        self.next_id = 0
        self.gone = False
        threading.Thread(target=self._listen, daemon=True, name="fork-server").start()
        log.info("fork_server_started", pid=self.process.pid)

    def alive(self) -> bool:
        return not self.gone and self.process.poll() is None

    def refusal(self, env: dict[str, str]) -> str | None:
        """Why a task with this environment cannot be a fork of the server (None: it can)."""
        wanted = startup_variables(env)
        differ = sorted(key for key in wanted.keys() | self.startup.keys()
                        if wanted.get(key) != self.startup.get(key))
        if differ:
            return (f"its environment sets {', '.join(differ)} otherwise than the node "
                    f"agent's, and an interpreter reads them at its start")
        return None

    def start(self, script: Path, cwd: Path, env: dict[str, str], join: list[Path],
              output: int) -> Forked:
        """Fork a child for the task; OSError: it cannot start (its setup failed);
        ForkServerUnavailable: the server cannot fork it (the caller spawns it instead)."""
        with self.lock:
            self.next_id += 1
            ident = self.next_id
            forked = self.children[ident] = Forked()
            request = marshal.dumps({"id": ident, "script": str(script), "cwd": str(cwd),
                                     "env": env, "join": [str(path) for path in join]})
            try:
                socket.send_fds(self.channel, [request], [self.null, output, output])
            except OSError as exc:
                del self.children[ident]
                raise ForkServerUnavailable(f"the fork server took no request: {exc}") \
                    from exc
            reply = self._reply()
        if "pid" not in reply:
            self.children.pop(ident, None)
            if "gone" in reply:
                raise ForkServerUnavailable("the fork server ended before it answered")
            raise OSError(reply["error"])
        forked.pid = reply["pid"]
        return forked

    def _reply(self) -> dict[str, Any]:
        try:
            return self.replies.get(timeout=REPLY_SECONDS)
        except queue.Empty:
            self.process.kill()  # stuck: the next task starts another
            return {"gone": True}

    def _listen(self) -> None:
        """Replies to the waiting `start`, exit statuses to their handles; at the server's
        end, every child it still watched is lost (the reaper ends what is left of it)."""
        while True:
            try:
                data = self.channel.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            message = marshal.loads(data)
            if "exit" not in message:
                self.replies.put(message)
                continue
            forked = self.children.pop(message["id"], None)
            if forked is not None:
                forked.end(message["exit"])
                self.on_exit()
        self.gone = True
        self.replies.put({"gone": True})
        lost = list(self.children.values())
        self.children.clear()
        for forked in lost:
            if forked.pid:
                forked.end(LOST_STATUS, lost=True)
        if lost:
            log.warning("fork_server_ended", code=self.process.poll(), tasks_lost=len(lost))
            self.on_exit()

    def close(self) -> None:
        """At the agent's exit: the server ends what still runs and exits."""
        with contextlib.suppress(OSError):
            self.channel.shutdown(socket.SHUT_RDWR)
        self.channel.close()
        os.close(self.null)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
