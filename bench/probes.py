"""What bench.agent_tasks and bench.files watch in other processes: resident memory, and
where their time goes (py-spy).

Memory comes from /proc/<pid>/status: VmRSS (resident now) and VmHWM (the peak since the
process started, or since the last reset). Writing 5 to /proc/<pid>/clear_refs resets
VmHWM to the current RSS (Linux 4.0 and later; root or the process's own user), so the
peak of one step is exact rather than sampled. A sampler thread also reads VmRSS every
20 ms, for the parts of a step whose bounds the bench only learns by polling.

py-spy samples a process from outside (no change to it); `--idle` keeps the samples where
the thread waits (in select, say), so a profile says where the wall-clock time went, not
only the CPU time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import markdown_table, process_cpu_seconds

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SECONDS = 0.02
PROJECT = ("coordinator/", "node_agent/", "shared/", "client/", "bench/")  # named in tables


# ---- resident memory ----------------------------------------------------------------------
def memory_kb(pid: int | None) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a live process in kB, or None."""
    if pid is None:
        return None
    rss = hwm = None
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None if rss is None or hwm is None else (rss, hwm)


def reset_peak(pid: int | None) -> bool:
    """Set VmHWM back to the current RSS; False where the kernel does not let us."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


@dataclass
class RssSampler:
    """A thread that reads VmRSS (kB) and CPU seconds used so far of named processes every
    SAMPLE_SECONDS."""

    pids: dict[str, int | None]
    samples: list[tuple[float, dict[str, tuple[int, float]]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            now = time.monotonic()
            reading = {}
            for name, pid in self.pids.items():
                found, cpu = memory_kb(pid), process_cpu_seconds(pid)
                if found is not None and cpu is not None:
                    reading[name] = (found[0], cpu)
            self.samples.append((now, reading))

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def peak(self, name: str, start: float, end: float) -> int | None:
        """The highest VmRSS (kB) sampled for `name` between two monotonic times."""
        found = [reading[name][0] for stamp, reading in self.samples
                 if start <= stamp <= end and name in reading]
        return max(found) if found else None

    def cpu_share(self, name: str, start: float, end: float) -> float | None:
        """CPU seconds `name` used between two monotonic times, over their distance (1.0:
        one core all the time), from the samples nearest inside them."""
        inside = [(stamp, reading[name][1]) for stamp, reading in self.samples
                  if start <= stamp <= end and name in reading]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


# ---- py-spy --------------------------------------------------------------------------------
def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def spying(targets: dict[str, int | None], folder: Path,
           idle: frozenset[str] = frozenset()) -> Iterator[dict[str, Path]]:
    """py-spy records each named process (100 samples/s, non-blocking) while the block
    runs; those named in `idle` with their waiting time kept. Yields the output files."""
    tool = py_spy()
    if tool is None:
        raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
    spies: list[subprocess.Popen[bytes]] = []
    outputs: dict[str, Path] = {}
    for name, pid in targets.items():
        if pid is None:
            continue
        outputs[name] = folder / f"{name.replace(' ', '-')}.txt"
        command = [tool, "record", "--pid", str(pid), "--format", "raw", "--nonblocking",
                   "--rate", "100", "--output", str(outputs[name])]
        spies.append(subprocess.Popen(
            command + (["--idle"] if name in idle else []), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    try:
        time.sleep(0.7)  # attached before the measured part starts
        yield outputs
    finally:
        for spy in spies:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)  # it writes its output on SIGINT
        for spy in spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(timeout=10)


@dataclass
class Profile:
    samples: int = 0
    own: Counter[str] = field(default_factory=Counter)  # function on top of the stack
    inclusive: Counter[str] = field(default_factory=Counter)  # anywhere on the stack
    # (function on top, the project's frame nearest to it with its line): who asked for it
    via: Counter[tuple[str, str]] = field(default_factory=Counter)

    def project_inclusive(self, top: int) -> list[tuple[str, int]]:
        """The project's own functions by total time, less the outer frames (loops) that
        nearly every sample passes through."""
        return [(name, count) for name, count in self.inclusive.most_common()
                if name.rsplit(" (", 1)[-1].startswith(PROJECT) and count < 0.9 * self.samples
                ][:top]

    def own_by_file(self, top: int) -> list[tuple[str, int]]:
        files: Counter[str] = Counter()
        for name, count in self.own.items():
            files[name.rsplit(" (", 1)[-1].rstrip(")")] += count
        return files.most_common(top)


def frame_name(frame: str, line: bool = False) -> str:
    """`handle (/…/coordinator/processor.py:120)` → `handle (coordinator/processor.py)`,
    or with `line` `handle (coordinator/processor.py:120)`."""
    name, _, where = frame.partition(" (")
    path, _, number = where.rstrip(")").rpartition(":")
    if not path:
        path, number = number, ""
    for marker in ("/site-packages/", "/lib/python3.11/", "/lib/python3/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if path.startswith(str(REPO) + os.sep):
        path = os.path.relpath(path, REPO)
    return f"{name} ({path}:{number})" if line and number else f"{name} ({path})"


def read_profile(path: Path) -> Profile:
    """py-spy's raw output: one line a distinct stack, `frame;frame;… count`."""
    profile = Profile()
    if not path.exists():
        return profile
    for line in path.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        raw = [f for f in stack.split(";") if " (" in f]
        frames = [frame_name(f) for f in raw]
        if not frames or not number.isdigit():
            continue
        count = int(number)
        profile.samples += count
        profile.own[frames[-1]] += count
        for name in set(frames):
            profile.inclusive[name] += count
        mine = [frame_name(f, line=True) for f in raw if frame_name(f).split(" (")[-1]
                .startswith(PROJECT)]
        profile.via[(frames[-1], mine[-1] if mine else "—")] += count
    return profile


def profile_tables(title: str, profile: Profile, top: int = 12) -> str:
    """A profile as Markdown: own time by function and by file, the project's functions by
    total time."""
    if not profile.samples:
        return f"{title}: no samples (py-spy could not attach, or the step was too short)."

    def table(head: str, entries: list[tuple[str, int]]) -> str:
        return markdown_table([head, "samples", "share"],
                              [[f"`{name}`", f"{n:,}", f"{100 * n / profile.samples:.1f}%"]
                               for name, n in entries])

    return "\n\n".join([
        f"{title}: {profile.samples:,} samples.",
        f"Top {top} functions by own time (on top of the stack):",
        table("function (file)", profile.own.most_common(top)),
        "Own time by file:", table("file", profile.own_by_file(8)),
        "The top functions by own time and the project's line that led to them:",
        markdown_table(["function on top", "nearest project frame (file:line)", "samples",
                        "share"],
                       [[f"`{own}`", f"`{via}`", f"{n:,}", f"{100 * n / profile.samples:.1f}%"]
                        for (own, via), n in profile.via.most_common(top // 2)]),
        "The project's functions by total time (anywhere on the stack; frames in nearly "
        "every sample left out):",
        table("function (file)", profile.project_inclusive(top))])
