"""The timeline's pure parts: critical path, core slots, and the SVG read back as XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from vespid.client import cli
from vespid.client.timeline import (
    OUTCOME_COLOURS,
    critical_path,
    render_html,
    render_svg,
    short_name,
    slot_lanes,
    total_seconds,
)
from vespid.shared import logs
from vespid.shared.errors import RemoteError
from vespid.shared.protocol import TimelineAttempt, TimelineTask, TreeTimelineResponse

SVG = "{http://www.w3.org/2000/svg}"
NOW = 1000.0


def attempt(task: str, start: float, end: float | None, outcome: str = "ok", n: int = 1,
            node: str = "box1", queued: float | None = None, **extra: Any) -> TimelineAttempt:
    return TimelineAttempt(task=task, attempt=n, node=node, queued=queued, start=start,
                           end=end, outcome=outcome, **extra)  # type: ignore[arg-type]


def task(name: str, parent: str | None, start: float | None, end: float | None,
         created: float | None = None, attempts: list[TimelineAttempt] | None = None,
         status: str | None = "complete", **extra: Any) -> TimelineTask:
    """A task that ran once from start to end (no attempt when it never started)."""
    created = (start if start is not None else NOW) - 1 if created is None else created
    if attempts is None:
        attempts = [] if start is None else [
            attempt(name, start, end, "ok" if end is not None else "running", queued=created)]
    return TimelineTask(name=name, parent=parent, status=status,  # type: ignore[arg-type]
                        success="ok" if status == "complete" else None,
                        time_create=created, time_start=start, time_finish=end,
                        attempts=attempts, **extra)


def tree(*tasks: TimelineTask, now: float = NOW) -> TreeTimelineResponse:
    return TreeTimelineResponse(command="tree-timeline-response", root=tasks[0].name, now=now,
                                total=len(tasks), tasks=list(tasks))


def build_tree() -> TreeTimelineResponse:
    """root waits for a (short), b (long, its child b1 longest) and c (made last, short):
    the longest child is not the last created. Listed level by level, as the coordinator
    does."""
    return tree(
        task("root", None, 10, 60, created=9),
        task("a", "root", 11, 20, created=10.5),
        task("b", "root", 12, 40, created=11),
        task("c", "root", 15, 25, created=14),
        task("b1", "b", 13, 55, created=12.5),
        task("b2", "b", 14, 30, created=12.6),
    )


# ---- critical path ----------------------------------------------------------------------
def test_the_critical_path_follows_the_subtree_that_finished_last_not_the_last_made() -> None:
    assert critical_path(build_tree()) == ["root", "b", "b1"]


def test_a_child_that_outlives_its_parent_decides_through_the_parent() -> None:
    # b itself ended at 20, but its child b1 ran on until 50: b's subtree is the latest.
    timeline = tree(task("root", None, 0, 60), task("a", "root", 1, 40),
                    task("b", "root", 2, 20), task("b1", "b", 3, 50))
    assert critical_path(timeline) == ["root", "b", "b1"]


def test_a_running_task_counts_as_ending_now() -> None:
    timeline = tree(task("root", None, 0, None, status="working"),
                    task("long", "root", 1, 500), task("busy", "root", 2, None,
                                                       status="working"))
    assert critical_path(timeline) == ["root", "busy"]


def test_an_idle_child_counts_as_ending_now_and_as_starting_last() -> None:
    timeline = tree(task("root", None, 0, None, status="working"),
                    task("busy", "root", 2, None, status="working"),
                    task("queued", "root", None, None, status=None, waiting_reason="no node"))
    assert critical_path(timeline) == ["root", "queued"]


def test_on_a_tie_the_child_that_started_last_is_on_the_path() -> None:
    timeline = tree(task("root", None, 0, 30), task("early", "root", 1, 20),
                    task("late", "root", 5, 20), task("middle", "root", 3, 20))
    assert critical_path(timeline) == ["root", "late"]


def test_a_single_task_is_its_own_critical_path() -> None:
    assert critical_path(tree(task("alone", None, 5, 8))) == ["alone"]


def test_an_unknown_root_has_no_path() -> None:
    timeline = tree(task("a", None, 0, 1)).model_copy(update={"root": "other"})
    assert critical_path(timeline) == []


def test_total_time_runs_from_the_first_creation_to_the_last_end() -> None:
    assert total_seconds(build_tree()) == pytest.approx(60 - 9)
    # A grandchild left running by parents that did not wait for it ends the tree.
    timeline = tree(task("root", None, 0, 10, created=0), task("b", "root", 1, 5),
                    task("b1", "b", 2, 90))
    assert total_seconds(timeline) == pytest.approx(90)


# ---- core slots -------------------------------------------------------------------------
def test_overlapping_attempts_never_share_a_slot_and_freed_slots_are_reused() -> None:
    attempts = [attempt("a", 0, 10), attempt("b", 1, 5), attempt("c", 2, 20),
                attempt("d", 5, 8), attempt("e", 10, None), attempt("f", 3, 4)]
    lanes = slot_lanes(attempts, 3)

    for one in attempts:
        for other in attempts:
            if one is not other and lanes[(one.task, 1)] == lanes[(other.task, 1)]:
                assert _end(one) <= other.start or _end(other) <= one.start, (one, other)
    assert lanes[("a", 1)] == 0 and lanes[("b", 1)] == 1 and lanes[("c", 1)] == 2
    assert lanes[("f", 1)] == 3  # three busy at 3: an extra slot, past the granted ones
    assert lanes[("d", 1)] == 1  # b ended at 5 exactly: its slot is free again
    assert lanes[("e", 1)] == 0  # a ended at 10


def test_fractional_cores_round_up_and_none_still_gives_one_slot() -> None:
    lanes = slot_lanes([attempt("a", 0, 10), attempt("b", 20, 30, n=2)], 0)
    assert lanes == {("a", 1): 0, ("b", 2): 0}
    lanes = slot_lanes([attempt("a", 0, 10), attempt("b", 1, 9)], 1.5)
    assert lanes == {("a", 1): 0, ("b", 1): 1}


def test_a_running_attempt_keeps_its_slot() -> None:
    lanes = slot_lanes([attempt("a", 0, None), attempt("b", 500, 600)], 1)
    assert lanes == {("a", 1): 0, ("b", 1): 1}


def _end(one: TimelineAttempt) -> float:
    return float("inf") if one.end is None else one.end


# ---- the picture ------------------------------------------------------------------------
def bars(picture: bytes) -> list[ET.Element]:
    return [r for r in ET.fromstring(picture).iter(f"{SVG}rect")
            if "bar" in r.get("class", "").split()]


def test_every_attempt_is_one_bar_with_its_data_and_its_outcome_colour() -> None:
    timeline = tree(
        task("root", None, 0, None, status="working"),
        task("flaky", "root", None, None, status="working", created=1, attempts=[
            attempt("flaky", 2, 5, "lost", n=1, node="box2", queued=1, why="node lost"),
            attempt("flaky", 6, 9, "replaced", n=2, queued=5),
            attempt("flaky", 10, None, "running", n=3, queued=9)]),
        task("bad", "root", 3, 4, attempts=[attempt("bad", 3, 4, "fatal", queued=2)]),
        now=20)
    picture = render_svg(timeline, critical_path(timeline))
    found = bars(picture)

    assert len(found) == sum(len(t.attempts) for t in timeline.tasks) == 5
    seen = {(b.get("data-task"), b.get("data-attempt"), b.get("data-node"),
             b.get("data-outcome"), b.get("fill")) for b in found}
    assert ("flaky", "1", "box2", "lost", OUTCOME_COLOURS["lost"]) in seen
    assert ("flaky", "3", "box1", "running", OUTCOME_COLOURS["running"]) in seen
    assert ("bad", "1", "box1", "fatal", OUTCOME_COLOURS["fatal"]) in seen
    lost = next(b for b in found if b.get("data-outcome") == "lost")
    hover = lost.findtext(f"{SVG}title") or ""
    assert "box2" in hover and "waited 1.0 s, ran 3.0 s" in hover and "node lost" in hover


def test_a_running_bar_reaches_now_and_a_wait_shows_before_its_start() -> None:
    timeline = tree(task("root", None, 4, None, status="working", created=0), now=10)
    picture = render_svg(timeline, ["root"])
    bar = bars(picture)[0]
    wait = next(r for r in ET.fromstring(picture).iter(f"{SVG}rect")
                if r.get("class") == "wait")

    left, chart = float(wait.get("x", 0)), 900  # the wait starts at the tree's creation
    assert float(wait.get("width", 0)) == pytest.approx(chart * 4 / 10, abs=0.2)
    assert float(bar.get("x", 0)) == pytest.approx(left + chart * 4 / 10, abs=0.2)
    assert float(bar.get("x", 0)) + float(bar.get("width", 0)) == pytest.approx(
        left + chart, abs=0.2)  # running: it reaches now, the chart's right end
    assert "waited 4.0 s, ran 6.0 s" in (bar.findtext(f"{SVG}title") or "")


def test_the_critical_class_marks_exactly_the_critical_tasks_bars() -> None:
    timeline = build_tree()
    critical = critical_path(timeline)
    found = bars(render_svg(timeline, critical))

    marked = {b.get("data-task") for b in found if "critical" in b.get("class", "").split()}
    assert marked == {"root", "b", "b1"}
    assert all(b.get("stroke") for b in found if b.get("data-task") in marked)
    assert not any(b.get("stroke") for b in found if b.get("data-task") not in marked)


def test_the_picture_has_a_title_an_axis_in_seconds_and_a_legend_of_every_outcome() -> None:
    root = ET.fromstring(render_svg(build_tree(), ["root", "b", "b1"]))
    texts = [t.text or "" for t in root.iter(f"{SVG}text")]

    assert texts[0].startswith("root: 51.0 s; 6 tasks, 6 attempts; critical path: root → b")
    assert "0 s" in texts and "50 s" in texts
    assert set(OUTCOME_COLOURS) <= set(texts)
    assert "★ b1" in texts  # a critical task's label is starred


def test_each_row_sits_under_its_parent_indented_by_depth() -> None:
    root = ET.fromstring(render_svg(build_tree(), ["root", "b", "b1"]))
    labels = [(t.text, float(t.get("x", 0))) for t in root.iter(f"{SVG}text")
              if "label" in t.get("class", "").split()]

    assert [text for text, _ in labels] == ["★ root", "a", "★ b", "★ b1", "b2", "c"]
    x = dict(labels)
    assert x["★ root"] < x["a"] == x["★ b"] == x["c"] < x["★ b1"] == x["b2"]


def test_markup_in_a_task_name_or_reason_stays_text() -> None:
    timeline = tree(task("root", None, 0, 5), task("x", "root", 1, 2,
                                                   waited_for="<b>&\"quotes\"</b>"))
    found = bars(render_svg(timeline, ["root", "x"]))
    assert "<b>&\"quotes\"</b>" in (found[1].findtext(f"{SVG}title") or "")


def test_the_html_page_holds_the_same_svg_and_fetches_nothing() -> None:
    timeline = build_tree()
    page = render_html(timeline, critical_path(timeline)).decode()

    assert page.startswith("<!DOCTYPE html>")
    assert page.count('class="bar ') == 6
    assert "src=" not in page and "href=" not in page


def test_a_unique_suffix_is_shortened_in_labels_only() -> None:
    name = "compile_1712345678_3f2a9c1d-1234-4abc-8def-0123456789ab"
    assert short_name(name) == "compile·3f2a9c1d"
    assert short_name("plain") == "plain"
    assert short_name("x" * 80).endswith("…") and len(short_name("x" * 80)) == 48


# ---- the command, on a stand-in client --------------------------------------------------
class FakeClient:
    def __init__(self, answer: TreeTimelineResponse | Exception) -> None:
        self.answer = answer

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def tree_timeline(self, root: str) -> TreeTimelineResponse:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture
def answer(monkeypatch: pytest.MonkeyPatch) -> list[TreeTimelineResponse | Exception]:
    """What the coordinator will answer the command's tree-timeline request."""
    given: list[TreeTimelineResponse | Exception] = []
    monkeypatch.setattr(cli, "_client", lambda args: FakeClient(given[0]))
    # main() points the logs at this test's captured stderr, closed after it: later tests
    # would log into a closed file.
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    return given


def test_the_command_writes_the_picture_and_says_what_it_drew(
        answer: list[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    answer.append(build_tree())
    target = tmp_path / "tree.svg"

    assert cli.main(["timeline", "root", "--out", str(target)]) == 0
    assert len(bars(target.read_bytes())) == 6
    assert capsys.readouterr().out == (f"wrote {target}: 6 tasks, 6 attempts; critical path: "
                                       "root → b → b1 (51.0 s)\n")


def test_an_html_file_gets_the_page(answer: list[Any], tmp_path: Path) -> None:
    answer.append(build_tree())
    assert cli.main(["timeline", "root", "--out", str(tmp_path / "tree.html")]) == 0
    assert (tmp_path / "tree.html").read_text().startswith("<!DOCTYPE html>")


def test_another_suffix_is_one_sentence_and_exit_2(
        answer: list[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["timeline", "root", "--out", str(tmp_path / "tree.png")]) == 2
    assert capsys.readouterr().err == ("vespid timeline: --out must name a .svg or .html "
                                       "file, not 'tree.png'\n")
    assert not (tmp_path / "tree.png").exists()


@pytest.mark.parametrize("reply", [RemoteError("not_found", "no task named 'nope'"),
                                   tree(task("nope", None, 0, 1)).model_copy(
                                       update={"tasks": [], "total": 0})])
def test_an_unknown_root_is_said_and_exits_4(
        answer: list[Any], reply: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    answer.append(reply)
    assert cli.main(["timeline", "nope", "--out", str(tmp_path / "x.svg")]) == 4
    assert "no task named 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.svg").exists()
