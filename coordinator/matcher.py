"""Which waiting task runs on which node: a pure function of state, no I/O.

Rules (docs/protocol.md, "Matching"):
- every numeric requirement that is not a `usage_` key is a consumable resource; a task fits
  a node while each is at most what the node has free (a resource a node does not declare
  is one it has none of); `cores` defaults to 1 and the task gets up to `cores_max`;
- `usage_X` is a label, `usage_require_X` a hard requirement on the other side's labels,
  `usage_prefer_X` a soft one that ranks the nodes that fit;
- a repository request claims a free repository of that type (on the task's node when
  `local`); `{"local": true}` without a request pins the task to the node hosting the
  repository it inherited;
- higher priority first, then older first; among nodes of the same score, best fit (the one
  left with the fewest free cores) wins;
- the first task in that order that cannot start now but could on an emptier node gets that
  node reserved: nothing after it in the order is put there until it starts, so a stream of
  small tasks cannot starve a large one.

Waiting tasks come grouped by shape (tasks of one shape fit exactly the same nodes), each
group in priority-then-age order, so a pass costs per group and per decision, not per
queued task; a group that could not start last time is only tried against the nodes that
gained room since (`dirty`), a group that asks at least as much as one found to fit
nowhere in the pass is not tried at all (`Shape.covers`), and once those nodes have no
room left for any group that may only use them, the pass ends (`_Pass.spent`). A caller
that keeps the groups' first tasks in order and what the groups ask (`heads`, `asks`: the
State does) spares each pass a look at every group before it starts.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from vespid.shared.text import amount

REQUIRE = "usage_require_"
PREFER = "usage_prefer_"
LABEL = "usage_"
ELASTIC = "cores_max"
BID, MIN_BID = "bid", "min_bid"
# Numbers that are not consumed: the elastic core limit, what a task bids, what a node asks.
NOT_CONSUMED = frozenset({ELASTIC, BID, MIN_BID})

# (-priority, tier, -bid, seq, name), ascending is the order to start. Tier 0 is a child
# of a running task: it goes before tasks whose tree has not started, since its tree
# already holds resources (cores, memory, repositories) until it finishes. The name is last.
QueueKey = tuple[Any, ...]


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
class RepoRequest:
    key: str
    type: str
    local: bool


# Each distinct reach (what `compatible` reads) gets a number: a pass keys its lists by
# reach and compares reaches for every shape it skips, and hashing or comparing the Labels
# dataclasses each time was a fifth of a pass. The table is bounded (bids are any number a
# client likes): when full it starts over, and numbers are never reused, so two reaches
# never share one; an equal reach numbered again only costs a pass a list made twice.
_REACHES: dict[tuple[Any, ...], int] = {}
_REACHES_KEPT = 10_000
_REACH_NUMBERS = itertools.count()


def _reach_number(reach: tuple[Any, ...]) -> int:
    number = _REACHES.get(reach)
    if number is None:
        if len(_REACHES) >= _REACHES_KEPT:
            _REACHES.clear()
        number = _REACHES[reach] = next(_REACH_NUMBERS)
    return number


@dataclass(frozen=True)
class Shape:
    """Everything about a task that decides where it may run."""

    needs: tuple[tuple[str, float], ...]
    cores_max: float
    labels: Labels
    repos: tuple[RepoRequest, ...] = ()
    pinned: tuple[str, ...] = ()  # repositories the task must run next to
    unplaceable: str | None = None  # why no node can ever take it (e.g. no inherited repo)
    bid: float = 0.0
    avoid: frozenset[str] = frozenset()  # nodes to use only when no other can serve
    # Derived once: a pass asks for them per node, and a Counter or a hash of all the
    # fields each time was a tenth of a pass.
    local_types: Counter[str] = field(init=False, repr=False, compare=False)
    repo_types: Counter[str] = field(init=False, repr=False, compare=False)
    # What `compatible` reads, as a number: shapes that differ only in what they consume
    # may run on the same nodes, so a pass finds those nodes once for all of them.
    reach: int = field(init=False, repr=False, compare=False)
    # The cores and memory it needs, which ranking a node reads (a dict each time was a
    # fifth of a one-task pass).
    cores: float = field(init=False, repr=False, compare=False)
    memory: float = field(init=False, repr=False, compare=False)
    amounts: dict[str, float] = field(init=False, repr=False, compare=False)  # needs, by key
    # The least free memory it fits: asking none fits a node with less than none free.
    least_memory: float = field(init=False, repr=False, compare=False)
    # Whether it claims a repository from any node, so that one freed anywhere may let it in.
    anywhere: bool = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        needs = dict(self.needs)
        object.__setattr__(self, "amounts", needs)
        object.__setattr__(self, "cores", needs.get("cores", 0.0))
        object.__setattr__(self, "memory", needs.get("memory", 0.0))
        object.__setattr__(self, "least_memory", needs.get("memory", -math.inf))
        object.__setattr__(self, "anywhere", any(not r.local for r in self.repos))
        reach = (self.labels, self.bid, self.pinned, self.unplaceable)
        object.__setattr__(self, "reach", _reach_number(reach))
        object.__setattr__(self, "local_types", Counter(r.type for r in self.repos if r.local))
        object.__setattr__(self, "repo_types", Counter(r.type for r in self.repos))
        object.__setattr__(self, "_hash", hash((self.needs, self.cores_max, self.labels,
                                                self.repos, self.pinned, self.unplaceable,
                                                self.bid, self.avoid)))

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def of(cls, requirements: Mapping[str, Any], repositories: Mapping[str, Any] | None = None,
           environment: Mapping[str, str] | None = None,
           avoid: Iterable[str] = ()) -> Shape:
        needs = {k: float(v) for k, v in requirements.items()
                 if not k.startswith(LABEL) and k not in NOT_CONSUMED and _is_amount(v)}
        needs.setdefault("cores", 1.0)
        raw_max = requirements.get(ELASTIC, needs["cores"])
        cores_max = max(math.inf if raw_max is None else float(raw_max), needs["cores"])
        requests, pinned, unplaceable = _repositories(repositories or {}, environment or {})
        bid = requirements.get(BID, 0.0)
        return cls(tuple(sorted(needs.items())), cores_max, Labels.parse(requirements),
                   requests, pinned, unplaceable, float(bid) if _is_amount(bid) else 0.0,
                   frozenset(avoid))

    @property
    def need(self) -> dict[str, float]:
        return dict(self.needs)

    def covers(self, other: Shape) -> bool:
        """Whether this shape asks at least as much as `other` of everything that decides
        whether a task fits a node now, on the same nodes: wherever it fits, `other` fits
        too, so when `other` fits nowhere, neither does this one."""
        if self.reach != other.reach:
            return False
        # Loops, not all() over generators: a pass asks this about every shape it skips.
        amounts = self.amounts
        for key, asked in other.needs:
            # A resource this one does not ask for covers nothing, not even an ask of 0: a
            # node may have less than none of it free (its capacity lowered under tasks).
            if amounts.get(key, -math.inf) < asked:
                return False
        if other.repo_types and any(self.repo_types[kind] < n
                                    for kind, n in other.repo_types.items()):
            return False
        return not other.local_types or all(self.local_types[kind] >= n
                                            for kind, n in other.local_types.items())


def _repositories(repositories: Mapping[str, Any], environment: Mapping[str, str]
                  ) -> tuple[tuple[RepoRequest, ...], tuple[str, ...], str | None]:
    requests, pinned, unplaceable = [], [], None
    for key, spec in sorted(repositories.items()):
        request, local = _field(spec, "request"), bool(_field(spec, "local"))
        if request:
            requests.append(RepoRequest(key, str(request), local))
        elif local:
            inherited = environment.get(f"repo_{key}")
            if inherited:
                pinned.append(inherited)
            else:
                unplaceable = (f"repository {key!r} is local but the task holds none "
                               f"(no repo_{key} in its environment)")
    return tuple(requests), tuple(pinned), unplaceable


def _field(spec: Any, name: str) -> Any:
    return spec.get(name) if isinstance(spec, Mapping) else getattr(spec, name, None)


@dataclass
class NodeOffer:
    name: str
    free: dict[str, float]
    labels: Labels
    capacity: dict[str, float] = field(default_factory=dict)
    repos: dict[str, str] = field(default_factory=dict)  # hosted repository -> type
    free_repos: dict[str, list[str]] = field(default_factory=dict)  # type -> unclaimed
    accepting: bool = True
    min_bid: float = 0.0
    repo_counts: Counter[str] = field(default_factory=Counter)  # type -> hosted, claimed or not

    def __post_init__(self) -> None:
        if self.repos and not self.repo_counts:
            self.repo_counts.update(self.repos.values())


@dataclass(frozen=True)
class Assignment:
    task: str
    node: str
    allocated: dict[str, float]
    repos: dict[str, str] = field(default_factory=dict)  # request key -> repository


@dataclass(frozen=True)
class Reservation:
    task: str
    node: str


@dataclass
class MatchResult:
    assignments: list[Assignment]
    blocked: set[Shape]
    reservation: Reservation | None
    # The shapes still to try when the pass stopped at its limit (empty: it went through).
    unfinished: set[Shape] = field(default_factory=set)


def _is_amount(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def labels_compatible(task: Labels, node: Labels) -> bool:
    return task.required <= node.carried and node.required <= task.carried


def preference_score(task: Labels, node: Labels) -> int:
    if not (task.preferred or node.preferred):  # most: no sets made for a score of 0
        return 0
    return len(task.preferred & node.carried) + len(node.preferred & task.carried)


def compatible(shape: Shape, node: NodeOffer) -> bool:
    """Whether the node could ever take the shape, whatever is running there now."""
    if shape.unplaceable is not None or shape.bid < node.min_bid:
        return False
    if not labels_compatible(shape.labels, node.labels):
        return False
    if shape.pinned:
        hosted = node.repos
        for repo in shape.pinned:
            if repo not in hosted:
                return False
    return True


class RepoPool:
    """Unclaimed repositories across accepting nodes, for requests that are not local.
    Counted when a task that asks for repositories first needs it: most passes never do."""

    def __init__(self, offers: Iterable[NodeOffer]) -> None:
        self._offers = offers
        self._count: Counter[str] | None = None

    @property
    def count(self) -> Counter[str]:
        if self._count is None:
            self._count = Counter()
            for offer in self._offers:
                for kind, names in offer.free_repos.items():
                    self._count[kind] += len(names)
        return self._count

    def claimed(self, kind: str) -> None:
        """One repository of `kind` left its node's free list."""
        if self._count is not None:  # else the count, when made, sees the lists as they are
            self._count[kind] -= 1

    def enough(self, shape: Shape) -> bool:
        count = self.count
        return all(count[kind] >= n for kind, n in shape.repo_types.items())


# These three are asked of a node for every shape a pass looks over: plain loops, not
# any()/all() over generators, which made each ask several times slower.
def fits_now(shape: Shape, node: NodeOffer, pool: RepoPool) -> bool:
    free = node.free
    for key, asked in shape.needs:
        if free.get(key, 0.0) < asked:
            return False
    return repositories_free(shape, node, pool)


def repositories_free(shape: Shape, node: NodeOffer, pool: RepoPool) -> bool:
    # Only a request that may be met on another node needs the farm's count: the node's own
    # free repositories are in the pool, so they already meet the local ones there.
    if shape.local_types:
        free_repos = node.free_repos
        for kind, count in shape.local_types.items():
            if len(free_repos.get(kind, ())) < count:
                return False
    return not shape.anywhere or pool.enough(shape)


def fits_empty(shape: Shape, node: NodeOffer) -> bool:
    """Whether the node, once empty, has room for the shape."""
    capacity = node.capacity
    for key, asked in shape.needs:
        if capacity.get(key, 0.0) < asked:
            return False
    if shape.local_types:
        counts = node.repo_counts
        for kind, count in shape.local_types.items():
            if counts[kind] < count:
                return False
    return True


def _rank(shape: Shape, node: NodeOffer) -> tuple[bool, int, float, float, str]:
    free = node.free
    return (node.name in shape.avoid, -preference_score(shape.labels, node.labels),
            free.get("cores", 0.0) - shape.cores, free.get("memory", 0.0) - shape.memory,
            node.name)


def allocate(shape: Shape, node: NodeOffer) -> dict[str, float]:
    allocated = shape.need
    spare = math.floor(node.free.get("cores", 0.0))
    allocated["cores"] = max(allocated["cores"], min(shape.cores_max, spare))
    return allocated


def _claim(shape: Shape, node: NodeOffer, offers: Sequence[NodeOffer],
           pool: RepoPool) -> tuple[dict[str, str], set[str]]:
    """The repositories claimed, and the nodes they were taken from."""
    claimed, sources_used = {}, set()
    # Local requests first: a non-local one must not take the repository a local one
    # of the same type needs on this node.
    for request in sorted(shape.repos, key=lambda r: not r.local):
        sources = [node] if request.local else [node, *offers]
        source = next(o for o in sources if o.free_repos.get(request.type))
        claimed[request.key] = source.free_repos[request.type].pop(0)
        sources_used.add(source.name)
        pool.claimed(request.type)
    return claimed, sources_used


Rank = tuple[bool, int, float, float, str]


@dataclass
class _Fitting:
    """The nodes a shape fits now, best first: a heap of (rank, node) that is brought up to
    date with the nodes changed since it last looked, not rebuilt per decision. At 1,000
    nodes, filtering and ranking every node for every decision was most of a pass.

    A node's entry goes stale when a decision changes its room (its rank only improves as
    room shrinks, so the fresh entry comes first); stale entries are dropped as they surface.
    """

    heap: list[tuple[Rank, str]]
    members: dict[str, NodeOffer]
    synced: int  # how much of the pass's change log it has seen

    @classmethod
    def of(cls, shape: Shape, offers: _Roomiest, pool: RepoPool, synced: int) -> _Fitting:
        # A shape that asks no memory fits a node with less than none free (its memory
        # lowered under running tasks), as fits_now has it.
        members = {o.name: o for o in offers.with_room(shape.cores, shape.least_memory)
                   if fits_now(shape, o, pool)}
        heap = [(_rank(shape, o), name) for name, o in members.items()]
        heapq.heapify(heap)
        return cls(heap, members, synced)

    def catch_up(self, shape: Shape, changed: Iterable[str], pool: RepoPool) -> None:
        for name in changed:
            offer = self.members.get(name)
            if offer is None:
                continue
            if fits_now(shape, offer, pool):
                heapq.heappush(self.heap, (_rank(shape, offer), name))
            else:
                del self.members[name]

    def best(self, shape: Shape, pool: RepoPool, usable: Callable[[str], bool]
             ) -> NodeOffer | None:
        skipped: list[tuple[Rank, str]] = []
        found = None
        while self.heap:
            rank, name = self.heap[0]
            offer = self.members.get(name)
            if offer is None or rank != _rank(shape, offer):
                heapq.heappop(self.heap)  # gone, or an older entry of a changed node
            elif not fits_now(shape, offer, pool):  # the pool of repositories ran out
                heapq.heappop(self.heap)
                del self.members[name]
            elif not usable(name):  # kept free for another task
                skipped.append(heapq.heappop(self.heap))
            else:
                found = offer
                break
        for entry in skipped:
            heapq.heappush(self.heap, entry)
        return found


class _Roomiest:
    """Offers with the most free cores first, as they were when listed. Room only shrinks
    during a pass, so the offers listed with fewer cores or less memory than a shape needs
    cannot take it now either: most of a busy farm is skipped without a full look."""

    def __init__(self, offers: Iterable[NodeOffer]) -> None:
        listed = sorted(((-o.free.get("cores", 0.0), o.free.get("memory", 0.0), o)
                         for o in offers), key=lambda entry: entry[0])
        self.offers = [offer for _, _, offer in listed]
        self._less = [less for less, _, _ in listed]
        self._memory = [memory for _, memory, _ in listed]

    def with_room(self, cores: float, memory: float) -> list[NodeOffer]:
        """The offers that had these cores and memory free when listed."""
        end = bisect.bisect_right(self._less, -cores)
        return [offer for offer, had in zip(self.offers[:end], self._memory[:end], strict=True)
                if had >= memory]


def _has_room(offer: NodeOffer, asks: Mapping[float, float]) -> bool:
    """Whether the offer has the cores and memory free for one of `asks` (cores -> memory)."""
    cores, memory = offer.free.get("cores", 0.0), offer.free.get("memory", 0.0)
    return any(cores >= c and memory >= m for c, m in asks.items())


@dataclass(frozen=True)
class QueueAsks:
    """What the queued shapes ask, by reach (what decides which nodes a shape may use): for
    each number of cores asked, the least memory asked with it. A pass over freed room reads
    it to tell when no node that gained room can take any shape left. It depends only on
    which shapes are queued, so a caller may keep it while they stay the same (State does):
    made afresh each pass it cost a look at every queued shape."""

    asks: dict[int, dict[float, float]]  # reach: cores -> least memory
    examples: dict[int, Shape]  # a shape of each reach
    anywhere: frozenset[Shape]  # shapes that claim a repository any node may free

    @classmethod
    def of(cls, shapes: Iterable[Shape]) -> QueueAsks:
        asks: dict[int, dict[float, float]] = {}
        examples: dict[int, Shape] = {}
        anywhere = []
        for shape in shapes:
            if shape.anywhere:
                anywhere.append(shape)
            by_cores = asks.get(shape.reach)
            if by_cores is None:
                by_cores = asks[shape.reach] = {}
                examples[shape.reach] = shape
            cores, memory = shape.cores, shape.least_memory
            if by_cores.get(cores, math.inf) > memory:
                by_cores[cores] = memory
        return cls(asks, examples, frozenset(anywhere))


@dataclass
class _FreedRoom:
    """What tells a pass over freed room that it is over before its heap is: on a full farm
    the room freed since the last pass is spent by the first few dozen shapes in the order,
    and the hundreds behind them would each be popped only to fit nowhere."""

    queued: QueueAsks
    unrestricted: int  # shapes still to try that may use nodes that did not gain room
    room: dict[int, set[str]] | None = None  # reach -> freed nodes with room for an ask of it
    reaches_with_room: int = 0

    def track(self, offers: Callable[[Shape], _Roomiest], kept: str) -> None:
        """Start following which freed nodes have room left: `offers` gives those a shape's
        reach may use, `kept` is the node kept for a waiting task."""
        examples = self.queued.examples
        self.room = {reach: {o.name for o in offers(examples[reach]).offers
                             if o.name != kept and _has_room(o, asks)}
                     for reach, asks in self.queued.asks.items()}
        self.reaches_with_room = sum(1 for names in self.room.values() if names)

    def note_change(self, offer: NodeOffer) -> None:
        asks = self.queued.asks
        for reach, names in (self.room or {}).items():
            if offer.name in names and not _has_room(offer, asks[reach]):
                names.discard(offer.name)
                if not names:
                    self.reaches_with_room -= 1


class _Order:
    """The queue's tasks in start order across shapes: the shapes' first tasks as the
    caller keeps them sorted, merged with each shape's next task once one of it started.
    A heap of the queue's ~700 shapes, built and popped in every pass, was about a fifth
    of a pass on a busy farm."""

    def __init__(self, heads: Iterable[tuple[QueueKey, Shape]],
                 queue: Mapping[Shape, Sequence[QueueKey]]) -> None:
        self._heads = iter(heads)
        self._head = next(self._heads, None)
        self._queue = queue
        self._next: list[tuple[QueueKey, Shape, int]] = []  # a heap

    def __bool__(self) -> bool:
        return self._head is not None or bool(self._next)

    def pop(self) -> tuple[QueueKey, Shape, int]:
        """The next task: its key, its shape and its place in the shape's tasks."""
        head, later = self._head, self._next
        if later and (head is None or later[0][0] < head[0]):
            return heapq.heappop(later)
        assert head is not None
        self._head = next(self._heads, None)
        return head[0], head[1], 0

    def then(self, shape: Shape, index: int) -> bool:
        """After the shape's task at `index` started: its next one, if any, comes in."""
        tasks = self._queue[shape]
        if index + 1 < len(tasks):
            heapq.heappush(self._next, (tasks[index + 1], shape, index + 1))
            return True
        return False

    def shapes_left(self) -> set[Shape]:
        left = {shape for _, shape, _ in self._next}
        if self._head is not None:
            left.add(self._head[1])
            left.update(shape for _, shape in self._heads)
            self._head = None
        return left


@dataclass
class _Pass:
    # Every node's offer by name, accepting or not, as the caller keeps them: a pass reads
    # the few it needs by name, and lists the accepting ones only when a shape may use any
    # node (no copy of 1,000 offers, nor lists and dicts of them, made for every pass).
    nodes: Mapping[str, NodeOffer]
    dirty: set[str] | None
    blocked_before: AbstractSet[Shape]
    previous: Reservation | None
    pool: RepoPool = field(init=False)
    compatible: dict[int, _Roomiest] = field(default_factory=dict)
    dirty_compatible: dict[int, _Roomiest] = field(default_factory=dict)
    live: dict[Shape, _Fitting] = field(default_factory=dict)
    reservation: Reservation | None = None
    changed: list[str] = field(default_factory=list)  # nodes whose room a decision took
    # The shapes found to fit nowhere in this pass, by reach (one that covers another
    # already there is dropped when it is added, so the lists stay short).
    failed: dict[int, list[Shape]] = field(default_factory=dict)
    freed: _FreedRoom | None = None  # in a pass over freed room (dirty is not None)

    def __post_init__(self) -> None:
        self.pool = RepoPool(o for o in self.nodes.values() if o.accepting)

    @functools.cached_property
    def offers(self) -> list[NodeOffer]:
        """The accepting offers, in the caller's order."""
        return [o for o in self.nodes.values() if o.accepting]

    def offer(self, name: str) -> NodeOffer | None:
        """The node's offer, if it accepts work."""
        found = self.nodes.get(name)
        return found if found is not None and found.accepting else None

    @functools.cached_property
    def dirty_offers(self) -> list[NodeOffer]:
        """The accepting nodes that gained room, by name (no order of theirs decides
        anything: ties between nodes go by name)."""
        return [o for o in map(self.offer, sorted(self.dirty or ())) if o is not None]

    def only_freed_room(self, shape: Shape) -> bool:
        """Whether nothing changed for this shape but the nodes that gained room: it fit
        nowhere last pass, and it claims no repository that may be freed on any node."""
        return (self.dirty is not None and not shape.anywhere
                and shape in self.blocked_before)

    def candidates(self, shape: Shape) -> _Roomiest:
        if self.only_freed_room(shape):
            return self.freed_compatible(shape)
        return self.all_compatible(shape)

    def freed_compatible(self, shape: Shape) -> _Roomiest:
        """The nodes that gained room and could take the shape's reach."""
        found = self.dirty_compatible.get(shape.reach)
        if found is None:
            found = _Roomiest(o for o in self.dirty_offers if compatible(shape, o))
            self.dirty_compatible[shape.reach] = found
        return found

    def all_compatible(self, shape: Shape) -> _Roomiest:
        found = self.compatible.get(shape.reach)
        if found is None:
            found = self.compatible[shape.reach] = _Roomiest(o for o in self.offers
                                                             if compatible(shape, o))
        return found

    def note_change(self, offer: NodeOffer) -> None:
        self.changed.append(offer.name)
        if self.freed is not None:
            self.freed.note_change(offer)

    def done_with(self, shape: Shape) -> None:
        """The shape is out of the order: blocked, or none of its tasks left."""
        if self.freed is not None and not self.only_freed_room(shape):
            self.freed.unrestricted -= 1

    def spent(self) -> bool:
        """Whether every shape still in the heap would fit nowhere: each may only use the
        nodes that gained room, none of those (bar the node kept) has the cores and memory
        any shape of its reach asks, and a node is kept already (so no failure to come
        keeps one: the pass's outcome is settled)."""
        freed, kept = self.freed, self.reservation
        if freed is None or kept is None or freed.unrestricted:
            return False
        if freed.room is None:
            freed.track(self.freed_compatible, kept.node)
        return freed.reaches_with_room == 0

    def best_node(self, shape: Shape, task: str) -> NodeOffer | None:
        # Room only shrinks during a pass: a node that cannot take the shape now will not
        # later in this pass, so each shape looks at each node about once per pass, and
        # again only at the nodes a decision changed since.
        fitting = self.live.get(shape)
        if fitting is None:
            fitting = self.live[shape] = _Fitting.of(shape, self.candidates(shape), self.pool,
                                                     len(self.changed))
        elif fitting.synced < len(self.changed):
            fitting.catch_up(shape, set(self.changed[fitting.synced:]), self.pool)
            fitting.synced = len(self.changed)
        taken = self.reservation

        def usable(name: str) -> bool:
            return taken is None or name != taken.node or taken.task == task

        return fitting.best(shape, self.pool, usable)

    def fits_nowhere(self, shape: Shape) -> bool:
        """Known without a look at any node: it covers a shape that already fit nowhere in
        this pass (room only shrinks during a pass). On a full farm most shapes in the
        queue are such, and looking each one over the nodes was most of a pass. (A node
        kept in this pass is kept for a task whose shape fit nowhere and is not looked at
        again, so no task asked about here may use a node the failed shape could not.)"""
        if shape in self.live:  # looked over once in this pass: its own heap says it
            return False
        return any(shape.covers(smaller) for smaller in self.failed.get(shape.reach, ()))

    def fit_nowhere(self, shape: Shape) -> None:
        smaller = self.failed.setdefault(shape.reach, [])
        smaller[:] = [known for known in smaller if not known.covers(shape)]
        smaller.append(shape)

    def reserve_for(self, shape: Shape, task: str) -> None:
        if self.reservation is not None:
            return
        # Only a wait for room is helped by keeping a node free: a repository comes back
        # when its holder's tree ends, whatever else runs there.
        previous = self.previous
        if previous is not None and previous.task == task:
            kept = self.offer(previous.node)
            if kept is not None and compatible(shape, kept) and self._room_for(shape, kept):
                self.reservation = previous  # still waiting: the same node, no look around
                return
        # The compatible offers unsorted unless a pass already sorted them: max() below
        # needs no order, and a pass that only tries where room was freed would sort all
        # of them just for this.
        listed = self.compatible.get(shape.reach)
        offers = (listed.offers if listed is not None
                  else [o for o in self.offers if compatible(shape, o)])
        room = [o for o in offers if self._room_for(shape, o)]
        if room:
            chosen = max(room, key=lambda o: (o.free.get("cores", 0.0), o.name))
            self.reservation = Reservation(task, chosen.name)

    def _room_for(self, shape: Shape, offer: NodeOffer) -> bool:
        """Whether the offer, once empty, could take the shape."""
        return fits_empty(shape, offer) and repositories_free(shape, offer, self.pool)


def match(queue: Mapping[Shape, Sequence[QueueKey]],
          offers: Mapping[str, NodeOffer] | Iterable[NodeOffer], *,
          blocked_before: AbstractSet[Shape] | Iterable[Shape] = (),
          dirty: Iterable[str] | None = None,
          reservation: Reservation | None = None, limit: int | None = None,
          heads: Iterable[tuple[QueueKey, Shape]] | None = None,
          asks: QueueAsks | None = None) -> MatchResult:
    """Start what can start now, in priority-then-age order across all shapes.

    `offers` may be a mapping by name, kept by the caller (never changed here). `dirty`
    names the nodes that gained room since the last pass; a shape in `blocked_before` is
    only tried on those (None: try every node). With a `limit`, the pass stops after that
    many assignments, which are the first that many of the whole pass: the shapes it did
    not finish are in `unfinished` (see `carry_over`). A caller that keeps them may give
    `heads`, each queued shape's first task as (key, shape) in ascending order, and `asks`,
    QueueAsks.of the queued shapes; every group in `queue` must then have a task."""
    nodes = offers if isinstance(offers, Mapping) else {o.name: o for o in offers}
    dirty_set = None if dirty is None else set(dirty)
    if dirty_set is not None and reservation is not None:
        dirty_set.add(reservation.node)  # a lifted reservation frees that node for everyone
    if not isinstance(blocked_before, AbstractSet):
        blocked_before = frozenset(blocked_before)
    if heads is None:
        queue = {shape: tasks for shape, tasks in queue.items() if tasks}
        heads = sorted((tasks[0], shape) for shape, tasks in queue.items())
    run = _Pass(nodes, dirty_set, blocked_before, reservation)
    if dirty_set is not None:
        queued = asks if asks is not None else QueueAsks.of(queue)
        restricted = (queue.keys() & blocked_before) - queued.anywhere
        run.freed = _FreedRoom(queued, unrestricted=len(queue) - len(restricted))
    order = _Order(heads, queue)
    assignments: list[Assignment] = []
    blocked: set[Shape] = set()
    while order:
        if run.spent():
            blocked.update(order.shapes_left())
            break
        if len(assignments) == limit:
            return MatchResult(assignments, blocked, run.reservation, order.shapes_left())
        key, shape, index = order.pop()
        if run.fits_nowhere(shape):
            # Nor could it be kept a node: the shape it covers found none, or one is kept.
            blocked.add(shape)
            run.done_with(shape)
            continue
        node = run.best_node(shape, key[-1])
        if node is None:
            blocked.add(shape)
            run.fit_nowhere(shape)
            run.reserve_for(shape, key[-1])
            run.done_with(shape)
            continue
        allocated = allocate(shape, node)
        repos, sources = _claim(shape, node, run.offers if shape.anywhere else (), run.pool)
        for resource, granted in allocated.items():
            node.free[resource] = node.free.get(resource, 0.0) - granted
        run.note_change(node)
        for source in sources - {node.name}:
            run.note_change(run.nodes[source])
        assignments.append(Assignment(key[-1], node.name, allocated, repos))
        if not order.then(shape, index):
            run.done_with(shape)
    return MatchResult(assignments, blocked, run.reservation)


def carry_over(result: MatchResult, blocked_before: Iterable[Shape],
               dirty: set[str] | None, reservation: Reservation | None
               ) -> tuple[set[Shape], set[str] | None, Reservation | None]:
    """What the next pass starts from after `result`: (blocked, dirty, reservation).

    A pass that went through leaves what it found, and no node gained room since. One
    stopped at its limit leaves the next pass to go on as if it were this one: a shape it
    did not finish keeps what was known of it before (blocked ones are still tried on
    every node that gained room since they were), the nodes that had gained room still
    have, and the node kept for a waiting task stays kept unless this pass kept another,
    which frees the first for everyone."""
    if not result.unfinished:
        return result.blocked, set(), result.reservation
    before = set(blocked_before)
    blocked = result.blocked | {shape for shape in result.unfinished if shape in before}
    kept = result.reservation or reservation
    if dirty is not None and reservation is not None and kept != reservation:
        dirty = dirty | {reservation.node}
    return blocked, dirty, kept


def explain(shape: Shape, offers: Iterable[NodeOffer],
            reservation: Reservation | None = None, task: str | None = None) -> list[str]:
    """Sentences saying why a task of this shape runs nowhere now."""
    if shape.unplaceable:
        return [shape.unplaceable]
    offers = list(offers)
    reasons = _grouped((offer.name, _why_not(shape, offer)) for offer in offers)
    if shape.repos and not RepoPool(o for o in offers if o.accepting).enough(shape):
        kinds = ", ".join(sorted({r.type for r in shape.repos}))
        reasons.append(f"not enough free repositories of type {kinds} on any node")
    if reservation is not None and reservation.task != task:
        reasons.append(f"{reservation.node} is kept free for {reservation.task}, which waits "
                       "longer")
    found = [r for r in reasons if r]
    if found:
        return found
    return ["it fits now and starts at the next scheduling pass"] if offers else [
        "no node is registered"]


# Nodes that share a reason are named one by one up to this many; more are one sentence.
NODES_NAMED = 3


def _grouped(reasons: Iterable[tuple[str, str | None]]) -> list[str]:
    """One sentence per node and reason ("n1: full for now (...)"), in the nodes' order;
    but where more than NODES_NAMED nodes share a reason, one sentence for them all where
    the first of them stood, naming the first few by name ("n1, n2, n3 and 997 other
    nodes: full for now (...)"): on a farm of 1,000 busy nodes a task-info listed 1,000
    sentences, 60 KB a reply."""
    listed = [(node, reason) for node, reason in reasons if reason is not None]
    sharing: dict[str, list[str]] = {}
    for node, reason in listed:
        sharing.setdefault(reason, []).append(node)
    sentences: list[str] = []
    for node, reason in listed:
        nodes = sharing[reason]
        if len(nodes) <= NODES_NAMED:
            sentences.append(f"{node}: {reason}")
        elif node == nodes[0]:
            others = len(nodes) - NODES_NAMED
            named = heapq.nsmallest(NODES_NAMED, nodes)  # by name, as the node-list shows
            sentences.append(f"{', '.join(named)} and {others} other "
                             f"node{'s' if others > 1 else ''}: {reason}")
    return sentences


def _why_not(shape: Shape, node: NodeOffer) -> str | None:
    """Why the node does not take a task of this shape now (None: it would). Asked of every
    node for each task-info of a waiting task: the usual answer (full for now) is reached
    without building a set or a dict."""
    if not node.accepting:
        return "not accepting work (lost, draining or incompatible)"
    labels, offered = shape.labels, node.labels
    if not labels.required <= offered.carried:
        return f"lacks label(s) {', '.join(sorted(labels.required - offered.carried))}"
    if shape.bid < node.min_bid:
        return (f"takes only tasks bidding at least {amount(node.min_bid)} "
                f"(bid {amount(shape.bid)})")
    if not offered.required <= labels.carried:
        return f"runs only tasks labelled {', '.join(sorted(offered.required - labels.carried))}"
    for repo in shape.pinned:
        if repo not in node.repos:
            return f"does not host repository {repo}"
    too_big = _shortfall(shape.needs, node.capacity)
    if too_big:
        return _short("too small", too_big, "")
    for kind, count in shape.local_types.items():
        if len(node.free_repos.get(kind, ())) < count:
            hosted = sum(1 for t in node.repos.values() if t == kind)
            return f"no free repository of type {kind} ({hosted} hosted, all held)"
    busy = _shortfall(shape.needs, node.free)
    if busy:
        return _short("full for now", busy, " free")
    return None


def _shortfall(needs: tuple[tuple[str, float], ...], has: Mapping[str, float]
               ) -> tuple[tuple[str, float, float], ...]:
    """(resource, needed, had) of each need `has` falls short of. A plain loop that builds
    nothing when nothing falls short: asked twice of every node for each task-info."""
    short: list[tuple[str, float, float]] | None = None
    for key, need in needs:
        had = has.get(key, 0.0)
        if had < need:
            if short is None:
                short = []
            short.append((key, need, had))
    return () if short is None else tuple(short)


@functools.lru_cache(maxsize=1024)
def _short(what: str, shortfall: tuple[tuple[str, float, float], ...], suffix: str) -> str:
    """`what`, with what is needed and had of each resource short; kept, since most nodes of
    a busy farm fall short in the same way and writing the numbers was most of a look."""
    amounts = ", ".join(f"{key} needs {amount(need)}, has {amount(had)}"
                        for key, need, had in shortfall)
    return f"{what} ({amounts}{suffix})"
