"""vespid.coordinator.matcher: which waiting task runs on which node (a pure function)."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from sortedcontainers import SortedList

from vespid.coordinator import matcher
from vespid.coordinator.matcher import (
    Assignment,
    Labels,
    MatchResult,
    NodeOffer,
    QueueAsks,
    QueueKey,
    RepoPool,
    Reservation,
    Shape,
    _claim,
    _rank,
    allocate,
    carry_over,
    compatible,
    explain,
    fits_empty,
    fits_now,
    match,
    repositories_free,
)

# --- helpers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    name: str
    shape: Shape
    priority: int
    seq: int

    @property
    def key(self) -> QueueKey:
        return (-self.priority, 1, self.seq, self.name)


def shape(repositories: Mapping[str, Any] | None = None,
          environment: Mapping[str, str] | None = None, **requirements: Any) -> Shape:
    return Shape.of(requirements, repositories, environment)


def task(name: str = "t", priority: int = 0, seq: int = 1,
         repositories: Mapping[str, Any] | None = None,
         environment: Mapping[str, str] | None = None, **requirements: Any) -> Task:
    return Task(name, shape(repositories, environment, **requirements), priority, seq)


def node(name: str = "n", accepting: bool = True, repos: Mapping[str, str] | None = None,
         held: Iterable[str] = (), **capabilities: Any) -> NodeOffer:
    """An offer whose capacity is what it has free, hosting `repos` (name -> type), every one
    free except those `held`."""
    free = {k: float(v) for k, v in capabilities.items()
            if not k.startswith("usage_") and not isinstance(v, bool)}
    hosted = dict(repos or {})
    free_repos: dict[str, list[str]] = {}
    for repo, kind in sorted(hosted.items()):
        if repo not in set(held):
            free_repos.setdefault(kind, []).append(repo)
    return NodeOffer(name, free, Labels.parse(capabilities), capacity=dict(free), repos=hosted,
                     free_repos=free_repos, accepting=accepting)


def busy(offer: NodeOffer, **free: float) -> NodeOffer:
    """The same offer with less free now (tasks already running there)."""
    offer.free.update({k: float(v) for k, v in free.items()})
    return offer


def queue(*tasks: Task) -> dict[Shape, list[QueueKey]]:
    grouped: dict[Shape, list[QueueKey]] = {}
    for t in tasks:
        grouped.setdefault(t.shape, []).append(t.key)
    return {s: sorted(keys) for s, keys in grouped.items()}


def run(tasks: Iterable[Task], offers: Iterable[NodeOffer], **options: Any) -> MatchResult:
    """The pass as a caller with nothing kept makes it; checked against the same pass made
    as the State makes it (the offers by name, the queue's heads and asks kept), on a copy."""
    grouped, offers = queue(*tasks), list(offers)
    kept = match(grouped, {o.name: o for o in copy.deepcopy(offers)},
                 heads=SortedList((keys[0], shape) for shape, keys in grouped.items()),
                 asks=QueueAsks.of(grouped), **options)
    result = match(grouped, offers, **options)
    assert (kept.assignments, kept.blocked, kept.reservation, kept.unfinished) == (
        result.assignments, result.blocked, result.reservation, result.unfinished)
    return result


def placed(result: MatchResult) -> dict[str, str]:
    return {a.task: a.node for a in result.assignments}


def claimed(result: MatchResult) -> dict[str, dict[str, str]]:
    return {a.task: a.repos for a in result.assignments}


# --- fit on resources -----------------------------------------------------------------------


def test_a_task_fits_a_node_with_enough_memory_and_cores() -> None:
    result = run([task(memory=1000, cores=2)], [node(memory=1000, cores=2)])

    assert result.assignments == [Assignment("t", "n", {"memory": 1000.0, "cores": 2.0})]
    assert result.blocked == set()


def test_a_task_needing_more_memory_than_the_node_has_does_not_run_there() -> None:
    big = task(memory=2000)

    result = run([big], [node(memory=1999, cores=8)])

    assert result.assignments == []
    assert result.blocked == {big.shape}


def test_a_task_needing_more_cores_than_the_node_has_does_not_run_there() -> None:
    assert run([task(cores=3)], [node(memory=1000, cores=2)]).assignments == []


def test_any_other_numeric_resource_is_consumed_like_memory() -> None:
    tasks = [task("a", seq=1, gpus=1), task("b", seq=2, gpus=1)]

    result = run(tasks, [node(cores=8, gpus=1)])

    assert placed(result) == {"a": "n"}
    assert result.assignments[0].allocated["gpus"] == 1.0


def test_a_resource_the_node_does_not_declare_counts_as_none_of_it() -> None:
    assert run([task(gpus=1)], [node(cores=8, memory=1000)]).assignments == []


def test_a_zero_amount_of_an_undeclared_resource_still_fits() -> None:
    assert placed(run([task(gpus=0)], [node(cores=1)])) == {"t": "n"}


def test_a_task_without_requirements_needs_one_core() -> None:
    plain = task()

    assert plain.shape.need == {"cores": 1.0}
    assert run([plain], [node(memory=1000)]).assignments == []
    assert run([plain], [node(cores=1)]).assignments[0].allocated == {"cores": 1.0}


def test_a_fractional_core_request_fits_a_fractional_free_amount() -> None:
    assert placed(run([task(cores=0.5)], [node(cores=0.5)])) == {"t": "n"}
    assert run([task(cores=0.6)], [node(cores=0.5)]).assignments == []


def test_fits_now_compares_needs_with_what_is_free_and_fits_empty_with_capacity() -> None:
    offer = busy(node(cores=8), cores=2)
    pool = RepoPool([offer])

    assert not fits_now(shape(cores=4), offer, pool)
    assert fits_empty(shape(cores=4), offer)
    assert not fits_empty(shape(cores=9), offer)


# --- elastic cores ----------------------------------------------------------------------------


def test_without_cores_max_a_task_gets_exactly_its_cores() -> None:
    result = run([task(cores=2)], [node(cores=16)])

    assert result.assignments[0].allocated["cores"] == 2.0


def test_an_elastic_task_gets_up_to_cores_max_of_the_free_cores() -> None:
    result = run([task(cores=2, cores_max=6)], [node(cores=16)])

    assert result.assignments[0].allocated["cores"] == 6.0


def test_an_elastic_task_gets_all_free_cores_when_fewer_than_cores_max() -> None:
    result = run([task(cores=2, cores_max=6)], [node(cores=4)])

    assert result.assignments[0].allocated["cores"] == 4.0


@pytest.mark.parametrize("unbounded", [math.inf, None])
def test_an_unbounded_task_takes_every_free_core(unbounded: float | None) -> None:
    result = run([task(cores=1, cores_max=unbounded)], [node(cores=12)])

    assert result.assignments[0].allocated["cores"] == 12.0


def test_an_elastic_task_never_gets_fewer_than_its_cores() -> None:
    elastic = shape(cores=1.5, cores_max=math.inf)

    assert allocate(elastic, node(cores=2.5))["cores"] == 2.0
    assert allocate(elastic, node(cores=1.7))["cores"] == 1.5


def test_a_cores_max_below_cores_is_raised_to_cores() -> None:
    request = task(cores=4, cores_max=2)

    assert request.shape.cores_max == 4.0
    assert run([request], [node(cores=8)]).assignments[0].allocated["cores"] == 4.0


def test_an_unbounded_task_leaves_no_cores_for_the_next_task() -> None:
    tasks = [task("greedy", seq=1, cores_max=math.inf), task("small", seq=2)]

    assert placed(run(tasks, [node(cores=8)])) == {"greedy": "n"}


# --- labels ---------------------------------------------------------------------------------


def test_a_task_requiring_a_label_runs_only_on_a_node_carrying_it() -> None:
    request = task(usage_require_gpu=True)

    assert run([request], [node("plain", cores=8)]).assignments == []
    assert placed(run([request], [node("plain", cores=8), node("gpu", cores=1,
                                                               usage_gpu=True)])) == \
        {"t": "gpu"}


def test_a_node_requiring_a_label_runs_only_tasks_carrying_it() -> None:
    fussy = node("fussy", cores=8, usage_require_nightly=True)

    assert not compatible(shape(), fussy)
    assert run([task("plain")], [fussy]).assignments == []
    assert placed(run([task("nightly", usage_nightly=True)], [fussy])) == {"nightly": "fussy"}


def test_a_label_set_to_false_is_not_carried() -> None:
    assert run([task(usage_require_gpu=True)], [node(cores=1, usage_gpu=False)]).assignments \
        == []


def test_a_requirement_set_to_false_requires_nothing() -> None:
    assert placed(run([task(usage_require_gpu=False)], [node(cores=1)])) == {"t": "n"}


def test_labels_parse_into_carried_required_and_preferred() -> None:
    labels = Labels.parse({"usage_gpu": True, "usage_require_linux": True,
                           "usage_prefer_ssd": True, "usage_off": False, "cores": 4})

    assert labels == Labels(frozenset({"gpu"}), frozenset({"linux"}), frozenset({"ssd"}))


def test_labels_are_not_consumable_resources() -> None:
    assert shape(usage_gpu=True, usage_require_ssd=True, usage_prefer_x=True).need == \
        {"cores": 1.0}


def test_a_task_preferring_a_label_goes_to_the_node_that_carries_it() -> None:
    nodes = [node("tight", cores=2), node("ssd", cores=16, usage_ssd=True)]

    assert placed(run([task(cores=2, usage_prefer_ssd=True)], nodes)) == {"t": "ssd"}


def test_a_preference_is_soft_and_the_task_still_runs_without_it() -> None:
    assert placed(run([task(usage_prefer_ssd=True)], [node(cores=1)])) == {"t": "n"}


def test_a_node_preferring_a_label_attracts_tasks_that_carry_it() -> None:
    nodes = [node("tight", cores=2), node("likes-ci", cores=16, usage_prefer_ci=True)]

    assert placed(run([task(cores=2, usage_ci=True)], nodes)) == {"t": "likes-ci"}


def test_more_preference_matches_rank_a_node_higher() -> None:
    nodes = [node("one", cores=4, usage_ssd=True),
             node("two", cores=16, usage_ssd=True, usage_fast=True)]
    request = task(usage_prefer_ssd=True, usage_prefer_fast=True)

    assert placed(run([request], nodes)) == {"t": "two"}


# --- choosing a node and an order -----------------------------------------------------------


def test_among_equal_nodes_the_best_fit_leaves_the_fewest_cores_free() -> None:
    nodes = [node("big", cores=16), node("snug", cores=3), node("mid", cores=8)]

    assert placed(run([task(cores=3)], nodes)) == {"t": "snug"}


def test_when_cores_tie_the_node_left_with_less_memory_wins() -> None:
    nodes = [node("roomy", cores=4, memory=64000), node("snug", cores=4, memory=2000)]

    assert placed(run([task(cores=4, memory=1000)], nodes)) == {"t": "snug"}


def test_a_higher_priority_task_is_placed_before_an_older_one() -> None:
    tasks = [task("old", priority=0, seq=1, cores=4), task("urgent", priority=5, seq=2, cores=4)]

    assert placed(run(tasks, [node(cores=4)])) == {"urgent": "n"}


def test_among_equal_priorities_the_older_task_is_placed_first() -> None:
    tasks = [task("young", seq=9, cores=4), task("old", seq=3, cores=4)]

    assert placed(run(tasks, [node(cores=4)])) == {"old": "n"}


def test_a_priority_2_task_starts_before_an_older_priority_0_task_of_another_shape() -> None:
    older = task("older", priority=0, seq=1, cores=4)
    urgent = task("urgent", priority=2, seq=2, cores=3, memory=100)
    assert older.shape != urgent.shape

    assert placed(run([older, urgent], [node(cores=4, memory=100)])) == {"urgent": "n"}


def test_among_equal_priorities_the_older_task_of_another_shape_starts_first() -> None:
    older = task("older", seq=1, cores=4)
    younger = task("younger", seq=2, cores=3, memory=100)

    assert placed(run([younger, older], [node(cores=4, memory=100)])) == {"older": "n"}


def test_assignments_come_out_in_priority_then_age_order_across_shapes() -> None:
    tasks = [task("c", priority=0, seq=1, memory=1), task("a", priority=2, seq=3),
             task("b", priority=2, seq=4, memory=2), task("d", priority=-1, seq=0),
             task("e", priority=-1, seq=5, memory=1)]

    result = run(tasks, [node(cores=10, memory=10)])

    assert [a.task for a in result.assignments] == ["a", "b", "c", "d", "e"]


def test_a_big_task_that_fits_nowhere_does_not_block_smaller_ones_behind_it() -> None:
    tasks = [task("huge", priority=9, seq=1, cores=64), task("small", seq=2, cores=1)]

    result = run(tasks, [node(cores=4)])

    assert placed(result) == {"small": "n"}
    assert result.reservation is None


# --- several placements within one pass -------------------------------------------------------


def test_two_tasks_that_each_need_the_whole_node_do_not_both_land_on_it() -> None:
    tasks = [task("a", seq=1, cores=4, memory=8000), task("b", seq=2, cores=4, memory=8000)]

    assert placed(run(tasks, [node(cores=4, memory=8000)])) == {"a": "n"}


def test_memory_taken_by_one_task_is_not_offered_to_the_next() -> None:
    tasks = [task("a", seq=1, memory=600), task("b", seq=2, memory=600)]

    assert placed(run(tasks, [node(cores=8, memory=1000)])) == {"a": "n"}


def test_the_second_task_goes_to_another_node_when_the_first_fills_one() -> None:
    tasks = [task("a", seq=1, cores=4), task("b", seq=2, cores=4)]

    assert placed(run(tasks, [node("n1", cores=4), node("n2", cores=4)])) == \
        {"a": "n1", "b": "n2"}


def test_several_small_tasks_fill_a_node_exactly_to_its_capacity() -> None:
    tasks = [task(f"t{i}", seq=i, cores=1) for i in range(6)]

    assert placed(run(tasks, [node(cores=4)])) == {"t0": "n", "t1": "n", "t2": "n", "t3": "n"}


def test_match_takes_what_it_allocates_from_the_offers_it_was_given() -> None:
    offer = node(cores=8, memory=1000)

    run([task(cores=3, memory=400)], [offer])

    assert offer.free == {"cores": 5.0, "memory": 600.0}


# --- non-accepting nodes --------------------------------------------------------------------


def test_a_node_that_is_not_accepting_gets_no_task() -> None:
    assert run([task()], [node(cores=64, accepting=False)]).assignments == []


def test_a_task_skips_a_non_accepting_node_for_an_accepting_one() -> None:
    nodes = [node("draining", cores=1, accepting=False), node("open", cores=64)]

    assert placed(run([task()], nodes)) == {"t": "open"}


def test_a_non_accepting_node_is_never_reserved() -> None:
    tasks = [task("huge", seq=1, cores=8)]
    nodes = [busy(node("draining", cores=8, accepting=False), cores=0), node("small", cores=2)]

    assert run(tasks, nodes).reservation is None


def test_no_nodes_means_no_assignments() -> None:
    result = run([task()], [])

    assert result.assignments == []
    assert result.reservation is None


# --- repositories ---------------------------------------------------------------------------

ENV = {"env": {"request": "env"}}
LOCAL_ENV = {"env": {"request": "env", "local": True}}


def test_a_request_claims_a_free_repository_of_that_type() -> None:
    offer = node(cores=4, repos={"//n/scratch": "tmp", "//n/env1": "env"})

    result = run([task(repositories=ENV)], [offer])

    assert claimed(result) == {"t": {"env": "//n/env1"}}
    assert offer.free_repos == {"tmp": ["//n/scratch"], "env": []}


def test_two_tasks_never_get_the_same_repository_in_one_pass() -> None:
    tasks = [task("a", seq=1, repositories=ENV), task("b", seq=2, repositories=ENV)]

    result = run(tasks, [node(cores=8, repos={"//n/env1": "env", "//n/env2": "env"})])

    assert placed(result) == {"a": "n", "b": "n"}
    assert {r["env"] for r in claimed(result).values()} == {"//n/env1", "//n/env2"}


def test_several_requests_in_one_task_get_distinct_repositories() -> None:
    two = {"first": {"request": "env"}, "second": {"request": "env"}}

    result = run([task(repositories=two)],
                 [node(cores=8, repos={"//n/env1": "env", "//n/env2": "env"})])

    assert claimed(result) == {"t": {"first": "//n/env1", "second": "//n/env2"}}


def test_a_task_whose_request_finds_no_free_repository_is_blocked() -> None:
    tasks = [task("a", seq=1, repositories=ENV), task("b", seq=2, repositories=ENV)]

    result = run(tasks, [node(cores=8, repos={"//n/env1": "env"})])

    assert placed(result) == {"a": "n"}
    assert result.blocked == {tasks[1].shape}


def test_a_local_request_forces_the_node_that_hosts_a_free_repository_of_that_type() -> None:
    nodes = [node("snug", cores=1), node("host", cores=16, repos={"//host/env": "env"})]

    result = run([task(repositories=LOCAL_ENV)], nodes)

    assert placed(result) == {"t": "host"}
    assert claimed(result) == {"t": {"env": "//host/env"}}


def test_a_local_request_is_not_met_by_a_repository_on_another_node() -> None:
    nodes = [node("worker", cores=8), busy(node("store", cores=8, repos={"//s/env": "env"}),
                                           cores=0)]

    result = run([task(repositories=LOCAL_ENV)], nodes)

    assert result.assignments == []


def test_a_local_request_skips_a_host_whose_repositories_of_that_type_are_all_held() -> None:
    nodes = [node("held", cores=1, repos={"//h/env": "env"}, held=["//h/env"]),
             node("free", cores=16, repos={"//f/env": "env"})]

    assert placed(run([task(repositories=LOCAL_ENV)], nodes)) == {"t": "free"}


def test_a_local_claim_before_the_farm_is_counted_leaves_the_count_right() -> None:
    # The first claim of the pass is local (no count needed for it); the farm's count,
    # made afterwards for the non-local request, must see one repository left, not none.
    hosted = {"//n/e1": "env", "//n/e2": "env"}
    first = task("a", seq=1, repositories={"env": {"request": "env", "local": True}})
    second = task("b", seq=2, repositories={"env": {"request": "env"}})

    result = run([first, second], [node("n", cores=8, repos=hosted)])

    assert claimed(result) == {"a": {"env": "//n/e1"}, "b": {"env": "//n/e2"}}


def test_a_non_local_request_may_take_a_repository_hosted_on_another_node() -> None:
    nodes = [node("worker", cores=4), busy(node("store", cores=4, repos={"//s/env": "env"}),
                                           cores=0)]

    result = run([task(repositories=ENV)], nodes)

    assert placed(result) == {"t": "worker"}
    assert claimed(result) == {"t": {"env": "//s/env"}}


def test_a_repository_not_listed_as_free_is_never_handed_out() -> None:
    offer = NodeOffer("n", {"cores": 8.0}, Labels.parse({}), capacity={"cores": 8.0},
                      repos={"//n/held": "env", "//n/free": "env"},
                      free_repos={"env": ["//n/free"]})
    tasks = [task("a", seq=1, repositories=ENV), task("b", seq=2, repositories=ENV),
             task("c", seq=3, repositories={"x": {"request": "other"}})]

    result = run(tasks, [offer])

    assert claimed(result) == {"a": {"env": "//n/free"}}


def test_a_non_accepting_node_hands_out_no_repository() -> None:
    nodes = [node("worker", cores=4),
             node("draining", cores=0, accepting=False, repos={"//d/env": "env"})]

    assert run([task(repositories=ENV)], nodes).assignments == []


def test_a_local_repository_without_request_pins_the_task_to_the_inherited_repository() -> None:
    inherited = task(repositories={"env": {"local": True}},
                     environment={"repo_env": "//home/env"})
    nodes = [node("snug", cores=1, repos={"//snug/env": "env"}),
             node("home", cores=16, repos={"//home/env": "env"}, held=["//home/env"])]

    result = run([inherited], nodes)

    assert inherited.shape.pinned == ("//home/env",)
    assert placed(result) == {"t": "home"}
    assert claimed(result) == {"t": {}}


def test_a_local_repository_without_request_or_inherited_repository_is_unplaceable() -> None:
    orphan = task(repositories={"env": {"local": True}}, environment={"repo_other": "//x"})

    result = run([orphan], [node(cores=16, repos={"//n/env": "env"})])

    assert result.assignments == []
    assert result.blocked == {orphan.shape}
    assert result.reservation is None
    assert explain(orphan.shape, [node(cores=16)]) == \
        ["repository 'env' is local but the task holds none (no repo_env in its environment)"]


def test_a_task_with_a_local_and_a_non_local_request_of_one_type_gets_both() -> None:
    mixed = {"a_shared": {"request": "env"}, "b_mine": {"request": "env", "local": True}}
    nodes = [node("worker", cores=4, repos={"//w/env": "env"}),
             busy(node("store", cores=4, repos={"//s/env": "env"}), cores=0)]

    result = run([task(repositories=mixed)], nodes)

    assert claimed(result) == {"t": {"a_shared": "//s/env", "b_mine": "//w/env"}}


# --- a large task is not starved by small ones --------------------------------------------------


def starving() -> tuple[list[Task], list[NodeOffer]]:
    """A task needing all 8 cores of the only node that can hold it, oldest in the queue,
    and a stream of small tasks behind it; another small node beside it."""
    huge = task("huge", seq=1, cores=8)
    small = [task(f"s{i}", seq=i, cores=1) for i in range(2, 8)]
    return [huge, *small], [busy(node("big", cores=8), cores=3), node("side", cores=2)]


def test_the_oldest_task_that_cannot_start_gets_the_node_that_could_hold_it_reserved() -> None:
    tasks, nodes = starving()

    result = run(tasks, nodes)

    assert result.reservation == Reservation("huge", "big")
    assert "big" not in placed(result).values()


def test_small_tasks_still_start_on_a_node_that_is_not_reserved() -> None:
    tasks, nodes = starving()

    result = run(tasks, nodes)

    assert placed(result) == {"s2": "side", "s3": "side"}


def test_a_task_placed_before_the_reserving_task_may_still_use_its_node() -> None:
    tasks, nodes = starving()
    urgent = task("urgent", priority=1, seq=9, cores=3)

    result = run([*tasks, urgent], nodes)

    assert placed(result)["urgent"] == "big"
    assert result.reservation == Reservation("huge", "big")


def test_a_reservation_passed_back_keeps_the_same_node() -> None:
    huge = task("huge", seq=1, cores=8)
    first = run([huge], [busy(node("left", cores=8), cores=3),
                         busy(node("right", cores=8), cores=2)])
    assert first.reservation == Reservation("huge", "left")
    later = [busy(node("left", cores=8), cores=1), busy(node("right", cores=8), cores=4)]
    assert run([huge], later).reservation == Reservation("huge", "right")  # fresh choice

    again = run([huge], [busy(node("left", cores=8), cores=1),
                         busy(node("right", cores=8), cores=4)], reservation=first.reservation)

    assert again.reservation == Reservation("huge", "left")


def test_the_large_task_starts_on_its_reserved_node_once_that_node_is_empty() -> None:
    tasks, nodes = starving()
    first = run(tasks, nodes)

    result = run(tasks[3:] + tasks[:1], [node("big", cores=8), node("side", cores=0)],
                 reservation=first.reservation)

    assert placed(result) == {"huge": "big"}
    assert result.reservation != Reservation("huge", "big")


def test_a_task_that_could_not_fit_even_an_empty_node_reserves_nothing() -> None:
    result = run([task("huge", seq=1, cores=64), task("small", seq=2)], [node(cores=8)])

    assert result.reservation is None
    assert placed(result) == {"small": "n"}


# --- incremental passes ---------------------------------------------------------------------


def test_a_shape_blocked_before_is_not_tried_on_a_node_that_is_not_dirty() -> None:
    waiting = task(cores=2)

    result = run([waiting], [node("n", cores=4)], blocked_before={waiting.shape}, dirty=[])

    assert result.assignments == []
    assert waiting.shape in result.blocked


def test_a_shape_blocked_before_starts_once_its_node_is_dirty() -> None:
    waiting = task(cores=2)

    result = run([waiting], [node("n", cores=4)], blocked_before={waiting.shape}, dirty=["n"])

    assert placed(result) == {"t": "n"}
    assert result.blocked == set()


def test_a_shape_blocked_before_is_tried_only_on_the_dirty_nodes() -> None:
    waiting = task(cores=2)
    nodes = [node("snug", cores=2), node("roomy", cores=8)]

    result = run([waiting], nodes, blocked_before={waiting.shape}, dirty=["roomy"])

    assert placed(result) == {"t": "roomy"}


def test_with_dirty_none_a_shape_blocked_before_is_tried_on_every_node() -> None:
    waiting = task(cores=2)

    result = run([waiting], [node("n", cores=4)], blocked_before={waiting.shape}, dirty=None)

    assert placed(result) == {"t": "n"}


def test_a_shape_not_blocked_before_is_tried_on_every_node_whatever_is_dirty() -> None:
    waiting = task(cores=2)

    result = run([waiting], [node("n", cores=4)], blocked_before={task(cores=3).shape},
                 dirty=[])

    assert placed(result) == {"t": "n"}


def test_the_node_of_a_previous_reservation_counts_as_dirty() -> None:
    waiting = task(cores=2)

    result = run([waiting], [node("n", cores=4)], blocked_before={waiting.shape}, dirty=[],
                 reservation=Reservation("gone", "n"))

    assert placed(result) == {"t": "n"}


def test_a_pass_that_tries_only_freed_room_keeps_a_node_the_waiting_task_could_use() -> None:
    # The roomiest node would take the big task once empty, but only nightly tasks: the node
    # kept must be one the task could run on, in a pass that looks only where room was freed.
    big = task("big", cores=8)
    offers = [busy(node("fussy", cores=16, usage_require_nightly=True), cores=12),
              busy(node("plain", cores=8), cores=2), busy(node("freed", cores=4), cores=1)]

    result = run([big], offers, blocked_before={big.shape}, dirty=["freed"])

    assert result.assignments == []
    assert result.reservation == Reservation("big", "plain")


def test_a_blocked_shape_asking_no_memory_starts_where_cores_were_freed_below_none() -> None:
    # Its memory lowered under its tasks, the node gains cores only: a shape that asks no
    # memory fits there, so the pass must not count the freed room as spent once the big
    # task ahead of it has a node kept.
    big, waiting = task("big", seq=1, cores=8), task("any", seq=2, cores=1)
    offers = [busy(node("wide", cores=8), cores=2),
              busy(node("low", cores=4, memory=1000), cores=2, memory=-200)]

    result = run([big, waiting], offers, blocked_before={big.shape, waiting.shape},
                 dirty=["low"], reservation=Reservation("big", "wide"))

    assert result.reservation == Reservation("big", "wide")
    assert placed(result) == {"any": "low"}


def test_a_pass_over_freed_room_still_keeps_a_node_for_the_first_task_that_fits_nowhere(
        ) -> None:
    # The big task is first in the order and cannot use the 1 core freed: it keeps the node
    # that could hold it, and the small task behind it may not take that node.
    big, small = task("big", seq=1, cores=8), task("small", seq=2, cores=1)
    offers = [busy(node("wide", cores=8), cores=1), busy(node("other", cores=2), cores=0)]

    result = run([big, small], offers, blocked_before={big.shape, small.shape}, dirty=["wide"])

    assert result.reservation == Reservation("big", "wide")
    assert result.assignments == []
    assert result.blocked == {big.shape, small.shape}


def test_a_repository_freed_on_one_node_lets_a_blocked_task_start_on_another() -> None:
    huge = task("huge", seq=1, cores=8)
    waiting = task("t", seq=2, repositories=ENV)
    first = run([huge, waiting],
                [busy(node("z", cores=8), cores=4), node("y", cores=2),
                 busy(node("x", cores=1, repos={"//x/env": "env"}, held=["//x/env"]), cores=0)])
    assert first.blocked == {huge.shape, waiting.shape}
    assert first.reservation == Reservation("huge", "z")

    # The task holding //x/env ends: x gains room (its repository), nothing changes on y.
    result = run([huge, waiting],
                 [busy(node("z", cores=8), cores=4), node("y", cores=2),
                  busy(node("x", cores=1, repos={"//x/env": "env"}), cores=0)],
                 blocked_before=first.blocked, dirty=["x"], reservation=first.reservation)

    assert placed(result) == {"t": "y"}


# --- the pass against its rules, the slow way -----------------------------------------------


def reference_match(tasks: Iterable[Task], offers: list[NodeOffer],
                    previous: Reservation | None = None) -> MatchResult:
    """The rules of one pass with nothing remembered or skipped: every task in priority-then-
    age order is looked at against every node (match keeps heaps, shares candidate lists and
    skips shapes it can tell fit nowhere; its choices must be these). A task kept a node by
    the `previous` pass keeps the same one while it may."""
    accepting = [o for o in offers if o.accepting]
    assignments: list[Assignment] = []
    blocked: set[Shape] = set()
    reservation: Reservation | None = None
    for t in sorted(tasks, key=lambda t: t.key):
        if t.shape in blocked:  # a shape that fit nowhere is done for the pass
            continue
        pool = RepoPool(accepting)  # counted afresh: nothing kept up to date between tasks
        usable = [o for o in accepting if compatible(t.shape, o) and fits_now(t.shape, o, pool)
                  and (reservation is None or o.name != reservation.node)]
        if not usable:
            blocked.add(t.shape)
            room = [o for o in accepting if compatible(t.shape, o) and fits_empty(t.shape, o)
                    and repositories_free(t.shape, o, pool)]
            kept = [o for o in room if previous == Reservation(t.name, o.name)]
            if reservation is None and room:
                chosen = kept[0] if kept else max(room, key=lambda o: (o.free.get("cores", 0.0),
                                                                     o.name))
                reservation = Reservation(t.name, chosen.name)
            continue
        best = min(usable, key=lambda o: _rank(t.shape, o))
        allocated = allocate(t.shape, best)
        repos, _ = _claim(t.shape, best, accepting, pool)
        for resource, granted in allocated.items():
            best.free[resource] = best.free.get(resource, 0.0) - granted
        assignments.append(Assignment(t.name, best.name, allocated, repos))
    return MatchResult(assignments, blocked, reservation)


def random_farm(seed: int) -> tuple[list[Task], list[NodeOffer]]:
    """A small mixed farm, part busy, and a queue of tasks of few kinds, so that many shapes
    share the nodes they may run on and differ only in what they consume."""
    rng = random.Random(seed)
    nodes = []
    for index in range(rng.randint(2, 9)):
        labels: dict[str, Any] = {}
        if rng.random() < 0.3:
            labels.update(usage_gpu=True, gpus=rng.choice((1, 2)))
        if rng.random() < 0.2:
            labels["usage_require_alice"] = True
        repos = {f"//n{index}/r{k}": rng.choice("ab") for k in range(rng.randint(0, 2))}
        offer = node(f"n{index}", repos=repos, held=[r for r in repos if rng.random() < 0.3],
                     cores=rng.choice((2, 4, 8)), memory=rng.choice((1000, 4000, 8000)),
                     **labels)
        if rng.random() < 0.5:
            busy(offer, cores=rng.randint(0, int(offer.capacity["cores"])))
        if "gpus" in offer.free and rng.random() < 0.6:
            busy(offer, gpus=-1)  # over-committed: its capacity went down under its tasks
        if rng.random() < 0.1:
            busy(offer, memory=-500)
        nodes.append(offer)
    tasks = []
    for seq in range(1, rng.randint(2, 40)):
        requirements: dict[str, Any] = {"cores": rng.choice((1, 2, 4, 8))}
        if rng.random() < 0.8:
            requirements["memory"] = 500 * rng.randint(1, 12)
        if rng.random() < 0.2:
            requirements.update(usage_require_gpu=True, gpus=1)
        elif rng.random() < 0.3:
            requirements["gpus"] = 0  # an ask of none, which a node with less than none fails
        if rng.random() < 0.2:
            requirements["usage_alice"] = True
        if rng.random() < 0.15:
            requirements["usage_prefer_gpu"] = True
        wanted = ({"r": {"request": rng.choice("ab"), "local": rng.random() < 0.5}}
                  if rng.random() < 0.2 else None)
        tasks.append(task(f"t{seq}", priority=rng.choice((0, 0, 1, 2)), seq=seq,
                          repositories=wanted, **requirements))
    return tasks, nodes


@pytest.mark.parametrize("seed", range(1000))
def test_a_pass_chooses_what_looking_at_every_task_and_node_would(seed: int) -> None:
    tasks, offers = random_farm(seed)
    expected = reference_match(tasks, random_farm(seed)[1])

    result = run(tasks, offers)

    assert result.assignments == expected.assignments
    assert result.blocked == expected.blocked
    assert result.reservation == expected.reservation


def free_some(offers: list[NodeOffer], seed: int) -> list[str]:
    """Room freed on some nodes, as tasks ending there free it (cores, memory, a repository
    they held); returns those nodes' names."""
    rng = random.Random(seed)
    freed = [o for o in offers if rng.random() < 0.3]
    for offer in freed:
        for resource in ("cores", "memory"):  # some free cores only, some memory only
            if resource in offer.capacity and rng.random() < 0.7:
                gained = rng.choice((0.5, 1.0)) * offer.capacity[resource]
                offer.free[resource] = min(offer.capacity[resource],
                                           offer.free[resource] + gained)
        held = [(r, kind) for r, kind in sorted(offer.repos.items())
                if r not in offer.free_repos.get(kind, [])]
        if held and rng.random() < 0.5:
            repo, kind = held[0]
            offer.free_repos.setdefault(kind, []).append(repo)
    return [o.name for o in freed]


@pytest.mark.parametrize("seed", range(500))
def test_a_pass_over_freed_room_chooses_what_looking_at_every_task_and_node_would(
        seed: int) -> None:
    """The next pass after some nodes gained room, which tries the shapes that fit nowhere
    last time only there (and skips those that cannot fit there at all), against a full look."""
    tasks, offers = random_farm(seed)
    first = run(tasks, offers)
    started = {a.task for a in first.assignments}
    waiting = [t for t in tasks if t.name not in started]
    newcomers = random_farm(seed + 10_000)[0][:3]  # shapes never tried, queued since
    waiting += [Task(f"new{t.name}", t.shape, t.priority, 1000 + t.seq) for t in newcomers]
    dirty = free_some(offers, seed)
    twin = copy.deepcopy(offers)

    result = run(waiting, offers, blocked_before=first.blocked, dirty=dirty,
                 reservation=first.reservation)

    expected = reference_match(waiting, twin, previous=first.reservation)
    assert result.assignments == expected.assignments
    assert result.blocked == expected.blocked
    assert result.reservation == expected.reservation


def in_passes_of_at_most(limit: int, tasks: list[Task], offers: list[NodeOffer],
                         **options: Any) -> MatchResult:
    """Passes of at most `limit` assignments, each going on from what the one before left
    (carry_over), the tasks it started gone from the queue, until one goes through: all
    their assignments, and what the last one found."""
    blocked: set[Shape] = set(options.get("blocked_before", ()))
    dirty = options.get("dirty")
    dirty = None if dirty is None else set(dirty)
    kept = options.get("reservation")
    assignments: list[Assignment] = []
    for _ in range(len(tasks) + 1):
        result = run(tasks, offers, blocked_before=blocked, dirty=dirty, reservation=kept,
                     limit=limit)
        assert len(result.assignments) <= limit
        assignments += result.assignments
        started = {a.task for a in result.assignments}
        tasks = [t for t in tasks if t.name not in started]
        blocked, dirty, kept = carry_over(result, blocked, dirty, kept)
        if not result.unfinished:
            return MatchResult(assignments, result.blocked, result.reservation)
    raise AssertionError("the passes never went through")


@pytest.mark.parametrize("seed", range(300))
def test_passes_stopped_at_a_limit_choose_what_one_whole_pass_would(seed: int) -> None:
    """A turn's pass stops after its limit and the next turn's goes on: together they make
    the choices of one pass with no limit, first passes and passes over freed room alike."""
    limit = 1 + seed % 3
    tasks, offers = random_farm(seed)
    whole = reference_match(tasks, random_farm(seed)[1])

    first = in_passes_of_at_most(limit, tasks, offers)

    assert first.assignments == whole.assignments
    assert first.blocked == whole.blocked and first.reservation == whole.reservation
    started = {a.task for a in first.assignments}
    waiting = [t for t in tasks if t.name not in started]
    waiting += [Task(f"new{t.name}", t.shape, t.priority, 1000 + t.seq)
                for t in random_farm(seed + 10_000)[0][:3]]
    dirty = free_some(offers, seed)
    twin = copy.deepcopy(offers)

    result = in_passes_of_at_most(limit, waiting, offers, blocked_before=first.blocked,
                                  dirty=dirty, reservation=first.reservation)

    expected = reference_match(waiting, twin, previous=first.reservation)
    assert result.assignments == expected.assignments
    assert result.blocked == expected.blocked
    assert result.reservation == expected.reservation


def test_a_pass_stopped_at_its_limit_says_which_shapes_it_did_not_finish() -> None:
    small, big = task("a", seq=1, cores=1), task("b", seq=3, cores=2)
    tasks = [small, task("a2", seq=2, cores=1), big]

    result = run(tasks, [node("n", cores=8)], limit=1)

    assert placed(result) == {"a": "n"}
    assert result.unfinished == {small.shape, big.shape}
    assert run(tasks[1:], [node("n", cores=8)], limit=2).unfinished == set()


def test_a_pass_stopped_before_a_node_is_kept_keeps_the_one_kept_before() -> None:
    previous = Reservation("big", "m")
    stopped = MatchResult([], set(), None, unfinished={shape(cores=1)})

    blocked, dirty, kept = carry_over(stopped, [shape(cores=64)], {"n"}, previous)

    assert kept == previous and dirty == {"n"}
    assert blocked == set()  # what the pass did not finish was not blocked before


def test_a_pass_stopped_after_keeping_another_node_frees_the_first() -> None:
    waiting = shape(cores=64)
    stopped = MatchResult([], {waiting}, Reservation("big", "x"),
                          unfinished={shape(cores=1)})

    blocked, dirty, kept = carry_over(stopped, [waiting], {"n"}, Reservation("old", "m"))

    assert kept == Reservation("big", "x") and dirty == {"n", "m"}
    assert blocked == {waiting}


def test_a_shape_needing_more_than_one_that_fit_nowhere_is_not_looked_at() -> None:
    small, large = task("small", seq=1, cores=2), task("large", seq=2, cores=4, memory=100)
    offers = [busy(node("a", cores=8, memory=1000), cores=1)]

    result = run([small, large], offers)

    assert result.blocked == {small.shape, large.shape}
    assert large.shape.covers(small.shape) and not small.shape.covers(large.shape)


def test_a_shape_asking_nothing_of_a_resource_is_tried_where_an_ask_of_none_failed() -> None:
    """A node whose capacity went down under its running tasks has less than none free: a
    task asking 0 of it fails there, one not asking for it does not."""
    def farm() -> list[NodeOffer]:
        return [busy(node("m", cores=8), cores=0), busy(node("n", cores=4, gpus=0), gpus=-1)]
    tasks = [task("big", seq=1, cores=8), task("zero", seq=2, cores=1, gpus=0),
             task("plain", seq=3, cores=1)]

    result = run(tasks, farm())

    assert placed(result) == {"plain": "n"} == placed(reference_match(tasks, farm()))
    assert not tasks[2].shape.covers(tasks[1].shape)


def test_a_task_asking_no_memory_fits_a_node_with_less_than_none_free() -> None:
    over = busy(node("over", cores=4, memory=1000), memory=-200)  # lowered under its tasks

    result = run([task("any", cores=1), task("some", seq=2, cores=1, memory=100)], [over])

    assert placed(result) == {"any": "over"}


def test_shapes_that_may_run_on_the_same_nodes_share_their_reach_number() -> None:
    assert shape(cores=1, memory=100).reach == shape(cores=8, gpus=1).reach
    assert shape(cores=1).reach != shape(cores=1, usage_alice=True).reach
    assert shape(cores=1).reach != shape(cores=1, bid=2).reach


def test_reach_numbers_stay_distinct_when_the_table_starts_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matcher, "_REACHES_KEPT", 3)
    shapes = [shape(cores=1, bid=bid) for bid in range(10)]  # ten reaches, the table full thrice

    assert len({s.reach for s in shapes}) == 10
    again = shape(cores=2, bid=9)  # the same reach as the last: still in the table
    assert again.reach == shapes[-1].reach
    assert shape(cores=1, bid=0).reach not in {s.reach for s in shapes[1:]}


def test_a_shape_is_not_covered_by_one_that_runs_on_other_nodes() -> None:
    plain, alice = shape(cores=1), shape(cores=4, usage_alice=True)

    assert not alice.covers(plain)


# --- explain --------------------------------------------------------------------------------


def test_explain_names_the_label_a_node_lacks() -> None:
    assert explain(shape(usage_require_gpu=True), [node("box", cores=8)]) == \
        ["box: lacks label(s) gpu"]


def test_explain_names_the_label_a_node_insists_on() -> None:
    assert explain(shape(), [node("box", cores=8, usage_require_nightly=True)]) == \
        ["box: runs only tasks labelled nightly"]


def test_explain_says_a_node_is_too_small_and_by_how_much() -> None:
    assert explain(shape(memory=4000), [node("box", cores=8, memory=1000)]) == \
        ["box: too small (memory needs 4000, has 1000)"]


def test_explain_says_a_big_enough_node_is_full_for_now() -> None:
    offer = busy(node("box", cores=8), cores=1)

    assert explain(shape(cores=4), [offer]) == ["box: full for now (cores needs 4, has 1 free)"]


def test_explain_names_every_resource_short_in_the_order_the_task_asks_them() -> None:
    small = node("small", cores=2, memory=1000)
    full = busy(node("full", cores=8, memory=8000), cores=1, memory=500)
    enough_memory = busy(node("spare", cores=8, memory=8000), cores=0)

    assert explain(shape(cores=4, memory=3000), [small, full, enough_memory]) == [
        "small: too small (cores needs 4, has 2, memory needs 3000, has 1000)",
        "full: full for now (cores needs 4, has 1, memory needs 3000, has 500 free)",
        "spare: full for now (cores needs 4, has 0 free)"]


def test_explain_says_a_node_is_not_accepting() -> None:
    reasons = explain(shape(), [node("box", cores=8, accepting=False)])

    assert len(reasons) == 1
    assert reasons[0].startswith("box: not accepting work")


def test_explain_says_when_no_node_is_registered() -> None:
    assert explain(shape(), []) == ["no node is registered"]


def test_explain_gives_one_sentence_per_node_that_cannot_take_the_task() -> None:
    offers = [node("small", cores=1), node("plain", cores=8),
              node("fits", cores=8, usage_gpu=True)]

    reasons = explain(shape(cores=2, usage_require_gpu=True), offers)

    assert reasons == ["small: lacks label(s) gpu", "plain: lacks label(s) gpu"]


def test_explain_gives_one_sentence_to_many_nodes_that_share_a_reason() -> None:
    full = [busy(node(f"b{index}", cores=4), cores=0) for index in (5, 0, 3, 1, 4, 2)]
    offers = [node("small", cores=1), *full[:2], node("roomy", cores=8),
              *full[2:], node("tiny", cores=1)]

    reasons = explain(shape(cores=2), offers)

    # In the nodes' order, the shared reason where its first node stood; two nodes too
    # small for the same reason are still named one by one.
    assert reasons == ["small: too small (cores needs 2, has 1)",
                       "b0, b1, b2 and 3 other nodes: full for now (cores needs 2, has 0 free)",
                       "tiny: too small (cores needs 2, has 1)"]


def test_explain_names_up_to_three_nodes_that_share_a_reason_one_by_one() -> None:
    offers = [busy(node(f"b{index}", cores=4), cores=0) for index in range(3)]

    assert explain(shape(cores=2), offers) == [
        f"b{index}: full for now (cores needs 2, has 0 free)" for index in range(3)]
    assert explain(shape(cores=2), [busy(node("a9", cores=4), cores=0), *offers]) == [
        "a9, b0, b1 and 1 other node: full for now (cores needs 2, has 0 free)"]


def test_explain_says_a_node_does_not_host_the_inherited_repository() -> None:
    pinned = shape({"env": {"local": True}}, {"repo_env": "//home/env"})

    assert explain(pinned, [node("box", cores=8)]) == ["box: does not host repository //home/env"]


def test_explain_says_every_local_repository_of_the_type_is_held() -> None:
    offer = node("box", cores=8, repos={"//box/env": "env"}, held=["//box/env"])

    assert explain(shape(LOCAL_ENV), [offer]) == \
        ["box: no free repository of type env (1 hosted, all held)",
         "not enough free repositories of type env on any node"]


def test_explain_says_no_node_has_a_free_repository_of_the_requested_type() -> None:
    offer = node("box", cores=8, repos={"//box/env": "env"}, held=["//box/env"])

    assert explain(shape(ENV), [offer]) == \
        ["not enough free repositories of type env on any node"]


def test_explain_says_which_task_a_node_is_kept_free_for() -> None:
    offer = busy(node("box", cores=8), cores=2)
    reserved = Reservation("huge", "box")

    assert explain(shape(cores=4), [offer], reserved, "small") == \
        ["box: full for now (cores needs 4, has 2 free)",
         "box is kept free for huge, which waits longer"]
    assert explain(shape(cores=8), [offer], reserved, "huge") == \
        ["box: full for now (cores needs 8, has 2 free)"]
