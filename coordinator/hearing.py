"""When this coordinator could not hear its nodes.

A node is lost when nothing came from it for a while, and a task-run is taken for lost when a
node-set that omits it arrives long after it was sent. Both measure time by this process's
clock, which also runs while the process itself hears nothing: a long turn of its own (a
commit the disk held up, a large read), a pause of the process, a machine that gave it no
CPU. Meanwhile the nodes' messages wait in its socket, and are read only after. Counted as
silence, such a stall of 20 s made every node whose heartbeat waited in the socket lost, and
a node-set sent before its node read a task-run look 20 s late: tasks ran twice. So the
service marks each time its event loop runs, and a gap between two marks longer than
`slack` (a healthy loop marks at least once a tick) counts, all of it, as deafness, which
those judgements leave out (engine.Context.elapsed).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

# Seconds between two times during which the process heard nothing.
DeafBetween = Callable[[float, float], float]

# Above the service's tick (1 s), which marks even when nothing arrives.
STALL_SLACK_SECONDS = 2.0
# Longer than any timeout the deafness is subtracted from (node timeout, dispatch grace x 10).
KEPT_SECONDS = 3600.0


class Hearing:
    """The stretches of time this process was deaf (its event loop did not run)."""

    def __init__(self, slack: float = STALL_SLACK_SECONDS, kept: float = KEPT_SECONDS) -> None:
        self.slack = slack
        self.kept = kept
        self._last: float | None = None
        self._deaf: deque[tuple[float, float]] = deque()

    def mark(self, now: float) -> float:
        """The event loop runs at `now` (the socket is read right after); returns the
        seconds of a stall this mark ended (0.0: none)."""
        last, deaf = self._last, 0.0
        if last is not None and now - last > self.slack:
            self._deaf.append((last, now))  # all of it: the socket was read at neither end
            deaf = now - last
        if last is None or now > last:
            self._last = now
        while self._deaf and self._deaf[0][1] < now - self.kept:
            self._deaf.popleft()
        return deaf

    def deaf_between(self, start: float, end: float) -> float:
        """Seconds between `start` and `end` during which the process heard nothing."""
        return sum(max(0.0, min(until, end) - max(since, start))
                   for since, until in self._deaf)


def never_deaf(_start: float, _end: float) -> float:
    """For a processor driven without an event loop (tests, tools): no stall to leave out."""
    return 0.0
