"""Restart benchmark: a coordinator holding N tasks is stopped and started again on the same
state file; how soon it answers, and how much memory it holds (issue 14, target 5: task-info
answered within 2 s of the start, RSS at 100,000 tasks <= 400 MB).

Fill (not timed): with no node joined yet, a raw client publishes N task-creates, a mix of
85 % plain tasks, 10 % in trees (a parent and 4 children) and 5 % that ask for a GPU no node
has and stay idle; then M simulated raw nodes join and run everything they can (one attempt
each, ended ok at once). Once task-list counts them complete, the coordinator's memory is
read (/proc: VmRSS, VmHWM) and it is stopped with SIGTERM.

Restart: a new coordinator process on the same state file. Right after starting it, the
client sends a task-info (a tree's parent), a node-list and a new, runnable task-create; they
wait in the coordinator's durable queue, so each reply (and the new task's task-run at a
node) comes the first moment the coordinator can give it. Times are from the process start.

After it, the same state is restarted again (`--restarts`, 5 in all by default), each time
timing only the first task-info: one start on a shared machine varies by a third, so the
target is judged on their median.

    .venv/bin/python -m bench.restart [--quick] [--tasks N] [--nodes M] [--restarts K]
                                      [--keep-state PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import (
    COORDINATOR_QUEUE,
    BenchError,
    ChildProcess,
    Coordinator,
    Deadline,
    NodeSpec,
    Peer,
    SimSpec,
    SimStats,
    bench_parser,
    count_status,
    fmt,
    log,
    markdown_table,
    run_bench,
    simulator_main,
    size_options,
    start_bench,
    task_create,
    vespid_farm,
    wait_for_total,
    wind_down,
)
from bench.throughput import wait_for_nodes

FULL_TASKS, QUICK_TASKS = 100_000, 10_000
NODES = 100
RESTARTS = 5
CHILDREN = 4  # per tree: a parent and this many children
TARGET_ANSWER, TARGET_RSS_MB = 2.0, 400.0
STALL = 60.0  # no new task-run for this long ends the fill
SETTLE = 2.0  # seconds of quiet before the memory is read
AFTER = 5.0  # seconds after the restart's last answer before its memory is read again
# What the coordinator logs at level info while it starts, in order.
MILESTONES = [("settings", "settings read"),
              ("coordinator_active", "state loaded"),
              ("coordinator_consuming", "consuming")]
SCRIPT = """\
import os
import subprocess
import sys

# A typical build step: check out, build and test one component of the tree.
component = os.environ["COMPONENT"]
subprocess.run(["git", "checkout", os.environ["COMMIT"]], check=True)
done = subprocess.run(["make", "-C", component, "-j", os.environ["VESPID_CORES"], "test"])
sys.exit(done.returncode)
"""


@dataclass
class Mix:
    bodies: list[bytes] = field(default_factory=list)
    runnable: int = 0
    idle: int = 0
    trees: int = 0
    children: int = 0
    a_parent: str | None = None


@dataclass
class Memory:
    rss_mb: float | None = None
    hwm_mb: float | None = None

    def text(self) -> str:
        return f"{fmt(self.rss_mb)} MB (peak {fmt(self.hwm_mb)} MB)"


@dataclass
class Result:
    tasks: int
    nodes: int
    fill_seconds: float | None = None
    ingest_seconds: float | None = None
    state_mb: float | None = None
    warm_info_ms: float | None = None
    empty: Memory = field(default_factory=Memory)  # the same process before the fill
    before: Memory = field(default_factory=Memory)
    stop_seconds: float | None = None
    to_info: float | None = None
    to_node_list: float | None = None
    to_decision: float | None = None
    at_info: Memory = field(default_factory=Memory)
    cpu_at_info: float | None = None  # CPU seconds the restarted process had used by then
    after: Memory = field(default_factory=Memory)
    milestones: dict[str, float] = field(default_factory=dict)  # label -> s after start
    loaded_tasks: int | None = None
    restarts: int = 1
    to_info_again: list[float] = field(default_factory=list)  # the restarts after the first
    notes: list[str] = field(default_factory=list)

    @property
    def to_info_all(self) -> list[float]:
        return ([] if self.to_info is None else [self.to_info]) + self.to_info_again


# ---- the workload -------------------------------------------------------------------------
def task_name(index: int, pretty: str) -> str:
    """As the client names tasks: <pretty name>_<time>_<uuid>."""
    return f"{pretty}_20261125T120000_{uuid.UUID(int=index).hex}"


def task_body(index: int, pretty: str, **extra: Any) -> bytes:
    requirements: dict[str, Any] = {"cores": (1, 2, 4)[index % 3],
                                    "memory": 1000 * (1 + index % 4)}
    requirements.update(extra.pop("requirements", {}))
    environment = {"COMPONENT": f"lib{index % 97}", "BRANCH": "main",
                   "COMMIT": f"{index:040x}"}
    return task_create(task_name(index, pretty), requirements, name_pretty=pretty,
                       executable_pyscript=SCRIPT, environment=environment, **extra)


def make_mix(count: int) -> Mix:
    """In every 100 tasks: 2 trees of a parent and 4 children, 5 idle, 85 plain."""
    mix = Mix()
    parent: str | None = None
    for index in range(count):
        slot = index % 100
        if slot < 10 and slot % (CHILDREN + 1) == 0:
            parent = task_name(index, "release")
            mix.bodies.append(task_body(index, "release"))
            mix.trees += 1
            mix.a_parent = mix.a_parent or parent
        elif slot < 10:
            mix.bodies.append(task_body(index, "component", parent=parent))
            mix.children += 1
        elif slot < 15:
            mix.bodies.append(task_body(index, "gpu_tests",
                                        requirements={"usage_require_gpu": True, "gpus": 1}))
            mix.idle += 1
            continue
        else:
            mix.bodies.append(task_body(index, "unit_tests"))
        mix.runnable += 1
    return mix


def make_nodes(count: int) -> list[NodeSpec]:
    return [NodeSpec(f"rs{index:04d}", {"cores": 16, "memory": 64000})
            for index in range(count)]


def probe_body() -> tuple[str, bytes]:
    name = f"restart_probe_{uuid.uuid4().hex}"
    return name, task_create(name, {"cores": 1, "memory": 100})


# ---- memory -------------------------------------------------------------------------------
def memory_of(pid: int | None) -> Memory:
    """VmRSS and VmHWM of a live process (/proc/PID/status), in MB."""
    memory = Memory()
    if pid is None:
        return memory
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                megabytes = int(value.split()[0]) / 1024
                if key == "VmRSS":
                    memory.rss_mb = megabytes
                else:
                    memory.hwm_mb = megabytes
    return memory


def cpu_of(pid: int | None) -> float | None:
    """CPU seconds (user + system) a live process has used (/proc/PID/stat): unlike the
    wall-clock times, not stretched by other work on a shared machine."""
    if pid is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def state_megabytes(workdir: Path) -> float:
    files = workdir.glob("state.sqlite3*")
    return sum(f.stat().st_size for f in files) / 1e6


# ---- the fill -----------------------------------------------------------------------------
def ingest(peer: Peer, coordinator: Coordinator, mix: Mix, result: Result,
           deadline: Deadline) -> None:
    """Every task-create taken while no node is there: all N idle."""
    first, _last = peer.publish_many(mix.bodies)
    while not deadline.expired():
        coordinator.check_alive()
        depth = peer.queue_depth(COORDINATOR_QUEUE)
        if depth is not None and depth[0] == 0:
            reply = wait_for_total(peer, "idle", len(mix.bodies), deadline.within(5), 0.2)
            if reply is not None:
                result.ingest_seconds = reply.received - first
                return
        peer.pump(0.2)
    raise BenchError(f"ingestion unfinished at the deadline: "
                     f"{count_status(peer, 'idle', Deadline.after(15))} of "
                     f"{len(mix.bodies)} tasks taken")


def run_all(peer: Peer, sim: ChildProcess, coordinator: Coordinator, mix: Mix,
            deadline: Deadline) -> None:
    """The nodes join and run every runnable task; until task-list counts them complete."""
    sim.send("join")
    last_progress, last_count = time.monotonic(), -1
    while not deadline.expired():
        sim.poll(0.2)
        coordinator.check_alive()
        stats: SimStats = sim.latest.get("progress", SimStats())
        if stats.distinct >= mix.runnable:
            break
        if stats.distinct > last_count:
            last_progress, last_count = time.monotonic(), stats.distinct
        elif time.monotonic() - last_progress > STALL:
            raise BenchError(f"stalled at {stats.distinct} of {mix.runnable} task-runs")
    if wait_for_total(peer, "complete", mix.runnable, deadline.within(120)) is None:
        raise BenchError("the runnable tasks were not all complete before the deadline")


def fill(peer: Peer, sim: ChildProcess, coordinator: Coordinator, mix: Mix, result: Result,
         deadline: Deadline) -> None:
    started = time.monotonic()
    ingest(peer, coordinator, mix, result, deadline)
    log.info("restart: %d tasks ingested in %.1f s; %d nodes join", len(mix.bodies),
             result.ingest_seconds or 0, result.nodes)
    run_all(peer, sim, coordinator, mix, deadline)
    wait_for_nodes(peer, result.nodes, deadline.within(60))
    result.fill_seconds = time.monotonic() - started
    peer.pump(SETTLE)
    if mix.a_parent is not None:
        reply = peer.request(task_info(mix.a_parent), deadline.within(30))
        result.warm_info_ms = None if reply is None else 1000 * reply.latency
    result.before = memory_of(coordinator.pid)
    result.state_mb = state_megabytes(coordinator.workdir)


def task_info(name: str) -> dict[str, Any]:
    return {"command": "task-info", "name": name}


# ---- the restart --------------------------------------------------------------------------
@dataclass
class Probes:
    """What the client asks the moment the new process starts."""

    info: str
    node_list: str
    started: float  # monotonic, just before the process was started
    started_wall: float


def restart(peer: Peer, sim: ChildProcess, coordinator: Coordinator, mix: Mix,
            result: Result, deadline: Deadline) -> Probes:
    stopping = time.monotonic()
    coordinator.stop()
    result.stop_seconds = time.monotonic() - stopping
    coordinator.log_level = "info"  # its start-up milestones, with timestamps
    started_wall, started = time.time(), time.monotonic()
    coordinator.start()
    assert mix.a_parent is not None
    probes = Probes(peer.ask(task_info(mix.a_parent)), peer.ask({"command": "node-list"}),
                    started, started_wall)
    peer.publish(probe_body()[1])
    wait_for_answers(peer, sim, coordinator, probes, result, deadline)
    return probes


def restart_again(peer: Peer, coordinator: Coordinator, mix: Mix, result: Result,
                  deadline: Deadline) -> None:
    """Stop and start it once more; only the first task-info is timed."""
    coordinator.stop()
    started = time.monotonic()
    coordinator.start()
    assert mix.a_parent is not None
    reply = peer.request(task_info(mix.a_parent), deadline)  # stamped as it arrives
    if reply is not None:
        result.to_info_again.append(reply.received - started)
        return
    coordinator.check_alive()
    result.notes.append("a further restart's task-info was not answered before the deadline")


def wait_for_answers(peer: Peer, sim: ChildProcess, coordinator: Coordinator, probes: Probes,
                     result: Result, deadline: Deadline) -> None:
    while not deadline.expired():
        peer.pump(0.005)
        info = peer.take_reply(probes.info)
        if info is not None:
            result.at_info = memory_of(coordinator.pid)
            result.cpu_at_info = cpu_of(coordinator.pid)
            result.to_info = info.received - probes.started
            check_info(info.body, result)
        listed = peer.take_reply(probes.node_list)
        if listed is not None:
            result.to_node_list = listed.received - probes.started
        sim.poll(0)
        decided = sim.latest.get("progress", SimStats()).expected_run
        if decided is not None:
            result.to_decision = decided - probes.started
        if None not in (result.to_info, result.to_node_list, result.to_decision):
            return
        coordinator.check_alive()
    result.notes.append("not every request was answered after the restart before the "
                        "deadline")


def check_info(body: dict[str, Any], result: Result) -> None:
    if body.get("status") != "complete" or len(body.get("children") or ()) != CHILDREN:
        result.notes.append(f"the task-info after the restart looks wrong: status "
                            f"{body.get('status')!r}, {len(body.get('children') or ())} "
                            "children")


def read_milestones(coordinator: Coordinator, probes: Probes, result: Result) -> None:
    """Seconds from the start to each milestone the restarted coordinator logged."""
    labels = dict(MILESTONES)
    for line in coordinator.log_lines():
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            record = json.loads(line)
            at = datetime.fromisoformat(record["timestamp"]).timestamp()
            label = labels.get(record["event"])
            if label and at >= probes.started_wall and label not in result.milestones:
                result.milestones[label] = at - probes.started_wall
            if record["event"] == "coordinator_active" and at >= probes.started_wall:
                result.loaded_tasks = int(record["tasks"])


# ---- one run ------------------------------------------------------------------------------
def run(result: Result, keep_state: Path | None, deadline: Deadline) -> None:
    mix = make_mix(result.tasks)
    with ExitStack() as stack:
        farm = vespid_farm(stack, "vespid-bench-restart")
        url, coordinator, peer = farm.url, farm.coordinator, farm.peer
        spec = SimSpec(url, make_nodes(result.nodes), mix.runnable + 1)
        sim = ChildProcess(simulator_main, (spec,), "node simulator")
        try:
            coordinator.wait_ready(peer, deadline.within(90))
            result.empty = memory_of(coordinator.pid)
            sim.start()
            stack.callback(sim.stop)
            sim.wait_for("declared", deadline.within(120))
            fill(peer, sim, coordinator, mix, result, deadline)
            log.info("restart: filled in %.1f s, RSS %s; restarting", result.fill_seconds or 0,
                     result.before.text())
            probes = restart(peer, sim, coordinator, mix, result, deadline.within(120))
            peer.pump(AFTER)
            result.after = memory_of(coordinator.pid)
            read_milestones(coordinator, probes, result)
            for _ in range(result.restarts - 1):
                restart_again(peer, coordinator, mix, result, deadline.within(120))
            if keep_state is not None:
                keep(coordinator, keep_state)
        except BenchError as exc:
            result.notes.append(str(exc))
        finally:
            wind_down(sim, coordinator, result.notes)


def keep(coordinator: Coordinator, target: Path) -> None:
    """A copy of the state file (SQLite's own backup: consistent while it runs)."""
    import sqlite3

    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(coordinator.workdir / "state.sqlite3")) as source, \
            contextlib.closing(sqlite3.connect(target)) as copy:
        source.backup(copy)
    shutil.copymode(coordinator.workdir / "state.sqlite3", target)
    log.info("restart: state kept in %s", target)


# ---- the report ---------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def seconds(value: float | None) -> str:
    return fmt(value, 2, " s")


def answer_rows(result: Result) -> list[list[str]]:
    times = result.to_info_all
    median = statistics.median(times) if times else None
    answered = None if median is None else median <= TARGET_ANSWER
    return [
        [f"first task-info answered, median of {len(times)} restarts",
         f"{seconds(median)} ({seconds(min(times, default=None))} to "
         f"{seconds(max(times, default=None))})", f"≤ {TARGET_ANSWER:g} s: {verdict(answered)}"],
        ["first task-info answered, first restart (the rows below are of it)",
         seconds(result.to_info), ""],
        ["CPU the process had used by its first task-info", seconds(result.cpu_at_info),
         "user + system; the wall-clock rows also hold waiting for a shared CPU"],
        ["first node-list answered", seconds(result.to_node_list), ""],
        ["first decision (a new task's task-run at a node)", seconds(result.to_decision), ""],
        *[[f"log: {label}", seconds(at), "the coordinator's own timestamp"]
          for label, at in result.milestones.items()],
    ]


def per_task_kb(result: Result) -> float | None:
    full, empty = result.before.rss_mb, result.empty.rss_mb
    if full is None or empty is None or result.tasks <= 0:
        return None
    return 1024 * (full - empty) / result.tasks


def rss_target(result: Result) -> str:
    """Met or missed at 100,000 tasks: measured there, else projected from the slope."""
    rss, per_task, empty = result.before.rss_mb, per_task_kb(result), result.empty.rss_mb
    if result.tasks == FULL_TASKS and rss is not None:
        return f"≤ {TARGET_RSS_MB:g} MB: {verdict(rss <= TARGET_RSS_MB)}"
    if per_task is None or empty is None:
        return "—"
    projected = empty + per_task * FULL_TASKS / 1024
    return (f"≤ {TARGET_RSS_MB:g} MB at {FULL_TASKS:,}: projected {projected:,.0f} MB "
            f"({verdict(projected <= TARGET_RSS_MB)})")


def memory_rows(result: Result) -> list[list[str]]:
    return [
        ["started, empty state (before the fill)", result.empty.text(), ""],
        [f"after the fill ({result.tasks:,} tasks)", result.before.text(),
         f"{fmt(per_task_kb(result), 2, ' KB')} a task over the empty one; "
         f"{rss_target(result)}"],
        ["restarted, at its first task-info", result.at_info.text(), ""],
        [f"restarted, {AFTER:g} s after its last answer", result.after.text(), ""],
    ]


def load_line(result: Result) -> str:
    settings, loaded = (result.milestones.get(label) for label in
                        ("settings read", "state loaded"))
    if settings is None or loaded is None or not result.loaded_tasks:
        return ""
    per_task = 1e6 * (loaded - settings) / result.loaded_tasks
    return (f"\n\nSettings read → state loaded: {loaded - settings:.2f} s, "
            f"{per_task:.0f} µs a task.")


def report_sections(result: Result) -> list[str]:
    sections = [
        f"{result.tasks:,} tasks, {result.nodes} simulated raw nodes; filled in "
        f"{seconds(result.fill_seconds)} (ingest {seconds(result.ingest_seconds)}); state file "
        f"{fmt(result.state_mb)} MB; a task-info to the warm coordinator took "
        f"{fmt(result.warm_info_ms, 2, ' ms')}; SIGTERM to exit {seconds(result.stop_seconds)};"
        f" tasks loaded at restart: "
        f"{'—' if result.loaded_tasks is None else f'{result.loaded_tasks:,}'}.",
        "Restart, from the new process's start:\n\n" + markdown_table(
            ["what", "after", "target"], answer_rows(result)) + load_line(result),
        "Coordinator memory (VmRSS, peak VmHWM):\n\n" + markdown_table(
            ["when", "RSS", "target"], memory_rows(result)),
    ]
    if result.notes:
        sections.append("Notes:\n" + "\n".join(f"- {note}" for note in result.notes))
    sections.append(
        "How to read it: the state holds, per 100 tasks, 2 trees (a parent and 4 children), "
        "5 tasks waiting for a GPU no node has (idle) and 85 plain tasks, each with a "
        f"{len(SCRIPT)}-byte script and three environment entries; every task but the idle ones "
        "ran once and ended ok. The three requests are sent right after the new process is "
        "started and wait in the coordinator's queue, so each time is process start → the "
        "first moment the coordinator could answer: interpreter and imports, reading the "
        "state file into memory, declaring the known nodes' queues, connecting, and the "
        "first batch. The *log* rows split it, from the coordinator's own timestamps (wall "
        "clock, so a few ms apart from the others). *first decision* is a new runnable task, "
        "created at the same moment, reaching a node's queue consumer.")
    return sections


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench.restart", __doc__)
    size_options(parser, QUICK_TASKS, FULL_TASKS, "tasks in the state (N)",
                 "wall-clock cap for the run (default 15)", 15.0)
    parser.add_argument("--nodes", type=int, default=NODES,
                        help=f"simulated nodes (default {NODES})")
    parser.add_argument("--restarts", type=int, default=RESTARTS,
                        help=f"restarts in all; the target is judged on the median of their "
                             f"first task-info (default {RESTARTS})")
    parser.add_argument("--keep-state", type=Path,
                        help="copy the state file here at the end (to profile a load alone)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    start_bench()
    args = parse_args(argv)
    result = Result(args.tasks or (QUICK_TASKS if args.quick else FULL_TASKS), args.nodes,
                    restarts=max(1, args.restarts))
    return run_bench("Vespid restart benchmark",
                     lambda: run(result, args.keep_state, Deadline.after(60 * args.cap_minutes)),
                     lambda: report_sections(result))


if __name__ == "__main__":
    sys.exit(main())
