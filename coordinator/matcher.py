"""Which waiting task runs on which node: a pure function of state, no I/O.

Rules (docs/protocol.md, "Matching"):
- every numeric requirement that is not a `usage_` key is a consumable resource; a task fits
  a node while each is at most what the node has free (a resource a node does not declare
  is one it has none of); `cores` defaults to 1 and the task gets up to `cores_max`;
- `usage_X` is a label, `usage_require_X` a hard requirement on the other side's labels,
  `usage_prefer_X` a soft one that ranks the nodes that fit;
- higher priority first, then older first; among nodes of the same score, best fit (the one
  left with the fewest free cores) wins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

REQUIRE = "usage_require_"
PREFER = "usage_prefer_"
LABEL = "usage_"
ELASTIC = "cores_max"


@dataclass(frozen=True)
class Labels:
    carried: frozenset[str]
    required: frozenset[str]
    preferred: frozenset[str]

    @classmethod
    def parse(cls, flags: Mapping[str, Any]) -> Labels:
        carried, required, preferred = set(), set(), set()
        for key, value in flags.items():
            if value is not True:
                continue
            if key.startswith(REQUIRE):
                required.add(key.removeprefix(REQUIRE))
            elif key.startswith(PREFER):
                preferred.add(key.removeprefix(PREFER))
            elif key.startswith(LABEL):
                carried.add(key.removeprefix(LABEL))
        return cls(frozenset(carried), frozenset(required), frozenset(preferred))


@dataclass(frozen=True)
class TaskRequest:
    name: str
    priority: int
    seq: int
    needs: Mapping[str, float]
    cores_max: float
    labels: Labels

    @classmethod
    def from_requirements(cls, name: str, priority: int, seq: int,
                          requirements: Mapping[str, Any]) -> TaskRequest:
        needs = {k: float(v) for k, v in requirements.items()
                 if not k.startswith(LABEL) and k != ELASTIC and _is_amount(v)}
        needs.setdefault("cores", 1.0)
        raw_max = requirements.get(ELASTIC, needs["cores"])
        cores_max = math.inf if raw_max is None else float(raw_max)
        return cls(name, priority, seq, needs, max(cores_max, needs["cores"]),
                   Labels.parse(requirements))

    @property
    def shape(self) -> tuple[Any, ...]:
        """Tasks of one shape fit exactly the same nodes."""
        return (tuple(sorted(self.needs.items())), self.labels)


@dataclass
class NodeOffer:
    name: str
    free: dict[str, float]
    labels: Labels
    accepting: bool = True


@dataclass(frozen=True)
class Assignment:
    task: str
    node: str
    allocated: dict[str, float]


def _is_amount(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def labels_compatible(task: Labels, node: Labels) -> bool:
    return task.required <= node.carried and node.required <= task.carried


def fits(task: TaskRequest, node: NodeOffer) -> bool:
    return (node.accepting and labels_compatible(task.labels, node.labels)
            and all(node.free.get(k, 0.0) >= amount for k, amount in task.needs.items()))


def preference_score(task: Labels, node: Labels) -> int:
    return len(task.preferred & node.carried) + len(node.preferred & task.carried)


def allocate(task: TaskRequest, node: NodeOffer) -> dict[str, float]:
    allocated = dict(task.needs)
    spare_cores = node.free.get("cores", 0.0)
    allocated["cores"] = max(task.needs["cores"], min(task.cores_max, math.floor(spare_cores)))
    return allocated


def _rank(task: TaskRequest, node: NodeOffer) -> tuple[int, float, float]:
    left_cores = node.free.get("cores", 0.0) - task.needs["cores"]
    left_memory = node.free.get("memory", 0.0) - task.needs.get("memory", 0.0)
    return (-preference_score(task.labels, node.labels), left_cores, left_memory)


def match(tasks: Iterable[TaskRequest], nodes: Iterable[NodeOffer]) -> list[Assignment]:
    """Assign waiting tasks to nodes, in priority-then-age order, reserving as it goes."""
    offers = [n for n in nodes if n.accepting]
    assignments: list[Assignment] = []
    unfit_shapes: set[tuple[Any, ...]] = set()
    for task in sorted(tasks, key=lambda t: (-t.priority, t.seq)):
        if not offers:
            break
        shape = task.shape
        if shape in unfit_shapes:
            continue
        candidates = [n for n in offers if fits(task, n)]
        if not candidates:
            unfit_shapes.add(shape)
            continue
        node = min(candidates, key=lambda n: _rank(task, n))
        allocated = allocate(task, node)
        for key, amount in allocated.items():
            node.free[key] = node.free.get(key, 0.0) - amount
        assignments.append(Assignment(task.name, node.name, allocated))
    return assignments


def explain(task: TaskRequest, nodes: Iterable[NodeOffer],
            capacity: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Sentences saying why `task` runs nowhere now; `capacity` is each node's total."""
    reasons: list[str] = []
    any_node = False
    for node in nodes:
        any_node = True
        if not node.accepting:
            reasons.append(f"{node.name}: not accepting work (lost, draining or incompatible)")
            continue
        missing = task.labels.required - node.labels.carried
        if missing:
            reasons.append(f"{node.name}: lacks label(s) {', '.join(sorted(missing))}")
            continue
        unmet = node.labels.required - task.labels.carried
        if unmet:
            reasons.append(f"{node.name}: runs only tasks labelled {', '.join(sorted(unmet))}")
            continue
        total = capacity.get(node.name, {})
        too_big = [k for k, v in task.needs.items() if total.get(k, 0.0) < v]
        if too_big:
            reasons.append(f"{node.name}: too small ({_amounts(task, total, too_big)})")
            continue
        busy = [k for k, v in task.needs.items() if node.free.get(k, 0.0) < v]
        if busy:
            reasons.append(f"{node.name}: full for now ({_amounts(task, node.free, busy)} free)")
    if not any_node:
        reasons.append("no node is registered")
    return reasons


def _amounts(task: TaskRequest, have: Mapping[str, float], keys: list[str]) -> str:
    return ", ".join(f"{k} needs {task.needs[k]:g}, has {have.get(k, 0.0):g}" for k in keys)
