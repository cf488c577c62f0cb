"""The Timeline extension on its own (tree-timeline, attempt-list, farm-history): a Processor
that runs only it, on a real SQLite file, with a fake clock."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vespid.coordinator.extensions.timeline import Timeline
from vespid.coordinator.processor import Delivery, Processor
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.store import SqliteStore

T0 = 1_000_000.0
HEARTBEAT, MISSED = 2.0, 4  # a node silent for 8 s is lost


def settings_in(tmp_path: Path) -> CoordinatorSettings:
    return CoordinatorSettings(state=tmp_path / "state.db", heartbeat_interval=HEARTBEAT,
                               missed_heartbeats=MISSED, history_interval=10.0,
                               history_keep=60.0, timeline_keep=3600.0)


def processor(settings: CoordinatorSettings, now: float = T0) -> Processor:
    return Processor(SqliteStore(settings.state), settings, now,
                     extensions=[Timeline(settings)])


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[Processor]:
    made = processor(settings_in(tmp_path))
    yield made
    made.store.close()


def ask(proc: Processor, body: dict[str, Any], now: float = T0) -> dict[str, Any]:
    outcome = proc.process([Delivery(json.dumps(body).encode(), "client", "corr")], now)
    assert len(outcome.replies) == 1
    return outcome.replies[0].body


def send(proc: Processor, body: dict[str, Any], now: float = T0) -> None:
    reply = ask(proc, body, now)
    assert reply["command"] != "error", reply


def node_set(name: str, cores: int = 4, running: list[str] | None = None) -> dict[str, Any]:
    return {"command": "node-set", "name": name, "capabilities": {"cores": cores},
            "repositories": {}, "activetasks": running or []}


def create(name: str, parent: str | None = None, cores: int = 1) -> dict[str, Any]:
    body = {"command": "task-create", "name": name, "executable_pyscript": "pass",
            "requirements": {"cores": cores}, "retries": 2}
    return body | ({"parent": parent} if parent else {})


def complete(name: str, node: str, success: str = "ok") -> dict[str, Any]:
    return {"command": "task-complete", "name": name, "node": node, "success": success}


def tree(proc: Processor, root: str, now: float) -> dict[str, Any]:
    return ask(proc, {"command": "tree-timeline", "root": root}, now)


def test_a_tree_lists_parents_before_children_with_each_attempts_times_and_outcome(
        proc: Processor) -> None:
    send(proc, node_set("n1"), T0)
    send(proc, create("root"), T0 + 1)  # starts at once on n1
    send(proc, create("a", parent="root"), T0 + 2)
    send(proc, create("b", parent="root"), T0 + 2)
    send(proc, create("a1", parent="a"), T0 + 3)
    send(proc, complete("b", "n1", "warning"), T0 + 5)

    reply = tree(proc, "root", T0 + 6)

    assert reply["command"] == "tree-timeline-response" and reply["total"] == 4
    names = [t["name"] for t in reply["tasks"]]
    assert names[0] == "root" and set(names[1:3]) == {"a", "b"} and names[3] == "a1"
    by_name = {t["name"]: t for t in reply["tasks"]}
    b = by_name["b"]
    assert b["parent"] == "root" and b["status"] == "complete" and b["success"] == "warning"
    assert b["attempts"] == [{"task": "b", "attempt": 1, "node": "n1", "queued": T0 + 2,
                              "start": T0 + 2, "end": T0 + 5, "outcome": "warning",
                              "why": "warning", "late": False, "cores": 1.0}]
    assert by_name["a1"]["attempts"][0]["outcome"] == "running"
    assert by_name["a1"]["attempts"][0]["end"] is None
    assert reply["now"] == T0 + 6


def test_an_unknown_root_is_refused_with_a_sentence(proc: Processor) -> None:
    reply = tree(proc, "nope", T0)
    assert reply["command"] == "error" and reply["error"] == "not_found"
    assert "nope" in reply["message"]


def test_a_lost_attempt_shows_as_lost_and_its_retry_waits_from_the_loss(
        proc: Processor) -> None:
    send(proc, node_set("n1"), T0)
    send(proc, create("t"), T0 + 1)
    send(proc, node_set("n2"), T0 + 9)  # n1 falls silent after T0
    proc.tick(T0 + 9)  # n1 lost: t starts again on n2
    send(proc, complete("t", "n2"), T0 + 12)

    attempts = tree(proc, "t", T0 + 13)["tasks"][0]["attempts"]

    assert [(a["node"], a["outcome"]) for a in attempts] == [("n1", "lost"), ("n2", "ok")]
    assert attempts[1]["queued"] == attempts[0]["end"] == T0 + 9
    assert "lost" in attempts[0]["why"]


def test_attempt_list_returns_what_ran_in_the_window_including_long_running_ones(
        proc: Processor) -> None:
    send(proc, node_set("n1"), T0)
    send(proc, create("long"), T0)  # runs from T0 and is still running
    send(proc, create("early"), T0 + 1)
    send(proc, complete("early", "n1"), T0 + 2)
    send(proc, create("middle"), T0 + 100)
    send(proc, complete("middle", "n1"), T0 + 200)
    send(proc, create("late"), T0 + 300)
    send(proc, node_set("n1", running=["long", "late"]), T0 + 300)

    def window(since: float, until: float | None = None, **more: Any) -> list[str]:
        reply = ask(proc, {"command": "attempt-list", "since": since, "until": until, **more},
                    T0 + 301)
        return [a["task"] for a in reply["attempts"]]

    assert window(T0 + 150, T0 + 250) == ["long", "middle"]
    assert window(T0 + 50) == ["long", "middle", "late"]
    assert window(T0) == ["long", "early", "middle", "late"]
    assert window(T0 + 201, T0 + 250) == ["long"]
    limited = ask(proc, {"command": "attempt-list", "since": T0, "limit": 2}, T0 + 301)
    assert limited["truncated"] is True
    assert [a["task"] for a in limited["attempts"]] == ["middle", "late"]  # the newest
    refused = ask(proc, {"command": "attempt-list", "since": T0 + 5, "until": T0}, T0 + 301)
    assert refused["command"] == "error"


def test_a_restarted_coordinator_finds_the_same_attempts(tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    first = processor(settings)
    send(first, node_set("n1"), T0)
    send(first, create("done"), T0)
    send(first, complete("done", "n1"), T0 + 50)
    send(first, create("running"), T0 + 60)
    first.store.close()

    second = processor(settings, T0 + 70)
    reply = ask(second, {"command": "attempt-list", "since": T0 + 10}, T0 + 70)
    second.store.close()

    assert [(a["task"], a["end"]) for a in reply["attempts"]] == [("done", T0 + 50),
                                                                   ("running", None)]


def test_the_index_is_made_on_the_first_ask_and_then_follows_new_attempts(
        tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    first = processor(settings)
    timeline = first.extensions.find(Timeline)
    send(first, node_set("n1"), T0)
    send(first, create("before"), T0)
    send(first, complete("before", "n1"), T0 + 500)  # the longest attempt: 500 s
    assert timeline._index is None  # nothing asked yet: no index made

    def window(proc: Processor, since: float, now: float) -> list[tuple[str, float | None]]:
        reply = ask(proc, {"command": "attempt-list", "since": since}, now)
        return [(a["task"], a["end"]) for a in reply["attempts"]]

    assert window(first, T0, T0 + 600) == [("before", T0 + 500)]
    assert timeline._index is not None
    send(first, create("after"), T0 + 700)  # followed by the index made above
    send(first, create("long"), T0 + 800)
    send(first, complete("long", "n1"), T0 + 2000)  # longer than any before it
    seen = window(first, T0 + 1900, T0 + 2100)
    first.store.close()

    assert seen == [("after", None), ("long", T0 + 2000)]
    again = processor(settings, T0 + 2100)  # a fresh index over the same state agrees
    assert window(again, T0 + 1900, T0 + 2100) == seen
    again.store.close()


def test_farm_history_samples_queue_starts_and_node_use_each_interval(
        proc: Processor) -> None:
    send(proc, node_set("n1", cores=4), T0)
    for name in ("a", "b", "c"):
        send(proc, create(name, cores=2), T0)  # two start, one waits
    proc.tick(T0 + 1)  # the first sample
    proc.tick(T0 + 5)  # within the interval: none
    send(proc, complete("a", "n1"), T0 + 6)  # c starts
    send(proc, node_set("n1", running=["b", "c"]), T0 + 7)
    proc.tick(T0 + 11)

    samples = ask(proc, {"command": "farm-history"}, T0 + 12)
    assert samples["interval"] == 10.0
    got = [(s["time"], s["queued"], s["running"], s["started"]) for s in samples["samples"]]
    assert got == [(T0 + 1, 1, 2, 2), (T0 + 11, 0, 2, 1)]
    assert samples["samples"][1]["nodes"] == {"n1": {"cores": 4.0, "cores_used": 4.0,
                                                      "memory": 0.0, "memory_used": 0.0}}
    since = ask(proc, {"command": "farm-history", "since": T0 + 1}, T0 + 12)
    assert [s["time"] for s in since["samples"]] == [T0 + 11]


def test_farm_history_keeps_only_its_window(proc: Processor) -> None:
    for second in range(0, 200, 10):
        proc.tick(T0 + second)
    samples = ask(proc, {"command": "farm-history"}, T0 + 200)["samples"]
    assert [s["time"] for s in samples] == [T0 + s for s in range(140, 200, 10)]


def test_why_a_task_waited_is_kept_after_it_starts(proc: Processor) -> None:
    send(proc, node_set("small", cores=2), T0)
    send(proc, create("big", cores=8), T0)
    proc.tick(T0 + 2)

    waiting = tree(proc, "big", T0 + 2)["tasks"][0]
    assert waiting["status"] is None and "small" in waiting["waiting_reason"]
    assert waiting["waited_for"] is None

    send(proc, node_set("large", cores=16), T0 + 3)
    started = tree(proc, "big", T0 + 4)["tasks"][0]
    assert started["status"] == "working" and started["waiting_reason"] is None
    assert started["waited_for"] == waiting["waiting_reason"]


def test_a_reason_names_the_first_obstacles_and_counts_the_rest(proc: Processor) -> None:
    for index in range(5):  # each too small in its own way: five obstacles
        send(proc, node_set(f"small{index}", cores=index + 1), T0)
    send(proc, create("big", cores=8), T0)
    reason = tree(proc, "big", T0 + 2)["tasks"][0]["waiting_reason"]
    assert reason.count("too small") == 3 and reason.endswith("; and 2 more")
