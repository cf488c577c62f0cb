"""QueueMarks: what a mark that came back says about the messages behind it."""

from __future__ import annotations

from vespid.coordinator.marks import QueueMarks

Q, R = "vespid.coordinator.node", "vespid.coordinator"


def test_nothing_is_known_until_a_mark_comes_back() -> None:
    marks = QueueMarks((Q, R))
    marks.send(Q, 10.0)

    assert marks.through(Q) == 0.0


def test_a_mark_back_dates_its_own_queue_by_when_it_was_sent() -> None:
    marks = QueueMarks((Q, R))
    first = marks.send(Q, 10.0)
    marks.send(R, 11.0)
    second = marks.send(Q, 12.0)

    marks.received(Q, first)
    assert (marks.through(Q), marks.through(R)) == (10.0, 0.0)
    marks.received(Q, second)
    assert marks.through(Q) == 12.0


def test_another_process_s_mark_or_a_forgotten_one_moves_nothing() -> None:
    marks = QueueMarks((Q,), most=2)
    other = QueueMarks((Q,))
    oldest = marks.send(Q, 1.0)
    marks.send(Q, 2.0)
    newest = marks.send(Q, 3.0)  # the oldest is forgotten: more than `most` outstanding

    marks.received(Q, other.send(Q, 99.0))
    marks.received(Q, oldest)
    marks.received(Q, None)
    assert marks.through(Q) == 0.0

    marks.received(Q, newest)
    assert marks.through(Q) == 3.0


def test_a_mark_never_moves_the_time_back() -> None:
    marks = QueueMarks((Q,))
    early = marks.send(Q, 5.0)
    late = marks.send(Q, 6.0)
    marks.received(Q, late)
    marks.received(Q, early)  # after a later one: proves nothing newer
    assert marks.through(Q) == 6.0

    after_clock_step = marks.send(Q, 4.0)  # the wall clock was set back
    marks.received(Q, after_clock_step)
    assert marks.through(Q) == 6.0


def test_a_new_link_forgets_the_time_but_not_the_marks_on_their_way() -> None:
    marks = QueueMarks((Q,))
    marks.received(Q, marks.send(Q, 5.0))
    on_its_way = marks.send(Q, 6.0)

    marks.new_link()
    assert marks.through(Q) == 0.0
    marks.received(Q, on_its_way)
    assert marks.through(Q) == 6.0


def test_a_malformed_mark_of_ours_moves_nothing() -> None:
    marks = QueueMarks((Q,))
    marks.send(Q, 5.0)

    marks.received(Q, f"vespid-mark:{marks.token}:not-a-number")
    assert marks.through(Q) == 0.0
