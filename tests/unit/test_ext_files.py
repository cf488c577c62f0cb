"""The Files extension on its own: a Processor that runs only Files, on a real SQLite file,
with a fake clock and no broker. Uploads (blob-chunk), downloads one chunk at a time
(blob-get), and each resource sent once per node ahead of the task-run that needs it."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from vespid.coordinator.extension import Extension
from vespid.coordinator.extensions.files import Files
from vespid.coordinator.processor import Delivery, Outcome, Processor
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.store import Store
from vespid.shared.blobs import CHUNK_BYTES, chunk_messages, digest

T0 = 1_000_000.0


def files_settings(tmp_path: Path) -> CoordinatorSettings:
    # The state file of the unit tests' `store` fixture (tests/unit/conftest.py).
    return CoordinatorSettings(state=tmp_path / "s.db", heartbeat_interval=60.0,
                               missed_heartbeats=100, blob_dir=tmp_path / "blobs")


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(files_settings(tmp_path))


@pytest.fixture
def proc(store: Store, files: Files, tmp_path: Path) -> Processor:
    return Processor(store, files_settings(tmp_path), T0, extensions=[files])


def send(proc: Processor, body: dict[str, Any], now: float = T0,
         reply_to: str | None = "client") -> Outcome:
    raw = json.dumps(body).encode()
    return proc.process([Delivery(raw, reply_to, "corr" if reply_to else None)], now)


def ask(proc: Processor, body: dict[str, Any], now: float = T0) -> dict[str, Any]:
    outcome = send(proc, body, now)
    assert len(outcome.replies) == 1
    reply: dict[str, Any] = json.loads(outcome.replies[0].data)
    return reply


def upload(proc: Processor, data: bytes) -> str:
    for chunk in chunk_messages(data):
        send(proc, chunk.model_dump(), reply_to=None)
    return digest(data)


def node_set(name: str, cores: int = 1, **labels: bool) -> dict[str, Any]:
    return {"command": "node-set", "name": name, "capabilities": {"cores": cores, **labels},
            "repositories": {}, "activetasks": []}


def task_create(name: str, **requirements: Any) -> dict[str, Any]:
    return {"command": "task-create", "name": name, "executable_pyscript": "pass",
            "requirements": {"cores": 1, **requirements}}


def needs(proc: Processor, name: str, *shas: str) -> None:
    """Give a waiting task files to place, as the Golem dialect does for its attempts
    (State.set_resources), and commit that with a batch that changes nothing else."""
    proc.state.set_resources(proc.state.tasks[name],
                             [{"sha256": sha, "path": f"in/{i}.bin"} for i, sha in enumerate(shas)])
    assert ask(proc, {"command": "state-check"})["ok"] is True


def to_node(outcome: Outcome, node: str) -> list[tuple[str, str | None]]:
    """("file", sha) or (command, task) of what the outcome sends to `node`, in the order
    it is published (the outbox's, whose ids ascend)."""
    ids = [e.id for e in outcome.outbox]
    assert ids == sorted(ids)
    entries = [e for e in outcome.outbox if e.routing_key == f"node.{node}"]
    return [(e.command if e.file is None else "file", e.file or _name(e.body))
            for e in entries]


def _name(body: bytes) -> str:
    return str(json.loads(body)["name"])


# --- uploads and downloads ------------------------------------------------------------------


def test_a_file_uploaded_in_chunks_is_kept_and_blob_get_returns_only_the_chunk_asked_for(
        proc: Processor, files: Files) -> None:
    data = bytes(range(256)) * 2100  # 537,600 bytes: two full chunks and a shorter third
    sha = digest(data)
    chunks = list(chunk_messages(data))
    assert len(chunks) == 3

    for chunk in (chunks[2], chunks[0]):  # in any order; kept once the last one is in
        assert send(proc, chunk.model_dump(), reply_to=None).outbox == []
    assert not files.store.has(sha)
    send(proc, chunks[1].model_dump(), reply_to=None)

    assert files.store.read(sha) == data
    middle = ask(proc, {"command": "blob-get", "sha256": sha, "index": 1})
    assert {k: middle[k] for k in ("command", "sha256", "index", "count", "size")} == {
        "command": "blob-chunk", "sha256": sha, "index": 1, "count": 3, "size": len(data)}
    assert base64.b64decode(middle["data"]) == data[CHUNK_BYTES:2 * CHUNK_BYTES]
    first = ask(proc, {"command": "blob-get", "sha256": sha})  # index defaults to 0
    assert base64.b64decode(first["data"]) == data[:CHUNK_BYTES]
    last = ask(proc, {"command": "blob-get", "sha256": sha, "index": 2})
    assert base64.b64decode(last["data"]) == data[2 * CHUNK_BYTES:]
    past = ask(proc, {"command": "blob-get", "sha256": sha, "index": 3})
    assert (past["command"], past["error"]) == ("error", "not_found")
    assert "3 chunks" in past["message"]
    unknown = ask(proc, {"command": "blob-get", "sha256": "f" * 64})
    assert unknown["error"] == "not_found"


def test_blob_get_reads_its_chunk_after_the_batch_committed(
        proc: Processor, files: Files, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = upload(proc, b"result bytes")
    seen: list[bool] = []
    read_chunk = files.store.read_chunk

    def watched(sha256: str, index: int) -> Any:
        seen.append(store.in_transaction)
        return read_chunk(sha256, index)

    monkeypatch.setattr(files.store, "read_chunk", watched)
    reply = ask(proc, {"command": "blob-get", "sha256": sha})

    assert base64.b64decode(reply["data"]) == b"result bytes"
    assert seen == [False]  # read once, and not inside BEGIN IMMEDIATE


def test_a_file_whose_chunks_do_not_match_its_digest_is_refused_and_not_kept(
        proc: Processor, files: Files) -> None:
    claimed = digest(b"what was meant")
    [chunk] = chunk_messages(b"something else", sha=claimed)

    reply = ask(proc, chunk.model_dump())

    assert (reply["command"], reply["error"]) == ("error", "corrupt")
    assert not files.store.has(claimed)
    assert ask(proc, {"command": "blob-get", "sha256": claimed})["error"] == "not_found"


# --- files for nodes ------------------------------------------------------------------------


def test_a_resource_goes_once_to_each_node_ahead_of_the_first_task_run_there_that_needs_it(
        proc: Processor, store: Store) -> None:
    a, b = upload(proc, b"file a"), upload(proc, b"file b")
    send(proc, task_create("t1"))
    send(proc, task_create("t2"))
    send(proc, task_create("t3", usage_require_far=True))  # only n2 carries `far`
    needs(proc, "t1", a, b)
    needs(proc, "t2", a)
    needs(proc, "t3", a)

    first = send(proc, node_set("n1"), T0 + 1)  # one core: t1 starts, t2 waits

    assert to_node(first, "n1") == [("file", a), ("file", b), ("task-run", "t1")]
    assert [e.file for e in store.pending_outbox() if e.file] == [a, b]
    [run] = [json.loads(e.body) for e in first.outbox if e.command == "task-run"]
    assert run["resources"] == [{"sha256": a, "path": "in/0.bin"},
                                {"sha256": b, "path": "in/1.bin"}]

    second = send(proc, {"command": "task-complete", "name": "t1", "node": "n1",
                         "success": "ok", "attempt": 1}, T0 + 2)  # t2 starts on n1

    assert to_node(second, "n1") == [("task-run", "t2")]

    elsewhere = send(proc, node_set("n2", usage_far=True), T0 + 3)

    assert to_node(elsewhere, "n2") == [("file", a), ("task-run", "t3")]
    assert to_node(elsewhere, "n1") == []


class FailsOnce(Extension):
    """Once armed, makes the next batch fail after it was scheduled (an extension's flush is
    not isolated: one that raises rolls the batch back)."""

    name = "fails-once"

    def __init__(self) -> None:
        self.armed = False

    def flush(self, store: Store) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("the disk was full for a moment")


def test_a_file_send_that_was_rolled_back_is_sent_again_with_the_task_run(
        store: Store, tmp_path: Path) -> None:
    settings = files_settings(tmp_path)
    fails = FailsOnce()
    proc = Processor(store, settings, T0, extensions=[Files(settings), fails])
    sha = upload(proc, b"needed")
    send(proc, task_create("t1"))
    needs(proc, "t1", sha)
    fails.armed = True

    with capture_logs() as logged:
        outcome = send(proc, node_set("n1"), T0 + 1)

    assert "batch_failed_retrying_one_by_one" in [e["event"] for e in logged]
    assert to_node(outcome, "n1") == [("file", sha), ("task-run", "t1")]


# --- found while writing these ----------------------------------------------------------------


def test_a_processor_without_the_golem_extension_refuses_golem_messages_as_unknown(
        proc: Processor) -> None:
    with capture_logs():
        reply = ask(proc, {"type": "ListTasks"})

    assert (reply["command"], reply["error"]) == ("error", "unknown_type")


def test_a_node_whose_agent_started_again_is_sent_its_files_again(proc: Processor) -> None:
    a = upload(proc, b"file a")
    send(proc, task_create("t1"))
    send(proc, task_create("t2", usage_require_far=True))  # waits for the reinstalled node
    needs(proc, "t1", a)
    needs(proc, "t2", a)
    first = send(proc, {**node_set("n1"), "started": 100.0}, T0 + 1)
    send(proc, {"command": "task-complete", "name": "t1", "node": "n1", "success": "ok",
                "attempt": 1}, T0 + 2)

    reinstalled = send(proc, {**node_set("n1", usage_far=True), "started": 200.0}, T0 + 3)

    assert to_node(first, "n1") == [("file", a), ("task-run", "t1")]
    assert to_node(reinstalled, "n1") == [("file", a), ("task-run", "t2")]


def test_a_blob_get_whose_read_fails_is_still_answered_once(
        proc: Processor, files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = upload(proc, b"result bytes")

    def broken(sha256: str, index: int) -> Any:
        raise OSError("disk gone")

    monkeypatch.setattr(files.store, "read_chunk", broken)
    with capture_logs():
        reply = ask(proc, {"command": "blob-get", "sha256": sha})

    assert (reply["command"], reply["error"]) == ("error", "internal")
    assert "disk gone" in reply["message"]
