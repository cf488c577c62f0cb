"""vespid.coordinator.hearing: which stretches of time the coordinator heard nothing in."""

from __future__ import annotations

import pytest

from vespid.coordinator.hearing import Hearing

T0 = 1_000_000.0


def test_a_loop_that_marks_within_the_slack_is_never_deaf() -> None:
    hearing = Hearing(slack=2.0)
    for step in range(100):
        hearing.mark(T0 + step * 1.0)

    assert hearing.deaf_between(T0, T0 + 100) == 0.0


def test_a_gap_longer_than_the_slack_is_deaf_all_through() -> None:
    hearing = Hearing(slack=2.0)
    hearing.mark(T0)
    hearing.mark(T0 + 30)  # a 30 s turn, or a paused process

    assert hearing.deaf_between(T0, T0 + 30) == pytest.approx(30.0)
    assert hearing.deaf_between(T0 + 10, T0 + 20) == pytest.approx(10.0)
    assert hearing.deaf_between(T0 + 25, T0 + 60) == pytest.approx(5.0)
    assert hearing.deaf_between(T0 + 30, T0 + 60) == 0.0
    assert hearing.deaf_between(T0 - 10, T0 + 2) == pytest.approx(2.0)
    assert hearing.deaf_between(T0 - 10, T0) == 0.0


def test_a_gap_within_the_slack_is_no_stall() -> None:
    hearing = Hearing(slack=2.0)
    hearing.mark(T0)
    hearing.mark(T0 + 1.9)

    assert hearing.deaf_between(T0, T0 + 1.9) == 0.0


def test_several_stalls_add_up() -> None:
    hearing = Hearing(slack=1.0)
    for stamp in (0, 11, 12, 32, 33):
        hearing.mark(T0 + stamp)

    assert hearing.deaf_between(T0, T0 + 40) == pytest.approx(11.0 + 20.0)


def test_a_clock_stepped_back_makes_no_deafness() -> None:
    hearing = Hearing(slack=2.0)
    hearing.mark(T0 + 10)
    hearing.mark(T0)  # the wall clock was set back
    hearing.mark(T0 + 11)

    assert hearing.deaf_between(T0 - 100, T0 + 100) == 0.0


def test_stalls_older_than_it_keeps_are_forgotten() -> None:
    hearing = Hearing(slack=1.0, kept=100.0)
    hearing.mark(T0)
    hearing.mark(T0 + 50)
    hearing.mark(T0 + 51)
    assert hearing.deaf_between(T0, T0 + 51) == pytest.approx(50.0)

    hearing.mark(T0 + 151)  # a stall itself, 100 s long; the first ended 101 s ago

    assert hearing.deaf_between(T0, T0 + 51) == 0.0
    assert hearing.deaf_between(T0 + 51, T0 + 151) == pytest.approx(100.0)


def test_a_mark_that_ends_a_stall_says_how_long_it_was() -> None:
    hearing = Hearing(slack=2.0)
    assert hearing.mark(T0) == 0.0
    assert hearing.mark(T0 + 1.5) == 0.0

    assert hearing.mark(T0 + 31.5) == pytest.approx(30.0)


def test_a_long_turn_of_its_own_is_deaf_and_a_short_one_is_not() -> None:
    """A 1.9 s turn (a large read, a commit the disk held up) is no gap between marks, yet
    nothing was read during it: with the tests' 2 s node timeout it alone lost nodes."""
    hearing = Hearing(slack=2.0, busy=0.25)
    hearing.mark(T0)

    assert hearing.busy(T0, T0 + 1.9) == pytest.approx(1.9)
    assert hearing.busy(T0 + 2.0, T0 + 2.1) == 0.0

    assert hearing.deaf_between(T0, T0 + 3) == pytest.approx(1.9)
    assert hearing.mark(T0 + 2.5) == 0.0  # the turn moved the last mark to its end


def test_a_gap_before_a_turn_counts_too() -> None:
    hearing = Hearing(slack=2.0, busy=0.25)
    hearing.mark(T0)

    hearing.busy(T0 + 10, T0 + 10.1)  # stopped for 10 s, then a short turn

    assert hearing.deaf_between(T0, T0 + 11) == pytest.approx(10.0)
