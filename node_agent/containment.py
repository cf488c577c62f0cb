"""Keeping every process of a task in one place the agent can end: a cgroup per attempt.

A process group is not enough: build tools leave it on purpose (Gradle daemons, sccache
servers, MSBuild node reuse call setsid or double-fork), and it then outlives the task. A
cgroup holds every descendant however it detaches, so ending a task ends all of it, and the
kernel enforces the memory limit instead of a poll that a short spike slips past.

Three ways, the best the machine allows, chosen once at agent start:
- cgroup v2 (a unified hierarchy at /sys/fs/cgroup): one cgroup per attempt, `cgroup.kill`
  to end it, `memory.max` where the memory controller can be delegated to it;
- cgroup v1 (this project's machines): the freezer hierarchy to stop and end every process
  at once, memory (`memory.limit_in_bytes`) and pids for accounting;
- neither writable: the task's process group alone, as before, and the agent says once what
  is not contained.

Cells live under `<agent's own cgroup>/vespid-<node>/<agent pid>/`, so two agents never touch
each other's, and a restarted agent ends what a killed one left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("freezer", "memory", "pids")
FREEZE_WAIT_SECONDS = 2.0


class Cell(Protocol):
    """The processes of one attempt of one task."""

    @property
    def join_files(self) -> list[Path]:
        """Where a process writes "0" to join the cell, one per hierarchy ([]: no cgroup)."""

    @property
    def procs_file(self) -> Path | None:
        """The list of every process in the cell (None: there is no cgroup)."""

    @property
    def kill_file(self) -> Path | None:
        """Writing "1" there kills the whole cell (cgroup v2), else None."""

    def enter(self) -> bool:
        """Move the calling thread into the cell, so that a child it spawns is born there
        (and the spawn needs no code between fork and exec: Python can vfork); False where
        the hierarchy moves whole processes only (then the child joins `join_files`)."""

    def leave(self) -> None:
        """Move the calling thread back where it was before `enter`."""

    def kill(self) -> None: ...
    def pids(self) -> list[int]: ...
    def oom_kills(self) -> int: ...
    def memory_limit_mb(self) -> float | None: ...
    def remove(self) -> None: ...


class Containment(Protocol):
    @property
    def kind(self) -> str:
        """"cgroup-v2", "cgroup-v1" or "process-group"."""

    @property
    def contains_detached(self) -> bool:
        """Whether it ends processes that left the task's process group."""

    @property
    def kernel_memory_limit(self) -> bool:
        """Whether the kernel enforces the memory limit (else the agent polls RSS)."""

    def cell(self, name: str, memory_limit_mb: float | None) -> Cell: ...
    def sweep(self) -> int: ...
    def end_all(self) -> int: ...
    def spec(self) -> dict[str, Any]: ...
    def release(self) -> None: ...


def describe(containment: Containment) -> str:
    """What is and is not contained, in one sentence for the agent's start."""
    if not containment.contains_detached:
        return ("no writable cgroup: each task runs in its own process group only, so a "
                "process that leaves it (setsid, a double fork, a build daemon) outlives the "
                "task, and memory is enforced by polling resident memory")
    memory = ("the kernel enforces each task's memory limit" if containment.kernel_memory_limit
              else "memory is enforced by polling resident memory (no memory controller)")
    return (f"{containment.kind}: every process a task starts, detached or not, ends with "
            f"the task; {memory}")


# ---- no cgroup --------------------------------------------------------------------------
@dataclass
class NoCell:
    join_files: list[Path] = field(default_factory=list)
    procs_file: Path | None = None
    kill_file: Path | None = None

    def enter(self) -> bool:
        return False

    def leave(self) -> None:
        return None

    def kill(self) -> None:
        return None

    def pids(self) -> list[int]:
        return []

    def oom_kills(self) -> int:
        return 0

    def memory_limit_mb(self) -> float | None:
        return None

    def remove(self) -> None:
        return None


@dataclass
class ProcessGroupOnly:
    kind: str = "process-group"
    contains_detached: bool = False
    kernel_memory_limit: bool = False

    def cell(self, name: str, memory_limit_mb: float | None) -> Cell:
        return NoCell()

    def sweep(self) -> int:
        return 0

    def end_all(self) -> int:
        return 0

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def release(self) -> None:
        return None


def revive(spec: dict[str, Any]) -> Containment:
    """The containment a `spec()` describes, in another process (the keeper)."""
    if spec["kind"] == "cgroup-v1":
        return CgroupV1({c: Path(p) for c, p in spec["bases"].items()})
    if spec["kind"] == "cgroup-v2":
        return CgroupV2(Path(spec["base"]))
    return ProcessGroupOnly()


# ---- helpers ----------------------------------------------------------------------------
def _read_pids(procs: Path) -> list[int]:
    try:
        return [int(line) for line in procs.read_text().split()]
    except (OSError, ValueError):
        return []


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _wait_empty(procs: Path, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while _read_pids(procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _oom_kills(counters: Path) -> int:
    """The `oom_kill` counter of a memory.oom_control (v1) or memory.events (v2) file."""
    try:
        for line in counters.read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 0


def _rmdir(path: Path) -> None:
    try:  # a cell holds no folder of its own unless a task made one: one call, mostly
        os.rmdir(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    with contextlib.suppress(FileNotFoundError):
        for child in sorted(path.iterdir(), reverse=True):
            if child.is_dir():
                _rmdir(child)
        with contextlib.suppress(OSError):  # still busy: the next sweep takes it
            path.rmdir()


def _folders(path: Path) -> list[Path]:
    """The folders in `path`, by name; none if it is gone, even while being listed: a dead
    agent's keeper ends its cells while the agent started after it sweeps the same ones,
    and a folder one of them removes must not stop the other (a new agent that crashed
    there never shipped what its predecessor left)."""
    try:
        return sorted(child for child in path.iterdir() if child.is_dir())
    except FileNotFoundError:
        return []


def _rmdir_patiently(path: Path, seconds: float = 2.0) -> None:
    """Remove a folder whose cells were just removed: the kernel lets a cgroup go a moment
    after its last process and its last child cgroup went, and refuses until then."""
    deadline = time.monotonic() + seconds
    while path.exists() and time.monotonic() < deadline:
        _rmdir(path)
        if path.exists():
            time.sleep(0.02)


def own_cgroup(controller: str | None) -> str:
    """This process's cgroup path in a v1 hierarchy (`controller`) or in v2 (None)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _number, controllers, path = line.split(":", 2)
        if controller is None and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    raise LookupError(f"this process is in no {controller or 'cgroup v2'} hierarchy")


def _try_mkdir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        return os.access(path / "cgroup.procs", os.W_OK)
    except OSError:
        return False


def _stale(agent_dir: Path) -> bool:
    """An agent folder (named by its agent's pid) whose agent is gone. Pids are reused, so
    only a live process that is a vespid one still owns its folder."""
    if not agent_dir.name.isdigit() or int(agent_dir.name) == os.getpid():
        return False
    try:
        command = Path(f"/proc/{agent_dir.name}/cmdline").read_bytes()
    except OSError:
        return True
    return b"vespid" not in command


# ---- cgroup v1 --------------------------------------------------------------------------
@dataclass
class V1Cell:
    dirs: dict[str, Path]  # controller -> this cell's folder
    homes: dict[str, Path] = field(default_factory=dict)  # controller -> the agent's own

    def enter(self) -> bool:
        """cgroup v1 moves one thread through `tasks`: the agent's spawning thread steps in
        for the fork and out again; its memory stays charged where it was (v1 charges the
        memory of a process to its mm's owner, never to one of its threads)."""
        if not self.homes:
            return False
        thread = str(threading.get_native_id())
        try:
            for path in self.dirs.values():
                (path / "tasks").write_text(thread)
        except OSError:
            self.leave()
            return False
        return True

    def leave(self) -> None:
        thread = str(threading.get_native_id())
        for attempt in range(3):
            try:
                for home in self.homes.values():
                    (home / "tasks").write_text(thread)
                return
            except OSError:
                if attempt == 2:  # still in the cell, whose end would be this agent's end
                    raise

    @property
    def join_files(self) -> list[Path]:
        return [path / "cgroup.procs" for path in self.dirs.values()]

    @property
    def procs_file(self) -> Path | None:
        return self.dirs["freezer"] / "cgroup.procs"

    @property
    def kill_file(self) -> Path | None:
        return None

    def pids(self) -> list[int]:
        return _read_pids(self.dirs["freezer"] / "cgroup.procs")

    def kill(self) -> None:
        """Freeze, so nothing forks while we kill, kill everything, thaw: all gone."""
        freezer = self.dirs["freezer"]
        if not self.pids():  # gone or empty (the usual end): nothing can join it any more
            return
        state = freezer / "freezer.state"
        with contextlib.suppress(OSError):
            state.write_text("FROZEN")
            deadline = time.monotonic() + FREEZE_WAIT_SECONDS
            while state.read_text().strip() != "FROZEN" and time.monotonic() < deadline:
                time.sleep(0.005)
        for _ in range(5):  # a process that forked before the freeze took hold
            pids = self.pids()
            if not pids:
                break
            _kill_pids(pids)
        with contextlib.suppress(OSError):
            state.write_text("THAWED")  # a frozen process cannot act on SIGKILL
        _wait_empty(freezer / "cgroup.procs")

    def oom_kills(self) -> int:
        control = self.dirs.get("memory")
        return 0 if control is None else _oom_kills(control / "memory.oom_control")

    def memory_limit_mb(self) -> float | None:
        control = self.dirs.get("memory")
        if control is None:
            return None
        try:
            limit = int((control / "memory.limit_in_bytes").read_text())
        except (OSError, ValueError):
            return None
        return None if limit >= 1 << 60 else limit / (1024 * 1024)

    def remove(self) -> None:
        for path in self.dirs.values():
            _rmdir(path)


@dataclass
class CgroupV1:
    bases: dict[str, Path]  # controller -> <mount>/<own path>/vespid-<node>/<agent pid>
    kind: str = "cgroup-v1"
    contains_detached: bool = True
    kernel_memory_limit: bool = field(init=False)

    def __post_init__(self) -> None:
        self.kernel_memory_limit = "memory" in self.bases

    @classmethod
    def detect(cls, node: str, root: Path = CGROUP_ROOT) -> CgroupV1 | None:
        bases: dict[str, Path] = {}
        for controller in V1_CONTROLLERS:
            mount = root / controller
            if not (mount / "cgroup.procs").exists():
                continue
            try:
                own = own_cgroup(controller)
            except (LookupError, OSError):
                continue
            base = mount / own.lstrip("/") / f"vespid-{node}" / str(os.getpid())
            if _try_mkdir(base):
                bases[controller] = base
        return cls(bases) if "freezer" in bases else None

    def cell(self, name: str, memory_limit_mb: float | None) -> Cell:
        dirs = {controller: base / name for controller, base in self.bases.items()}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        if memory_limit_mb is not None and "memory" in dirs:
            limit = str(int(memory_limit_mb * 1024 * 1024))
            (dirs["memory"] / "memory.limit_in_bytes").write_text(limit)
            # memory + swap: a task cannot dodge its limit into swap (where swap is counted)
            with contextlib.suppress(OSError):
                (dirs["memory"] / "memory.memsw.limit_in_bytes").write_text(limit)
        # The agent's own folders, where a spawning thread goes back to (`leave`).
        homes = {controller: base.parent.parent for controller, base in self.bases.items()}
        return V1Cell(dirs, homes)

    def sweep(self) -> int:
        """End what agents that died left in their cells; returns how many processes."""
        ended = 0
        for agent_dir in _folders(self.bases["freezer"].parent):
            if _stale(agent_dir):
                ended += self._end_agent(agent_dir.name)
        return ended

    def end_all(self) -> int:
        """End every cell of this agent (the keeper, once the agent is gone)."""
        ended = self._end_agent(self.bases["freezer"].name)
        for base in self.bases.values():
            with contextlib.suppress(OSError):
                base.parent.rmdir()  # the node's folder, when no other agent uses it
        return ended

    def _end_agent(self, agent: str) -> int:
        ended = 0
        for cell_dir in _folders(self.bases["freezer"].parent / agent):
            cell = V1Cell({c: b.parent / agent / cell_dir.name for c, b in self.bases.items()})
            ended += len(cell.pids())
            cell.kill()
            cell.remove()
        for base in self.bases.values():
            _rmdir_patiently(base.parent / agent)
        return ended

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "bases": {c: str(p) for c, p in self.bases.items()}}

    def release(self) -> None:
        """At agent exit: remove this agent's (empty) folders."""
        for base in self.bases.values():
            _rmdir(base)
            with contextlib.suppress(OSError):
                base.parent.rmdir()  # the node's folder, when no other agent uses it


# ---- cgroup v2 --------------------------------------------------------------------------
@dataclass
class V2Cell:
    path: Path

    @property
    def join_files(self) -> list[Path]:
        return [self.path / "cgroup.procs"]

    @property
    def procs_file(self) -> Path | None:
        return self.path / "cgroup.procs"

    @property
    def kill_file(self) -> Path | None:
        kill = self.path / "cgroup.kill"
        return kill if kill.exists() else None

    def pids(self) -> list[int]:
        return _read_pids(self.path / "cgroup.procs")

    def enter(self) -> bool:
        return False  # a domain cgroup v2 takes whole processes only

    def leave(self) -> None:
        return None

    def kill(self) -> None:
        if not self.path.exists():
            return
        if self.kill_file is not None:
            with contextlib.suppress(OSError):
                self.kill_file.write_text("1")
        else:  # before Linux 5.14: freeze, kill, thaw
            freeze = self.path / "cgroup.freeze"
            with contextlib.suppress(OSError):
                freeze.write_text("1")
            _kill_pids(self.pids())
            with contextlib.suppress(OSError):
                freeze.write_text("0")
        _wait_empty(self.path / "cgroup.procs")

    def oom_kills(self) -> int:
        return _oom_kills(self.path / "memory.events")

    def memory_limit_mb(self) -> float | None:
        try:
            value = (self.path / "memory.max").read_text().strip()
        except OSError:
            return None
        return None if value == "max" else int(value) / (1024 * 1024)

    def remove(self) -> None:
        _rmdir(self.path)


@dataclass
class CgroupV2:
    base: Path  # <root>/<own path>/vespid-<node>/<agent pid>
    kind: str = "cgroup-v2"
    contains_detached: bool = True
    kernel_memory_limit: bool = False

    @classmethod
    def detect(cls, node: str, root: Path = CGROUP_ROOT) -> CgroupV2 | None:
        if not (root / "cgroup.controllers").exists():
            return None
        try:
            own = own_cgroup(None)
        except (LookupError, OSError):
            return None
        base = root / own.lstrip("/") / f"vespid-{node}" / str(os.getpid())
        if not _try_mkdir(base):
            return None
        found = cls(base)
        found.kernel_memory_limit = found._delegate_memory()
        return found

    def _delegate_memory(self) -> bool:
        """Turn the memory controller on for the cells, where the hierarchy allows it."""
        try:
            for folder in (self.base.parent, self.base):
                if "memory" not in (folder / "cgroup.controllers").read_text().split():
                    return False
                (folder / "cgroup.subtree_control").write_text("+memory")
        except OSError:
            return False
        return True

    def cell(self, name: str, memory_limit_mb: float | None) -> Cell:
        path = self.base / name
        path.mkdir(parents=True, exist_ok=True)
        if memory_limit_mb is not None and self.kernel_memory_limit:
            (path / "memory.max").write_text(str(int(memory_limit_mb * 1024 * 1024)))
            swap = path / "memory.swap.max"
            if swap.exists():
                with contextlib.suppress(OSError):
                    swap.write_text("0")
        return V2Cell(path)

    def sweep(self) -> int:
        ended = 0
        for agent_dir in _folders(self.base.parent):
            if _stale(agent_dir):
                ended += _end_v2_agent(agent_dir)
        return ended

    def end_all(self) -> int:
        """End every cell of this agent (the keeper, once the agent is gone)."""
        ended = _end_v2_agent(self.base)
        with contextlib.suppress(OSError):
            self.base.parent.rmdir()
        return ended

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "base": str(self.base)}

    def release(self) -> None:
        _rmdir(self.base)
        with contextlib.suppress(OSError):
            self.base.parent.rmdir()


def _end_v2_agent(agent_dir: Path) -> int:
    ended = 0
    for cell_dir in _folders(agent_dir):
        cell = V2Cell(cell_dir)
        ended += len(cell.pids())
        cell.kill()
    _rmdir_patiently(agent_dir)
    return ended


def detect(node: str, wanted: str = "auto", root: Path = CGROUP_ROOT) -> Containment:
    """The best containment this machine allows (or the one asked for, if it can)."""
    if wanted in ("auto", "cgroup-v2"):
        found: Containment | None = CgroupV2.detect(node, root)
        if found is not None:
            return found
    if wanted in ("auto", "cgroup-v1"):
        found = CgroupV1.detect(node, root)
        if found is not None:
            return found
    return ProcessGroupOnly()
