"""Consistency of the coordinator's state: what `vespid coordinator --check` verifies.

The coordinator keeps each node's used resources, the repository holds, each tree's outcome
and the index of keyed creates up to date incrementally, as tasks start, wait, finish and
move; these checks recompute them from the tasks themselves, so any drift (a leak, a double
release, a tree counted wrong) shows as a sentence.
"""

from __future__ import annotations

import math

from vespid.coordinator.state import State
from vespid.shared.protocol import TaskStatus


def check_state(state: State) -> list[str]:
    return [*_resources(state), *_repositories(state), *_tasks(state), *_trees(state),
            *_keys(state)]


def _resources(state: State) -> list[str]:
    problems = []
    for node in state.nodes.values():
        expected: dict[str, float] = {}
        for name in node.running:
            for key, amount in state.tasks[name].holding.items():
                expected[key] = expected.get(key, 0.0) + amount
        for key in set(expected) | set(node.used):
            have, want = node.used.get(key, 0.0), expected.get(key, 0.0)
            if not math.isclose(have, want, abs_tol=1e-6):
                problems.append(f"node {node.name}: {key} in use is {have:g} but its running "
                                f"tasks hold {want:g}")
        working = {t.name for t in state.tasks.values()
                   if t.status is TaskStatus.WORKING and t.node == node.name}
        if working != node.running:
            problems.append(f"node {node.name}: runs {sorted(node.running)} but tasks working "
                            f"there are {sorted(working)}")
    return problems


def _repositories(state: State) -> list[str]:
    problems = []
    for repo, holder_name in state.holds.items():
        holder = state.tasks.get(holder_name)
        if holder is None or repo not in holder.holds.values():
            problems.append(f"repository {repo}: held by {holder_name}, which does not hold it")
            continue
        tree = [holder_name, *state.descendants(holder_name)]
        if all(state.tasks[t].status is TaskStatus.COMPLETE for t in tree):
            problems.append(f"repository {repo}: still held by {holder_name}, whose whole tree "
                            "completed")
    return problems


def _tasks(state: State) -> list[str]:
    problems = []
    for task in state.tasks.values():
        if task.status is TaskStatus.COMPLETE and task.unreadable:
            # Loading reads only its HEAD (store.HEAD): here is where a damaged record shows.
            problems.append(f"task {task.name}: its stored record cannot be read "
                            f"({task.unreadable})")
            continue
        if task.status is TaskStatus.IDLE and task.name not in state.waiting_shape:
            problems.append(f"task {task.name}: idle but not in the queue")
        if task.status is not TaskStatus.IDLE and task.name in state.waiting_shape:
            problems.append(f"task {task.name}: {task.status.value} but still in the queue")
        if task.status is TaskStatus.COMPLETE and (task.success is None
                                                   or task.time_finish is None):
            problems.append(f"task {task.name}: complete without a success or finish time")
        if task.status is TaskStatus.WORKING and task.node not in state.nodes \
                and not task.virtual:
            problems.append(f"task {task.name}: working on unknown node {task.node}")
    return problems


def _trees(state: State) -> list[str]:
    problems = []
    for task in state.tasks.values():
        tree = [task, *(state.tasks[name] for name in state.descendants(task.name))]
        open_count = sum(1 for t in tree if t.status is not TaskStatus.COMPLETE)
        worst = None
        for member in tree:
            if member.success is not None:
                worst = member.success.worst(worst)
        if state.tree_open.get(task.name, 0) != open_count:
            problems.append(f"task {task.name}: {state.tree_open.get(task.name, 0)} open in "
                            f"its tree counted, {open_count} found")
        if state.tree_worst.get(task.name) != worst:
            problems.append(f"task {task.name}: tree severity {state.tree_worst.get(task.name)}"
                            f" kept, {worst} found")
    return problems


def _keys(state: State) -> list[str]:
    problems = []
    for identity, name in state.keys.items():
        task = state.tasks.get(name)
        if task is None or task.identity != identity:
            problems.append(f"key {identity}: points at {name}, which does not carry it")
    return problems
