"""The Metrics extension on its own: a Processor that runs only Metrics (never served on a
port), on a real SQLite file, with a fake clock. Prometheus' registry is process-global, so
counters and histograms are read as differences from before; gauges are set, not added to."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from vespid.coordinator.extensions.metrics import Metrics
from vespid.coordinator.processor import Delivery, Outcome, Processor
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.store import SqliteStore
from vespid.shared.protocol import NodeList

T0 = 1_000_000.0
HEARTBEAT, MISSED = 2.0, 4  # a node silent for 8 s is lost


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[Processor]:
    settings = CoordinatorSettings(state=tmp_path / "state.db", heartbeat_interval=HEARTBEAT,
                                   missed_heartbeats=MISSED)
    store = SqliteStore(settings.state)
    yield Processor(store, settings, T0, extensions=[Metrics(port=9)])
    store.close()


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Counts:
    """Samples read now, to compare with later."""

    def __init__(self, *samples: tuple[str, dict[str, str]]) -> None:
        self.samples = samples
        self.before = [value(name, **labels) for name, labels in samples]

    def increase(self) -> list[float]:
        return [value(name, **labels) - before
                for (name, labels), before in zip(self.samples, self.before, strict=True)]


def handled(command: str) -> tuple[str, dict[str, str]]:
    return "vespid_messages_total", {"command": command}


def rejected(code: str) -> tuple[str, dict[str, str]]:
    return "vespid_messages_rejected_total", {"error": code}


def send(proc: Processor, body: dict[str, Any] | bytes, now: float = T0) -> Outcome:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return proc.process([Delivery(raw, "client", "corr")], now)


def node_set(name: str = "n1", cores: int = 4, **fields: Any) -> dict[str, Any]:
    return {"command": "node-set", "name": name, "capabilities": {"cores": cores},
            "repositories": {}, "activetasks": [], **fields}


def task_create(name: str, cores: int = 1) -> dict[str, Any]:
    return {"command": "task-create", "name": name, "executable_pyscript": "pass",
            "requirements": {"cores": cores}}


def test_handled_and_rejected_messages_are_counted_by_command_and_by_error_code(
        proc: Processor) -> None:
    counts = Counts(handled("node-set"), handled("task-info"), handled("task-cancel"),
                    handled("ListTasks"), rejected("not_found"), rejected("invalid_json"),
                    rejected("unknown_command"), rejected("invalid_message"))

    send(proc, node_set())
    send(proc, node_set())
    send(proc, {"command": "task-info", "name": "nobody"})  # answered: status invalid
    cancel = send(proc, {"command": "task-cancel", "name": "nobody"})
    send(proc, b"{not json")
    send(proc, {"command": "task-explode", "name": "t"})
    send(proc, {"command": "node-set"})  # no name

    assert json.loads(cancel.replies[0].data)["error"] == "not_found"
    # node-set x2, task-info, task-cancel (decoded, then refused), no ListTasks;
    # not_found (the cancel), invalid_json, unknown_command, invalid_message.
    assert counts.increase() == [2, 1, 1, 0, 1, 1, 1, 1]


def test_a_completed_task_is_observed_in_the_run_time_and_queue_wait_histograms(
        proc: Processor) -> None:
    counts = Counts(("vespid_task_run_seconds_count", {}), ("vespid_task_run_seconds_sum", {}),
                    ("vespid_task_run_seconds_bucket", {"le": "5.0"}),
                    ("vespid_task_run_seconds_bucket", {"le": "10.0"}),
                    ("vespid_task_queue_wait_seconds_count", {}),
                    ("vespid_task_queue_wait_seconds_sum", {}))
    send(proc, task_create("t1"), T0)
    send(proc, task_create("never", cores=64), T0)  # fits nowhere: cancelled, never started
    send(proc, node_set(), T0 + 3)  # t1 waited 3 s
    send(proc, {"command": "task-cancel", "name": "never"}, T0 + 4)

    send(proc, {"command": "task-complete", "name": "t1", "node": "n1", "success": "ok",
                "attempt": 1}, T0 + 10)  # ran 7 s

    assert counts.increase() == [1, 7.0, 0, 1, 1, 3.0]


def test_tick_refreshes_the_node_and_task_gauges_from_state(proc: Processor) -> None:
    proc.tick(T0)
    assert value("vespid_nodes", state="up") == 0
    send(proc, node_set("n1", cores=4), T0 + 1)
    send(proc, node_set("n2", cores=2, draining=True), T0 + 1)
    send(proc, task_create("big", cores=2), T0 + 1)  # on n1
    send(proc, task_create("huge", cores=64), T0 + 1)  # fits nowhere: idle

    assert value("vespid_nodes", state="up") == 0  # not refreshed between ticks

    proc.tick(T0 + 2)

    assert [value("vespid_nodes", state=s) for s in ("up", "draining", "lost")] == [1, 1, 0]
    assert value("vespid_node_utilisation", node="n1", resource="cores") == 0.5
    assert value("vespid_node_utilisation", node="n2", resource="cores") == 0.0
    assert value("vespid_tasks", status="working", success="none") == 1
    assert value("vespid_tasks", status="idle", success="none") == 1

    send(proc, {"command": "task-complete", "name": "big", "node": "n1", "success": "error",
                "attempt": 1}, T0 + 3)
    later = T0 + 1 + HEARTBEAT * MISSED + 1
    send(proc, node_set("n1", cores=4), later)  # n1's heartbeat; n2 silent since T0 + 1
    proc.tick(later)

    assert [value("vespid_nodes", state=s) for s in ("up", "draining", "lost")] == [1, 0, 1]
    assert value("vespid_node_utilisation", node="n1", resource="cores") == 0.0
    assert value("vespid_tasks", status="working", success="none") == 0
    assert value("vespid_tasks", status="complete", success="error") == 1


def test_a_message_is_counted_once_even_when_its_batch_is_retried_one_by_one(
        proc: Processor, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(ctx: Any, msg: Any) -> None:
        raise RuntimeError("a handler bug")

    monkeypatch.setitem(proc.dispatch_table, NodeList, boom)
    counts = Counts(handled("node-set"), handled("node-list"), rejected("internal"))

    with capture_logs():
        proc.process([Delivery(json.dumps(node_set()).encode()),
                      Delivery(b'{"command": "node-list"}', "client", "corr")], T0)

    assert counts.increase() == [1, 1, 1]
