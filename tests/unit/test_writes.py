"""The joining send (shared/writes.py) against a real socket pair: every byte arrives once and
in order, through partial and refused sends, in fewer sends than there were frames."""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from pika.adapters.utils import io_services_utils

from vespid.shared import writes


class _Loop:
    """The bits of pika's I/O services a transport calls."""

    def __init__(self) -> None:
        self.writer: Any = None

    def set_reader(self, _fd: int, _callback: Any) -> None:
        pass

    def set_writer(self, _fd: int, callback: Any) -> None:
        self.writer = callback

    def remove_writer(self, _fd: int) -> bool:
        self.writer = None
        return True


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # so that sends come up short
    left.setblocking(False)
    right.setblocking(False)
    yield left, right
    left.close()
    right.close()


def _transport(sock: socket.socket) -> tuple[Any, _Loop, list[int]]:
    loop = _Loop()
    transport = io_services_utils._AsyncPlaintextTransport(sock, object(), loop)  # type: ignore[arg-type]
    sizes: list[int] = []
    plain_send = transport._sigint_safe_send

    def counted(sock: socket.socket, data: bytes) -> int:
        sent: int = plain_send(sock, data)
        sizes.append(sent)
        return sent

    transport._sigint_safe_send = counted
    return transport, loop, sizes


def _drain(transport: Any, loop: _Loop, reader: socket.socket) -> bytes:
    """Run the writer whenever it is armed, reading the far end between turns, as the event
    loop would."""
    received = bytearray()
    for _ in range(100_000):
        if loop.writer is not None:
            loop.writer()
        with contextlib.suppress(BlockingIOError):
            received += reader.recv(1 << 20)
        if loop.writer is None and transport.get_write_buffer_size() == 0:
            break
    while True:
        try:
            received += reader.recv(1 << 20)
        except BlockingIOError:
            return bytes(received)


def _frames(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [rng.choice((8, 21, 120, 700, 4000)) for _ in range(3000)]
    sizes[100] = writes.MAX_SEND + 5  # one larger than a send ever joins to
    sizes[101] = writes.MAX_SEND - 10
    return [bytes([index % 251]) * size for index, size in enumerate(sizes)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_byte_arrives_once_and_in_order_in_fewer_sends(
        pair: tuple[socket.socket, socket.socket], seed: int) -> None:
    assert writes.coalesce_writes()
    left, right = pair
    transport, loop, sizes = _transport(left)
    frames = _frames(seed)
    for frame in frames:
        transport.write(frame)
    assert transport.get_write_buffer_size() == sum(map(len, frames))

    received = _drain(transport, loop, right)

    assert received == b"".join(frames)
    assert transport.get_write_buffer_size() == 0
    assert sum(sizes) == len(received)
    assert len(sizes) < len(frames) / 5  # pika's own method makes at least one send a frame
    assert max(sizes) <= writes.MAX_SEND + 5


def test_a_lone_frame_goes_out_as_it_came(pair: tuple[socket.socket, socket.socket]) -> None:
    assert writes.coalesce_writes()
    left, right = pair
    transport, loop, sizes = _transport(left)
    transport.write(b"method-frame")

    assert _drain(transport, loop, right) == b"method-frame"
    assert sizes == [len(b"method-frame")]


def test_installing_twice_keeps_one_joining_send() -> None:
    assert writes.coalesce_writes()
    assert writes.coalesce_writes()
    assert io_services_utils._AsyncPlaintextTransport._produce is writes._produce
    # TLS connections keep pika's own method: their transport has one of its own
    assert io_services_utils._AsyncSSLTransport._produce is not writes._produce


def test_a_pika_without_the_expected_transport_is_left_as_it_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Other:
        pass

    monkeypatch.setattr(writes, "_Transport", Other)
    assert not writes.coalesce_writes()
    assert not hasattr(Other, "_produce")
