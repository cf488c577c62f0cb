"""Each task's output, streamed through the broker as it is written (exchange vespid.logs,
key log.<task>), from the local log file the agent keeps anyway.

The file is the buffer: what was written while the broker was away is read and sent after
the reconnect, from the last offset sent, so the lines arrive later and in order. Every
chunk carries its byte offset, so a receiver writes it in place and a repeat is harmless.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK_BYTES = 64 * 1024


@dataclass
class Stream:
    task: str
    path: Path
    sent: int = 0
    finished: bool = False  # the process exited: send the rest, then the end


def chunk(task: str, offset: int, data: bytes) -> dict[str, Any]:
    body: dict[str, Any] = {"command": "log-chunk", "task": task, "offset": offset}
    try:
        body["data"] = data.decode("utf-8")
    except UnicodeDecodeError:  # a cut in the middle of a character, or binary output
        body["data_base64"] = base64.b64encode(data).decode("ascii")
    return body


def chunk_bytes(body: dict[str, Any]) -> bytes:
    if "data_base64" in body:
        return base64.b64decode(body["data_base64"])
    return str(body.get("data", "")).encode("utf-8")


class LogStreams:
    def __init__(self) -> None:
        self.streams: dict[str, Stream] = {}

    def follow(self, task: str, path: Path) -> None:
        self.streams.setdefault(task, Stream(task, path))

    def finish(self, task: str) -> None:
        if task in self.streams:
            self.streams[task].finished = True

    def pending(self) -> list[dict[str, Any]]:
        """The next chunks to send; call `sent()` for each once the broker has it."""
        out = []
        for stream in list(self.streams.values()):
            data = _read(stream.path, stream.sent)
            if data:
                out.append(chunk(stream.task, stream.sent, data))
            elif stream.finished:
                out.append({"command": "log-chunk", "task": stream.task,
                            "offset": stream.sent, "data": "", "eof": True})
        return out

    def sent(self, body: dict[str, Any]) -> None:
        stream = self.streams.get(str(body["task"]))
        if stream is None:
            return
        if body.get("eof"):
            del self.streams[stream.task]
        else:
            stream.sent = int(body["offset"]) + len(chunk_bytes(body))


def _read(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(CHUNK_BYTES)
    except FileNotFoundError:
        return b""
