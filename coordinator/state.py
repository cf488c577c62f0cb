"""The coordinator's scheduling state in memory: tasks, nodes, the queue and repositories.

The store persists it. Handlers and the engine change it only through State's methods,
each of which marks what it changed, so the store writes just that at the end of each
batch and no caller can forget to. The waiting queue is
indexed by shape (what decides where a task may run), each shape's tasks kept sorted by
priority then age, so scheduling never scans every queued task.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from sortedcontainers import SortedList

from vespid.coordinator.matcher import (
    NOT_CONSUMED,
    Labels,
    NodeOffer,
    QueueAsks,
    QueueKey,
    Reservation,
    Shape,
)
from vespid.coordinator.records import loads
from vespid.shared.errors import StoreError
from vespid.shared.logs import get_logger
from vespid.shared.protocol import RepositoryRequest, Severity, TaskDefinition, TaskStatus

# A node's node-list entry, as the dict NodeSummary describes and encoded (views.py).
Listing = tuple[dict[str, Any], bytes]

log = get_logger(__name__)
TaskIdentity = tuple[str, str, str]  # ("child", parent, key) or ("root", owner, key)


def identity(parent: str | None, owner: str | None, key: str | None) -> TaskIdentity | None:
    """What a keyed task-create is matched against: (parent, key) for a child, (owner, key)
    for a root; None without a key."""
    if key is None:
        return None
    return ("child", parent, key) if parent is not None else ("root", owner or "", key)


@dataclass(slots=True)
class Attempt:
    """One start of a task: where, when, and how it ended."""

    attempt: int
    node: str
    start: float
    end: float | None = None
    why: str | None = None  # why it ended, as a sentence
    lost: bool = False  # its node was lost under it (or its agent exited)
    cause: str | None = None  # what its node said it ended of (task-complete `cause`)
    allocated: dict[str, float] = field(default_factory=dict)
    late: list[str] = field(default_factory=list)  # reports that came after it was replaced

    def close(self, now: float, why: str, lost: bool, cause: str | None) -> None:
        self.end, self.why, self.lost, self.cause = now, why, lost, cause

    def reopen(self) -> None:
        self.end, self.why, self.lost = None, None, False

    def to_record(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies, and this runs for every attempt of every
        # task in every event and every flush.
        return {"attempt": self.attempt, "node": self.node, "start": self.start,
                "end": self.end, "why": self.why, "lost": self.lost, "cause": self.cause,
                "allocated": dict(self.allocated), "late": list(self.late)}

    def compact(self) -> dict[str, Any]:
        """As the store keeps it: what differs from the defaults (to_record is the wire's)."""
        return _differing(self, _ATTEMPT_DEFAULTS,
                          {"attempt": self.attempt, "node": self.node, "start": self.start})

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Attempt:
        return cls(**record)


def _defaults(cls: type, leave_out: tuple[str, ...]) -> list[tuple[str, Any]]:
    """(name, default) of a dataclass's public fields, but those left out."""
    return [(f.name, f.default_factory() if f.default_factory is not MISSING else f.default)
            for f in fields(cls) if f.name not in leave_out and not f.name.startswith("_")]


def _differing(item: Any, defaults: list[tuple[str, Any]], record: dict[str, Any]
               ) -> dict[str, Any]:
    """`record`, plus each of `defaults`' fields whose value in `item` is not its default."""
    for name, default in defaults:
        value = getattr(item, name)
        if value != default:
            record[name] = value
    return record


_ATTEMPT_DEFAULTS = _defaults(Attempt, leave_out=("attempt", "node", "start"))


# Reads back the definition (as JSON) of a task whose definition was written to the store.
DefinitionSource = Callable[[str], dict[str, Any]]
# What a task keeps of its definition once it is complete, besides its name and parent:
# what list views, keyed creates and failures show (Task.HEAD).
HEAD = ("key", "name_pretty", "priority")


@dataclass(slots=True)
class Task:
    """A task. A complete task's definition lives in the store only (a copy in memory of
    each would be most of the coordinator's memory at 100,000 tasks): what it keeps is its
    name, parent and HEAD, and `definition` reads the rest back when asked (a task-info)."""

    name: str
    seq: int
    time_create: float
    parent: str | None = None
    key: str | None = None
    name_pretty: str | None = None
    priority: int = 0
    status: TaskStatus = TaskStatus.IDLE
    success: Severity | None = None
    node: str | None = None
    allocated: dict[str, float] = field(default_factory=dict)
    attempt: int = 0
    time_start: float | None = None
    time_finish: float | None = None
    message: str | None = None
    log: str | None = None
    path: str | None = None
    # When the broker took its current task-run (until then, when it was decided), and
    # whether the node has reported it since: decide whether a node-set omitting it means
    # the node lost it (engine.reconcile_node).
    dispatched_at: float | None = None
    seen_on_node: bool = False
    # In memory only: its task-run is not yet confirmed by the broker, so no node can have
    # it yet (a publish the broker holds back by flow control waits in pika's buffer);
    # after a restart it is False and forgive_downtime gives the grace instead.
    _run_unconfirmed: bool = field(default=False, repr=False, compare=False)
    # In memory only: where its confirmed task-run stands in its node's queue (Node._sent
    # then); 0 when not known (not yet confirmed, or sent before a restart).
    _dispatch: int = field(default=0, repr=False, compare=False)
    cancel_requested: bool = False
    holds: dict[str, str] = field(default_factory=dict)  # request key -> repository
    lent_cores: float = 0.0  # cores given back while it waits for its children
    attempts: list[Attempt] = field(default_factory=list)
    virtual: bool = False  # runs nowhere itself: it stands for the work of its children
    owner: str | None = None  # the authenticated user who created its tree
    resources: list[dict[str, str]] = field(default_factory=list)  # files to place: sha256, path
    results: list[dict[str, Any]] = field(default_factory=list)  # files it produced
    _definition: TaskDefinition | None = field(default=None, repr=False, compare=False)
    _definition_json: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # Set once its definition is in the store: how to read it back.
    _stored: DefinitionSource | None = field(default=None, repr=False, compare=False)
    # A complete task as loaded: its stored record (JSON text, or parsed once `unreadable`
    # checked it), until a field it holds is first read.
    _pending: str | dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # Why that record could not be read, once that was found out (Task.unreadable).
    _unreadable: str | None = field(default=None, repr=False, compare=False)

    if not TYPE_CHECKING:  # the type checker must keep seeing Task's fields, and only those
        def __getattr__(self, name: str) -> Any:
            # Called only for a slot not set: the unread part of a complete task as loaded.
            pending = _SLOTS["_pending"].__get__(self, Task)
            if pending is None or name not in _LAZY_FIELDS:
                raise AttributeError(name)
            self._read_pending(self._parsed(pending))
            return _SLOTS[name].__get__(self, Task)

    @classmethod
    def new(cls, definition: TaskDefinition, seq: int, time_create: float,
            **fields: Any) -> Task:
        return cls(definition.name, seq, time_create, definition.parent, definition.key,
                   definition.name_pretty, definition.priority, **fields,
                   _definition=definition)

    @property
    def definition(self) -> TaskDefinition:
        if self._definition is not None:
            return self._definition
        return stored_definition(self.definition_json())  # a complete task's, from the store

    def definition_json(self) -> dict[str, Any]:
        """The definition as the wire shows it: every event of the task carries it. A
        complete task's is read back from the store when asked."""
        if self._definition_json is not None:
            return self._definition_json
        if self._definition is None:
            if self._stored is None:
                raise StoreError(f"task {self.name!r} has no definition in memory or store")
            return self._stored(self.name)
        built = self._definition.model_dump(mode="json")
        if self.status is TaskStatus.WORKING or self._stored is None:
            # Kept while it runs, when most of its events are sent, and through the batch
            # that made it (its created and started events, its first row); not while it
            # waits (a queue of 100,000 would keep 100 MB of them) nor once it is complete.
            self._definition_json = built
        return built

    @property
    def stored(self) -> bool:
        """Whether its definition was written to the store."""
        return self._stored is not None

    def definition_stored(self, source: DefinitionSource) -> None:
        """Its definition is in the store now; a complete task lets go of its copy."""
        self._stored = source
        if self.status is TaskStatus.COMPLETE:
            self._definition = self._definition_json = None
        elif self.status is not TaskStatus.WORKING:
            self._definition_json = None  # waiting: see definition_json

    @property
    def losses(self) -> int:
        return sum(1 for a in self.attempts if a.lost)

    @property
    def last_attempt(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def close_attempt(self, now: float, why: str, lost: bool = False,
                      cause: str | None = None) -> None:
        last = self.last_attempt
        if last is not None and last.end is None:
            last.close(now, why, lost, cause)

    @property
    def last_cause(self) -> str | None:
        """Why its last attempt ended, as its node said (task-complete `cause`)."""
        return self.last_attempt.cause if self.last_attempt else None

    @property
    def identity(self) -> TaskIdentity | None:
        return identity(self.parent, self.owner, self.key)

    def queue_key(self, parent_running: bool) -> QueueKey:
        bid = self.definition.requirements.get("bid") or 0
        return (-self.priority, 0 if parent_running else 1, -float(bid), self.seq, self.name)

    @property
    def environment(self) -> dict[str, str]:
        """Its own environment plus `repo_<key>` for every repository it holds."""
        env = dict(self.definition.environment)
        env.update({f"repo_{key}": repo for key, repo in self.holds.items()})
        return env

    @property
    def holding(self) -> dict[str, float]:
        """What it holds on its node now (less the cores it lent while waiting)."""
        held = dict(self.allocated)
        if self.lent_cores:
            held["cores"] = held.get("cores", 0.0) - self.lent_cores
        return held

    @property
    def requirements(self) -> dict[str, Any]:
        """What it asked for, with its owner's label set by the coordinator: a client cannot
        claim another user's label to reach a workstation that runs only that user's tasks."""
        asked = dict(self.definition.requirements)
        if self.owner is None:
            return asked
        effective = {k: v for k, v in asked.items() if not k.startswith("usage_user_")}
        effective[f"usage_user_{self.owner}"] = True
        return effective

    def shape(self) -> Shape:
        d = self.definition
        if not d.repositories and not self.holds:
            # Most tasks: what decides where they run is their requirements alone, and a
            # farm's tasks come in few kinds, so their shapes are made once per kind.
            # (The type is in the key: 1 and True are equal, but a label is only True.)
            kind = tuple((k, v, type(v)) for k, v in self.requirements.items())
            with contextlib.suppress(TypeError):  # a value no key can hold: a damaged row's
                return _plain_shape(kind, tuple(d.avoid_nodes))
        repositories: dict[str, Any] = dict(d.repositories)
        environment = dict(d.environment)
        if self.holds and self.status is TaskStatus.IDLE:
            # Started again while it still holds these: claim nothing, run next to them.
            for key, repo in self.holds.items():
                repositories[key] = {"local": True}
                environment[f"repo_{key}"] = repo
        return Shape.of(self.requirements, repositories, environment, d.avoid_nodes)

    def raise_severity(self, severity: Severity) -> bool:
        """Severity never goes down; True when it went up."""
        worse = severity.worst(self.success)
        changed = worse != self.success
        self.success = worse
        return changed

    def to_record(self) -> dict[str, Any]:
        """What the store keeps of it besides its name, parent, status and definition (each
        a column of its own): only what differs from a new task's, so that a record is
        small to write and quick to read back."""
        record = _differing(self, _RECORDED, {})
        if self.attempts:
            record["attempts"] = [a.compact() for a in self.attempts]
        if self.success is not None:
            record["success"] = self.success.value
        return record

    @classmethod
    def from_record(cls, name: str, parent: str | None, status: str, record: dict[str, Any],
                    definition: TaskDefinition | None, stored: DefinitionSource | None
                    ) -> Task:
        """A task as the store has it (takes `record` over); raises KeyError, TypeError or
        ValueError on a record this code cannot read."""
        attempts = record.pop("attempts", None)
        success = record.pop("success", None)
        task = cls(name, parent=parent, status=_STATUSES[status], **record,
                   _definition=definition, _stored=stored)
        if attempts:
            task.attempts = [Attempt(**a) for a in attempts]
        if success:
            task.success = _SEVERITIES[success]
        task._share_values()
        return task

    @classmethod
    def complete_loaded(cls, name: str, parent: str | None, seq: int, key: str | None,
                        owner: str | None, success: str | None, holds: dict[str, str],
                        record: str, stored: DefinitionSource) -> Task:
        """A complete task as the store has it: what loading the state needs (its seq,
        identity, success and holds: store.HEAD) is given, and its record is kept as the
        store's JSON text, parsed the first time any of it is read (a task-info, a list,
        the check). Parsing 100,000 records was a third of a restart, for tasks few will be
        asked about, and the text takes less memory than what it parses to.
        Raises KeyError on a success this code does not know."""
        task = cls.__new__(cls)
        task.name, task.parent, task.status = name, parent, TaskStatus.COMPLETE
        task.seq, task.key, task.owner = seq, key, owner
        task.success = _SEVERITIES[success] if success else None
        task.holds = holds
        task._definition = task._definition_json = None
        task._stored, task._pending, task._unreadable = stored, record, None
        return task

    @property
    def unreadable(self) -> str | None:
        """Why its loaded record could not be read, if it could not (read now if need be)."""
        if self._pending is not None:
            self._parsed(self._pending)
        return self._unreadable

    def _parsed(self, pending: str | dict[str, Any], keep: bool = True) -> dict[str, Any]:
        """The loaded record, parsed and checked (kept so, unless `keep` is False, until it
        is read). A record that cannot be read was damaged after it was written, or by a
        newer version: the task is complete, so little is decided from it, and it shows its
        HEAD and why the rest is missing rather than stopping the coordinator (or its start)
        over its history; its record stays as it is in the store (Store.flush)."""
        if isinstance(pending, dict):
            return pending
        try:
            record: dict[str, Any] = loads(pending)
            _check_fields(record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.error("task_record_unreadable", task=self.name, reason=reason)
            self._unreadable = reason
            record = {"time_create": 0.0,
                      "message": f"the coordinator could not read this task's stored record "
                                 f"({reason}); how it ran is not known"}
            keep = True
        if keep:
            self._pending = record
        return record

    def _read_pending(self, record: dict[str, Any]) -> None:
        """Set every field not set yet from the loaded record, or to its default."""
        self._pending = None
        for name, default, factory in _LAZY_DEFAULTS:
            slot = _SLOTS[name]
            try:
                slot.__get__(self, Task)
                continue  # set before anything read it: that value stands
            except AttributeError:
                pass
            value: Any
            if name == "attempts":
                value = [Attempt(**a) for a in record.get(name, ())]
            elif name in record:
                value = record[name]
            else:
                value = factory() if factory is not None else default
            slot.__set__(self, value)
        self._share_values()

    def attempt_spans(self) -> list[tuple[float, int, float | None]]:
        """(start, attempt, end) of each attempt, without reading the rest of a loaded
        complete task."""
        pending = self._pending
        if pending is not None:
            # Not kept: the timeline asks for every task's spans once, and 100,000 parsed
            # records would hold more memory than their text.
            return [(a["start"], a["attempt"], a.get("end"))
                    for a in self._parsed(pending, keep=False).get("attempts", ())]
        return [(a.start, a.attempt, a.end) for a in self.attempts]

    def _share_values(self) -> None:
        """A loaded task holds one object for each value it repeats (its times, what it was
        allocated), not one per place JSON had it (the parser already shares short strings,
        such as node names): a third less memory per complete task. Nothing changes these
        in place, they are only ever replaced."""
        start, finish = self.time_start, self.time_finish
        if self.dispatched_at == start:
            self.dispatched_at = start
        allocated = self.allocated = _shared_allocation(self.allocated)
        for attempt in self.attempts:
            if attempt.start == start:
                attempt.start = start
            if attempt.end == finish:
                attempt.end = finish
            attempt.allocated = (allocated if attempt.allocated == allocated
                                 else _shared_allocation(attempt.allocated))


_STATUSES = {s.value: s for s in TaskStatus}
_SEVERITIES = {s.value: s for s in Severity}
_ALLOCATIONS: dict[tuple[tuple[str, float], ...], dict[str, float]] = {}
MAX_ALLOCATIONS = 10_000


def _shared_allocation(allocated: dict[str, float]) -> dict[str, float]:
    """One dict for every equal allocation (tasks mostly ask for a few sizes): callers
    never change an allocation in place, they replace it."""
    if not allocated:
        return allocated
    key = tuple(allocated.items())
    shared = _ALLOCATIONS.get(key)
    if shared is None:
        if len(_ALLOCATIONS) >= MAX_ALLOCATIONS:
            return allocated
        shared = _ALLOCATIONS[key] = allocated
    return shared


# The fields a record holds when they differ from these, a new task's (Task.to_record).
_RECORDED = _defaults(Task, leave_out=("name", "parent", "status", "success", "attempts"))
_SLOTS = {f.name: Task.__dict__[f.name] for f in fields(Task)}
# What Task.complete_loaded sets at once; the others wait for their first reading.
_LOADED_AT_ONCE = frozenset({"name", "parent", "status", "seq", "key", "owner", "success",
                             "holds", "_definition", "_definition_json", "_stored", "_pending",
                             "_unreadable"})
_LAZY_DEFAULTS = [(f.name, f.default, None if f.default_factory is MISSING else f.default_factory)
                  for f in fields(Task) if f.name not in _LOADED_AT_ONCE]
_LAZY_FIELDS = frozenset(name for name, _, _ in _LAZY_DEFAULTS)
_RECORD_FIELDS = frozenset(f.name for f in fields(Task) if not f.name.startswith("_"))
_ATTEMPT_FIELDS = frozenset(f.name for f in fields(Attempt))
_ATTEMPT_REQUIRED = frozenset(f.name for f in fields(Attempt)
                              if f.default is MISSING and f.default_factory is MISSING)


def _check_fields(record: Any) -> None:
    """What from_record's constructors would refuse, checked before the fields are read: a
    damaged record must be found out in one place, not fail a batch later on."""
    if not isinstance(record, dict):
        raise TypeError(f"it is {type(record).__name__}, not an object")
    if not _RECORD_FIELDS.issuperset(record) or "time_create" not in record:
        raise ValueError(f"unknown fields {sorted(record.keys() - _RECORD_FIELDS)} or no "
                         "time_create")
    for attempt in record.get("attempts", ()):
        if not _ATTEMPT_FIELDS.issuperset(attempt) or not _ATTEMPT_REQUIRED.issubset(attempt):
            raise ValueError(f"an attempt has fields {sorted(attempt)}: it needs "
                             f"{sorted(_ATTEMPT_REQUIRED)}, and may have only "
                             f"{sorted(_ATTEMPT_FIELDS)}")


@functools.lru_cache(maxsize=1024)
def _plain_shape(requirements: tuple[tuple[str, Any, type], ...], avoid: tuple[str, ...]
                 ) -> Shape:
    """The shape of a task that claims and holds no repository (shapes never change)."""
    return Shape.of({k: v for k, v, _ in requirements}, avoid=avoid)


def stored_definition(data: Any) -> TaskDefinition:
    """A definition as the store has it, made without validating it again: it was valid
    when the task was created, and validating 100,000 of them was most of a restart. Only
    its form is checked, so that a damaged row is an error when it is read rather than a
    crash later on (ValueError or TypeError)."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ValueError("its definition has no name")
    unknown = data.keys() - TaskDefinition.model_fields.keys()
    if unknown:
        raise ValueError(f"its definition has unknown fields {sorted(unknown)}")
    given = dict(data)
    for key in ("requirements", "repositories", "environment"):
        if given.get(key) is None:
            given.pop(key, None)
        elif not isinstance(given[key], dict):
            raise TypeError(f"its definition's {key} is not an object")
    if "repositories" in given:
        given["repositories"] = {key: RepositoryRequest.model_construct(**request)
                                 for key, request in given["repositories"].items()}
    requirements = given.get("requirements")
    if requirements and "cores_max" in requirements and requirements["cores_max"] is None:
        given["requirements"] = {**requirements, "cores_max": math.inf}  # JSON's unbounded
    if isinstance(given.get("executable_pyscript"), str):
        # Waiting tasks of one kind mostly run one script: kept once.
        given["executable_pyscript"] = sys.intern(given["executable_pyscript"])
    return TaskDefinition.model_construct(**given)


@functools.lru_cache(maxsize=4096)
def _labels(capabilities: frozenset[tuple[str, Any]]) -> Labels:
    # Parsed once per distinct set of capabilities, not once per node per pass.
    return Labels.parse(dict(capabilities))


@dataclass(frozen=True)
class StandingOffer:
    """What a node offers that only a node-set changes: derived once per change of its
    capabilities or repositories, not once per node per scheduling pass (at 1,000 nodes
    that derivation cost 4 ms a pass)."""

    capabilities: dict[str, Any]  # the dicts it was derived from, compared by identity:
    repositories: dict[str, dict[str, Any]]  # a node-set replaces them, never edits them
    labels: Labels
    capacity: dict[str, float]
    repos: dict[str, str]  # hosted repository -> type
    repo_order: tuple[tuple[str, str], ...]  # (repository, type), by name
    min_bid: float

    @classmethod
    def of(cls, node: Node) -> StandingOffer:
        repos = {repo: str(spec.get("type")) for repo, spec in node.repositories.items()}
        return cls(node.capabilities, node.repositories,
                   labels=_labels(frozenset(node.capabilities.items())),
                   capacity={k: node.resource(k) for k, v in node.capabilities.items()
                             if not k.startswith("usage_") and not isinstance(v, bool)
                             and k not in NOT_CONSUMED},
                   repos=repos, repo_order=tuple(sorted(repos.items())),
                   min_bid=node.resource("min_bid"))


@dataclass
class Node:
    name: str
    capabilities: dict[str, Any]
    repositories: dict[str, dict[str, Any]]
    last_seen: float
    alive: bool = True
    draining: bool = False
    left: bool = False  # its agent said it was exiting (drained or stopped): gone, not lost
    log_dir: str | None = None  # where its agent keeps task logs, as it reports
    version: str | None = None
    protocol: int | None = None
    started: float | None = None
    used: dict[str, float] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    # In memory only: task-runs the broker confirmed onto its queue, in order, and the latest
    # of them it has shown it received (by reporting or completing it): its queue is first
    # in, first out, so it received every one before that too (engine._gone_from).
    _sent: int = field(default=0, repr=False, compare=False)
    _vouched: int = field(default=0, repr=False, compare=False)
    # Whether it has ever listed a task in its activetasks: only then does leaving one out
    # mean something before the grace (a third-party node may send them empty).
    _lists_tasks: bool = field(default=False, repr=False, compare=False)
    # Derived, kept between scheduling passes: rebuilt when what they derive from changes.
    _standing: StandingOffer | None = field(default=None, repr=False, compare=False)
    _free: dict[str, float] | None = field(default=None, repr=False, compare=False)
    _offer: NodeOffer | None = field(default=None, repr=False, compare=False)
    # The State's set of nodes whose offer was dropped since its last pass (State.offers):
    # a pass then rebuilds only those, not a look at each of 1,000 nodes.
    _stale: set[str] | None = field(default=None, repr=False, compare=False)
    _listed: tuple[tuple[Any, ...], Listing] | None = field(default=None, repr=False,
                                                            compare=False)
    # Counts the changes to what it uses and runs (each goes through _room_changed): the
    # node-list's kept entry compares this number, not copies of `used` and `running`.
    _room_version: int = field(default=0, repr=False, compare=False)

    @property
    def labels(self) -> Labels:
        return self.standing().labels

    def resource(self, key: str) -> float:
        value = self.capabilities.get(key, 0)
        if value is None or isinstance(value, bool):
            return 0.0
        return float(value)

    def standing(self) -> StandingOffer:
        cached = self._standing
        if (cached is None or cached.capabilities is not self.capabilities
                or cached.repositories is not self.repositories):
            cached = self._standing = StandingOffer.of(self)
            self._room_changed()
        return cached

    def offer(self, build: Callable[[Node], NodeOffer]) -> NodeOffer:
        """What the node offers the scheduler, built by `build` only when something it
        shows changed since the last pass: at 1,000 nodes, building every offer for every
        pass cost more than the pass. Whatever changes an offer drops it: reserve and
        release here, State for the node's flags and the holds on its repositories."""
        self.standing()
        if self._offer is None:
            self._offer = build(self)
        return self._offer

    def offer_changed(self) -> None:
        self._offer = None
        if self._stale is not None:
            self._stale.add(self.name)

    def _room_changed(self) -> None:
        """What is free changed: the kept free room and offer go."""
        self._free = None
        self._room_version += 1
        self.offer_changed()

    def listing(self, build: Callable[[Node], Listing]) -> Listing:
        """Its node-list entry, built by `build` only when something it shows changed: a
        node-list of 1,000 nodes every 100 ms (bench.scheduling's probe) took a seventh of
        the coordinator's time, though most nodes show the same between two asks. The
        cache checks what it shows: a node's dicts are replaced, never changed in place (the
        same dict means the same content), and what it uses and runs changes only through
        take, give_back, reserve and release, which count each change (_room_version)."""
        cached = self._listed
        if cached is not None and cached[0] == self._shown():
            return cached[1]
        listing = build(self)
        # Taken after the build, which may count a room change (a standing offer made anew).
        self._listed = (self._shown(), listing)
        return listing

    def _shown(self) -> tuple[Any, ...]:
        return (self.capabilities, self.repositories, self.last_seen, self.alive,
                self.draining, self.left, self.version, self.protocol, self._room_version)

    def resources(self) -> dict[str, float]:
        """What the node has of each consumable resource (a copy: callers may change it)."""
        return dict(self.standing().capacity)

    def offer_terms(self) -> tuple[Any, ...]:
        """What decides where tasks fit, of what a node-set says."""
        return (self.capabilities, self.repositories, self.alive, self.left, self.draining,
                self.protocol)

    def free_resources(self) -> dict[str, float]:
        """What is not reserved now (a copy: the matcher spends from it during a pass)."""
        capacity = self.standing().capacity
        if self._free is None:
            used = self.used
            self._free = {k: total - used.get(k, 0.0) for k, total in capacity.items()}
        return dict(self._free)

    def take(self, task: str, amounts: dict[str, float]) -> None:
        """The task runs here, holding `amounts`."""
        self.reserve(amounts)
        self.running.add(task)

    def give_back(self, task: str, amounts: dict[str, float]) -> None:
        """The task no longer runs here; what it held is free again."""
        self.release(amounts)
        self.running.discard(task)

    def reserve(self, amounts: dict[str, float]) -> None:
        self._room_changed()
        for key, amount in amounts.items():
            self.used[key] = self.used.get(key, 0.0) + amount

    def release(self, amounts: dict[str, float]) -> None:
        self._room_changed()
        for key, amount in amounts.items():
            left = self.used.get(key, 0.0) - amount
            self.used[key] = 0.0 if math.isclose(left, 0.0, abs_tol=1e-9) else left

    def to_record(self) -> dict[str, Any]:
        # Its underscored fields are memory only: derived, or (the queue order) meaningful to
        # this process alone; and an older coordinator must still read the record.
        return {k: v for k, v in self.__dict__.items()
                if k not in ("used", "running") and not k.startswith("_")}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Node:
        return cls(**{k: v for k, v in record.items() if not k.startswith("_")})


@dataclass
class State:
    """All tasks and nodes, the waiting queue by shape, and what changed since the last flush."""

    tasks: dict[str, Task] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)
    queue: dict[Shape, SortedList[QueueKey]] = field(default_factory=dict)
    waiting_shape: dict[str, tuple[Shape, QueueKey]] = field(default_factory=dict)
    shapes: dict[Shape, Shape] = field(default_factory=dict)  # the one object of each queued
    holds: dict[str, str] = field(default_factory=dict)  # repository -> holding task
    hosts: dict[str, set[str]] = field(default_factory=dict)  # repository -> its nodes
    next_seq: int = 1
    dirty_tasks: set[str] = field(default_factory=set)
    dirty_nodes: set[str] = field(default_factory=set)
    # Scheduling memo: shapes that fit nowhere at the last pass, nodes that gained room
    # since (None: every node), and the node kept free for the longest-waiting task.
    blocked: set[Shape] = field(default_factory=set)
    # Each queued shape's first task, in the order tasks start: a pass takes them in this
    # order without sorting the queue's ~700 shapes again each time.
    heads: SortedList[tuple[QueueKey, Shape]] = field(default_factory=SortedList)
    _queue_asks: QueueAsks | None = field(default=None, repr=False)
    roomier: set[str] | None = None
    reservation: Reservation | None = None
    needs_scheduling: bool = True
    pass_stopped: bool = False  # the last pass stopped at its limit: the next goes on
    # Every node's offer as of the last pass, and the nodes whose offer was dropped since
    # (Node.offer_changed adds them): `offers` rebuilds only those.
    _offers: dict[str, NodeOffer] = field(default_factory=dict, repr=False)
    _stale_offers: set[str] = field(default_factory=set, repr=False)
    # The nodes' names in order, sorted again only when one joins (nodes are never dropped,
    # so the count tells): a node-list of 1,000 nodes every 100 ms sorted them each time.
    _names_sorted: list[str] = field(default_factory=list, repr=False)
    keys: dict[TaskIdentity, str] = field(default_factory=dict)  # keyed creates -> task
    # Per task, over itself and all its descendants: the worst severity so far, and how many
    # are not complete. Kept up to date on every change so list views and events carry a
    # tree's outcome without walking the tree.
    tree_worst: dict[str, Severity] = field(default_factory=dict)
    tree_open: dict[str, int] = field(default_factory=dict)

    def add_task(self, task: Task) -> None:
        # Written for speed: a restart runs it for every task in the store.
        name, parent, seq = task.name, task.parent, task.seq
        self.tasks[name] = task
        if seq >= self.next_seq:
            self.next_seq = seq + 1
        if parent is not None:
            self.children.setdefault(parent, []).append(name)
        if task.key is not None:
            keyed = identity(parent, task.owner, task.key)
            if keyed is not None:
                self.keys.setdefault(keyed, name)
        if task.status is not TaskStatus.COMPLETE:
            for above in self._tree_of(task):
                self.tree_open[above] = self.tree_open.get(above, 0) + 1
        if task.success is not None:
            self._spread_severity(task, task.success)
        for repo in task.holds.values():
            self._hold(repo, task.name)
        if task.status is TaskStatus.IDLE:
            self.enqueue(task)
        elif task.status is TaskStatus.WORKING and task.node in self.nodes:
            node = self.nodes[task.node]
            node.take(task.name, task.holding)

    def enqueue(self, task: Task) -> None:
        shape = task.shape()
        # Waiting tasks of one kind share one shape object, not one each.
        shape = self.shapes.setdefault(shape, shape)
        parent = self.tasks.get(task.parent or "")
        key = task.queue_key(parent is not None and parent.status is TaskStatus.WORKING)
        self.waiting_shape[task.name] = (shape, key)
        group = self.queue.get(shape)
        if group is None:
            group = self.queue[shape] = SortedList[QueueKey]()
            self._queue_asks = None
        head = group[0] if group else None
        if head is None or key < head:  # the shape's first task now
            if head is not None:
                self.heads.remove((head, shape))
            self.heads.add((key, shape))
        group.add(key)
        self.needs_scheduling = True

    def dequeue(self, task: Task) -> None:
        entry = self.waiting_shape.pop(task.name, None)
        if entry is None:
            return
        shape, key = entry
        group = self.queue[shape]
        was_head = group[0] == key
        group.discard(key)
        if was_head:
            self.heads.remove((key, shape))
            if group:
                self.heads.add((group[0], shape))
        if not group:
            del self.queue[shape]
            del self.shapes[shape]
            self.blocked.discard(shape)
            self._queue_asks = None

    def queue_asks(self) -> QueueAsks:
        """What the queued shapes ask (matcher.QueueAsks), made again only once a shape
        joined or left the queue: most passes have the same shapes waiting."""
        if self._queue_asks is None:
            self._queue_asks = QueueAsks.of(self.queue)
        return self._queue_asks

    def add_node(self, node: Node) -> None:
        self.nodes[node.name] = node
        node._stale = self._stale_offers
        node.offer_changed()
        self._index_repositories(node, {})

    def nodes_by_name(self) -> list[Node]:
        if len(self._names_sorted) != len(self.nodes):
            self._names_sorted = sorted(self.nodes)
        return [self.nodes[name] for name in self._names_sorted]

    def offers(self, build: Callable[[Node], NodeOffer]) -> Mapping[str, NodeOffer]:
        """Every node's offer by name (in the order the nodes joined, which decides, say,
        whose repository a non-local request takes), building again only those dropped
        since the last call. The mapping is kept: read it, never change it."""
        offers, nodes, stale = self._offers, self.nodes, self._stale_offers
        if any(name not in offers for name in stale):  # a node joined: listed in its place
            offers = self._offers = {name: node.offer(build) for name, node in nodes.items()}
        else:
            for name in stale:
                offers[name] = nodes[name].offer(build)
        stale.clear()
        return offers

    def _index_repositories(self, node: Node, before: dict[str, Any]) -> None:
        for repo in before.keys() - node.repositories.keys():
            hosts = self.hosts[repo]
            hosts.discard(node.name)
            if not hosts:
                del self.hosts[repo]
        for repo in node.repositories.keys() - before.keys():
            self.hosts.setdefault(repo, set()).add(node.name)

    def create(self, task: Task) -> None:
        """A new task (add_task is also how the store loads one, which changes nothing)."""
        self.add_task(task)
        self._changed(task)

    def join(self, node: Node) -> None:
        self.add_node(node)
        self._changed_node(node)

    def _changed(self, task: Task) -> None:
        self.dirty_tasks.add(task.name)

    def _changed_node(self, node: Node) -> None:
        self.dirty_nodes.add(node.name)
        node.offer_changed()  # its flags (alive, draining, ...) decide if it accepts

    def forgive_downtime(self, now: float) -> None:
        """While the coordinator was down nobody heard the nodes: give every node and every
        task in flight a full timeout from `now` before calling it lost. In memory only."""
        for node in self.nodes.values():
            node.last_seen = max(node.last_seen, now)
        for task in self.tasks.values():
            if task.status is TaskStatus.WORKING and task.dispatched_at is not None \
                    and not task.seen_on_node:
                task.dispatched_at = max(task.dispatched_at, now)

    # ---- what nodes say ------------------------------------------------------------------
    def heard_from(self, node: Node, *, capabilities: dict[str, Any],
                   repositories: dict[str, dict[str, Any]], draining: bool,
                   started: float | None, version: str | None, log_dir: str | None,
                   protocol: int | None, now: float) -> None:
        """A node-set: the node is alive and offers this now. Room is re-offered only when
        something that decides where tasks fit changed (a heartbeat usually changes none)."""
        before = node.offer_terms()
        hosted_before = node.repositories
        # A heartbeat's dicts equal the ones held: keep those, which what was derived from
        # them (the offer, the node-list entry) is known by.
        if capabilities != node.capabilities:
            node.capabilities = capabilities
        if repositories != hosted_before:
            node.repositories = repositories
            self._index_repositories(node, hosted_before)
        node.draining, node.started, node.last_seen = draining, started, now
        node.alive, node.left = True, False
        node.version, node.log_dir, node.protocol = version, log_dir, protocol
        self.dirty_nodes.add(node.name)
        if node.offer_terms() != before:
            node.offer_changed()
            self.node_gained_room(node.name)

    def drain(self, node: Node) -> None:
        node.draining = True
        self._changed_node(node)

    def lose(self, node: Node) -> None:
        node.alive = False
        self._changed_node(node)

    def node_left(self, node: Node) -> None:
        node.alive, node.left = False, True
        self._changed_node(node)
        self.node_gained_room(node.name)

    def run_taken(self, name: str, attempt: int, now: float) -> None:
        """The broker confirmed the task-run of this attempt: the grace for the node to
        report it counts from now. In memory only, like forgive_downtime."""
        task = self.tasks.get(name)
        if task is None or task.status is not TaskStatus.WORKING or task.attempt != attempt:
            return
        task._run_unconfirmed = False
        node = self.nodes.get(task.node or "")
        if node is not None and not task._dispatch:  # a copy sent again stands behind it
            node._sent += 1
            task._dispatch = node._sent
        if not task.seen_on_node:
            task.dispatched_at = max(task.dispatched_at or now, now)

    def run_unconfirmed(self, name: str, attempt: int) -> None:
        """This attempt's task-run was sent and the broker has not confirmed it yet."""
        task = self.tasks.get(name)
        if task is not None and task.status is TaskStatus.WORKING and task.attempt == attempt:
            task._run_unconfirmed = True

    def vouched_by(self, node: Node, task: Task) -> None:
        """The node reported or completed the task's current attempt: it has every task-run
        queued to it before this one."""
        if task.node == node.name and task._dispatch > node._vouched:
            node._vouched = task._dispatch

    def seen_on_node(self, task: Task) -> None:
        if not task.seen_on_node:
            task.seen_on_node = True
            self._changed(task)

    # ---- what tasks say and ask ----------------------------------------------------------
    def note(self, task: Task, message: str) -> None:
        task.message = message
        self._changed(task)

    def set_results(self, task: Task, results: list[dict[str, Any]]) -> None:
        task.results = results
        self._changed(task)

    def set_resources(self, task: Task, resources: list[dict[str, str]]) -> None:
        task.resources = resources
        self._changed(task)

    def request_cancel(self, task: Task) -> None:
        task.cancel_requested = True
        self._changed(task)

    def record_late(self, task: Task, attempt: int | None, what: str) -> None:
        """A report from an attempt that was replaced: kept on that attempt, nothing else."""
        for record in task.attempts:
            if record.attempt == attempt:
                record.late.append(what)
                self._changed(task)

    def lend_cores(self, task: Task, node: Node) -> None:
        """A parent waits for its children: its cores go back to its node meanwhile."""
        if task.lent_cores:
            return
        task.lent_cores = task.allocated.get("cores", 0.0)
        node.release({"cores": task.lent_cores})
        self.node_gained_room(node.name)
        self._changed(task)

    def take_back_cores(self, task: Task, node: Node) -> None:
        # Taken back even if that over-commits the node for a while: the parent's own
        # work is small next to its children's, and refusing would deadlock it.
        if not task.lent_cores:
            return
        node.reserve({"cores": task.lent_cores})
        task.lent_cores = 0.0
        self._changed(task)

    def node_gained_room(self, name: str) -> None:
        if self.roomier is not None:
            self.roomier.add(name)
        self.needs_scheduling = True

    def start(self, task: Task, node: Node, allocated: dict[str, float],
              repos: dict[str, str], now: float,
              locate: Callable[[Task, Node], tuple[str | None, str]]) -> None:
        """Give the task to the node as a new attempt; `locate` says where it works and
        where its log goes once it holds its repositories."""
        task.status = TaskStatus.WORKING
        task.node = node.name
        task.allocated = allocated
        task.holds = {**task.holds, **repos}  # kept holds of an earlier attempt, new claims
        task.attempt += 1
        task.time_start = now
        task.dispatched_at = now
        task.seen_on_node = False
        task._run_unconfirmed = True
        task._dispatch = 0
        task.attempts.append(Attempt(task.attempt, node.name, now, allocated=dict(allocated)))
        for repo in repos.values():
            self._hold(repo, task.name)
        self.dequeue(task)
        node.take(task.name, allocated)
        task.path, task.log = locate(task, node)
        self._changed(task)

    def _leave_node(self, task: Task) -> None:
        if task.status is TaskStatus.WORKING and task.node in self.nodes:
            node = self.nodes[task.node]
            node.give_back(task.name, task.holding)
            self.node_gained_room(node.name)

    def requeue(self, task: Task, now: float, why: str) -> None:
        """Its node was lost under it: wait again, to start as a new attempt elsewhere."""
        self._leave_node(task)
        task.close_attempt(now, why, lost=True)
        task.status = TaskStatus.IDLE
        task.node, task.allocated, task.lent_cores = None, {}, 0.0
        task.dispatched_at, task.seen_on_node, task._dispatch = None, False, 0
        # Its repositories stay held while any of its descendants may still use them; the new
        # attempt then runs next to them (Task.shape) instead of claiming others.
        if all(self.tasks[d].status is TaskStatus.COMPLETE for d in self.descendants(task.name)):
            for repo in self.release_repositories(task):
                host = self.repository_host(repo)
                if host is not None:
                    self.node_gained_room(host.name)
            task.holds = {}
        self.enqueue(task)
        self._changed(task)

    def adopt(self, task: Task, node: Node, now: float) -> None:
        """A node that came back still runs the current attempt of a requeued task."""
        self.dequeue(task)
        task.status, task.node, task.seen_on_node = TaskStatus.WORKING, node.name, True
        # What that attempt was granted: its process may still use all of it.
        last = task.last_attempt
        task.allocated = dict(last.allocated) if last and last.allocated else task.shape().need
        if last is not None:
            last.reopen()
        node.take(task.name, task.allocated)
        self._changed(task)

    def finish(self, task: Task, severity: Severity, now: float,
               message: str | None, cause: str | None = None) -> list[Task]:
        """Complete the task; returns the complete ancestors whose whole tree it completed."""
        self._leave_node(task)
        task.close_attempt(now, message or severity.value, cause=cause)
        task.status = TaskStatus.COMPLETE
        task.lent_cores = 0.0
        self.raise_severity(task, severity)
        task.time_finish = now
        if message:
            task.message = message
        self.dequeue(task)
        self._changed(task)
        closed = []
        for name in self._tree_of(task):
            left = self.tree_open.get(name, 1) - 1
            if left > 0:
                self.tree_open[name] = left
                continue
            self.tree_open.pop(name, None)
            if name != task.name and self.tasks[name].status is TaskStatus.COMPLETE:
                closed.append(self.tasks[name])
        return closed

    def raise_severity(self, task: Task, severity: Severity) -> bool:
        """Severity never goes down; True when the task's own went up."""
        raised = task.raise_severity(severity)
        if raised:
            self._spread_severity(task, severity)
            self._changed(task)
        return raised

    def _spread_severity(self, task: Task, severity: Severity) -> None:
        # Up the tree by hand, not through _tree_of: this runs for every task at a load.
        name, parent = task.name, task.parent
        while True:
            current = self.tree_worst.get(name)
            worst = severity.worst(current)
            if worst == current:
                return  # every ancestor above is at least this bad already
            self.tree_worst[name] = worst
            above = self.tasks.get(parent) if parent is not None else None
            if above is None:
                return
            name, parent = above.name, above.parent

    def tree_complete(self, task: Task) -> bool:
        return self.tree_open.get(task.name, 0) == 0

    def _tree_of(self, task: Task) -> list[str]:
        """The task and every ancestor: the trees it belongs to."""
        return [task.name, *(a.name for a in self.ancestors(task))]

    def release_repositories(self, task: Task) -> list[str]:
        released = [repo for repo in task.holds.values() if self.holds.get(repo) == task.name]
        for repo in released:
            self._hold(repo, None)
        return released

    def _hold(self, repo: str, task: str | None) -> None:
        """Claim a repository for a task, or (None) release it."""
        if task is None:
            self.holds.pop(repo, None)
        else:
            self.holds[repo] = task
        for host in self.hosts.get(repo, ()):
            self.nodes[host].offer_changed()

    def drop_released_holds(self) -> None:
        """After loading: a complete task whose whole tree is complete released what it held
        (it still shows what it worked in), so it holds nothing now."""
        for repo, name in list(self.holds.items()):
            if self.tasks[name].status is TaskStatus.COMPLETE and \
                    self.tree_complete(self.tasks[name]):
                self._hold(repo, None)

    def repository_host(self, repo: str) -> Node | None:
        hosts = self.hosts.get(repo)
        return self.nodes[min(hosts)] if hosts else None

    def ancestors(self, task: Task) -> list[Task]:
        found = []
        parent = task.parent
        while parent is not None and parent in self.tasks:
            found.append(self.tasks[parent])
            parent = self.tasks[parent].parent
        return found

    def descendants(self, name: str) -> list[str]:
        found: list[str] = []
        stack = list(self.children.get(name, ()))
        while stack:
            child = stack.pop()
            found.append(child)
            stack.extend(self.children.get(child, ()))
        return found
