"""What ran where, and when: the read-only views behind the dashboard's timeline, a tree's
shape in time (`vespid timeline`) and the farm charts.

Three commands, answered from memory and never written to the store:
- `tree-timeline`: every task of one tree with its attempts' times;
- `attempt-list`: the attempts that ran in a window of time, farm-wide. An index of recent
  attempts by start time keeps this from walking every task the coordinator knows: the
  dashboard asks every two seconds, and a farm keeps months of tasks;
- `farm-history`: samples of queue depth, starts and each node's use, taken on the tick.

Samples and the reasons tasks waited live in this process only: a restart starts the
charts afresh (attempt times are task state, so the timelines survive it).
"""

from __future__ import annotations

import bisect
import itertools
import math
from array import array
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass

from vespid.coordinator import engine, views
from vespid.coordinator.engine import Context
from vespid.coordinator.extension import Extension, Handler, Reply
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.state import Attempt, State, Task
from vespid.coordinator.store import Store
from vespid.shared.errors import ProtocolError
from vespid.shared.protocol import (
    AttemptList,
    AttemptListResponse,
    AttemptOutcome,
    FarmHistory,
    FarmHistoryResponse,
    FarmSample,
    NodeSample,
    TaskStatus,
    TimelineAttempt,
    TimelineTask,
    TreeTimeline,
    TreeTimelineResponse,
)

# Why a task waited is looked up for at most this many waiting groups a sample: explaining
# costs a pass over every node's offer.
EXPLAINED_PER_SAMPLE = 10
# A reason names at most this many obstacles (at 1,000 nodes there may be one per node).
OBSTACLES_SHOWN = 3
MAX_TEXTS = 10_000
# ... and given to at most this many of a group's tasks (the next in line; the others get
# theirs as they move up).
REASONS_PER_GROUP = 500
# A task that started within this long of becoming ready did not wait for anything.
NOTICEABLE_WAIT = 1.0


def outcome_of(task: Task, attempt: Attempt) -> AttemptOutcome:
    if attempt.end is None:
        return "running"
    if attempt.lost:
        return "lost"
    if attempt is task.last_attempt and task.status is TaskStatus.COMPLETE and task.success:
        return task.success.value
    return "replaced"


def bar(task: Task, index: int) -> TimelineAttempt:
    """The task's `index`th attempt (from 0) as the wire shows it. It began to wait when the
    task was made, or when the attempt before it ended."""
    attempt = task.attempts[index]
    queued = task.time_create if index == 0 else task.attempts[index - 1].end
    return TimelineAttempt(
        task=task.name, attempt=attempt.attempt, node=attempt.node, queued=queued,
        start=attempt.start, end=attempt.end, outcome=outcome_of(task, attempt),
        why=attempt.why, late=bool(attempt.late),
        cores=float(attempt.allocated.get("cores", 0.0)))


def summary(obstacles: list[str]) -> str:
    """The first few obstacles as one sentence."""
    shown = "; ".join(obstacles[:OBSTACLES_SHOWN])
    if len(obstacles) > OBSTACLES_SHOWN:
        shown += f"; and {len(obstacles) - OBSTACLES_SHOWN} more"
    return shown


@dataclass
class Sample:
    """One tick's figures; node use as one flat array of floats (cores, used, memory,
    used per node, in the order of `nodes`), since 1,000 nodes sampled every few seconds
    for hours would otherwise be millions of small objects."""

    time: float
    queued: int
    running: int
    started: int
    nodes: tuple[str, ...]
    use: array[float]

    def to_wire(self) -> FarmSample:
        use = self.use
        return FarmSample(
            time=self.time, queued=self.queued, running=self.running, started=self.started,
            nodes={name: NodeSample(cores=use[4 * i], cores_used=use[4 * i + 1],
                                    memory=use[4 * i + 2], memory_used=use[4 * i + 3])
                   for i, name in enumerate(self.nodes)})


class AttemptIndex:
    """Attempts by start time, for the last `keep` seconds. Entries name (task, attempt);
    the attempt itself stays in its task, so ends and outcomes are always current."""

    def __init__(self, keep: float) -> None:
        self.keep = keep
        self.starts: list[float] = []
        self.entries: list[tuple[str, int]] = []
        # Every ended attempt lasted at most this long: a window's scan starts that far
        # before it, not at the beginning of the index.
        self.longest = 0.0

    def add(self, start: float, task: str, attempt: int) -> None:
        at = bisect.bisect_right(self.starts, start)
        self.starts.insert(at, start)
        self.entries.insert(at, (task, attempt))

    def ended(self, attempt: Attempt) -> None:
        if attempt.end is not None:
            self.longest = max(self.longest, attempt.end - attempt.start)

    def prune(self, now: float) -> None:
        cut = bisect.bisect_left(self.starts, now - self.keep)
        if cut:
            del self.starts[:cut]
            del self.entries[:cut]

    def between(self, since: float, until: float) -> Iterator[tuple[str, int]]:
        first = bisect.bisect_left(self.starts, since - self.longest)
        last = bisect.bisect_right(self.starts, until)
        return iter(self.entries[first:last])


class Timeline(Extension):
    name = "timeline"

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.interval = settings.history_interval
        self.samples: deque[Sample] = deque(
            maxlen=max(1, math.ceil(settings.history_keep / settings.history_interval)))
        self.keep = settings.timeline_keep
        # Built on the first window asked for, from the state, not at start: indexing every
        # attempt of 100,000 tasks was a tenth of a restart, for a view few open. Until then
        # nothing needs keeping up to date: the state holds every attempt it would index.
        self._index: AttemptIndex | None = None
        self.started_since_sample = 0
        self.next_sample = 0.0
        self.waited_for: dict[str, str] = {}  # task -> the last reason seen while it waited
        self.reasons: dict[str, str] = {}  # idle task -> why it waits, as last noted
        self.texts: dict[str, str] = {}

    def handlers(self) -> Mapping[type, Handler]:
        return {TreeTimeline: self.handle_tree, AttemptList: self.handle_attempts,
                FarmHistory: self.handle_history}

    def reads(self) -> Collection[type]:
        return (TreeTimeline, AttemptList, FarmHistory)  # all three: read-only views

    # ---- following the tasks -----------------------------------------------------------
    def load(self, store: Store, state: State) -> None:
        """At start and after a rolled-back batch: the index is made anew when next asked."""
        self._index = None

    def _attempts(self, state: State) -> AttemptIndex:
        if self._index is None:
            self._index = self._indexed(state)
        return self._index

    def _indexed(self, state: State) -> AttemptIndex:
        """The attempts of the last `keep` seconds (and every running one)."""
        index = AttemptIndex(self.keep)
        everything = [(start, t.name, attempt, end) for t in state.tasks.values()
                      for start, attempt, end in t.attempt_spans()]
        since = max((start for start, *_ in everything), default=0.0) - index.keep
        for start, _, _, end in everything:
            if end is not None:
                index.longest = max(index.longest, end - start)
        recent = sorted(e for e in everything if e[0] >= since or e[3] is None)
        index.starts = [start for start, *_ in recent]
        index.entries = [(name, number) for _, name, number, _ in recent]
        return index

    def started(self, ctx: Context, task: Task) -> None:
        attempt = task.last_attempt
        if attempt is None:
            return
        if self._index is not None:
            self._index.add(attempt.start, task.name, attempt.attempt)
        self.started_since_sample += 1
        reason = self.reasons.pop(task.name, None)
        if reason is not None:
            self.waited_for[task.name] = reason

    def ended(self, ctx: Context, task: Task) -> None:
        if self._index is not None:
            for attempt in task.attempts:
                self._index.ended(attempt)

    def tick(self, ctx: Context) -> None:
        if ctx.now >= self.next_sample:
            self._note_reasons(ctx.state, ctx.now)
            self.samples.append(self._sample(ctx.state, ctx.now))
            self.started_since_sample = 0
            self.next_sample = ctx.now + self.interval
            if self._index is not None:
                self._index.prune(ctx.now)

    def _note_reasons(self, state: State, now: float) -> None:
        """Why the head of each waiting group waits, for the first groups: tasks of one
        shape wait for the same thing, so each of them gets its group's reason."""
        self.reasons = {}
        for group in itertools.islice(state.queue.values(), EXPLAINED_PER_SAMPLE):
            head = state.tasks.get(group[0][-1]) if group else None
            if head is None or now - head.time_create < NOTICEABLE_WAIT:
                continue
            # One string object per distinct text: every task that waited for it keeps it.
            if len(self.texts) > MAX_TEXTS:
                self.texts = {}
            reason = summary(engine.explain(state, head))
            reason = self.texts.setdefault(reason, reason)
            for key in itertools.islice(group, REASONS_PER_GROUP):
                self.reasons[key[-1]] = reason

    def _sample(self, state: State, now: float) -> Sample:
        live = [node for node in state.nodes.values() if node.alive and not node.left]
        use = array("f")
        for node in live:
            capacity = node.resources()
            use.extend((capacity.get("cores", 0.0), node.used.get("cores", 0.0),
                        capacity.get("memory", 0.0), node.used.get("memory", 0.0)))
        running = sum(len(node.running) for node in state.nodes.values())
        return Sample(now, len(state.waiting_shape), running, self.started_since_sample,
                      tuple(node.name for node in live), use)

    # ---- answering ---------------------------------------------------------------------
    def handle_tree(self, ctx: Context, msg: TreeTimeline) -> Reply:
        root = ctx.state.tasks.get(msg.root)
        if root is None:
            raise ProtocolError("not_found", f"no task named {msg.root!r}; `vespid tasks` "
                                "lists them")
        names = [root.name, *self._parents_first(ctx.state, root.name)]
        tasks = [self._timeline_task(ctx.state, ctx.state.tasks[name])
                 for name in names[: msg.limit]]
        return TreeTimelineResponse(command="tree-timeline-response", root=root.name,
                                    now=ctx.now, total=len(names), tasks=tasks)

    @staticmethod
    def _parents_first(state: State, root: str) -> list[str]:
        found: list[str] = []
        level = list(state.children.get(root, ()))
        while level:
            found.extend(level)
            level = [child for name in level for child in state.children.get(name, ())]
        return found

    def _timeline_task(self, state: State, task: Task) -> TimelineTask:
        waiting = None
        if task.status is TaskStatus.IDLE:
            waiting = summary(engine.explain(state, task)) or None
        return TimelineTask(
            name=task.name, parent=task.parent, status=views.shown_status(task),
            success=task.success,
            virtual=task.virtual, time_create=task.time_create, time_start=task.time_start,
            time_finish=task.time_finish, waiting_reason=waiting,
            waited_for=self.waited_for.get(task.name),
            attempts=[bar(task, i) for i in range(len(task.attempts))])

    def handle_attempts(self, ctx: Context, msg: AttemptList) -> Reply:
        until = ctx.now if msg.until is None else msg.until
        if until < msg.since:
            raise ProtocolError("invalid_message", "attempt-list: `until` is before `since`")
        found = list(self._in_window(ctx.state, msg.since, until))
        found.sort(key=lambda a: (a.start, a.task, a.attempt))
        return AttemptListResponse(command="attempt-list-response", now=ctx.now,
                                   since=msg.since, truncated=len(found) > msg.limit,
                                   attempts=found[-msg.limit:])

    def _in_window(self, state: State, since: float, until: float) -> Iterable[TimelineAttempt]:
        seen: set[tuple[str, int]] = set()
        running = ((name, state.tasks[name].attempt) for node in state.nodes.values()
                   for name in node.running if name in state.tasks)
        for name, number in (*self._attempts(state).between(since, until), *running):
            task = state.tasks.get(name)
            if task is None or (name, number) in seen:
                continue
            seen.add((name, number))
            index = next((i for i, a in enumerate(task.attempts) if a.attempt == number), None)
            if index is None:
                continue
            attempt = task.attempts[index]
            if attempt.start <= until and (attempt.end is None or attempt.end >= since):
                yield bar(task, index)

    def handle_history(self, ctx: Context, msg: FarmHistory) -> Reply:
        since = msg.since or 0.0
        samples = [s.to_wire() for s in self.samples if s.time > since]
        return FarmHistoryResponse(command="farm-history-response", interval=self.interval,
                                   samples=samples)
