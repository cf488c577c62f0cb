"""Each attempt's output, streamed through the broker as it is written (exchange
vespid.logs, key log.<task>), from the local file the agent keeps anyway.

The local file is the source of truth and the buffer: one per attempt
(`<log dir>/<task>/attempt-<n>.log`), so two attempts of a task never share a file. What was
written while the broker was away is read and sent after the reconnect, from the last offset
sent; an agent that restarts ships again, from the start, every attempt whose end was never
confirmed, so a lost attempt's output reaches the central log when its node comes back.
Every chunk carries its attempt and byte offset: a receiver writes it in place in that
attempt's file, so a repeat is harmless and a stale attempt can never write into another's.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vespid.shared.logwire import LogChunk

CHUNK_BYTES = 64 * 1024
ATTEMPT_FILE = re.compile(r"^attempt-(\d+)\.log$")


def attempt_log(log_dir: Path, task: str, attempt: int) -> Path:
    return log_dir / task / f"attempt-{attempt}.log"


def _record_path(log: Path) -> Path:
    return log.with_suffix(".json")


def read_record(log: Path) -> dict[str, Any]:
    """What the agent noted of an attempt's end (`ended`, `success`) and shipping
    (`shipped`: when the log server's queue took its last chunk; `null` while not)."""
    try:
        data = json.loads(_record_path(log).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def note(log: Path, **fields: Any) -> None:
    record = read_record(log) | fields
    tmp = _record_path(log).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(_record_path(log))  # atomic: a crash leaves the old record or the new


@dataclass
class Stream:
    task: str
    attempt: int
    path: Path
    sent: int = 0
    finished: bool = False  # the process exited: send the rest, then the end
    ended: dict[str, Any] | None = None  # what to note of the end, with the shipping


class LogStreams:
    def __init__(self, log_dir: Path, node: str) -> None:
        self.log_dir, self.node = log_dir, node
        self.streams: dict[tuple[str, int], Stream] = {}

    def follow(self, task: str, attempt: int) -> Path:
        """Start streaming an attempt's output; returns the file its process writes."""
        path = attempt_log(self.log_dir, task, attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.streams.setdefault((task, attempt), Stream(task, attempt, path))
        return path

    def finish(self, task: str, attempt: int, **ended: Any) -> bool:
        """The attempt's process exited: its end (`ended`, `success`) is noted beside the log
        with its shipping, in one write, once the end is sent; False when the attempt has no
        stream (the caller notes it itself)."""
        stream = self.streams.get((task, attempt))
        if stream is None:
            return False
        stream.finished = True
        stream.ended = ended
        return True

    def resume_unshipped(self, running: set[tuple[str, int]]) -> int:
        """At agent start: ship again, from the start, every attempt whose end never reached
        the log server (its process is gone: the agent that ran it died)."""
        resumed = 0
        for log in sorted(self.log_dir.glob("*/attempt-*.log")):
            match = ATTEMPT_FILE.match(log.name)
            key = (log.parent.name, int(match.group(1))) if match else None
            if key is None or key in running or read_record(log).get("shipped"):
                continue
            self.streams.setdefault(key, Stream(key[0], key[1], log, finished=True))
            resumed += 1
        return resumed

    def pending(self, ends: bool = True) -> list[LogChunk]:
        """The next chunks to send; call `sent()` for each once the broker has it. Without
        `ends`, output only (what must reach the broker before the task-complete)."""
        out = []
        for stream in list(self.streams.values()):
            data = _read(stream.path, stream.sent)
            if data:
                out.append(LogChunk.carrying(stream.task, stream.attempt, self.node,
                                             stream.sent, data))
            elif stream.finished and ends:
                out.append(LogChunk.end(stream.task, stream.attempt, self.node, stream.sent))
        return out

    def sent(self, chunk: LogChunk, delivered: bool) -> None:
        """The broker has the chunk; `delivered`: a log server's queue took it."""
        key = (chunk.task, chunk.attempt)
        stream = self.streams.get(key)
        if stream is None:
            return
        if chunk.eof:
            del self.streams[key]
            if stream.path.exists():
                note(stream.path, **(stream.ended or {}),
                     shipped=time.time() if delivered else None, logserver=delivered)
        else:
            stream.sent = chunk.offset + len(chunk.content())


def _read(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(CHUNK_BYTES)
    except FileNotFoundError:
        return b""
