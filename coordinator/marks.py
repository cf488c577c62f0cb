"""How old a message may be when it reaches this coordinator, measured through its queues.

A node-set tells what its node ran when the node sent it, not when it reached us. Behind a
backlog in `vespid.coordinator.node` (what does not fit the window waits in the broker) it
may be tens of seconds old, and a task-run confirmed meanwhile is missing from it only
because the node had not read it yet. Judged by when it arrived, such a node-set made a
task that was on its way look lost: 1,000 busy nodes with the coordinator 30 s behind ran
3,000 of 100,000 tasks twice. Nothing in a message tells when the broker queued it, so the
coordinator sends its own: every tick a mark through each queue it consumes, remembering
when it sent which. A queue is first in, first out, so a message that comes after a mark
was queued after that mark was sent: the latest mark received before a message is a time
the message cannot predate (`enqueued_after`), whatever the backlog. And once a mark sent
at `t` came back, every message queued before `t` has arrived.

A mark carries this process's random token and a number; only the times this process
recorded for its own numbers count. A copy of a mark, put into the queue by anyone, can
only come after the mark was sent, so it dates what follows it no later than the truth.
Marks of another process (a coordinator that stood where this one stands, same broker
login) are acked and dropped; a message of another login that only looks like a mark is
handled as what it is. A message delivered again after a lost connection may have been
queued before any mark: it is dated as unknown (the service), and a mark delivered again
moves nothing.
"""

from __future__ import annotations

import secrets
from collections import deque

MARK_TYPE = "vespid-mark"
# Marks sent and not back yet, per queue: a backlog longer than this many ticks forgets the
# oldest, which then come back unknown and move nothing (later ones still do).
MOST_OUTSTANDING = 600


class QueueMarks:
    """The marks this coordinator sent through its queues, and the latest that came back."""

    def __init__(self, queues: tuple[str, ...], token: str | None = None,
                 most: int = MOST_OUTSTANDING) -> None:
        self.token = token or secrets.token_hex(8)
        self._prefix = f"{MARK_TYPE}:{self.token}:"
        self._most = most
        self._seq = 0
        self._sent: dict[str, deque[tuple[int, float]]] = {q: deque() for q in queues}
        # Per queue, when the latest mark received was sent (0.0: none yet, so nothing
        # that came is known to be recent).
        self._through: dict[str, float] = dict.fromkeys(queues, 0.0)

    def send(self, queue: str, now: float) -> str:
        """A mark is about to be published through `queue` at `now`: its message_id."""
        self._seq += 1
        sent = self._sent[queue]
        sent.append((self._seq, now))
        while len(sent) > self._most:
            sent.popleft()
        return f"{self._prefix}{self._seq}"

    def ours(self, message_id: str | None) -> bool:
        return (message_id or "").startswith(self._prefix)

    def new_link(self) -> None:
        """A new connection: what the last one had in hand and did not ack comes again,
        queued before any mark this one sees, so only marks seen from now on date what
        follows them. Marks sent on the last link still count when they come."""
        self._through = dict.fromkeys(self._through, 0.0)

    def received(self, queue: str, message_id: str | None) -> None:
        """A mark came back through `queue` (delivered for the first time): what comes
        after it was queued after it was sent."""
        number = (message_id or "").removeprefix(self._prefix)
        if not self.ours(message_id) or not number.isdecimal():
            return  # another process's, or not a mark: proves nothing about ours
        seq = int(number)
        sent = self._sent[queue]
        while sent and sent[0][0] <= seq:  # first in, first out: earlier ones are behind us
            mark_seq, sent_at = sent.popleft()
            if mark_seq == seq:  # (forgotten ones move nothing) and a clock set back neither
                self._through[queue] = max(self._through[queue], sent_at)

    def through(self, queue: str) -> float:
        """Every message queued in `queue` before this time has arrived (0.0: not known)."""
        return self._through[queue]
