"""vespid.coordinator.matcher: which waiting task runs on which node (a pure function)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from vespid.coordinator.matcher import (
    Assignment,
    Labels,
    NodeOffer,
    TaskRequest,
    explain,
    match,
)


def task(name: str = "t", priority: int = 0, seq: int = 1, **requirements: Any) -> TaskRequest:
    return TaskRequest.from_requirements(name, priority, seq, requirements)


def node(name: str = "n", accepting: bool = True, **capabilities: Any) -> NodeOffer:
    free = {k: float(v) for k, v in capabilities.items()
            if not k.startswith("usage_") and not isinstance(v, bool)}
    return NodeOffer(name, free, Labels.parse(capabilities), accepting=accepting)


def placed(assignments: list[Assignment]) -> dict[str, str]:
    return {a.task: a.node for a in assignments}


# --- fit on resources -----------------------------------------------------------------------


def test_a_task_fits_a_node_with_enough_memory_and_cores() -> None:
    assignments = match([task(memory=1000, cores=2)], [node(memory=1000, cores=2)])

    assert assignments == [Assignment("t", "n", {"memory": 1000.0, "cores": 2.0})]


def test_a_task_needing_more_memory_than_the_node_has_does_not_run_there() -> None:
    assert match([task(memory=2000)], [node(memory=1999, cores=8)]) == []


def test_a_task_needing_more_cores_than_the_node_has_does_not_run_there() -> None:
    assert match([task(cores=3)], [node(memory=1000, cores=2)]) == []


def test_any_other_numeric_resource_is_consumed_like_memory() -> None:
    tasks = [task("a", seq=1, gpus=1), task("b", seq=2, gpus=1)]

    assignments = match(tasks, [node(cores=8, gpus=1)])

    assert placed(assignments) == {"a": "n"}
    assert assignments[0].allocated["gpus"] == 1.0


def test_a_resource_the_node_does_not_declare_counts_as_none_of_it() -> None:
    assert match([task(gpus=1)], [node(cores=8, memory=1000)]) == []


def test_a_zero_amount_of_an_undeclared_resource_still_fits() -> None:
    assert placed(match([task(gpus=0)], [node(cores=1)])) == {"t": "n"}


def test_a_task_without_requirements_needs_one_core() -> None:
    request = task()

    assert request.needs == {"cores": 1.0}
    assert match([request], [node(memory=1000)]) == []
    assert match([request], [node(cores=1)])[0].allocated == {"cores": 1.0}


def test_a_fractional_core_request_fits_a_fractional_free_amount() -> None:
    assert placed(match([task(cores=0.5)], [node(cores=0.5)])) == {"t": "n"}
    assert match([task(cores=0.6)], [node(cores=0.5)]) == []


# --- elastic cores ----------------------------------------------------------------------------


def test_without_cores_max_a_task_gets_exactly_its_cores() -> None:
    assignments = match([task(cores=2)], [node(cores=16)])

    assert assignments[0].allocated["cores"] == 2.0


def test_an_elastic_task_gets_up_to_cores_max_of_the_free_cores() -> None:
    assignments = match([task(cores=2, cores_max=6)], [node(cores=16)])

    assert assignments[0].allocated["cores"] == 6.0


def test_an_elastic_task_gets_all_free_cores_when_fewer_than_cores_max() -> None:
    assignments = match([task(cores=2, cores_max=6)], [node(cores=4)])

    assert assignments[0].allocated["cores"] == 4.0


@pytest.mark.parametrize("unbounded", [math.inf, None])
def test_an_unbounded_task_takes_every_free_core(unbounded: float | None) -> None:
    assignments = match([task(cores=1, cores_max=unbounded)], [node(cores=12)])

    assert assignments[0].allocated["cores"] == 12.0


def test_an_elastic_task_never_gets_fewer_than_its_cores() -> None:
    request = task(cores=1.5, cores_max=math.inf)

    assignments = match([request], [node(cores=2.5)])

    assert assignments[0].allocated["cores"] == 2.0
    assert match([task(cores=1.5, cores_max=math.inf)], [node(cores=1.7)])[0] \
        .allocated["cores"] == 1.5


def test_a_cores_max_below_cores_is_raised_to_cores() -> None:
    request = task(cores=4, cores_max=2)

    assert request.cores_max == 4.0
    assert match([request], [node(cores=8)])[0].allocated["cores"] == 4.0


def test_an_unbounded_task_leaves_no_cores_for_the_next_task() -> None:
    tasks = [task("greedy", seq=1, cores_max=math.inf), task("small", seq=2)]

    assert placed(match(tasks, [node(cores=8)])) == {"greedy": "n"}


# --- labels ---------------------------------------------------------------------------------


def test_a_task_requiring_a_label_runs_only_on_a_node_carrying_it() -> None:
    request = task(usage_require_gpu=True)

    assert match([request], [node("plain", cores=8)]) == []
    assert placed(match([request], [node("plain", cores=8), node("gpu", cores=1,
                                                                 usage_gpu=True)])) == \
        {"t": "gpu"}


def test_a_node_requiring_a_label_runs_only_tasks_carrying_it() -> None:
    fussy = node("fussy", cores=8, usage_require_nightly=True)

    assert match([task("plain")], [fussy]) == []
    assert placed(match([task("nightly", usage_nightly=True)], [fussy])) == {"nightly": "fussy"}


def test_a_label_set_to_false_is_not_carried() -> None:
    assert match([task(usage_require_gpu=True)], [node(cores=1, usage_gpu=False)]) == []


def test_a_requirement_set_to_false_requires_nothing() -> None:
    assert placed(match([task(usage_require_gpu=False)], [node(cores=1)])) == {"t": "n"}


def test_labels_parse_into_carried_required_and_preferred() -> None:
    labels = Labels.parse({"usage_gpu": True, "usage_require_linux": True,
                           "usage_prefer_ssd": True, "usage_off": False, "cores": 4})

    assert labels == Labels(frozenset({"gpu"}), frozenset({"linux"}), frozenset({"ssd"}))


def test_a_task_preferring_a_label_goes_to_the_node_that_carries_it() -> None:
    nodes = [node("tight", cores=2), node("ssd", cores=16, usage_ssd=True)]

    assert placed(match([task(cores=2, usage_prefer_ssd=True)], nodes)) == {"t": "ssd"}


def test_a_preference_is_soft_and_the_task_still_runs_without_it() -> None:
    assert placed(match([task(usage_prefer_ssd=True)], [node(cores=1)])) == {"t": "n"}


def test_a_node_preferring_a_label_attracts_tasks_that_carry_it() -> None:
    nodes = [node("tight", cores=2), node("likes-ci", cores=16, usage_prefer_ci=True)]

    assert placed(match([task(cores=2, usage_ci=True)], nodes)) == {"t": "likes-ci"}


def test_more_preference_matches_rank_a_node_higher() -> None:
    nodes = [node("one", cores=4, usage_ssd=True),
             node("two", cores=16, usage_ssd=True, usage_fast=True)]
    request = task(usage_prefer_ssd=True, usage_prefer_fast=True)

    assert placed(match([request], nodes)) == {"t": "two"}


# --- choosing a node and an order -----------------------------------------------------------


def test_among_equal_nodes_the_best_fit_leaves_the_fewest_cores_free() -> None:
    nodes = [node("big", cores=16), node("snug", cores=3), node("mid", cores=8)]

    assert placed(match([task(cores=3)], nodes)) == {"t": "snug"}


def test_when_cores_tie_the_node_left_with_less_memory_wins() -> None:
    nodes = [node("roomy", cores=4, memory=64000), node("snug", cores=4, memory=2000)]

    assert placed(match([task(cores=4, memory=1000)], nodes)) == {"t": "snug"}


def test_a_higher_priority_task_is_placed_before_an_older_one() -> None:
    tasks = [task("old", priority=0, seq=1, cores=4), task("urgent", priority=5, seq=2, cores=4)]

    assert placed(match(tasks, [node(cores=4)])) == {"urgent": "n"}


def test_among_equal_priorities_the_older_task_is_placed_first() -> None:
    tasks = [task("young", seq=9, cores=4), task("old", seq=3, cores=4)]

    assert placed(match(tasks, [node(cores=4)])) == {"old": "n"}


def test_assignments_come_out_in_priority_then_age_order() -> None:
    tasks = [task("c", priority=0, seq=1), task("a", priority=2, seq=3),
             task("b", priority=2, seq=4), task("d", priority=-1, seq=0)]

    assignments = match(tasks, [node(cores=10)])

    assert [a.task for a in assignments] == ["a", "b", "c", "d"]


def test_a_big_task_that_fits_nowhere_does_not_block_smaller_ones_behind_it() -> None:
    tasks = [task("huge", priority=9, seq=1, cores=64), task("small", seq=2, cores=1)]

    assert placed(match(tasks, [node(cores=4)])) == {"small": "n"}


# --- reservations within one call -------------------------------------------------------------


def test_two_tasks_that_each_need_the_whole_node_do_not_both_land_on_it() -> None:
    tasks = [task("a", seq=1, cores=4, memory=8000), task("b", seq=2, cores=4, memory=8000)]

    assert placed(match(tasks, [node(cores=4, memory=8000)])) == {"a": "n"}


def test_memory_reserved_by_one_task_is_not_offered_to_the_next() -> None:
    tasks = [task("a", seq=1, memory=600), task("b", seq=2, memory=600)]

    assert placed(match(tasks, [node(cores=8, memory=1000)])) == {"a": "n"}


def test_the_second_task_goes_to_another_node_when_the_first_fills_one() -> None:
    tasks = [task("a", seq=1, cores=4), task("b", seq=2, cores=4)]

    assert placed(match(tasks, [node("n1", cores=4), node("n2", cores=4)])) == \
        {"a": "n1", "b": "n2"}


def test_several_small_tasks_fill_a_node_exactly_to_its_capacity() -> None:
    tasks = [task(f"t{i}", seq=i, cores=1) for i in range(6)]

    assert len(match(tasks, [node(cores=4)])) == 4


def test_match_reserves_what_it_allocates_on_the_offers_it_was_given() -> None:
    offer = node(cores=8, memory=1000)

    match([task(cores=3, memory=400)], [offer])

    assert offer.free == {"cores": 5.0, "memory": 600.0}


# --- non-accepting nodes --------------------------------------------------------------------


def test_a_node_that_is_not_accepting_gets_no_task() -> None:
    assert match([task()], [node(cores=64, accepting=False)]) == []


def test_a_task_skips_a_non_accepting_node_for_an_accepting_one() -> None:
    nodes = [node("draining", cores=1, accepting=False), node("open", cores=64)]

    assert placed(match([task()], nodes)) == {"t": "open"}


def test_no_nodes_means_no_assignments() -> None:
    assert match([task()], []) == []


# --- explain --------------------------------------------------------------------------------


def capacity(*offers: NodeOffer) -> dict[str, dict[str, float]]:
    return {o.name: dict(o.free) for o in offers}


def test_explain_names_the_label_a_node_lacks() -> None:
    offer = node("box", cores=8)

    reasons = explain(task(usage_require_gpu=True), [offer], capacity(offer))

    assert reasons == ["box: lacks label(s) gpu"]


def test_explain_names_the_label_a_node_insists_on() -> None:
    offer = node("box", cores=8, usage_require_nightly=True)

    reasons = explain(task(), [offer], capacity(offer))

    assert reasons == ["box: runs only tasks labelled nightly"]


def test_explain_says_a_node_is_too_small_and_by_how_much() -> None:
    offer = node("box", cores=8, memory=1000)

    reasons = explain(task(memory=4000), [offer], capacity(offer))

    assert reasons == ["box: too small (memory needs 4000, has 1000)"]


def test_explain_says_a_big_enough_node_is_full_for_now() -> None:
    offer = node("box", cores=8)
    total = capacity(offer)
    offer.free["cores"] = 1.0

    reasons = explain(task(cores=4), [offer], total)

    assert reasons == ["box: full for now (cores needs 4, has 1 free)"]


def test_explain_says_a_node_is_not_accepting() -> None:
    offer = node("box", cores=8, accepting=False)

    reasons = explain(task(), [offer], capacity(offer))

    assert len(reasons) == 1
    assert reasons[0].startswith("box: not accepting work")


def test_explain_says_when_no_node_is_registered() -> None:
    assert explain(task(), [], {}) == ["no node is registered"]


def test_explain_gives_one_sentence_per_node_that_cannot_take_the_task() -> None:
    offers = [node("small", cores=1), node("plain", cores=8), node("fits", cores=8,
                                                                   usage_gpu=True)]

    reasons = explain(task(cores=2, usage_require_gpu=True), offers, capacity(*offers))

    assert reasons == ["small: lacks label(s) gpu", "plain: lacks label(s) gpu"]
