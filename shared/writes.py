"""One send() for the frames waiting on a connection, instead of one per frame.

pika 1.x's plaintext transport keeps every frame it is given (a published message is three:
method, header, body) as a buffer of its own and hands each to a send() of its own when the
socket is writable. pika sets TCP_NODELAY, so each frame leaves as a TCP segment of its own,
which RabbitMQ then reads on its own. The coordinator writes thousands of small frames a
second (task-runs, events, replies, acks): py-spy put `_sigint_safe_send` first among its
own-time entries (bench/README.md). `coalesce_writes()` makes the transport join what is
waiting, in order, into sends of up to `MAX_SEND` bytes: the same bytes on the wire, in far
fewer syscalls and segments.

This replaces one private method of pika (`_AsyncPlaintextTransport._produce`), so it is
guarded: it is installed only if the transport still looks as this code expects, and a pika
that does not is used as it comes (correct, only slower). TLS connections keep pika's own
method (their transport overrides it). tests/unit/test_writes.py checks the bytes, their
order and the partial and refused sends against a real socket pair.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from pika.adapters.utils import io_services_utils

MAX_SEND = 256 * 1024  # a send larger than a socket buffer gains nothing and copies more

_Transport: Any = io_services_utils._AsyncPlaintextTransport


def coalesce_writes() -> bool:
    """Install the joining send on pika's plaintext transport (once; idempotent). Returns
    whether it is installed: False if this pika's transport is not the one it was written
    for."""
    current = getattr(_Transport, "_produce", None)
    if current is _produce:
        return True
    if current is None or not hasattr(_Transport, "_sigint_safe_send"):
        return False
    _Transport._produce = _produce
    return True


def _produce(self: Any) -> None:
    """pika's `_produce` contract: send from `_tx_buffers` until it is empty or send()
    raises (EAGAIN included: the writer is called again when the socket drains), keeping
    `_tx_buffers` and `_tx_buffered_byte_count` exact after every send."""
    buffers: deque[bytes] = self._tx_buffers
    while buffers:
        if len(buffers) > 1 and len(buffers[0]) < MAX_SEND:
            _join_head(buffers)
        sent = self._sigint_safe_send(self._sock, buffers[0])
        chunk = buffers.popleft()
        if sent < len(chunk):
            buffers.appendleft(chunk[sent:])
        self._tx_buffered_byte_count -= sent


def _join_head(buffers: deque[bytes]) -> None:
    """Replace the buffers at the head with their concatenation, up to MAX_SEND bytes (a
    large one that would pass it is left for a send of its own)."""
    parts = [buffers.popleft()]
    size = len(parts[0])
    while buffers and size + len(buffers[0]) <= MAX_SEND:
        part = buffers.popleft()
        parts.append(part)
        size += len(part)
    buffers.appendleft(b"".join(parts) if len(parts) > 1 else parts[0])
