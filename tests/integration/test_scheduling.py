"""Matching rules, one test each, against raw-protocol nodes (only the decision matters)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests import processes
from tests.processes import VespidProcess
from tests.raw import RawNode, RawPeer
from vespid.coordinator.service import MIN_TURN_DECISIONS

pytestmark = pytest.mark.integration


def create(raw: RawPeer, name: str, **fields: object) -> None:
    reply = raw.request({"command": "task-create", "name": name, "executable_pyscript": "x",
                         **fields})
    assert reply["command"] == "ack", reply


def node_of(raw: RawPeer, name: str) -> str | None:
    node: str | None = raw.wait_for(name, lambda i: i["status"] is not None)["node"]
    return node


def test_a_task_requiring_a_label_runs_only_on_a_node_carrying_it(
        coordinator: VespidProcess, raw: RawPeer) -> None:
    RawNode(raw, "plain", {"cores": 16, "memory": 64000}).node_set([])
    RawNode(raw, "gpubox", {"cores": 2, "memory": 4000, "usage_gpu": True, "gpus": 1}
            ).node_set([])

    create(raw, "needs-gpu", requirements={"usage_require_gpu": True, "gpus": 1})

    assert node_of(raw, "needs-gpu") == "gpubox"


def test_a_node_requiring_a_label_runs_only_tasks_that_carry_it(
        coordinator: VespidProcess, raw: RawPeer) -> None:
    RawNode(raw, "bob-ws", {"cores": 32, "memory": 64000, "usage_require_user_bob": True}
            ).node_set([])
    create(raw, "alices", requirements={"usage_user_alice": True})
    create(raw, "bobs", requirements={"usage_user_bob": True})

    assert node_of(raw, "bobs") == "bob-ws"
    time.sleep(0.5)
    info = raw.info("alices")
    assert info["status"] is None
    assert any("runs only tasks labelled user_bob" in r for r in info["waiting_reason"])


def test_a_task_prefers_a_node_with_the_label_it_prefers(coordinator: VespidProcess,
                                                        raw: RawPeer) -> None:
    RawNode(raw, "a-plain", {"cores": 4, "memory": 8000}).node_set([])
    RawNode(raw, "b-fast", {"cores": 8, "memory": 8000, "usage_fast": True}).node_set([])

    create(raw, "picky", requirements={"usage_prefer_fast": True})

    assert node_of(raw, "picky") == "b-fast"


def test_a_node_prefers_tasks_with_the_label_it_prefers(coordinator: VespidProcess,
                                                       raw: RawPeer) -> None:
    RawNode(raw, "a-plain", {"cores": 4, "memory": 8000}).node_set([])
    RawNode(raw, "b-project", {"cores": 8, "memory": 8000, "usage_prefer_project": True}
            ).node_set([])

    create(raw, "project-task", requirements={"usage_project": True})
    create(raw, "other-task")

    assert node_of(raw, "project-task") == "b-project"
    assert node_of(raw, "other-task") == "a-plain"  # best fit: fewest cores left


def test_best_fit_picks_the_node_left_with_the_fewest_free_cores(
        coordinator: VespidProcess, raw: RawPeer) -> None:
    for name, cores in [("big", 32), ("small", 4), ("medium", 8)]:
        RawNode(raw, name, {"cores": cores, "memory": 64000}).node_set([])

    create(raw, "three-cores", requirements={"cores": 3})

    assert node_of(raw, "three-cores") == "small"


def test_a_consumable_resource_other_than_cores_and_memory_is_reserved(
        coordinator: VespidProcess, raw: RawPeer) -> None:
    RawNode(raw, "licensed", {"cores": 16, "memory": 64000, "licenses": 1}).node_set([])
    create(raw, "lic-1", requirements={"licenses": 1})
    create(raw, "lic-2", requirements={"licenses": 1})

    assert node_of(raw, "lic-1") == "licensed"
    time.sleep(0.5)
    assert raw.info("lic-2")["status"] is None


def test_higher_priority_starts_first_then_older(coordinator: VespidProcess,
                                                raw: RawPeer) -> None:
    create(raw, "old-low")
    create(raw, "urgent", priority=5)
    create(raw, "new-low")
    create(raw, "middle", priority=1)
    node = RawNode(raw, "single", {"cores": 1, "memory": 1000})
    node.node_set([])

    order = []
    for _ in range(4):
        [name] = node.runs(1)
        order.append(name)
        node.complete(name)

    assert order == ["urgent", "middle", "old-low", "new-low"]


def test_a_large_task_is_not_starved_by_a_stream_of_small_ones(coordinator: VespidProcess,
                                                               raw: RawPeer) -> None:
    node = RawNode(raw, "quad", {"cores": 4, "memory": 8000})
    node.node_set([])
    for i in range(4):
        create(raw, f"small-{i}")
    running = node.runs(4)
    create(raw, "large", requirements={"cores": 4})
    for i in range(4, 12):
        create(raw, f"small-{i}")

    started = []
    for name in running:  # as each small one ends, the node is kept free for the large one
        node.complete(name)
    [first] = node.runs(1)
    started.append(first)

    assert started == ["large"]
    assert raw.info("small-4")["status"] is None
    explained = raw.info("small-4")["waiting_reason"]
    assert explained is not None


def test_explain_names_the_requirement_no_node_meets(coordinator: VespidProcess,
                                                    raw: RawPeer) -> None:
    RawNode(raw, "tiny", {"cores": 2, "memory": 1000}).node_set([])
    create(raw, "huge", requirements={"memory": 500000})

    time.sleep(0.3)
    reasons = raw.info("huge")["waiting_reason"]

    assert reasons == ["tiny: too small (memory needs 500000, has 1000)"]


def test_higher_bids_start_first_and_a_node_takes_only_bids_above_its_minimum(
        coordinator: VespidProcess, raw: RawPeer) -> None:
    create(raw, "cheap", requirements={"bid": 0.5})
    create(raw, "generous", requirements={"bid": 3})
    RawNode(raw, "pricey", {"cores": 1, "memory": 1000, "min_bid": 1}).node_set([])

    assert node_of(raw, "generous") == "pricey"
    time.sleep(0.3)
    assert raw.info("cheap")["status"] is None
    assert any("bidding at least 1" in r for r in raw.info("cheap")["waiting_reason"])


def test_a_pass_stopped_at_its_turns_limit_goes_on_with_nothing_more_heard(
        amqp_url: str, tmp_path: Path, started: list[VespidProcess], raw: RawPeer) -> None:
    # A turn of a microsecond: each pass may start only the least (MIN_TURN_DECISIONS).
    proc = processes.coordinator(amqp_url, tmp_path / "coordinator",
                                 VESPID_TURN_SECONDS="0.000001").start()
    started.append(proc)
    proc.wait_for_log("coordinator_consuming")
    names = [f"t{index:03d}" for index in range(3 * MIN_TURN_DECISIONS + 5)]
    for name in names:
        create(raw, name, requirements={"cores": 1})
    big = RawNode(raw, "big", {"cores": len(names), "memory": 64000})

    big.node_set([])  # the only message from a node: the passes after it go on alone

    assert sorted(big.runs(len(names), timeout=30)) == names
    assert all(raw.info(name)["node"] == "big" for name in (names[0], names[-1]))
