"""vespid.coordinator.processor.Processor driven with raw deliveries, on a real SQLite file."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vespid.coordinator import engine, views
from vespid.coordinator.engine import LATE_FACTOR
from vespid.coordinator.matcher import QueueAsks
from vespid.coordinator.processor import Delivery, Outcome, Processor
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.store import OutboxEntry, Store, open_store
from vespid.shared.protocol import TaskCreate, TaskInfo, decode_node_message, encode

T0 = 1_000_000.0
HEARTBEAT = 2.0
MISSED = 4  # node timeout: 8 s
GRACE = 15.0


def settings(tmp_path: Path) -> CoordinatorSettings:
    return CoordinatorSettings(state=tmp_path / "s.db", heartbeat_interval=HEARTBEAT,
                               missed_heartbeats=MISSED, dispatch_grace=GRACE,
                               max_body_bytes=1024 * 1024)


def deliver(message: dict[str, Any] | bytes, reply_to: str | None = None) -> Delivery:
    raw = message if isinstance(message, bytes) else json.dumps(message).encode("utf-8")
    return Delivery(raw, reply_to=reply_to, correlation_id="corr-1" if reply_to else None)


def send(proc: Processor, message: dict[str, Any] | bytes, now: float = T0,
         reply_to: str | None = None) -> Outcome:
    return proc.process([deliver(message, reply_to)], now)


def node_set(name: str = "n1", activetasks: list[str] | None = None,
             **capabilities: Any) -> dict[str, Any]:
    return {"command": "node-set", "name": name,
            "capabilities": capabilities or {"cores": 4, "memory": 8000},
            "repositories": {}, "activetasks": activetasks or []}


def task_create(name: str = "t1", **fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"command": "task-create", "name": name,
                               "executable_pyscript": "print('hi')",
                               "requirements": {"cores": 2}}
    message.update(fields)
    return message


def info(proc: Processor, name: str, now: float = T0) -> dict[str, Any]:
    outcome = send(proc, {"command": "task-info", "name": name}, now, reply_to="client")
    assert len(outcome.replies) == 1
    return outcome.replies[0].body


def to_nodes(outcome: Outcome) -> list[tuple[str, dict[str, Any]]]:
    return [(e.routing_key, json.loads(e.body)) for e in outcome.outbox
            if e.exchange == "vespid"]


def event_keys(outcome: Outcome) -> list[str]:
    return [e.routing_key for e in outcome.outbox if e.exchange == "vespid.events"]


def dead_letters(outcome: Outcome) -> list[OutboxEntry]:
    return [e for e in outcome.outbox if e.exchange == "vespid.dead"]


def start_one(proc: Processor, name: str = "t1", now: float = T0, confirm: bool = True,
              **fields: Any) -> Outcome:
    """Start one task on n1; with `confirm`, the broker takes everything it sent at once."""
    send(proc, node_set(), now)
    outcome = send(proc, task_create(name, **fields), now)
    assert [key for key, _ in to_nodes(outcome)] == ["node.n1"]
    if confirm:
        proc.confirmed([e.id for e in outcome.outbox], now)
    return outcome


# --- creating and starting tasks ------------------------------------------------------------


def test_a_task_created_after_a_node_joined_is_sent_to_that_node_as_a_task_run(
        proc: Processor, store: Store) -> None:
    send(proc, node_set())

    outcome = send(proc, task_create(environment={"A": "1"}), T0 + 1)

    runs = [e for e in outcome.outbox if e.exchange == "vespid"]
    assert len(runs) == 1
    assert runs[0].routing_key == "node.n1"
    assert runs[0].command == "task-run"
    run = decode_node_message(runs[0].body)
    assert run.name == "t1"
    assert run.cores == 2.0
    assert run.attempt == 1
    assert run.environment == {"A": "1"}
    assert run.executable_pyscript == "print('hi')"
    assert run.log == "//n1/vespid/logs/t1/attempt-1.log"
    assert event_keys(outcome) == ["task.created.t1", "task.started.t1"]
    assert [e.id for e in store.pending_outbox()] == [e.id for e in outcome.outbox]


def test_the_started_event_carries_the_task_info_of_the_working_task(proc: Processor) -> None:
    send(proc, node_set())

    outcome = send(proc, task_create(), T0 + 1)

    started = [e for e in outcome.outbox if e.routing_key == "task.started.t1"]
    body = json.loads(started[0].body)
    assert body["command"] == "task-info-response"
    assert body["status"] == "working"
    assert body["node"] == "n1"
    assert body["time-start"] == T0 + 1


def test_a_task_created_with_no_node_waits_and_starts_when_a_node_joins(
        proc: Processor) -> None:
    created = send(proc, task_create())
    assert to_nodes(created) == []
    assert info(proc, "t1")["status"] is None

    joined = send(proc, node_set(), T0 + 5)

    assert [(key, body["name"]) for key, body in to_nodes(joined)] == [("node.n1", "t1")]
    assert info(proc, "t1", T0 + 5)["status"] == "working"


def test_an_unbounded_task_gets_every_core_and_task_info_shows_cores_max_as_null(
        proc: Processor) -> None:
    send(proc, node_set())

    outcome = proc.process([Delivery(
        b'{"command":"task-create","name":"t1","executable_pyscript":"x",'
        b'"requirements":{"cores":1,"cores_max":Infinity}}')], T0)

    assert to_nodes(outcome)[0][1]["cores"] == 4.0
    reply = info(proc, "t1")
    assert reply["requirements"] == {"cores": 1, "cores_max": None}


def test_a_task_create_with_reply_to_is_acknowledged(proc: Processor) -> None:
    outcome = send(proc, task_create(), reply_to="amq.rabbitmq.reply-to")

    assert len(outcome.replies) == 1
    reply = outcome.replies[0]
    assert reply.reply_to == "amq.rabbitmq.reply-to"
    assert reply.correlation_id == "corr-1"
    assert reply.body == {"command": "ack", "name": "t1"}


def test_a_message_without_reply_to_gets_no_reply(proc: Processor) -> None:
    assert send(proc, task_create()).replies == []


def test_a_repeated_identical_task_create_is_acknowledged_and_changes_nothing(
        proc: Processor) -> None:
    start_one(proc)
    before = info(proc, "t1")

    outcome = send(proc, task_create(), T0 + 3, reply_to="client")

    assert outcome.replies[0].body == {"command": "ack", "name": "t1"}
    assert outcome.outbox == []
    assert info(proc, "t1", T0 + 3) == before


def test_a_different_task_under_an_existing_name_is_a_conflict(proc: Processor) -> None:
    start_one(proc)

    outcome = send(proc, task_create(requirements={"cores": 3}), T0 + 1, reply_to="client")

    body = outcome.replies[0].body
    assert body["command"] == "error"
    assert body["error"] == "conflict"
    assert "'t1'" in body["message"]
    assert outcome.outbox == []
    assert info(proc, "t1")["requirements"] == {"cores": 2}


def test_a_child_of_an_unknown_parent_is_refused(proc: Processor) -> None:
    outcome = send(proc, task_create("child", parent="ghost"), reply_to="client")

    assert outcome.replies[0].body["error"] == "unknown_parent"
    assert info(proc, "child")["status"] == "invalid"


def test_a_task_that_needs_more_memory_than_any_node_stays_idle(proc: Processor) -> None:
    send(proc, node_set("small", cores=8, memory=1000))
    send(proc, node_set("medium", cores=8, memory=4000))

    outcome = send(proc, task_create(requirements={"memory": 5000}), T0 + 1)

    assert to_nodes(outcome) == []
    assert event_keys(outcome) == ["task.created.t1"]
    reply = info(proc, "t1", T0 + 2)
    assert reply["status"] is None
    assert reply["node"] is None


# --- malformed messages ---------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "code"), [
    (b"{not json", "invalid_json"),
    (b'{"command":"frobnicate"}', "unknown_command"),
    (b'{"type":"TaskResults"}', "unknown_type"),
    (b'{"command":"task-create","name":"t1"}', "invalid_message"),
])
def test_a_malformed_message_with_reply_to_gets_an_error_reply_and_is_not_dead_lettered(
        proc: Processor, raw: bytes, code: str) -> None:
    outcome = proc.process([Delivery(raw, reply_to="client", correlation_id="c9")], T0)

    assert len(outcome.replies) == 1
    reply = outcome.replies[0]
    assert reply.correlation_id == "c9"
    assert reply.body["command"] == "error"
    assert reply.body["error"] == code
    assert reply.body["message"]
    assert outcome.outbox == []


@pytest.mark.parametrize(("raw", "code", "command"), [
    (b"\xff\xfe garbage", "invalid_json", "unknown"),
    (b'{"command":"frobnicate"}', "unknown_command", "frobnicate"),
    (b'{"command":"task-info"}', "invalid_message", "task-info"),
])
def test_a_malformed_message_without_reply_to_is_dead_lettered_with_the_reason(
        proc: Processor, raw: bytes, code: str, command: str) -> None:
    outcome = proc.process([Delivery(raw)], T0)

    assert outcome.replies == []
    assert len(outcome.outbox) == 1
    entry = outcome.outbox[0]
    assert entry.exchange == "vespid.dead"
    assert entry.body == raw
    assert entry.command == command
    assert entry.headers is not None
    assert entry.headers["x-vespid-error"].startswith(f"{code}: ")


def test_a_too_large_message_is_dead_lettered_as_too_large(tmp_path: Path,
                                                           store: Store) -> None:
    small = CoordinatorSettings(state=tmp_path / "s.db", max_body_bytes=1024)
    proc = Processor(store, small, now=T0)

    outcome = send(proc, task_create(executable_pyscript="x" * 2000))

    [entry] = dead_letters(outcome)
    assert entry.headers is not None
    assert entry.headers["x-vespid-error"].startswith("too_large: ")
    assert info(proc, "t1")["status"] == "invalid"


def test_a_bad_message_in_a_batch_does_not_stop_the_good_ones(proc: Processor) -> None:
    outcome = proc.process([deliver(task_create("a")), Delivery(b"junk"),
                            deliver(task_create("b"))], T0)

    assert len(dead_letters(outcome)) == 1
    assert event_keys(outcome) == ["task.created.a", "task.created.b"]


# --- completing and updating ------------------------------------------------------------------


def test_task_complete_ends_the_task_with_the_reported_success(proc: Processor) -> None:
    start_one(proc)

    outcome = send(proc, {"command": "task-complete", "name": "t1", "node": "n1",
                          "success": "warning"}, T0 + 10)

    assert event_keys(outcome) == ["task.completed.t1"]
    reply = info(proc, "t1", T0 + 10)
    assert reply["status"] == "complete"
    assert reply["success"] == "warning"
    assert reply["time-finish"] == T0 + 10


def test_a_later_task_update_never_lowers_the_success_of_a_complete_task(
        proc: Processor) -> None:
    start_one(proc)
    send(proc, {"command": "task-complete", "name": "t1", "node": "n1", "success": "error"},
         T0 + 10)

    outcome = send(proc, {"command": "task-update", "name": "t1", "success": "ok"}, T0 + 11)

    assert event_keys(outcome) == []
    assert info(proc, "t1", T0 + 11)["success"] == "error"


def test_a_task_update_raises_the_success_of_a_working_task(proc: Processor) -> None:
    start_one(proc)

    outcome = send(proc, {"command": "task-update", "name": "t1", "success": "error",
                          "message": "disk nearly full"}, T0 + 2)

    assert event_keys(outcome) == ["task.updated.t1"]
    reply = info(proc, "t1", T0 + 2)
    assert reply["status"] == "working"
    assert reply["success"] == "error"
    assert reply["message"] == "disk nearly full"


def test_a_complete_with_ok_after_a_warning_update_keeps_the_warning(proc: Processor) -> None:
    start_one(proc)
    send(proc, {"command": "task-update", "name": "t1", "success": "warning"}, T0 + 1)

    send(proc, {"command": "task-complete", "name": "t1", "node": "n1", "success": "ok"},
         T0 + 2)

    reply = info(proc, "t1", T0 + 2)
    assert reply["status"] == "complete"
    assert reply["success"] == "warning"


def test_a_working_task_never_shows_success_ok(proc: Processor) -> None:
    start_one(proc)

    send(proc, {"command": "task-update", "name": "t1", "success": "ok"}, T0 + 1)

    reply = info(proc, "t1", T0 + 1)
    assert reply["status"] == "working"
    assert reply["success"] is None


def test_a_repeated_task_complete_changes_nothing(proc: Processor) -> None:
    start_one(proc)
    complete = {"command": "task-complete", "name": "t1", "node": "n1", "success": "ok"}
    send(proc, complete, T0 + 5)
    before = info(proc, "t1", T0 + 5)

    outcome = send(proc, complete, T0 + 9)

    assert outcome.outbox == []
    assert info(proc, "t1", T0 + 9) == before


def test_a_task_complete_from_another_node_is_ignored(proc: Processor) -> None:
    start_one(proc)

    send(proc, {"command": "task-complete", "name": "t1", "node": "impostor",
                "success": "ok"}, T0 + 5)

    assert info(proc, "t1", T0 + 5)["status"] == "working"


def test_completing_a_task_frees_its_cores_for_the_next_waiting_task(proc: Processor) -> None:
    send(proc, node_set(cores=2))
    send(proc, task_create("a"))
    waiting = send(proc, task_create("b"))
    assert to_nodes(waiting) == []

    outcome = send(proc, {"command": "task-complete", "name": "a", "node": "n1",
                          "success": "ok"}, T0 + 5)

    assert [(key, body["name"]) for key, body in to_nodes(outcome)] == [("node.n1", "b")]


# --- lost nodes and reconciling -------------------------------------------------------------


def test_a_node_silent_longer_than_the_heartbeat_timeout_loses_its_working_task(
        proc: Processor) -> None:
    start_one(proc, retries=0)
    timeout = HEARTBEAT * MISSED

    quiet = proc.tick(T0 + timeout)
    assert quiet.outbox == []
    assert info(proc, "t1", T0 + timeout)["status"] == "working"

    outcome = proc.tick(T0 + timeout + 0.5)

    assert event_keys(outcome) == ["task.completed.t1"]
    reply = info(proc, "t1", T0 + timeout + 0.5)
    assert reply["status"] == "complete"
    assert reply["success"] == "terminated"
    nodes = send(proc, {"command": "node-list"}, T0 + timeout + 0.5, reply_to="c")
    [listed] = nodes.replies[0].body["nodes"]
    assert listed["alive"] is False
    assert listed["accepting"] is False


def test_a_heartbeat_keeps_a_node_and_its_task_alive(proc: Processor) -> None:
    start_one(proc)
    send(proc, node_set(activetasks=["t1"]), T0 + 6)

    proc.tick(T0 + 12)

    assert info(proc, "t1", T0 + 12)["status"] == "working"


def test_a_node_set_that_omits_a_task_it_reported_before_ends_it_terminated(
        proc: Processor) -> None:
    start_one(proc, retries=0)
    send(proc, node_set(activetasks=["t1"]), T0 + 1)

    outcome = send(proc, node_set(activetasks=[]), T0 + 2)

    assert event_keys(outcome) == ["task.completed.t1"]
    reply = info(proc, "t1", T0 + 2)
    assert reply["status"] == "complete"
    assert reply["success"] == "terminated"


def test_a_node_set_that_omits_a_task_sent_moments_ago_leaves_it_working(
        proc: Processor) -> None:
    start_one(proc)

    outcome = send(proc, node_set(activetasks=[]), T0 + GRACE - 1)

    assert event_keys(outcome) == []
    assert info(proc, "t1", T0 + GRACE - 1)["status"] == "working"


def test_a_node_set_that_still_omits_a_task_after_the_grace_ends_it_terminated(
        proc: Processor) -> None:
    start_one(proc, retries=0)
    send(proc, node_set(activetasks=[]), T0 + GRACE - 1)

    send(proc, node_set(activetasks=[]), T0 + GRACE + 1)

    reply = info(proc, "t1", T0 + GRACE + 1)
    assert reply["status"] == "complete"
    assert reply["success"] == "terminated"


def test_a_node_set_that_came_within_the_grace_leaves_it_working_even_if_handled_late(
        proc: Processor) -> None:
    """A coordinator behind on the nodes' messages handles an old node-set long after it
    came: what counts is when it came, which may be before the node got the task-run."""
    start_one(proc, retries=0)
    old = dataclasses.replace(deliver(node_set(activetasks=[])), received=T0 + GRACE - 1)
    proc.process([old], T0 + GRACE + 30)

    assert info(proc, "t1", T0 + GRACE + 30)["status"] == "working"

    late = dataclasses.replace(deliver(node_set(activetasks=[])), received=T0 + GRACE + 1)
    proc.process([late], T0 + GRACE + 31)

    assert info(proc, "t1", T0 + GRACE + 31)["success"] == "terminated"


def test_a_node_set_queued_within_the_grace_ends_nothing_however_late_it_arrives(
        proc: Processor) -> None:
    """Behind a backlog in the broker a node-set arrives long after it was queued, and the
    node may have sent it before it read the task-run: a mark sent through the queue
    (marks.py) says when it was queued at the earliest, and that is what counts. At 1,000
    busy nodes with the coordinator 30 s behind, judging by arrival ran 3,000 of 100,000
    tasks twice."""
    start_one(proc, retries=0)
    waited = dataclasses.replace(deliver(node_set(activetasks=[])), received=T0 + GRACE + 30,
                                 enqueued_after=T0 + 1)
    proc.process([waited], T0 + GRACE + 30)

    assert info(proc, "t1", T0 + GRACE + 30)["status"] == "working"

    queued_late = dataclasses.replace(deliver(node_set(activetasks=[])),
                                      received=T0 + GRACE + 31, enqueued_after=T0 + GRACE + 1)
    proc.process([queued_late], T0 + GRACE + 31)

    assert info(proc, "t1", T0 + GRACE + 31)["success"] == "terminated"


def test_with_no_mark_before_it_a_node_set_ends_nothing_by_the_clock(proc: Processor) -> None:
    """0.0: no mark came back before it (a coordinator just started, behind from the
    start): it may be as old as anything in the queue."""
    start_one(proc, retries=0)
    unknown = dataclasses.replace(deliver(node_set(activetasks=[])), received=T0 + 10 * GRACE,
                                  enqueued_after=0.0)
    proc.process([unknown], T0 + 10 * GRACE)

    assert info(proc, "t1", T0 + 10 * GRACE)["status"] == "working"


def test_a_node_is_lost_only_once_its_silence_is_in_what_the_broker_queued(
        proc: Processor) -> None:
    """Behind a backlog the node's heartbeats may be waiting in the broker: it is lost
    only when everything queued up to a timeout after its last message has been handled."""
    start_one(proc, retries=0)
    timeout = HEARTBEAT * MISSED

    behind = proc.tick(T0 + timeout + 30, heard_through=T0 + timeout - 1)
    assert behind.outbox == []
    assert info(proc, "t1", T0 + timeout + 30)["status"] == "working"

    proc.tick(T0 + timeout + 31, heard_through=T0 + timeout + 1)
    reply = info(proc, "t1", T0 + timeout + 31)
    assert reply["success"] == "terminated" and "lost" in reply["message"]


def test_a_node_set_never_ends_a_task_whose_task_run_the_broker_has_not_taken(
        proc: Processor) -> None:
    """At 1,000 busy nodes the broker held back the coordinator's publishes for longer than
    the grace: node-sets sent before the task-run even left were taken for losses, and a
    third of the tasks ran twice. No node can have a task-run the broker has not taken."""
    start_one(proc, retries=0, confirm=False)

    outcome = send(proc, node_set(activetasks=[]), T0 + 10 * GRACE)

    assert event_keys(outcome) == []
    assert info(proc, "t1", T0 + 10 * GRACE)["status"] == "working"


def test_the_grace_counts_from_when_the_broker_took_the_task_run(proc: Processor) -> None:
    outcome = start_one(proc, retries=0, confirm=False)
    taken = T0 + 100
    proc.confirmed([e.id for e in outcome.outbox], taken)

    send(proc, node_set(activetasks=[]), taken + GRACE - 1)
    assert info(proc, "t1", taken + GRACE - 1)["status"] == "working"

    send(proc, node_set(activetasks=[]), taken + GRACE + 1)
    reply = info(proc, "t1", taken + GRACE + 1)
    assert reply["success"] == "terminated"
    assert "no longer reports" in reply["message"]


def test_behind_on_the_nodes_messages_a_node_set_past_the_grace_ends_nothing(
        proc: Processor) -> None:
    """With the node channel's messages waiting (in hand, or in the broker behind a full
    window), a node-set reaching us now may have been sent long ago, before the node got
    the task-run: the grace waits until the coordinator is current again."""
    start_one(proc, retries=0)
    behind = proc.process([deliver(node_set(activetasks=[]))], T0 + GRACE + 30,
                          nodes_current=False)

    assert event_keys(behind) == []
    assert info(proc, "t1", T0 + GRACE + 30)["status"] == "working"

    send(proc, node_set(activetasks=[]), T0 + GRACE + 31)
    assert info(proc, "t1", T0 + GRACE + 31)["success"] == "terminated"


def test_behind_on_the_nodes_messages_a_task_the_node_reported_then_omits_is_still_gone(
        proc: Processor) -> None:
    """The node's own word needs no clock: it listed the task, then a later node-set does
    not (its task-complete would have come first)."""
    start_one(proc, retries=0)
    send(proc, node_set(activetasks=["t1"]), T0 + 1)

    proc.process([deliver(node_set(activetasks=[]))], T0 + 2, nodes_current=False)

    assert info(proc, "t1", T0 + 2)["success"] == "terminated"


def test_a_confirm_for_an_earlier_attempt_leaves_the_current_one_waiting(
        proc: Processor) -> None:
    """The task-run of an attempt since given up is confirmed late: the attempt that
    replaced it has not reached the broker yet, so it is not judged by that time."""
    first = start_one(proc, retries=1, confirm=False)
    send(proc, node_set("n2"), T0)
    send(proc, {"command": "node-set", "name": "n1", "capabilities": {}, "repositories": {},
                "activetasks": {}, "leaving": True}, T0 + 1)  # attempt 1 lost; 2 goes to n2
    proc.confirmed([e.id for e in first.outbox], T0 + 2)

    send(proc, node_set("n2", activetasks=[]), T0 + 10 * GRACE)

    reply = info(proc, "t1", T0 + 10 * GRACE)
    assert (reply["status"], reply["node"]) == ("working", "n2")


def start_in_order(proc: Processor, names: list[str], now: float = T0) -> None:
    """Start these tasks on n1, one core each, their task-runs confirmed in this order."""
    send(proc, node_set(), now)
    for name in names:
        outcome = send(proc, task_create(name, retries=0, requirements={"cores": 1}), now)
        assert [key for key, _ in to_nodes(outcome)] == ["node.n1"]
        proc.confirmed([e.id for e in outcome.outbox], now)


def reporting(*names: str) -> dict[str, Any]:
    """n1's node-set listing these tasks at their first attempt, as the project's agent does."""
    return {**node_set(), "activetasks": {name: {"attempt": 1} for name in names}}


def status(proc: Processor, name: str, now: float) -> tuple[str, str | None]:
    reply = info(proc, name, now)
    return reply["status"], reply["success"]


def test_a_node_that_reports_a_later_task_run_has_had_every_earlier_one(
        proc: Processor) -> None:
    """A node's queue is first in, first out: listing t2 shows it received t1 before, so
    t1 left out is gone at once, with no clock (a node-set can be as late as it likes)."""
    start_in_order(proc, ["t1", "t2"])

    send(proc, reporting("t2"), T0 + 1)

    assert status(proc, "t1", T0 + 1) == ("complete", "terminated")
    assert status(proc, "t2", T0 + 1) == ("working", None)


def test_a_task_reported_by_name_alone_vouches_for_no_earlier_task_run(
        proc: Processor) -> None:
    """A name without its attempt may be an earlier attempt of that task, still running
    there: it says nothing of which task-runs the node has read."""
    start_in_order(proc, ["t1", "t2"])

    send(proc, node_set(activetasks=["t2"]), T0 + 1)

    assert status(proc, "t1", T0 + 1) == ("working", None)


def complete(proc: Processor, name: str, now: float) -> None:
    send(proc, {"command": "task-complete", "name": name, "node": "n1", "success": "ok",
                "attempt": 1}, now)


def test_a_later_task_run_completed_vouches_for_the_earlier_ones_too(
        proc: Processor) -> None:
    start_in_order(proc, ["t0"])
    send(proc, reporting("t0"), T0)  # a node that lists what it runs
    complete(proc, "t0", T0)
    start_in_order(proc, ["t1", "t2"])
    complete(proc, "t2", T0 + 1)

    send(proc, node_set(activetasks=[]), T0 + 2)

    assert status(proc, "t1", T0 + 2) == ("complete", "terminated")


def test_a_node_that_never_lists_its_tasks_is_judged_by_the_grace_alone(
        proc: Processor) -> None:
    """A third-party node may send activetasks empty: that it completed t2 and leaves t1
    out says nothing then, and t1 keeps its grace."""
    start_in_order(proc, ["t1", "t2"])
    complete(proc, "t2", T0 + 1)

    send(proc, node_set(activetasks=[]), T0 + 2)
    assert status(proc, "t1", T0 + 2) == ("working", None)

    send(proc, node_set(activetasks=[]), T0 + LATE_FACTOR * GRACE + 1)
    assert status(proc, "t1", T0 + LATE_FACTOR * GRACE + 1) == ("complete", "terminated")


def test_a_task_run_with_later_ones_also_unreported_waits_for_the_order_not_the_grace(
        proc: Processor) -> None:
    """Neither of two task-runs reported: the node has most likely not read its queue yet.
    The latest is judged by the grace; an earlier one waits LATE_FACTOR graces, since the
    node's report of any later one will tell."""
    start_in_order(proc, ["t1", "t2"])

    send(proc, node_set(activetasks=[]), T0 + GRACE + 1)

    assert status(proc, "t2", T0 + GRACE + 1) == ("complete", "terminated")
    assert status(proc, "t1", T0 + GRACE + 1) == ("working", None)
    send(proc, node_set(activetasks=[]), T0 + LATE_FACTOR * GRACE + 1)
    assert status(proc, "t1", T0 + LATE_FACTOR * GRACE + 1) == ("complete", "terminated")


def test_a_report_of_another_attempt_vouches_for_no_earlier_task_run(
        proc: Processor) -> None:
    start_in_order(proc, ["t1", "t2"])

    send(proc, {**node_set(), "activetasks": {"t2": {"attempt": 7}}}, T0 + 1)

    assert status(proc, "t1", T0 + 1) == ("working", None)


def test_a_task_run_not_yet_confirmed_is_not_judged_by_the_order(proc: Processor) -> None:
    """The broker has not taken t1's task-run (it may reach the queue after t2's): that the
    node reports t2 says nothing about t1."""
    send(proc, node_set(), T0)
    first = send(proc, task_create("t1", retries=0, requirements={"cores": 1}), T0)
    second = send(proc, task_create("t2", retries=0, requirements={"cores": 1}), T0)
    proc.confirmed([e.id for e in second.outbox], T0)

    send(proc, reporting("t2"), T0 + 1)
    assert status(proc, "t1", T0 + 1) == ("working", None)

    proc.confirmed([e.id for e in first.outbox], T0 + 2)  # now behind t2 in the queue
    send(proc, reporting("t2"), T0 + 3)
    assert status(proc, "t1", T0 + 3) == ("working", None)


def test_a_reload_after_a_failed_batch_keeps_an_unconfirmed_task_run_unjudged(
        proc: Processor) -> None:
    """Reloading rebuilds the state from the store, where nothing says a task-run is still
    on its way: without the processor's own list, a node-set would count against it."""
    start_one(proc, retries=0, confirm=False)
    proc._reload()

    send(proc, node_set(activetasks=[]), T0 + 10 * GRACE)

    assert status(proc, "t1", T0 + 10 * GRACE) == ("working", None)


def test_a_nodes_queue_order_is_not_written_to_the_store(proc: Processor) -> None:
    """Its numbers mean something to this process only; an older coordinator reading the
    record must not meet fields it does not know."""
    start_in_order(proc, ["t1"])
    send(proc, reporting("t1"), T0 + 1)
    node = proc.state.nodes["n1"]
    assert (node._sent, node._vouched, node._lists_tasks) == (1, 1, True)

    assert not any(key.startswith("_") for key in node.to_record())


def stalled(start: float, seconds: float) -> Callable[[float, float], float]:
    """This coordinator heard nothing from `start` for `seconds` (hearing.Hearing)."""
    return lambda since, until: max(0.0, min(until, start + seconds) - max(since, start))


def test_a_stall_of_the_coordinator_is_not_a_nodes_silence(proc: Processor) -> None:
    """Its own stall (a long commit, a paused process) left the nodes' heartbeats waiting in
    its socket: counted as their silence, every node would be lost and its tasks run twice."""
    start_one(proc, retries=0)
    timeout = HEARTBEAT * MISSED
    proc.deaf_between = stalled(T0 + 1, 30)

    proc.tick(T0 + 31 + timeout - 1)
    assert status(proc, "t1", T0 + 31 + timeout - 1) == ("working", None)

    proc.tick(T0 + 31 + timeout + 0.5)
    assert status(proc, "t1", T0 + 31 + timeout + 0.5) == ("complete", "terminated")


def test_a_node_set_read_after_a_stall_of_the_coordinator_is_not_late(
        proc: Processor) -> None:
    """Read after a 30 s stall, a node-set may have been sent before the node read the
    task-run: the stall does not count toward the grace."""
    start_one(proc, retries=0)
    proc.deaf_between = stalled(T0 + 1, 30)

    send(proc, node_set(activetasks=[]), T0 + 31 + GRACE - 2)
    assert status(proc, "t1", T0 + 31 + GRACE - 2) == ("working", None)

    send(proc, node_set(activetasks=[]), T0 + 31 + GRACE + 1)
    assert status(proc, "t1", T0 + 31 + GRACE + 1) == ("complete", "terminated")


def test_a_node_reporting_a_task_it_should_not_run_is_told_to_kill_it(
        proc: Processor) -> None:
    send(proc, node_set())

    outcome = send(proc, node_set(activetasks=["stray"]), T0 + 1)

    assert [(key, body["command"], body["name"]) for key, body in to_nodes(outcome)] == \
        [("node.n1", "task-kill", "stray")]


# --- cancelling -----------------------------------------------------------------------------


def test_cancelling_an_idle_parent_also_ends_its_idle_children_terminated(
        proc: Processor) -> None:
    send(proc, task_create("parent"))
    send(proc, task_create("child", parent="parent"))
    send(proc, task_create("grandchild", parent="child"))
    send(proc, task_create("bystander"))

    outcome = send(proc, {"command": "task-cancel", "name": "parent"}, T0 + 1, reply_to="c")

    assert outcome.replies[0].body == {"command": "ack", "name": "parent"}
    # Parent and child completed before their descendants: each is announced again
    # (`updated`) once its whole tree is complete.
    assert sorted(event_keys(outcome)) == ["task.completed.child", "task.completed.grandchild",
                                           "task.completed.parent", "task.updated.child",
                                           "task.updated.parent"]
    for name in ("parent", "child", "grandchild"):
        reply = info(proc, name, T0 + 1)
        assert (reply["status"], reply["success"]) == ("complete", "terminated")
    assert info(proc, "bystander", T0 + 1)["status"] is None
    assert info(proc, "parent", T0 + 1)["children"] == ["child"]


def test_a_cancelled_idle_task_never_starts_when_a_node_joins(proc: Processor) -> None:
    send(proc, task_create())
    send(proc, {"command": "task-cancel", "name": "t1"})

    outcome = send(proc, node_set(), T0 + 1)

    assert to_nodes(outcome) == []


def test_cancelling_a_working_task_sends_a_kill_to_its_node(proc: Processor) -> None:
    start_one(proc)

    outcome = send(proc, {"command": "task-cancel", "name": "t1"}, T0 + 1)

    assert [(key, body["command"], body["name"], body["attempt"])
            for key, body in to_nodes(outcome)] == [("node.n1", "task-kill", "t1", 1)]
    assert info(proc, "t1", T0 + 1)["status"] == "working"


def test_cancelling_an_unknown_task_is_not_found(proc: Processor) -> None:
    outcome = send(proc, {"command": "task-cancel", "name": "ghost"}, reply_to="c")

    assert outcome.replies[0].body["error"] == "not_found"


# --- persistence ----------------------------------------------------------------------------


def test_state_survives_reopening_the_store(
        tmp_path: Path, state_location: Path | str, store: Store, proc: Processor) -> None:
    start_one(proc)
    send(proc, task_create("waiting", requirements={"memory": 99999}))
    store.close()

    reopened = open_store(state_location)
    try:
        again = Processor(reopened, settings(tmp_path), now=T0 + 60)
        working = info(again, "t1", T0 + 60)
        waiting = info(again, "waiting", T0 + 60)
    finally:
        reopened.close()

    assert (working["status"], working["node"], working["attempt"]) == ("working", "n1", 1)
    assert waiting["status"] is None
    assert waiting["requirements"] == {"memory": 99999}


def test_a_reopened_store_still_counts_the_cores_of_working_tasks(
        tmp_path: Path, state_location: Path | str, store: Store, proc: Processor) -> None:
    send(proc, node_set(cores=2))
    send(proc, task_create("a"))
    store.close()

    reopened = open_store(state_location)
    try:
        again = Processor(reopened, settings(tmp_path), now=T0 + 1)
        outcome = send(again, task_create("b"), T0 + 1)
    finally:
        reopened.close()

    assert to_nodes(outcome) == []


def test_a_repeated_unbounded_task_create_after_a_restart_is_still_acknowledged(
        tmp_path: Path, state_location: Path | str, store: Store, proc: Processor) -> None:
    raw = (b'{"command":"task-create","name":"t1","executable_pyscript":"x",'
           b'"requirements":{"cores":1,"cores_max":Infinity}}')
    proc.process([Delivery(raw)], T0)
    store.close()

    reopened = open_store(state_location)
    try:
        again = Processor(reopened, settings(tmp_path), now=T0 + 1)
        outcome = again.process([Delivery(raw, reply_to="c")], T0 + 1)
    finally:
        reopened.close()

    assert outcome.replies[0].body == {"command": "ack", "name": "t1"}
    assert outcome.outbox == []


def test_a_restarted_coordinator_gives_silent_nodes_a_full_timeout_from_its_start(
        tmp_path: Path, state_location: Path | str, store: Store, proc: Processor) -> None:
    start_one(proc, retries=0)
    store.close()
    restart = T0 + 60

    reopened = open_store(state_location)
    try:
        again = Processor(reopened, settings(tmp_path), now=restart)
        early = again.tick(restart + HEARTBEAT * MISSED - 1)
        status = info(again, "t1", restart + 1)["status"]
        late = again.tick(restart + HEARTBEAT * MISSED + 1)
    finally:
        reopened.close()

    assert early.outbox == []
    assert status == "working"
    assert event_keys(late) == ["task.completed.t1"]


def test_a_crashed_batch_after_a_restart_does_not_make_nodes_look_lost(
        tmp_path: Path, state_location: Path | str, store: Store, proc: Processor,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(ctx: Any, msg: Any) -> None:
        raise RuntimeError("boom")

    start_one(proc)
    store.close()
    restart = T0 + 60
    reopened = open_store(state_location)
    try:
        again = Processor(reopened, settings(tmp_path), now=restart)
        monkeypatch.setitem(again.dispatch_table, TaskInfo, explode)
        again.process([deliver({"command": "task-info", "name": "t1"})], restart)
        monkeypatch.undo()
        outcome = again.tick(restart + 1)
        status = info(again, "t1", restart + 1)["status"]
    finally:
        reopened.close()

    assert event_keys(outcome) == []
    assert status == "working"


def test_unconfirmed_outbox_entries_survive_reopening_and_confirmed_ones_are_deleted(
        tmp_path: Path, state_location: Path | str, store: Store, proc: Processor) -> None:
    send(proc, node_set())
    created = send(proc, task_create())
    ids = [e.id for e in created.outbox]
    proc.confirmed(ids[:1], T0)
    send(proc, {"command": "node-list"})
    store.close()

    reopened = open_store(state_location)
    try:
        pending = [e.id for e in reopened.pending_outbox()]
    finally:
        reopened.close()

    assert pending == ids[1:]


# --- strict JSON out -------------------------------------------------------------------------


def test_a_node_list_reply_is_strict_json(proc: Processor) -> None:
    send(proc, node_set(cores=4, memory=8000, usage_gpu=True))

    outcome = send(proc, {"command": "node-list"}, T0, reply_to="c")

    body = json.loads(encode(outcome.replies[0].body))
    [listed] = body["nodes"]
    assert listed["name"] == "n1"
    assert listed["capabilities"] == {"cores": 4, "memory": 8000, "usage_gpu": True}
    assert listed["free"] == {"cores": 4.0, "memory": 8000.0}


def asked_node_list(proc: Processor, now: float) -> tuple[dict[str, Any], bytes]:
    [reply] = send(proc, {"command": "node-list"}, now, reply_to="c").replies
    return reply.body, reply.data


def node_list_built_now(proc: Processor) -> dict[str, Any]:
    """What the node-list shows, built from the state as it is, with no kept entry."""
    nodes = sorted(proc.state.nodes.values(), key=lambda n: n.name)
    return {"command": "node-list-response",
            "nodes": [views.node_summary(n, engine.why_not_accepting(n) is None,
                                         engine.why_not_accepting(n)) for n in nodes]}


def test_the_node_list_shows_every_change_of_a_node_since_the_last_ask(
        proc: Processor) -> None:
    complete = {"command": "task-complete", "name": "t1", "node": "n1", "success": "ok",
                "attempt": 1}
    steps: list[tuple[str, Callable[[], object]]] = [
        ("a node joins", lambda: send(proc, node_set(), T0)),
        ("a second one", lambda: send(proc, node_set("n2", cores=8, memory=1000), T0)),
        ("a task starts on it", lambda: send(proc, task_create(), T0 + 1)),
        ("a heartbeat", lambda: send(proc, node_set(activetasks=["t1"]), T0 + 2)),
        ("new capabilities, heard at the same time",
         lambda: send(proc, node_set(activetasks=["t1"], cores=16, memory=8000), T0 + 2)),
        ("its task completes", lambda: send(proc, complete, T0 + 4)),
        ("drained", lambda: send(proc, {"command": "node-drain", "name": "n1"}, T0 + 5)),
        ("lost", lambda: proc.tick(T0 + 60)),
        ("back", lambda: send(proc, node_set(), T0 + 61)),
    ]
    asked_at = T0
    for what, step in steps:
        asked_node_list(proc, asked_at)  # the entries it keeps, from before the step
        step()
        asked_at += 1
        body, data = asked_node_list(proc, asked_at)
        assert body == node_list_built_now(proc), what
        assert data == encode(body), what
    listed = {n["name"]: n for n in body["nodes"]}
    assert listed["n1"]["capabilities"] == {"cores": 4, "memory": 8000}
    assert listed["n1"]["alive"] is True and listed["n1"]["activetasks"] == []


def test_the_node_list_shows_the_next_task_that_took_a_finished_ones_room(
        proc: Processor) -> None:
    send(proc, node_set(cores=2, memory=8000))
    send(proc, task_create("t1"))
    send(proc, task_create("t2"))
    before, _ = asked_node_list(proc, T0)
    assert before["nodes"][0]["activetasks"] == ["t1"]

    send(proc, {"command": "task-complete", "name": "t1", "node": "n1", "success": "ok",
                "attempt": 1})  # t2 takes the same room in the same turn

    after, _ = asked_node_list(proc, T0)
    assert after["nodes"][0]["activetasks"] == ["t2"]
    assert after["nodes"][0]["free"] == before["nodes"][0]["free"]


def test_a_node_list_builds_only_the_entries_of_nodes_that_changed(proc: Processor) -> None:
    send(proc, node_set("n1"))
    send(proc, node_set("n2"))
    first, _ = asked_node_list(proc, T0)

    send(proc, node_set("n2"), T0 + 1)  # a heartbeat: n2 was heard later
    second, _ = asked_node_list(proc, T0 + 1)

    assert second["nodes"][0] is first["nodes"][0]  # n1: the same entry, kept
    assert second["nodes"][1] is not first["nodes"][1]
    assert second["nodes"][1]["last_seen"] == T0 + 1


def offers_built_now(proc: Processor) -> list[Any]:
    """Every node's offer built from the state as it is, from copies with nothing kept."""
    fresh = []
    for node in proc.state.nodes.values():
        copy = dataclasses.replace(node, used=dict(node.used), running=set(node.running),
                                   _standing=None, _free=None, _offer=None, _stale=None,
                                   _listed=None)
        fresh.append(engine._build_offer(proc.state, copy))
    return fresh


def test_the_offers_a_pass_sees_follow_every_change_of_a_node(proc: Processor) -> None:
    repo = "//n1/vespid/ws"
    with_repo = {**node_set("n1"), "repositories": {repo: {"type": "ws"}}}
    complete = {"command": "task-complete", "node": "n1", "success": "ok"}
    steps: list[tuple[str, Callable[[], object]]] = [
        ("a node joins", lambda: send(proc, node_set(), T0)),
        ("a second one", lambda: send(proc, node_set("n2", cores=8, memory=1000), T0)),
        ("a task starts", lambda: send(proc, task_create(), T0 + 1)),
        ("a heartbeat", lambda: send(proc, node_set(activetasks=["t1"]), T0 + 2)),
        ("new capabilities", lambda: send(proc, node_set(activetasks=["t1"], cores=16,
                                                         memory=8000), T0 + 2)),
        ("a repository appears", lambda: send(proc, {**with_repo, "activetasks": ["t1"]},
                                               T0 + 3)),
        ("a task claims it", lambda: send(proc, task_create(
            "r1", requirements={"cores": 1},
            repositories={"env": {"request": "ws", "local": True}}), T0 + 3)),
        ("the first task completes", lambda: send(proc, {**complete, "name": "t1",
                                                         "attempt": 1}, T0 + 4)),
        ("the claimer completes: the repository is free",
         lambda: send(proc, {**complete, "name": "r1", "attempt": 1}, T0 + 4)),
        ("the repository goes", lambda: send(proc, node_set(), T0 + 5)),
        ("a bid", lambda: send(proc, node_set(cores=16, memory=8000, min_bid=3), T0 + 5)),
        ("drained", lambda: send(proc, {"command": "node-drain", "name": "n1"}, T0 + 6)),
        ("lost", lambda: proc.tick(T0 + 70)),
        ("back", lambda: send(proc, node_set(), T0 + 71)),
        ("the other one back, then gone", lambda: send(proc, {
            **node_set("n2", cores=8, memory=1000), "leaving": True}, T0 + 72)),
    ]
    for what, step in steps:
        engine.node_offers(proc.state)  # the offers kept, from before the step
        step()
        assert engine.node_offers(proc.state) == offers_built_now(proc), what
    assert [o.accepting for o in engine.node_offers(proc.state)] == [True, False]


def test_the_offers_keep_the_order_the_nodes_joined_in(proc: Processor) -> None:
    # The order decides, say, whose repository a non-local request takes: not a set's order.
    names = [f"node-{index:02d}" for index in range(30, 0, -1)]
    for name in names[:10]:
        send(proc, node_set(name))
    engine.node_offers(proc.state)
    for name in names[10:]:
        send(proc, node_set(name))
    send(proc, node_set(names[3], cores=16, memory=8000))  # one of the first changes

    assert [o.name for o in engine.node_offers(proc.state)] == names


@pytest.mark.parametrize("raw", [
    b'{"command":"node-set","name":"n1","capabilities":{"cores":4,"cores_max":Infinity}}',
    b'{"command":"node-set","name":"n1","capabilities":{"cores":4},'
    b'"repositories":{"r":{"type":"conda","size":Infinity}}}',
], ids=["capability-cores_max", "repository-extra-field"])
def test_a_node_list_reply_stays_strict_json_whatever_a_node_sent(
        proc: Processor, raw: bytes) -> None:
    proc.process([Delivery(raw)], T0)

    outcome = send(proc, {"command": "node-list"}, T0, reply_to="c")

    assert b"Infinity" not in encode(outcome.replies[0].body)
    sent = outcome.replies[0].data  # joined from the nodes' kept entries
    assert b"Infinity" not in sent and json.loads(sent) == outcome.replies[0].body


def test_a_draining_node_gets_no_new_task(proc: Processor) -> None:
    send(proc, {**node_set(), "draining": True})

    outcome = send(proc, task_create(), T0 + 1)

    assert to_nodes(outcome) == []
    assert info(proc, "t1", T0 + 1)["status"] is None


# --- a handler that crashes ---------------------------------------------------------------------


def test_a_handler_crash_on_one_message_does_not_lose_the_others_in_its_batch(
        proc: Processor, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(ctx: Any, msg: Any) -> None:
        raise RuntimeError("boom")

    send(proc, node_set(cores=8))
    monkeypatch.setitem(proc.dispatch_table, TaskInfo, explode)

    outcome = proc.process([
        deliver(task_create("a"), reply_to="c"),
        deliver({"command": "task-info", "name": "a"}, reply_to="c"),
        deliver(task_create("b")),
        deliver({"command": "task-info", "name": "b"}),
    ], T0 + 1)

    bodies = [r.body for r in outcome.replies]
    assert bodies[0] == {"command": "ack", "name": "a"}
    assert bodies[1]["command"] == "error"
    assert bodies[1]["error"] == "internal"
    assert "boom" in bodies[1]["message"]
    [dead] = dead_letters(outcome)
    assert dead.headers is not None
    assert dead.headers["x-vespid-error"].startswith("internal: ")
    assert sorted(body["name"] for _, body in to_nodes(outcome)) == ["a", "b"]
    monkeypatch.undo()
    assert info(proc, "a", T0 + 1)["status"] == "working"
    assert info(proc, "b", T0 + 1)["status"] == "working"


def test_a_handler_crash_leaves_no_half_applied_change_behind(
        proc: Processor, monkeypatch: pytest.MonkeyPatch) -> None:
    def create_then_explode(ctx: Any, msg: Any) -> None:
        original(ctx, msg)
        raise RuntimeError("after the change")

    original = proc.dispatch_table[TaskCreate]
    monkeypatch.setitem(proc.dispatch_table, TaskCreate, create_then_explode)

    outcome = send(proc, task_create())

    assert event_keys(outcome) == []
    monkeypatch.undo()
    assert info(proc, "t1")["status"] == "invalid"



# --- repositories across a lost node ------------------------------------------------------------


def test_a_requeued_task_keeps_its_repository_while_its_children_run_and_restarts_next_to_it(
        proc: Processor) -> None:
    repo = "//n1/vespid/ws"
    with_repo = {**node_set("n1"), "repositories": {repo: {"type": "ws"}}}
    send(proc, with_repo, T0)
    send(proc, task_create("parent", requirements={"cores": 1},
                           repositories={"env": {"request": "ws", "local": True}}), T0)
    send(proc, node_set("n2"), T0)
    send(proc, task_create("child", parent="parent", requirements={"cores": 1},
                           environment={"repo_env": repo},
                           repositories={"env": {"local": True}}), T0)
    send(proc, {**with_repo, "activetasks": ["parent", "child"]}, T0 + 1)
    send(proc, task_create("rival", requirements={"cores": 1}, priority=5,
                           repositories={"env": {"request": "ws", "local": True}}), T0 + 1)

    send(proc, {**with_repo, "activetasks": ["child"]}, T0 + 2)  # parent vanished from n1
    rival = info(proc, "rival", T0 + 2)
    outcome = send(proc, with_repo, T0 + 3)  # a node-set that lets the parent start again

    assert rival["status"] is None  # the repository is still held by the parent's tree
    runs = [body for key, body in to_nodes(outcome) if body["command"] == "task-run"]
    restarted = info(proc, "parent", T0 + 3)
    assert restarted["status"] == "working" and restarted["holds"] == {"env": repo}
    assert restarted["path"] == repo and restarted["attempt"] == 2
    assert all(body["name"] != "rival" for body in runs)


def test_a_create_task_delivered_twice_makes_one_golem_task(proc: Processor) -> None:
    body = json.dumps({"type": "CreateTask", "task": {"type": "Python",
                                                      "options": {"script": "pass"}}}).encode()
    first = proc.process([Delivery(body, "client", "c1", message_id="m-1")], T0)
    again = proc.process([Delivery(body, "client", "c1", message_id="m-1")], T0 + 1)
    other = proc.process([Delivery(body, "client", "c2", message_id="m-2")], T0 + 2)

    ids = [o.replies[0].body["task_id"] for o in (first, again, other)]
    assert ids[0] == ids[1] != ids[2]
    from vespid.coordinator.extensions.golem import Golem

    assert len(proc.extensions.find(Golem).tasks) == 2


def test_a_released_repository_stays_released_after_a_restart(
        tmp_path: Path, state_location: Path | str, store: Store, proc: Processor) -> None:
    repo = "//n1/vespid/ws"
    with_repo = {**node_set("n1"), "repositories": {repo: {"type": "ws"}}}
    send(proc, with_repo, T0)
    send(proc, task_create("a", requirements={"cores": 1},
                           repositories={"env": {"request": "ws", "local": True}}), T0)
    send(proc, {"command": "task-complete", "name": "a", "node": "n1", "success": "ok",
                "attempt": 1}, T0 + 1)
    store.close()

    reopened = open_store(state_location)
    try:
        again = Processor(reopened, settings(tmp_path), now=T0 + 2)
        send(again, with_repo, T0 + 2)
        outcome = send(again, task_create("b", requirements={"cores": 1},
                                          repositories={"env": {"request": "ws"}}), T0 + 2)
        check = send(again, {"command": "state-check"}, T0 + 2, reply_to="c").replies[0].body
        held = info(again, "a", T0 + 2)["holds"]
    finally:
        reopened.close()

    assert [body["name"] for _key, body in to_nodes(outcome)] == ["b"]
    assert held == {"env": repo}  # what it worked in stays shown
    assert check["ok"] is True, check["problems"]


def test_a_tick_that_fails_leaves_memory_as_the_store_has_it(
        proc: Processor, monkeypatch: pytest.MonkeyPatch) -> None:
    start_one(proc)

    def explode(_ctx: Any) -> None:
        raise RuntimeError("a sweep bug")

    monkeypatch.setattr(proc, "_sweep", explode)
    outcome = proc.tick(T0 + 100)  # would have lost n1; fails instead
    monkeypatch.undo()

    assert outcome.outbox == [] and outcome.replies == []
    assert info(proc, "t1", T0 + 101)["status"] == "working"


def test_a_node_set_that_grows_a_node_is_offered_at_its_new_size(proc: Processor) -> None:
    # The scheduler keeps what a node offers between passes: a node-set that changes the
    # capabilities must replace it, or the task waits for a size the node no longer has.
    send(proc, node_set(cores=2, memory=8000))
    send(proc, task_create("big", requirements={"cores": 4}))
    assert info(proc, "big")["status"] is None

    outcome = send(proc, node_set(cores=8, memory=8000))

    assert [(node, body["name"]) for node, body in to_nodes(outcome)
            if body["command"] == "task-run"] == [("node.n1", "big")]
    assert info(proc, "big")["node"] == "n1"


def test_a_turn_starts_at_most_its_decisions_and_the_next_turn_goes_on(
        proc: Processor) -> None:
    for index in range(5):
        send(proc, task_create(f"t{index}", requirements={"cores": 1}, priority=index % 2))

    first = proc.process([deliver(node_set(cores=8))], T0, decisions=2)
    assert proc.state.needs_scheduling
    second = proc.process([], T0, decisions=2)
    third = proc.process([], T0, decisions=2)

    started = [[body["name"] for _key, body in to_nodes(outcome)
                if body["command"] == "task-run"] for outcome in (first, second, third)]
    assert started == [["t1", "t3"], ["t0", "t2"], ["t4"]]  # priority, then age
    assert not proc.state.needs_scheduling


# --- what the State keeps for the matching pass ---------------------------------------------


def assert_kept_for_passes_as_made_afresh(proc: Processor) -> None:
    """The queue's heads and asks the State keeps between passes are what the queue says."""
    state = proc.state
    assert list(state.heads) == sorted((group[0], shape) for shape, group in state.queue.items())
    kept, fresh = state.queue_asks(), QueueAsks.of(state.queue)
    assert (kept.asks, kept.anywhere) == (fresh.asks, fresh.anywhere)
    assert {reach: (shape.reach, shape in state.queue) for reach, shape in kept.examples.items()
            } == {reach: (reach, True) for reach in fresh.examples}


@pytest.mark.parametrize("seed", range(25))
def test_the_queue_order_and_asks_kept_for_passes_follow_every_change(
        proc: Processor, seed: int) -> None:
    """Tasks of a few shapes and priorities created (children of running tasks among them,
    which go first), started, completed and cancelled, nodes joining and changing size: after
    every batch, what the State keeps for the next pass is what the queue makes afresh."""
    rng = random.Random(seed)
    running: dict[str, tuple[str, int]] = {}  # task -> (node, attempt)
    idle: list[str] = []
    now, made, started = T0, 0, 0
    for _ in range(80):
        now += 0.05
        roll, batch = rng.random(), []
        if roll < 0.45:
            for _ in range(rng.randint(1, 4)):
                made += 1
                fields: dict[str, Any] = {
                    "requirements": {"cores": rng.choice((1, 2, 4)),
                                     "memory": rng.choice((500, 2000))},
                    "priority": rng.choice((0, 0, 1, 5))}
                if running and rng.random() < 0.3:
                    fields["parent"] = rng.choice(sorted(running))
                batch.append(task_create(f"t{made}", **fields))
                idle.append(f"t{made}")
        elif roll < 0.6:
            name = f"n{rng.randint(1, 3)}"
            batch.append(node_set(name, [t for t, (n, _) in running.items() if n == name],
                                  cores=rng.choice((2, 4, 8)), memory=4000))
        elif roll < 0.85 and running:
            done = rng.choice(sorted(running))
            node, attempt = running.pop(done)
            batch.append({"command": "task-complete", "name": done, "node": node,
                          "success": "ok", "attempt": attempt})
        elif idle:
            batch.append({"command": "task-cancel", "name": idle.pop(rng.randrange(len(idle)))})
        outcome = proc.process([deliver(message) for message in batch], now)
        for key, run in to_nodes(outcome):
            if run.get("command") == "task-run":
                running[run["name"]] = (key.removeprefix("node."), run["attempt"])
                if run["name"] in idle:
                    idle.remove(run["name"])
                started += 1
        proc.confirmed([e.id for e in outcome.outbox], now)
        assert_kept_for_passes_as_made_afresh(proc)
    assert started and proc.state.queue  # tasks started, and others still waited
