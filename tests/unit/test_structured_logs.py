"""The coordinator's log lines tell of what happened: events logged inside a batch come out
once it committed, and never for a batch that was rolled back."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from tests.unit.test_processor import node_set, send, task_create
from vespid.coordinator import engine
from vespid.coordinator.processor import Processor
from vespid.shared import logs
from vespid.shared.errors import Superseded


class Lines(io.StringIO):
    """What the coordinator's log configuration writes (as its stderr), read line by line."""

    def read_events(self) -> list[dict[str, Any]]:
        text = self.getvalue()
        self.seek(0)
        self.truncate()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Lines]:
    lines = Lines()
    monkeypatch.setattr(sys, "stderr", lines)
    logs.configure("info", json_output=True)
    yield lines
    structlog.reset_defaults()


def test_info_logged_in_a_held_block_comes_out_after_it_with_what_was_bound_then(
        json_logs: Lines) -> None:
    log = structlog.get_logger()
    with logs.held_until_commit():
        structlog.contextvars.bind_contextvars(node="n1")
        log.info("decided", task="t1")
        structlog.contextvars.unbind_contextvars("node")
        log.warning("odd")
        assert [e["event"] for e in json_logs.read_events()] == ["odd"]  # warnings at once

    [decided] = json_logs.read_events()
    assert (decided["event"], decided["task"], decided["node"], decided["level"]) == \
        ("decided", "t1", "n1", "info")


def test_info_logged_in_a_held_block_that_raises_never_comes_out(
        json_logs: Lines) -> None:
    log = structlog.get_logger()
    with pytest.raises(RuntimeError), logs.held_until_commit():
        log.info("decided", task="t1")
        raise RuntimeError("the commit failed")
    log.info("after")

    assert [e["event"] for e in json_logs.read_events()] == ["after"]


def test_a_batch_fenced_out_at_its_commit_logs_no_task_it_did_not_start(
        proc: Processor, json_logs: Lines,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # As a coordinator paused mid-batch, whose state another took over meanwhile.
    monkeypatch.setattr(engine, "log", structlog.get_logger())  # the configuration above
    send(proc, node_set("n1", cores=4))
    flush = proc.store.flush

    def fenced_out(state: Any) -> None:
        raise Superseded("another coordinator took over this state")

    monkeypatch.setattr(proc.store, "flush", fenced_out)
    with pytest.raises(Superseded):
        send(proc, task_create("t1"))
    assert "task_started" not in [e["event"] for e in json_logs.read_events()]

    monkeypatch.setattr(proc.store, "flush", flush)
    proc.state = proc.store.load_state()
    send(proc, task_create("t2"))
    assert "task_started" in [e["event"] for e in json_logs.read_events()]
