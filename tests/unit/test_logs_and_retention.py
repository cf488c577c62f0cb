"""Per-attempt logs on the node and in the log server, and what retention removes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vespid.node_agent import retention
from vespid.node_agent.logstream import LogStreams, attempt_log, note, read_record
from vespid.servers.logserver import LogServer
from vespid.shared.logwire import LogChunk
from vespid.shared.settings import ClientSettings

NOW = 1_000_000.0


@dataclass
class Settings:
    work_dir: Path
    retain_after_shipped: float = 60.0
    retain_unshipped_ok: float = 0.0
    retain_unshipped_failed: float = 600.0

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"


def finished(settings: Settings, task: str, attempt: int = 1, **record: Any) -> list[Path]:
    """The files a finished attempt leaves on a node, with its record."""
    log = attempt_log(settings.log_dir, task, attempt)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("output\n")
    note(log, **record)
    scratch, script = settings.work_dir / "scratch" / task, settings.work_dir / "scripts"
    scratch.mkdir(parents=True, exist_ok=True)
    script.mkdir(exist_ok=True)
    (script / f"{task}.py").write_text("pass")
    return [log, scratch, script / f"{task}.py"]


@pytest.mark.parametrize(("record", "now", "removed"), [
    ({"shipped": NOW - 61, "logserver": True}, NOW, True),
    ({"shipped": NOW - 59, "logserver": True}, NOW, False),
    ({"ended": NOW, "success": "ok", "logserver": False}, NOW, True),
    ({"ended": NOW - 599, "success": "fatal", "logserver": False}, NOW, False),
    ({"ended": NOW - 601, "success": "fatal", "logserver": False}, NOW, True),
    ({"ended": NOW - 10_000, "success": "ok"}, NOW, False),  # not yet shipped anywhere
])
def test_retention_keeps_each_kind_of_finished_task_for_its_time(
        tmp_path: Path, record: dict[str, Any], now: float, removed: bool) -> None:
    settings = Settings(tmp_path)
    files = finished(settings, "t", **record)

    gone = retention.clean(settings, set(), now)

    assert gone == (["t"] if removed else [])
    assert [path.exists() for path in files] == [not removed] * 3


def test_retention_never_touches_a_task_with_a_running_attempt(tmp_path: Path) -> None:
    settings = Settings(tmp_path)
    files = finished(settings, "t", attempt=1, shipped=NOW - 3600, logserver=True)

    assert retention.clean(settings, {("t", 2)}, NOW) == []
    assert all(path.exists() for path in files)


def test_an_agent_that_restarts_ships_every_attempt_it_had_not_finished_shipping(
        tmp_path: Path) -> None:
    settings = Settings(tmp_path)
    lost = attempt_log(settings.log_dir, "a", 1)
    lost.parent.mkdir(parents=True)
    lost.write_text("line 1\nline 2\n")
    finished(settings, "b", shipped=NOW, logserver=True)
    streams = LogStreams(settings.log_dir, "n1")

    assert streams.resume_unshipped(set()) == 1
    first, end = streams.pending(), None
    streams.sent(first[0], delivered=True)
    end = streams.pending()

    assert (first[0].task, first[0].attempt, first[0].offset, first[0].data) == \
        ("a", 1, 0, "line 1\nline 2\n")
    assert end[0].eof is True and end[0].offset == 14
    streams.sent(end[0], delivered=True)
    assert read_record(lost)["shipped"] and streams.pending() == []


def store(server: LogServer, **chunk: Any) -> None:
    server._store(LogChunk.model_validate({"command": "log-chunk", "task": "t", **chunk}))


def test_the_log_server_keeps_each_attempt_in_its_own_file(tmp_path: Path) -> None:
    server = LogServer(tmp_path, ClientSettings(amqp_url="amqp://unused"))
    store(server, attempt=2, node="A", offset=0, data="two\n")
    store(server, attempt=1, node="B", offset=0, data="one\n")
    store(server, attempt=1, node="B", offset=4, data="more\n", eof=True)

    latest, first = server.read("t", None, 0), server.read("t", 1, 0)

    assert (latest.attempt, latest.attempts, latest.data) == (2, [1, 2], "two\n")
    assert (latest.node, latest.complete) == ("A", False)
    assert (first.data, first.node, first.complete) == ("one\nmore\n", "B", True)


class Channel:
    """What the log server does with a channel: publish (dead letters, replies) and ack."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, Any]] = []
        self.acked: list[int] = []

    def basic_publish(self, exchange: str, _key: str, body: bytes, props: Any,
                      **_: Any) -> None:
        self.published.append((exchange, body, props))

    def basic_ack(self, tag: int) -> None:
        self.acked.append(tag)


@pytest.mark.parametrize("chunk", [
    {"attempt": 0, "offset": 0, "data": "x"},
    {"attempt": "1", "offset": 0, "data": "x"},
    {"attempt": 1, "offset": -1, "data": "x"},
    {"attempt": 1, "offset": 0, "data_base64": "not base64!"},
])
def test_the_log_server_dead_letters_a_malformed_chunk_saying_why(
        tmp_path: Path, chunk: dict[str, Any]) -> None:
    server, channel = LogServer(tmp_path, ClientSettings(amqp_url="amqp://unused")), Channel()
    body = json.dumps({"command": "log-chunk", "task": "t", **chunk}).encode()

    server._on_message(channel, SimpleNamespace(delivery_tag=7),
                       SimpleNamespace(reply_to=None, correlation_id=None), body)

    [(exchange, dead, props)] = channel.published
    assert (exchange, dead, channel.acked) == ("vespid.dead", body, [7])
    assert props.headers["x-vespid-error"].startswith("invalid_message: log-chunk: ")
    assert not (tmp_path / "t").exists()


def ask(server: LogServer, **request: Any) -> dict[str, Any]:
    """Send the server a log-get as the reader does; the one reply it publishes."""
    channel = Channel()
    body = json.dumps({"command": "log-get", "task": "t", **request}).encode()
    server._on_message(channel, SimpleNamespace(delivery_tag=1),
                       SimpleNamespace(reply_to="amq.rabbitmq.reply-to", correlation_id="c1"),
                       body)
    [(exchange, reply, props)] = channel.published
    assert (exchange, props.correlation_id, channel.acked) == ("", "c1", [1])
    answer: dict[str, Any] = json.loads(reply)
    return answer


def test_the_log_server_answers_a_log_get_and_refuses_a_bad_one_to_the_asker(
        tmp_path: Path) -> None:
    server = LogServer(tmp_path, ClientSettings(amqp_url="amqp://unused"))
    store(server, attempt=1, node="A", offset=0, data="one\n")

    answer, refused = ask(server, attempt=None, offset=0), ask(server, attempt="latest")

    assert (answer["command"], answer["data"], answer["known"]) == ("log-response", "one\n",
                                                                    True)
    assert (refused["command"], refused["error"]) == ("error", "invalid_message")
    assert refused["message"].startswith("log-get: attempt: ")
