"""Files served chunk by chunk: each chunk read on its own, never the whole file."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from vespid.shared.blobs import (
    CHUNK_BYTES,
    BlobStore,
    chunk_messages,
    digest,
    file_chunk_messages,
    part_message,
)
from vespid.shared.errors import ProtocolError


def test_each_chunk_is_read_alone_and_they_add_up_to_the_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = bytes(range(256)) * (CHUNK_BYTES * 5 // 2 // 256)  # two and a half chunks
    sha = store.put_bytes(data)

    chunks = [store.read_chunk(sha, index) for index in range(store.chunks(sha))]

    assert store.chunks(sha) == 3
    assert all(c is not None and c.count == 3 and c.size == len(data) for c in chunks)
    assert b"".join(base64.b64decode(c.data) for c in chunks if c) == data
    assert store.read_chunk(sha, 3) is None


def test_chunks_received_in_any_order_make_the_file(tmp_path: Path) -> None:
    source, target = BlobStore(tmp_path / "a"), BlobStore(tmp_path / "b")
    data = os.urandom(CHUNK_BYTES * 2 + 17)
    sha = source.put_bytes(data)
    chunks = [source.read_chunk(sha, index) for index in range(source.chunks(sha))]

    done = [target.put_chunk(c) for c in reversed(chunks) if c is not None]

    assert done == [False, False, True]
    assert target.read(sha) == data
    assert list((tmp_path / "b" / "partial").iterdir()) == []


def test_chunks_that_do_not_add_up_to_their_digest_are_refused_and_leave_nothing(
        tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"x" * (CHUNK_BYTES + 5)
    wrong = "0" * 64
    parts = [part_message(data[:CHUNK_BYTES], wrong, 0, len(data)),
             part_message(data[CHUNK_BYTES:], wrong, 1, len(data))]

    assert store.put_chunk(parts[0]) is False
    with pytest.raises(ProtocolError) as refused:
        store.put_chunk(parts[1])

    assert refused.value.code == "corrupt"
    assert not store.has(wrong)
    assert list((tmp_path / "partial").iterdir()) == []


def test_a_file_is_chunked_part_by_part_exactly_as_its_bytes_are(tmp_path: Path) -> None:
    data = bytes(range(256)) * (CHUNK_BYTES // 256 * 2 + 3)  # two whole parts and a bit
    path = tmp_path / "resource.bin"
    path.write_bytes(data)

    from_file = list(file_chunk_messages(path, digest(data)))

    assert [c.index for c in from_file] == [0, 1, 2]
    assert from_file == list(chunk_messages(data))
