"""Files served chunk by chunk: each chunk read on its own, never the whole file."""

from __future__ import annotations

import base64
from pathlib import Path

from vespid.shared.blobs import CHUNK_BYTES, BlobStore


def test_each_chunk_is_read_alone_and_they_add_up_to_the_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = bytes(range(256)) * (CHUNK_BYTES * 5 // 2 // 256)  # two and a half chunks
    sha = store.put_bytes(data)

    chunks = [store.read_chunk(sha, index) for index in range(store.chunks(sha))]

    assert store.chunks(sha) == 3
    assert all(c is not None and c.count == 3 and c.size == len(data) for c in chunks)
    assert b"".join(base64.b64decode(c.data) for c in chunks if c) == data
    assert store.read_chunk(sha, 3) is None
