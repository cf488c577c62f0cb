"""Files through the broker: content-addressed, chunked, sha256-checked, cached by digest.

A file travels as `blob-chunk` messages {sha256, index, count, size, data (base64)}; the
receiver assembles the chunks and keeps the file only if its digest matches. Both the
coordinator (resources in, results out) and each node (resources cached once per node,
results kept until the requester has them) hold a BlobStore.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vespid.shared.errors import ProtocolError

CHUNK_BYTES = 256 * 1024
DIGEST_PATTERN = r"^[0-9a-f]{64}$"


# Built on first use, as the messages of shared/protocol.py are.
class BlobChunk(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    command: Literal["blob-chunk"]
    sha256: str = Field(pattern=DIGEST_PATTERN)
    index: int = Field(ge=0)
    count: int = Field(ge=1)
    size: int = Field(ge=0)
    data: str


class BlobGet(BaseModel):
    """Ask the coordinator for one chunk of a file it keeps (a result, say)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    command: Literal["blob-get"]
    sha256: str = Field(pattern=DIGEST_PATTERN)
    index: int = Field(default=0, ge=0)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def chunk_messages(data: bytes, sha: str | None = None) -> Iterator[BlobChunk]:
    sha = sha or digest(data)
    for index in range(chunk_count(len(data))):
        yield chunk_message(data, sha, index)


def file_chunk_messages(path: Path, sha: str) -> Iterator[BlobChunk]:
    """The blob-chunks of a file, read one part at a time: never the whole file in memory."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        for index in range(chunk_count(size)):
            yield part_message(handle.read(CHUNK_BYTES), sha, index, size)


def chunk_count(size: int) -> int:
    return max(1, -(-size // CHUNK_BYTES))


def chunk_message(data: bytes, sha: str, index: int) -> BlobChunk:
    return part_message(data[index * CHUNK_BYTES:(index + 1) * CHUNK_BYTES], sha, index,
                        len(data))


def part_message(part: bytes, sha: str, index: int, size: int) -> BlobChunk:
    """The blob-chunk of one part of a file of `size` bytes (built, not validated: we made
    every field ourselves)."""
    return BlobChunk.model_construct(command="blob-chunk", sha256=sha, index=index,
                                     count=chunk_count(size), size=size,
                                     data=base64.b64encode(part).decode("ascii"))


class BlobStore:
    def __init__(self, root: Path, max_bytes: int = 1 << 30) -> None:
        self.root = root
        self.max_bytes = max_bytes
        (root / "partial").mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        return self.root / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def read(self, sha: str) -> bytes:
        return self.path(sha).read_bytes()

    def chunks(self, sha: str) -> int:
        return chunk_count(self.path(sha).stat().st_size)

    def read_chunk(self, sha: str, index: int) -> BlobChunk | None:
        """One chunk as a blob-chunk message, reading only that part of the file (a 256 MB
        result fetched chunk by chunk is read once, not once per chunk); None past the end."""
        path = self.path(sha)
        size = path.stat().st_size
        if index >= chunk_count(size):
            return None
        with path.open("rb") as handle:
            handle.seek(index * CHUNK_BYTES)
            return part_message(handle.read(CHUNK_BYTES), sha, index, size)

    def put_bytes(self, data: bytes) -> str:
        sha = digest(data)
        if not self.has(sha):
            self._write(sha, data)
        return sha

    def put_file(self, source: Path) -> tuple[str, int]:
        """Keep a copy of a file, streamed (hashed, then copied, block by block); its
        (sha256, size)."""
        sha = file_digest(source)
        if not self.has(sha):
            temporary = self.root / "partial" / f"{sha}.tmp"
            shutil.copyfile(source, temporary)
            temporary.replace(self.path(sha))
        return sha, self.path(sha).stat().st_size

    def file_chunks(self, sha: str) -> Iterator[BlobChunk]:
        """A kept file's blob-chunks, one part read at a time."""
        return file_chunk_messages(self.path(sha), sha)

    def put_chunk(self, chunk: BlobChunk) -> bool:
        """Keep one chunk; True once the whole blob is here and checked."""
        if self.has(chunk.sha256):
            return True
        if chunk.size > self.max_bytes:
            raise ProtocolError("too_large", f"a file of {chunk.size} bytes is over the limit of "
                                f"{self.max_bytes} bytes for resources and results")
        if chunk.index >= chunk.count:
            raise ProtocolError("invalid_message", f"chunk {chunk.index} of {chunk.count}")
        part_dir = self.root / "partial" / chunk.sha256
        part_dir.mkdir(exist_ok=True)
        try:
            data = base64.b64decode(chunk.data, validate=True)
        except ValueError:
            raise ProtocolError("invalid_message", "blob-chunk data is not base64") from None
        (part_dir / str(chunk.index)).write_bytes(data)
        if len(os.listdir(part_dir)) < chunk.count:
            return False
        self._assemble(part_dir, chunk)
        return True

    def _assemble(self, part_dir: Path, chunk: BlobChunk) -> None:
        # Part by part into one file, hashing as it goes: never the whole file in memory.
        temporary = self.root / "partial" / f"{chunk.sha256}.tmp"
        sha, size = hashlib.sha256(), 0
        with temporary.open("wb") as out:
            for index in range(chunk.count):
                part = (part_dir / str(index)).read_bytes()
                sha.update(part)
                size += len(part)
                out.write(part)
        for part_file in part_dir.iterdir():
            part_file.unlink()
        part_dir.rmdir()
        if sha.hexdigest() != chunk.sha256 or size != chunk.size:
            temporary.unlink()
            raise ProtocolError("corrupt", f"the file sent as {chunk.sha256[:12]}… does not match "
                                "its sha256 or size; send it again")
        temporary.replace(self.path(chunk.sha256))

    def _write(self, sha: str, data: bytes) -> None:
        temporary = self.root / "partial" / f"{sha}.tmp"
        temporary.write_bytes(data)
        temporary.replace(self.path(sha))
