"""The fork server: tasks start as forks of one warm interpreter instead of a new one each.

A `python script` costs about 22-25 ms of CPU before the script's first line: on this
project's 2-core machine, more than the agent, the coordinator and the broker spend on a task
together. A fork of a small idle interpreter costs about 1 ms. The agent (forks.py) starts one
of these per agent, at its first task, as

    python <this file> <fd of its end of a Unix SOCK_SEQPACKET socketpair>

run as a file, not as a module of the package, so that the children hold only the few
standard modules imported here. One request a task (marshal: id, script, cwd, env, the cell's
join files; with three fds: stdin, stdout, stderr); for each, one answer with the child's pid
or why it could not start, and later one with its exit status as Popen.returncode gives it
(negative: a signal), which only this process, the child's parent, can learn.

Each child, before the script's first line: puts the fds on 0, 1 and 2 and closes every
other, joins its cell (cgroup: it is the only process there is to move), starts its own
session, takes the default signal handling back, goes to its folder and takes the task's
environment exactly; then tells the server it is ready (or why not, in its log too, and
exits with SETUP_FAILED). It runs the script as `python script` would: as `__main__`, with
`sys.argv == [script]`, `sys.path[0]` the script's folder, stdout and stderr unbuffered under
PYTHONUNBUFFERED, and the interpreter's own ends (SystemExit; an uncaught exception's
traceback and status 1; KeyboardInterrupt as death by SIGINT; threads joined, atexit run).
The known differences: every child has the server's hash seed (str hashes, set order), which
a fork cannot draw again; objects reachable only from modules the server imported are not
finalized at the end; `ps` shows the server's command line.

It ignores SIGINT, SIGTERM and SIGHUP (it is in its own session; the agent, which drains,
is the one they are meant for). When the agent's end of the socket closes (it exited, or
died), it ends the process group of every task still running and exits; the keeper ends
the cells.
"""

from __future__ import annotations

import builtins
import gc
import io
import marshal
import os
import selectors
import signal
import socket
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is one more module in every task: for the type checker only
    from collections.abc import Callable
    from types import TracebackType
    from typing import Any, NoReturn, TextIO

MAX_REQUEST = 1024 * 1024
SETUP_FAILED = 126  # a child's status when it could not be readied for its script
OWN_FILE = os.path.abspath(__file__)
# Run as a file, this module's loader is a SourceFileLoader: what `python script` gives its
# script's __main__.
_LOADER = type(globals()["__loader__"])
_server_module = sys.modules[__name__]  # kept alive once the child's __main__ replaces it


class SetupFailed(Exception):
    """A child could not be readied for its script; the message says why."""


# ---- the server -------------------------------------------------------------------------
class Server:
    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.selector = selectors.DefaultSelector()
        self.selector.register(channel, selectors.EVENT_READ)
        self.children: dict[int, tuple[int, int]] = {}  # pidfd -> (request id, pid)

    def serve(self) -> str | None:
        """Answer requests until the agent goes (None); in a forked child, its script."""
        while True:
            for key, _events in self.selector.select():
                if key.fileobj is not self.channel:
                    self._reap(key.fd)
                    continue
                try:
                    data, fds, _flags, _address = socket.recv_fds(self.channel, MAX_REQUEST, 3)
                except OSError:  # the agent died with our messages unread: reset, not EOF
                    data, fds = b"", []
                if not data:
                    self._end_children()
                    return None
                script = self._start(marshal.loads(data), fds)
                if script is not None:
                    return script

    def _start(self, request: dict[str, Any], fds: list[int]) -> str | None:
        """Fork a child for the request; in the child, its script once it is ready. The
        server waits for that (a pipe the child closes, or writes why not to) so the agent
        learns of a task that cannot start as it does from Popen: at once."""
        ident = request["id"]
        ready_read, ready_write = os.pipe2(os.O_CLOEXEC)
        gc.freeze()  # the child's collections leave the server's objects (and pages) alone
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (*fds, ready_read, ready_write):
                os.close(fd)
            self._say({"id": ident, "error": f"could not fork: {exc}"})
            return None
        if pid == 0:
            os.close(ready_read)
            self._become_task(request, fds, ready_write)
            return str(request["script"])
        gc.unfreeze()  # the server's own garbage stays collectable
        for fd in (*fds, ready_write):
            os.close(fd)
        with open(ready_read, "rb") as ready:
            problem = ready.read().decode(errors="replace")
        if problem:
            os.waitpid(pid, 0)
            self._say({"id": ident, "error": problem})
            return None
        pidfd = os.pidfd_open(pid)  # a child that already exited is still a zombie: fine
        self.children[pidfd] = (ident, pid)
        self.selector.register(pidfd, selectors.EVENT_READ)
        self._say({"id": ident, "pid": pid})
        return None

    def _become_task(self, request: dict[str, Any], fds: list[int], ready: int) -> None:
        """In the child: everything before the script's first line, then say so."""
        self.selector.close()
        self.channel.close()
        for pidfd in self.children:
            os.close(pidfd)
        try:
            set_up(request, fds, ready)
        except SetupFailed as exc:
            message = str(exc)
            with _suppress_os_error():
                os.write(2, f"vespid: the task could not start: {message}\n".encode())
            with _suppress_os_error():
                os.write(ready, message.encode())
            os._exit(SETUP_FAILED)
        os.close(ready)

    def _reap(self, pidfd: int) -> None:
        ident, pid = self.children.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _pid, status = os.waitpid(pid, 0)
        self._say({"id": ident, "pid": pid, "exit": os.waitstatus_to_exitcode(status)})

    def _say(self, message: dict[str, Any]) -> None:
        # The agent gone: the next read of the channel is its end, which ends this loop.
        with _suppress_os_error():
            self.channel.send(marshal.dumps(message))

    def _end_children(self) -> None:
        for _ident, pid in self.children.values():
            with _suppress_os_error():
                os.killpg(pid, signal.SIGKILL)


class _suppress_os_error:  # contextlib would be one more module in every task
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> bool:
        return kind is not None and issubclass(kind, OSError)


# ---- in the child, before the script ----------------------------------------------------
def set_up(request: dict[str, Any], fds: list[int], ready: int) -> None:
    """Output first (so what goes wrong after is in the task's log), then its cell, session,
    signals, folder and environment."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, ready)
    os.closerange(ready + 1, os.sysconf("SC_OPEN_MAX"))
    for path in request["join"]:
        try:
            cell = os.open(path, os.O_WRONLY)
            try:
                os.write(cell, b"0")
            finally:
                os.close(cell)
        except OSError as exc:
            raise SetupFailed(f"could not join its cgroup ({path}): {exc}") from exc
    os.setsid()
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    try:
        os.chdir(request["cwd"])
    except OSError as exc:
        raise SetupFailed(str(exc)) from exc
    os.environ.clear()
    os.environ.update(request["env"])
    if "time" in sys.modules:  # its idea of the time zone comes from TZ, maybe changed
        sys.modules["time"].tzset()


def _stream(fd: int, name: str, like: TextIO | None, unbuffered: bool) -> io.TextIOWrapper:
    """A standard stream as the interpreter makes it at start (Python/pylifecycle.c)."""
    write = fd != 0
    raw = io.FileIO(fd, "wb" if write else "rb", closefd=False)
    raw.name = name  # the interpreter names them so too
    buffer: Any = raw
    if not (unbuffered and write):
        buffer = io.BufferedWriter(raw) if write else io.BufferedReader(raw)
    text = io.TextIOWrapper(
        buffer, encoding=like.encoding if like else "utf-8",
        errors=like.errors if like else "strict", newline="\n",
        line_buffering=not unbuffered and (fd == 2 or raw.isatty()), write_through=unbuffered)
    text.mode = "w" if write else "r"  # type: ignore[misc]
    return text


def _standard_streams() -> None:
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        stream = _stream(fd, f"<{name}>", getattr(sys, f"__{name}__"), unbuffered)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


# ---- in the child: the script -----------------------------------------------------------
def run(script: str) -> NoReturn:
    """Run the script as `python script`, and end as the interpreter would."""
    _standard_streams()
    sys.argv[:] = [script]
    sys.orig_argv[:] = [sys.executable, script]
    sys.path[0] = os.path.dirname(os.path.realpath(script))  # was this file's folder
    sys.path_importer_cache.clear()
    main = type(sys)("__main__")
    main.__dict__.update(__file__=script, __cached__=None, __builtins__=builtins,
                         __loader__=_LOADER("__main__", script))
    sys.modules["__main__"] = main
    server_modules = set(sys.modules)
    try:
        with open(script, "rb") as handle:
            source = handle.read()
    except OSError as exc:
        sys.stderr.write(f"{sys.executable}: can't open file {script!r}: "
                         f"[Errno {exc.errno}] {exc.strerror}\n")
        _finish(2, server_modules)
    try:
        # dont_inherit: this file's `from __future__` must not reach the script.
        exec(compile(source, script, "exec", dont_inherit=True), main.__dict__)
    except SystemExit as exc:
        _finish(_exit_status(exc), server_modules)
    except KeyboardInterrupt as exc:
        _report(exc)
        _finish(None, server_modules)
    except BaseException as exc:  # noqa: BLE001 - what the interpreter does with any other
        _report(exc)
        _finish(1, server_modules)
    _finish(0, server_modules)


def _exit_status(exc: SystemExit) -> int:
    """What the interpreter makes of an uncaught SystemExit (Python/pythonrun.c)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    with _suppress_os_error():
        sys.stderr.write(f"{exc.code}\n")
    return 1


def _report(exc: BaseException) -> None:
    """The traceback the interpreter prints, without this file's frames."""
    traceback = exc.__traceback__
    while traceback is not None and traceback.tb_frame.f_code.co_filename == OWN_FILE:
        traceback = traceback.tb_next
    exc.__traceback__ = traceback
    sys.excepthook(type(exc), exc, traceback)


def _finish(status: int | None, server_modules: set[str]) -> NoReturn:
    """The interpreter's end (Py_FinalizeEx), for what the script made: threads joined,
    atexit run, then the script's modules and __main__ cleared as the interpreter clears
    them (their objects' finalizers run: an unclosed file is flushed), a collection, the
    standard streams flushed (120 if they cannot be). Not the server's own objects: tearing
    those down would copy every page the child shares with the server, which was 7-10 ms a
    task. None: die of SIGINT, as after an uncaught KeyboardInterrupt."""
    threading = sys.modules.get("threading")
    if threading is not None:
        _reporting(threading._shutdown)
    import atexit
    atexit._run_exitfuncs()
    _reporting(lambda: _clear_modules(server_modules))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = 120 if status is not None else status
    if status is None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        status = 128 + signal.SIGINT  # not reached: the signal ends it
    os._exit(status & 0xFF)


def _reporting(step: Callable[[], object]) -> None:
    """A step of the end: what goes wrong is printed, and the end goes on (as the
    interpreter's own)."""
    try:
        step()
    except BaseException as exc:  # noqa: BLE001 - every error at the end is only reported
        _report(exc)


def _clear_modules(server_modules: set[str]) -> None:
    made = [name for name in sys.modules if name not in server_modules]
    for name in [*reversed(made), "__main__"]:
        module = sys.modules.pop(name, None)
        # sys.modules may hold anything: only a module's own dict is cleared
        if isinstance(module, type(sys)) and type(module.__dict__) is dict:
            _clear(module.__dict__)
    del module
    gc.collect()


def _clear(namespace: dict[str, Any]) -> None:
    """As _PyModule_ClearDict: names with one leading underscore first, then the others."""
    for first in (True, False):
        for key in list(namespace):
            single = key[:1] == "_" and key[1:2] != "_"
            if key != "__builtins__" and (single or not first):
                namespace[key] = None


def main(argv: list[str]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    script = Server(socket.socket(fileno=int(argv[0]))).serve()
    if script is not None:
        run(script)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
