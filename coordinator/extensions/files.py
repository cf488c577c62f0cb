"""File transfer: resources in, results out, files to the nodes that need them.

Clients upload files (blob-chunk) and fetch results (blob-get, one chunk per request, read
from disk alone); a task that lists resources has each file sent once per node, since
nodes cache by digest. Sending is an effect (FileSend): the outbox keeps one small row per
file and the service streams the chunks from disk after the commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from vespid.coordinator.engine import Context
from vespid.coordinator.extension import Extension, Handler, Reply, ReplyLater
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.state import State, Task
from vespid.coordinator.store import Store
from vespid.shared.blobs import BlobChunk, BlobGet, BlobStore
from vespid.shared.errors import ProtocolError


class Files(Extension):
    name = "files"

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.store = BlobStore(settings.blobs_path, settings.max_file_bytes)
        # Which files each node's agent process was sent since this coordinator started
        # (node, agent start): a restart of either sends them again once, which costs a
        # little and never leaves a reinstalled node without one.
        self.sent: dict[tuple[str, float | None], set[str]] = {}

    def handlers(self) -> Mapping[type, Handler]:
        return {BlobChunk: self.handle_chunk, BlobGet: self.handle_get}

    def load(self, store: Store, state: State) -> None:
        self.sent = {}

    def started(self, ctx: Context, task: Task) -> None:
        assert task.node is not None
        node = ctx.state.nodes[task.node]
        sent = self.sent.setdefault((node.name, node.started), set())
        for resource in task.resources:
            if resource["sha256"] not in sent:
                sent.add(resource["sha256"])
                ctx.effects.send_file(task.node, resource["sha256"])

    def handle_chunk(self, ctx: Context, msg: BlobChunk) -> Reply:
        self.store.put_chunk(msg)
        return None

    def handle_get(self, ctx: Context, msg: BlobGet) -> Reply:
        return ReplyLater(partial(self._chunk, msg))  # read after the commit

    def _chunk(self, msg: BlobGet) -> BlobChunk:
        if not self.store.has(msg.sha256):
            raise ProtocolError("not_found", f"no file {msg.sha256[:12]}… is kept here")
        chunk = self.store.read_chunk(msg.sha256, msg.index)
        if chunk is None:
            raise ProtocolError("not_found",
                                f"that file has {self.store.chunks(msg.sha256)} chunks")
        return chunk
