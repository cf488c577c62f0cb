"""Trees a CI can trust, at the processor level: keyed (idempotent) creation, a tree's
outcome kept up to date, adoption only by the node that ran the attempt, nodes that leave."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.unit.test_processor import (
    T0,
    event_keys,
    info,
    node_set,
    send,
    settings,
    task_create,
    to_nodes,
)
from vespid.coordinator.processor import Delivery, Processor
from vespid.coordinator.store import Store


def create(proc: Processor, name: str, now: float = T0, user: str | None = None,
           **fields: Any) -> dict[str, Any]:
    delivery = Delivery(json.dumps(task_create(name, **fields)).encode(), reply_to="client",
                        correlation_id="c", user_id=user)
    outcome = proc.process([delivery], now)
    assert len(outcome.replies) == 1
    return outcome.replies[0].body


def complete(proc: Processor, name: str, success: str = "ok", node: str = "n1",
             attempt: int = 1, now: float = T0 + 5) -> Any:
    return send(proc, {"command": "task-complete", "name": name, "node": node,
                       "success": success, "attempt": attempt}, now)


def active(name: str, **attempts: int) -> dict[str, Any]:
    """A heartbeat of `name` reporting task -> attempt; n1 carries the gpu label, n2 not."""
    message = node_set(name, usage_gpu=True, cores=4, memory=8000) if name == "n1" \
        else node_set(name)
    message["activetasks"] = {task: {"attempt": n} for task, n in attempts.items()}
    return message


# --- keyed creation -------------------------------------------------------------------------


def test_a_second_create_with_the_same_key_under_the_same_parent_makes_nothing(
        proc: Processor) -> None:
    create(proc, "parent")

    first = create(proc, "child-a", parent="parent", key="build#1")
    again = create(proc, "child-b", parent="parent", key="build#1")

    assert first == {"command": "ack", "name": "child-a"}
    assert again == {"command": "ack", "name": "child-a", "existing": True}
    assert info(proc, "parent")["children"] == ["child-a"]
    assert info(proc, "child-b")["status"] == "invalid"


def test_the_same_key_under_two_parents_makes_two_tasks(proc: Processor) -> None:
    create(proc, "p1")
    create(proc, "p2")

    create(proc, "c1", parent="p1", key="build#1")
    reply = create(proc, "c2", parent="p2", key="build#1")

    assert reply == {"command": "ack", "name": "c2"}
    assert info(proc, "p2")["children"] == ["c2"]


def test_root_keys_belong_to_their_owner(proc: Processor) -> None:
    create(proc, "alice-root", user="alice", key="nightly")

    same_owner = create(proc, "alice-again", user="alice", key="nightly")
    other_owner = create(proc, "bob-root", user="bob", key="nightly")

    assert same_owner["name"] == "alice-root" and same_owner["existing"] is True
    assert other_owner == {"command": "ack", "name": "bob-root"}


def test_a_matching_key_wins_over_a_different_definition(proc: Processor) -> None:
    create(proc, "parent")
    create(proc, "child", parent="parent", key="k", priority=1)

    reply = create(proc, "other", parent="parent", key="k", priority=9,
                   executable_pyscript="something else")

    assert reply["name"] == "child" and reply["existing"] is True
    assert info(proc, "child")["priority"] == 1


def test_keys_survive_a_coordinator_restart(store: Store, tmp_path: Path) -> None:
    first = Processor(store, settings(tmp_path), now=T0)
    create(first, "parent")
    create(first, "child", parent="parent", key="build#1")

    restarted = Processor(store, settings(tmp_path), now=T0 + 10)
    reply = create(restarted, "child-again", parent="parent", key="build#1", now=T0 + 10)

    assert reply == {"command": "ack", "name": "child", "existing": True}
    assert info(restarted, "parent", T0 + 10)["children"] == ["child"]


# --- a tree's outcome -----------------------------------------------------------------------


def test_a_root_carries_the_worst_severity_of_its_tree(proc: Processor) -> None:
    send(proc, node_set(cores=8, memory=8000))
    create(proc, "root", requirements={"cores": 1})
    create(proc, "good", parent="root", requirements={"cores": 1})
    create(proc, "bad", parent="root", requirements={"cores": 1})
    complete(proc, "good")
    complete(proc, "bad", "fatal")
    complete(proc, "root")

    root = info(proc, "root", T0 + 6)
    listed = send(proc, {"command": "task-list"}, T0 + 6, reply_to="c").replies[0].body

    assert (root["success"], root["tree_success"], root["tree_complete"]) == \
        ("ok", "fatal", True)
    assert [f["name"] for f in root["tree_failures"]] == ["bad"]
    assert root["tree_failures_total"] == 1
    summary = next(t for t in listed["tasks"] if t["name"] == "root")
    assert (summary["success"], summary["tree_success"]) == ("ok", "fatal")


def test_a_tree_that_finishes_after_its_root_is_announced_on_the_root(
        proc: Processor) -> None:
    send(proc, node_set(cores=8, memory=8000))
    create(proc, "root", requirements={"cores": 1})
    create(proc, "late", parent="root", requirements={"cores": 1})
    complete(proc, "root")
    assert info(proc, "root", T0 + 6)["tree_complete"] is False

    outcome = complete(proc, "late", "error", now=T0 + 7)

    assert sorted(event_keys(outcome)) == ["task.completed.late", "task.updated.root"]
    root = info(proc, "root", T0 + 8)
    assert (root["tree_complete"], root["tree_success"]) == (True, "error")


def test_tree_outcomes_are_rebuilt_after_a_restart(store: Store, tmp_path: Path) -> None:
    first = Processor(store, settings(tmp_path), now=T0)
    send(first, node_set(cores=8, memory=8000))
    create(first, "root", requirements={"cores": 1})
    create(first, "a", parent="root", requirements={"cores": 1})
    create(first, "b", parent="root", requirements={"cores": 1})
    complete(first, "a", "warning")

    restarted = Processor(store, settings(tmp_path), now=T0 + 10)
    root = info(restarted, "root", T0 + 10)

    assert (root["tree_success"], root["tree_complete"]) == ("warning", False)


# --- adoption -------------------------------------------------------------------------------


def lost_on_n1(proc: Processor) -> None:
    """t1 runs on n1 (attempt 1), n1 goes silent and is lost: t1 waits for attempt 2."""
    send(proc, node_set("n1", usage_gpu=True, cores=4, memory=8000))
    create(proc, "t1", requirements={"cores": 1, "usage_require_gpu": True})
    send(proc, active("n1", t1=1), T0 + 1)
    send(proc, active("n2"), T0 + 8)
    proc.tick(T0 + 20)  # n1 silent for longer than the 8 s timeout
    assert info(proc, "t1", T0 + 20)["status"] is None


def test_a_node_that_never_ran_the_task_cannot_adopt_it(proc: Processor) -> None:
    lost_on_n1(proc)

    outcome = send(proc, active("n2", t1=1), T0 + 21)

    assert [(key, body["command"]) for key, body in to_nodes(outcome)] == \
        [("node.n2", "task-kill")]
    task = info(proc, "t1", T0 + 22)
    assert (task["status"], task["node"], task["attempt"]) == (None, None, 1)
    assert info(proc, "t1", T0 + 22)["attempts"][0]["node"] == "n1"


def test_the_node_that_ran_the_attempt_takes_it_back(proc: Processor) -> None:
    lost_on_n1(proc)

    send(proc, active("n1", t1=1), T0 + 21)

    task = info(proc, "t1", T0 + 22)
    assert (task["status"], task["node"], task["attempt"]) == ("working", "n1", 1)


def test_a_lost_attempts_reason_stays_on_the_attempt(proc: Processor) -> None:
    lost_on_n1(proc)
    send(proc, active("n1"), T0 + 21)  # back, running nothing: attempt 2 starts there
    complete(proc, "t1", attempt=2, now=T0 + 22)

    task = info(proc, "t1", T0 + 23)

    assert task["success"] == "ok"
    assert task["message"] is None or "lost" not in task["message"]
    assert task["attempts"][0]["lost"] is True and "lost" in task["attempts"][0]["why"]


# --- nodes that leave -----------------------------------------------------------------------


def test_a_node_whose_agent_says_it_leaves_is_gone_not_lost(proc: Processor) -> None:
    send(proc, node_set("n1"))
    leaving = node_set("n1")
    leaving.update(draining=True, leaving=True)
    send(proc, leaving, T0 + 1)
    proc.tick(T0 + 60)

    nodes = send(proc, {"command": "node-list"}, T0 + 60, reply_to="c").replies[0].body
    (node,) = nodes["nodes"]
    assert (node["alive"], node["left"], node["accepting"]) == (False, True, False)
    assert node["why_not_accepting"].startswith("gone")


def test_the_state_check_recomputes_trees_and_keys_and_reports_drift(proc: Processor) -> None:
    from vespid.coordinator.check import check_state
    from vespid.shared.protocol import Severity

    send(proc, node_set(cores=8, memory=8000))
    create(proc, "root", requirements={"cores": 1}, key="r")
    create(proc, "kid", parent="root", requirements={"cores": 1}, key="k")
    complete(proc, "kid", "error")
    assert check_state(proc.state) == []

    proc.state.tree_open["root"] = 5
    proc.state.tree_worst["root"] = Severity.OK
    proc.state.keys[("child", "root", "k")] = "root"

    problems = check_state(proc.state)
    assert any("root: 5 open" in p for p in problems)
    assert any("tree severity ok kept, error found" in p for p in problems)
    assert any("points at root" in p for p in problems)


def test_a_failing_extension_hook_is_counted_and_everything_else_goes_on(
        store: Store, tmp_path: Path) -> None:
    from vespid.coordinator.extension import Extension

    class Broken(Extension):
        def ended(self, ctx: object, task: object) -> None:
            raise RuntimeError("an extension with a bug")

        def tick(self, ctx: object) -> None:
            raise RuntimeError("an extension with a bug")

    broken = Broken()
    proc = Processor(store, settings(tmp_path), now=T0, extensions=[broken])
    other = Processor(store, settings(tmp_path), now=T0)
    send(proc, node_set(cores=8, memory=8000))
    create(proc, "t", requirements={"cores": 1})

    complete(proc, "t")
    proc.tick(T0 + 6)
    proc.tick(T0 + 7)

    assert info(proc, "t", T0 + 7)["success"] == "ok"  # ended, committed, answered
    assert proc.extensions.failures == 3
    assert broken not in other.extensions.members  # extensions belong to their processor


def golem_part_ended(proc: Processor, node: str, cause: str | None, message: str) -> str:
    """A one-part Golem-style task whose part ran on `node` and ended as the node said."""
    send(proc, node_set(node))
    reply = send(proc, {"type": "CreateTask", "task": {
        "type": "Python", "options": {"script": "pass"}}}, T0 + 1, reply_to="c")
    task_id = reply.replies[0].body["task_id"]
    (run,) = [body for _key, body in to_nodes(send(proc, node_set(node), T0 + 2))
              if body["command"] == "task-run"] or [
        body for _key, body in to_nodes(reply) if body["command"] == "task-run"]
    send(proc, {"command": "task-complete", "name": run["name"], "node": node,
                "success": "fatal", "attempt": run["attempt"], "message": message,
                **({"cause": cause} if cause else {})}, T0 + 3)
    state = send(proc, {"type": "GetTaskState", "task_id": task_id}, T0 + 4, reply_to="c")
    return str(state.replies[0].body["subtasks"][0]["attempts"][0]["state"])


def test_a_golem_part_timed_out_only_when_its_node_says_so(proc: Processor) -> None:
    assert golem_part_ended(proc, "timeout-box", "exit",
                            "the script exited with status 1 on timeout-box") == "failure"


def test_a_golem_part_that_ran_past_its_timeout_is_a_timeout(proc: Processor) -> None:
    assert golem_part_ended(proc, "n1", "timeout",
                            "killed: it ran longer than its timeout of 3 s") == "timeout"
