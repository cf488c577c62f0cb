"""A tree's shape in time: its critical path, and the picture `vespid timeline` writes.

Pure functions of a `TreeTimelineResponse` (what `Client.tree_timeline` returns): no I/O, so
the CLI, the dashboard and the tests share them. The picture is an SVG built as an element
tree (never markup pasted from strings, so a task name cannot break it), one row per task,
its waits light and its attempts as bars coloured by outcome, the critical path outlined.
"""

from __future__ import annotations

import io
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass

from vespid.shared.protocol import TimelineAttempt, TimelineTask, TreeTimelineResponse

# One colour per outcome, told apart also by people who do not see red from green well
# (Tableau 10): what a build monitor's users expect, green ok, yellow warning, reds failed.
OUTCOME_COLOURS: dict[str, str] = {
    "running": "#4e79a7",
    "ok": "#59a14f",
    "warning": "#edc948",
    "error": "#e15759",
    "fatal": "#9c1b1f",
    "terminated": "#b07aa1",
    "lost": "#f28e2b",
    "replaced": "#bab0ac",
}
WAIT_COLOUR = "#dde3ea"
CRITICAL_STROKE = "#111111"
CRITICAL_ROW = "#fff6d5"
CRITICAL_MARK = "★ "
SVG_NS = "http://www.w3.org/2000/svg"

ROW, BAR, WAIT = 22, 14, 6  # heights in px: a task's row, an attempt's bar, a wait's bar
PAD, HEAD, LEGEND, AXIS = 12, 30, 24, 26
CHART_WIDTH = 900
CHAR_WIDTH = 7.3  # px of one 12 px monospace character: how wide the label column is
INDENT = 14
MAX_LABEL = 48  # characters; longer names are cut in the label (the hover shows them whole)
_UNIQUE = re.compile(r"^(?P<base>.+)_\d{9,11}_(?P<id>[0-9a-f]{8})-[0-9a-f-]{27}$")


# ---- the critical path ------------------------------------------------------------------
def subtree_ends(tree: TreeTimelineResponse) -> dict[str, float]:
    """When each task's subtree finished: the latest end among the task and its
    descendants, a task still running or waiting counting as `tree.now`."""
    ends = {task.name: _own_end(task, tree.now) for task in tree.tasks}
    for task in reversed(tree.tasks):  # parents come before children: children fold first
        if task.parent in ends:
            ends[task.parent] = max(ends[task.parent], ends[task.name])
    return ends


def critical_path(tree: TreeTimelineResponse) -> list[str]:
    """The chain of tasks, from the root down, that decided when the tree finished.

    A task's subtree finishes at the latest end among the task and its descendants (a task
    still running or waiting counts as `tree.now`). From the root, step to the child whose
    subtree finished last (on a tie, the child that started last: a task not started yet
    counts as starting now; then the one listed last), and again from there, until a task
    without children. The root alone is the path of a one-task tree; an unknown root gives
    an empty path."""
    names = {task.name for task in tree.tasks}
    if tree.root not in names:
        return []
    ends = subtree_ends(tree)
    children = _children(tree)
    path = [tree.root]
    while children.get(path[-1]):
        kids = children[path[-1]]
        latest = max(range(len(kids)), key=lambda i: (ends[kids[i].name],
                                                      _started(kids[i], tree.now), i))
        path.append(kids[latest].name)
    return path


def total_seconds(tree: TreeTimelineResponse) -> float:
    """From the tree's first creation to when its root's subtree finished (so far)."""
    if not tree.tasks:
        return 0.0
    end = subtree_ends(tree).get(tree.root, tree.now)
    return max(0.0, end - _first_time(tree))


def _own_end(task: TimelineTask, now: float) -> float:
    if task.status != "complete":
        return now
    times = [task.time_finish, task.time_start, task.time_create,
             *(a.end for a in task.attempts)]
    return max((t for t in times if t is not None), default=now)


def _started(task: TimelineTask, now: float) -> float:
    return now if task.time_start is None else task.time_start


def _children(tree: TreeTimelineResponse) -> dict[str, list[TimelineTask]]:
    children: dict[str, list[TimelineTask]] = {}
    for task in tree.tasks:
        if task.parent is not None and task.name != tree.root:
            children.setdefault(task.parent, []).append(task)
    return children


def _first_time(tree: TreeTimelineResponse) -> float:
    times = [t for task in tree.tasks for t in (task.time_create, task.time_start)
             if t is not None]
    times += [a.queued if a.queued is not None else a.start
              for task in tree.tasks for a in task.attempts]
    return min(times, default=tree.now)


# ---- core slots -------------------------------------------------------------------------
def slot_lanes(attempts: list[TimelineAttempt], cores: float) -> dict[tuple[str, int], int]:
    """Which core slot of its node each attempt is drawn in: (task, attempt) -> slot.

    The node granted `ceil(cores)` slots (at least one). By start time, each attempt takes
    the lowest slot free when it starts (one ending exactly then has freed it); an attempt
    granted several cores is drawn in its first. Two attempts that overlap in time never
    share a slot: when none is free (a node that reported more than it granted, a late
    attempt) an extra slot is opened past the granted ones."""
    busy_until: list[float] = [-math.inf] * max(1, math.ceil(cores))
    lanes: dict[tuple[str, int], int] = {}
    for attempt in sorted(attempts, key=lambda a: (a.start, a.task, a.attempt)):
        free = [i for i, until in enumerate(busy_until) if until <= attempt.start]
        slot = free[0] if free else len(busy_until)
        if not free:
            busy_until.append(-math.inf)
        busy_until[slot] = math.inf if attempt.end is None else attempt.end
        lanes[(attempt.task, attempt.attempt)] = slot
    return lanes


# ---- the picture ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Scale:
    """Where a moment and a row are drawn."""

    start: float
    span: float
    left: float
    top: float

    def x(self, when: float) -> float:
        return self.left + (when - self.start) / self.span * CHART_WIDTH

    def width(self, begin: float, end: float) -> float:
        return max(1.0, self.x(end) - self.x(begin))  # a blink of a task stays visible

    def row(self, index: int) -> float:
        return self.top + index * ROW


def short_name(name: str) -> str:
    """A name as a label: `build_1712345678_3f2a…` (the client's unique suffix) becomes
    `build·3f2a9c1d`; the full name stays in the bar's data and hover text."""
    match = _UNIQUE.match(name)
    label = f"{match['base']}·{match['id']}" if match else name
    return label if len(label) <= MAX_LABEL else label[:MAX_LABEL - 1] + "…"


def render_svg(tree: TreeTimelineResponse, critical: list[str]) -> bytes:
    """The tree as an SVG file: one row per task (indented by depth), a light bar per wait
    before a start, a bar per attempt coloured by outcome, the critical path outlined and
    starred, a time axis in seconds from the tree's first creation, a title and a legend.
    Every attempt bar is a `rect.bar` with `data-task`, `data-attempt`, `data-node`,
    `data-outcome` and a `<title>` (node, waited, ran, why)."""
    buffer = io.BytesIO()
    ET.ElementTree(_svg_element(tree, critical)).write(buffer, encoding="utf-8",
                                                       xml_declaration=True)
    return buffer.getvalue()


def render_html(tree: TreeTimelineResponse, critical: list[str]) -> bytes:
    """The same picture in a standalone HTML page: no file besides itself is needed."""
    html = ET.Element("html", lang="en")
    head = ET.SubElement(html, "head")
    ET.SubElement(head, "meta", charset="utf-8")
    ET.SubElement(head, "title").text = f"vespid timeline: {tree.root}"
    ET.SubElement(head, "style").text = (
        "body{font-family:sans-serif;margin:16px;color:#222}"
        "rect.bar:hover{opacity:.75}p{max-width:60em}")
    body = ET.SubElement(html, "body")
    ET.SubElement(body, "p").text = (
        "One row per task of the tree, children under their parent. A light bar is a wait "
        "before a start, a coloured bar an attempt from its start to its end, coloured by "
        "outcome. Starred rows with outlined bars are the critical path: the chain of "
        "tasks that decided when the tree finished. Hover a bar for its node and times.")
    body.append(_svg_element(tree, critical))
    text = ET.tostring(html, encoding="unicode", method="html")
    return ("<!DOCTYPE html>\n" + text + "\n").encode()


def _svg_element(tree: TreeTimelineResponse, critical: list[str]) -> ET.Element:
    on_path = set(critical)
    depths = _depths(tree)
    labels = {t.name: (CRITICAL_MARK if t.name in on_path else "") + short_name(t.name)
              for t in tree.tasks}
    label_width = PAD + max((INDENT * depths[name] + CHAR_WIDTH * (len(label) + 1)
                             for name, label in labels.items()), default=80.0)
    first = _first_time(tree)
    last = max([tree.now if a.end is None else a.end for t in tree.tasks for a in t.attempts]
               + [_own_end(t, tree.now) for t in tree.tasks] + [first])
    scale = _Scale(first, max(last - first, 1e-3), label_width, PAD + HEAD + LEGEND)
    width = label_width + CHART_WIDTH + 3 * PAD
    height = scale.row(len(tree.tasks)) + AXIS + PAD
    svg = ET.Element("svg", xmlns=SVG_NS, width=_n(width), height=_n(height),
                     viewBox=f"0 0 {_n(width)} {_n(height)}", role="img")
    svg.set("font-family", "sans-serif")
    svg.set("font-size", "12")
    _title(svg, tree, critical)
    _legend(svg)
    _axis(svg, scale, len(tree.tasks))
    for index, task in enumerate(_rows(tree)):
        label = (PAD + INDENT * depths[task.name], labels[task.name])
        _task_row(svg, scale, index, task, label, task.name in on_path, tree.now)
    return svg


def _title(svg: ET.Element, tree: TreeTimelineResponse, critical: list[str]) -> None:
    attempts = sum(len(t.attempts) for t in tree.tasks)
    running = " so far, still running" if any(t.status != "complete" for t in tree.tasks) \
        else ""
    shown = "" if tree.total <= len(tree.tasks) else f" (of {tree.total})"
    text = (f"{tree.root}: {total_seconds(tree):.1f} s{running}; {len(tree.tasks)} tasks"
            f"{shown}, {attempts} attempts; critical path: "
            + " → ".join(short_name(name) for name in critical))
    node = ET.SubElement(svg, "text", x=_n(PAD), y=_n(PAD + 14))
    node.set("font-size", "15")
    node.set("font-weight", "bold")
    node.text = text


def _legend(svg: ET.Element) -> None:
    x, y = float(PAD), float(PAD + HEAD)
    entries: list[tuple[str, str, str | None]] = [(o, c, None)
                                                   for o, c in OUTCOME_COLOURS.items()]
    entries += [("waiting", WAIT_COLOUR, None), ("critical path", "#ffffff", CRITICAL_STROKE)]
    for label, colour, stroke in entries:
        swatch = ET.SubElement(svg, "rect", x=_n(x), y=_n(y), width="12", height="12",
                               fill=colour)
        swatch.set("class", "legend")
        if stroke:
            swatch.set("stroke", stroke)
            swatch.set("stroke-width", "2")
        ET.SubElement(svg, "text", x=_n(x + 16), y=_n(y + 10)).text = label
        x += 16 + CHAR_WIDTH * len(label) + 14


def _axis(svg: ET.Element, scale: _Scale, rows: int) -> None:
    bottom = scale.row(rows)
    for tick in _ticks(scale.span):
        x = _n(scale.x(scale.start + tick))
        line = ET.SubElement(svg, "line", x1=x, x2=x, y1=_n(scale.top - 4), y2=_n(bottom),
                             stroke="#e4e4e4")
        line.set("class", "tick")
        label = ET.SubElement(svg, "text", x=x, y=_n(bottom + 16))
        label.set("text-anchor", "middle")
        label.text = f"{tick:g} s"


def _ticks(span: float) -> list[float]:
    """Round steps (1, 2 or 5 times a power of ten) giving five to ten ticks over span."""
    rough = span / 6
    power = 10 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= rough)
    return [round(i * step, 9) for i in range(int(span / step + 1e-9) + 1)]


def _task_row(svg: ET.Element, scale: _Scale, index: int, task: TimelineTask,
              label: tuple[float, str], critical: bool, now: float) -> None:
    top = scale.row(index)
    if critical:
        band = ET.SubElement(svg, "rect", x="0", y=_n(top), width=_n(scale.left
                             + CHART_WIDTH + 2 * PAD), height=_n(ROW), fill=CRITICAL_ROW)
        band.set("class", "row critical")
    text = ET.SubElement(svg, "text", x=_n(label[0]), y=_n(top + ROW / 2 + 4))
    text.set("class", "label critical" if critical else "label")
    text.set("font-family", "monospace")
    if critical:
        text.set("font-weight", "bold")
    text.text = label[1]
    ET.SubElement(text, "title").text = task.name
    for wait in _waits(task, now):
        _wait_bar(svg, scale, top, *wait)
    for attempt in task.attempts:
        _attempt_bar(svg, scale, top, task, attempt, critical, now)


def _waits(task: TimelineTask, now: float) -> Iterable[tuple[float, float, str]]:
    """(from, to, hover text) of each wait: before each attempt, and the wait going on now
    for a task not running (idle: from its creation or its last attempt's end)."""
    for attempt in task.attempts:
        if attempt.queued is not None and attempt.queued < attempt.start:
            why = f" for: {task.waited_for}" if task.waited_for and attempt is \
                task.attempts[-1] else ""
            yield attempt.queued, attempt.start, (
                f"{task.name} waited {attempt.start - attempt.queued:.1f} s before attempt "
                f"{attempt.attempt}{why}")
    if task.status is None:
        since = max([a.end for a in task.attempts if a.end is not None]
                    + [task.time_create or now])
        reason = task.waiting_reason or task.waited_for
        yield since, now, (f"{task.name} waiting for {now - since:.1f} s"
                           + (f": {reason}" if reason else ""))


def _wait_bar(svg: ET.Element, scale: _Scale, top: float, begin: float, end: float,
              hover: str) -> None:
    rect = ET.SubElement(svg, "rect", x=_n(scale.x(begin)), y=_n(top + (ROW - WAIT) / 2),
                         width=_n(scale.width(begin, end)), height=_n(WAIT), fill=WAIT_COLOUR)
    rect.set("class", "wait")
    ET.SubElement(rect, "title").text = hover


def _attempt_bar(svg: ET.Element, scale: _Scale, top: float, task: TimelineTask,
                 attempt: TimelineAttempt, critical: bool, now: float) -> None:
    end = now if attempt.end is None else attempt.end
    rect = ET.SubElement(svg, "rect", x=_n(scale.x(attempt.start)), y=_n(top + (ROW - BAR) / 2),
                         width=_n(scale.width(attempt.start, end)), height=_n(BAR), rx="2",
                         fill=OUTCOME_COLOURS[attempt.outcome])
    rect.set("class", f"bar {attempt.outcome}" + (" critical" if critical else ""))
    for key, value in [("task", attempt.task), ("attempt", str(attempt.attempt)),
                       ("node", attempt.node), ("outcome", attempt.outcome)]:
        rect.set(f"data-{key}", value)
    if critical:
        rect.set("stroke", CRITICAL_STROKE)
        rect.set("stroke-width", "2")
    if attempt.late:  # its node reported on it after it was replaced
        rect.set("stroke-dasharray", "3 2")
        rect.set("stroke", rect.get("stroke", "#555555"))
    ET.SubElement(rect, "title").text = _attempt_hover(task, attempt, end)


def _attempt_hover(task: TimelineTask, attempt: TimelineAttempt, end: float) -> str:
    waited = 0.0 if attempt.queued is None else max(0.0, attempt.start - attempt.queued)
    lines = [f"{task.name} attempt {attempt.attempt} on {attempt.node}: {attempt.outcome}",
             f"waited {waited:.1f} s, ran {end - attempt.start:.1f} s"]
    if attempt.why:
        lines.append(f"why: {attempt.why}")
    if task.waited_for and attempt is task.attempts[-1]:
        lines.append(f"waited for: {task.waited_for}")
    if attempt.late:
        lines.append("its node reported on it after it had been replaced")
    return "\n".join(lines)


def _rows(tree: TreeTimelineResponse) -> list[TimelineTask]:
    """The tasks in drawing order: each followed by its subtree (depth first), so a
    task's row sits under its parent's, siblings in the order the coordinator listed them
    (the reply lists a tree level by level)."""
    names = {task.name for task in tree.tasks}
    children = _children(tree)
    stack = [t for t in reversed(tree.tasks) if t.parent not in names or t.name == tree.root]
    rows: list[TimelineTask] = []
    while stack:  # not recursive: a chain of thousands of tasks is a valid tree
        task = stack.pop()
        rows.append(task)
        stack.extend(reversed(children.get(task.name, [])))
    return rows


def _depths(tree: TreeTimelineResponse) -> dict[str, int]:
    depths: dict[str, int] = {}
    for task in tree.tasks:  # parents first, so a parent's depth is known
        depths[task.name] = depths[task.parent] + 1 if task.parent in depths else 0
    return depths


def _n(value: float) -> str:
    """A length as SVG text: at most one decimal, no trailing zeros."""
    return f"{value:.1f}".rstrip("0").rstrip(".")
