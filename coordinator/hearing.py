"""When this coordinator could not hear its nodes.

A node is lost when nothing came from it for a while, and a task-run is taken for lost when a
node-set that omits it arrives long after it was sent. Both measure time by this process's
clock, which also runs while the process itself hears nothing: a long turn of its own (a
commit the disk held up, a large read), a pause of the process, a machine that gave it no
CPU. Meanwhile the nodes' messages wait in its socket, and are read only after. Counted as
silence, such a stall of 20 s made every node whose heartbeat waited in the socket lost, and
a node-set sent before its node read a task-run look 20 s late: tasks ran twice. So the
service marks each time its event loop runs and the span of each of its own turns: a turn
longer than `busy_min`, and a gap between two marks longer than `slack` (a healthy loop
marks at least once a tick), count, all of them, as deafness, which those judgements leave
out (engine.Context.elapsed).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

# Seconds between two times during which the process heard nothing.
DeafBetween = Callable[[float, float], float]

# Above the service's tick (1 s), which marks even when nothing arrives: a longer gap
# between two marks means the process was stopped, starved, or busy past its own marks.
STALL_SLACK_SECONDS = 2.0
# A turn of its own longer than this is recorded as deaf (the socket is read between turns).
BUSY_SECONDS = 0.25
# Longer than any timeout the deafness is subtracted from (node timeout, dispatch grace x 10).
KEPT_SECONDS = 3600.0


class Hearing:
    """The stretches of time this process was deaf (its event loop did not run)."""

    def __init__(self, slack: float = STALL_SLACK_SECONDS, busy: float = BUSY_SECONDS,
                 kept: float = KEPT_SECONDS) -> None:
        self.slack = slack
        self.busy_min = busy
        self.kept = kept
        self._last: float | None = None
        self._deaf: deque[tuple[float, float]] = deque()

    def mark(self, now: float) -> float:
        """The event loop runs at `now` (the socket is read right after); returns the
        seconds of a stall this mark ended (0.0: none)."""
        last = self._last
        if last is not None and now - last > self.slack:
            return self._record(last, now)  # all of it: the socket was read at neither end
        self._last = now if last is None else max(last, now)
        return 0.0

    def busy(self, began: float, ended: float) -> float:
        """A turn of the loop's own ran from `began` to `ended`: nothing was read meanwhile.
        Returns its length if it was long enough to count (0.0: it was not)."""
        self.mark(began)
        if ended - began > self.busy_min:
            return self._record(began, ended)
        self.mark(ended)
        return 0.0

    def _record(self, since: float, until: float) -> float:
        if until <= since:
            return 0.0
        self._deaf.append((since, until))
        self._last = until if self._last is None else max(self._last, until)
        while self._deaf and self._deaf[0][1] < until - self.kept:
            self._deaf.popleft()
        return until - since

    def deaf_between(self, start: float, end: float) -> float:
        """Seconds between `start` and `end` during which the process heard nothing."""
        deaf = 0.0
        for since, until in reversed(self._deaf):  # in time order: newest first, then stop
            if until <= start:
                break
            deaf += max(0.0, min(until, end) - max(since, start))
        return deaf


def never_deaf(_start: float, _end: float) -> float:
    """For a processor driven without an event loop (tests, tools): no stall to leave out."""
    return 0.0
