"""Scheduling benchmark: how fast the coordinator decides against a deep queue.

For every cell of the grid (simulated nodes x queued tasks), in a private vhost with a fresh
coordinator: W task-creates are queued and taken by the coordinator before any node exists
(ingestion), then N simulated raw nodes join at once and complete every task-run they get
immediately. Measured: first task-run to W-th task-run (decisions per second), and how long
client requests (a task-info and a node-list every 100 ms) wait for their replies meanwhile.

    .venv/bin/python -m bench.scheduling [--quick] [--nodes 10 100] [--tasks 1000] ...
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bench.common import (
    COORDINATOR_QUEUE,
    DEAD_QUEUE,
    BenchError,
    ChildProcess,
    Coordinator,
    Deadline,
    NodeSpec,
    Peer,
    SimSpec,
    SimStats,
    Usage,
    broker_pid,
    count_status,
    describe_log,
    fmt,
    install_signal_handlers,
    log,
    markdown_table,
    private_vhost,
    rate,
    recording,
    setup_logging,
    simulator_main,
    task_create,
    wait_for_total,
    write_report,
)
from bench.floor import FloorStats, drain_floor_main

FULL_GRID = ([10, 100, 1000], [1_000, 10_000, 100_000], 20 * 60)
QUICK_GRID = ([10, 100], [1_000, 10_000], 3 * 60)
CELL_CAP = 10 * 60  # one cell never takes longer than this, whatever the grid cap leaves
STALL = 60.0  # no new task-run for this long ends the cell's drain
PROBE_EVERY = 0.1  # seconds between rounds of requests (one of each kind) during the drain
PROBE_TIMEOUT = 60.0
PROBE_KINDS = ("task-info", "node-list")
TARGET_DECISIONS = 2_500  # issue 14, target 3: decisions/s at 1,000 nodes x 100,000 tasks
TARGET_NODES, TARGET_TASKS = 1_000, 100_000
TARGET_P95 = 0.1  # issue 14, target 4: a request's p95 (s) while 1,000 nodes work
MIN_P95_SAMPLES = 20  # fewer, and a p95 is only the worst request


@dataclass
class Options:
    nodes: list[int]
    tasks: list[int]
    cap: float
    heartbeat: float
    delay: float
    seed: int
    coordinator_env: dict[str, str] = field(default_factory=dict)
    keep_logs: Path | None = None  # a folder each cell's coordinator log is copied to
    floor: bool = False  # each cell again with the contract's floor (bench/floor.py)
    probe_every: float = PROBE_EVERY  # seconds between rounds of requests; 0: none


@dataclass
class Cell:
    nodes: int
    tasks: int
    floor: bool = False  # run by the contract's floor instead of a coordinator
    ingest_seconds: float | None = None
    publish_seconds: float | None = None
    first_after_join: float | None = None
    drain_seconds: float | None = None
    decisions: int = 0
    join_latency: float | None = None  # the first node-list, sent right behind the join
    probe_latencies: dict[str, list[float]] = field(
        default_factory=lambda: {kind: [] for kind in PROBE_KINDS})
    probe_timeouts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(PROBE_KINDS, 0))
    completed: int | None = None
    # Each process over the drain, by role: on a CPU, and runnable but waiting for one.
    usage: dict[str, Usage] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: bool = False


# ---- the workload -------------------------------------------------------------------------
def make_nodes(count: int) -> list[NodeSpec]:
    """Mixed machines: 4-32 cores, 16/64 GB, every 5th with 2 GPUs, every 10th Alice's."""
    nodes = []
    for index in range(count):
        name = f"sim{index:04d}"
        capabilities: dict[str, object] = {"cores": (4, 8, 16, 32)[index % 4],
                                           "memory": (16000, 64000)[(index // 4) % 2]}
        if index % 5 == 2:
            capabilities.update(usage_gpu=True, gpus=2)
        if index % 10 == 9:
            capabilities["usage_require_user_alice"] = True
        repositories = {f"//{name}/vespid/general_1gb_{k}": {"type": "general_1gb"}
                        for k in range(2)}
        nodes.append(NodeSpec(name, capabilities, repositories))
    return nodes


def make_tasks(count: int, seed: int) -> list[bytes]:
    """Mixed tasks; every one of them fits at least one node of make_nodes(10)."""
    rng = random.Random(seed)
    bodies = []
    for index in range(count):
        requirements: dict[str, object] = {"cores": rng.choice((1, 2, 4)),
                                           "memory": 500 * rng.randint(1, 16)}
        if rng.random() < 0.10:
            requirements.update(usage_require_gpu=True, gpus=1)
        if rng.random() < 0.10:
            requirements["usage_user_alice"] = True
        if rng.random() < 0.10:
            requirements["usage_prefer_gpu"] = True
        extra: dict[str, object] = {}
        if rng.random() < 0.20:
            extra["priority"] = rng.randint(1, 3)
        if rng.random() < 0.10:
            extra["repositories"] = {"env": {"request": "general_1gb", "local": True}}
        bodies.append(task_create(f"bench-{index:06d}", requirements, **extra))
    return bodies


# ---- one cell -----------------------------------------------------------------------------
def ingest(peer: Peer, coordinator: Coordinator, bodies: list[bytes], cell: Cell,
           deadline: Deadline) -> bool:
    """Queue every task with no node around; True once the coordinator holds them all."""
    first, last = peer.publish_many(bodies)
    cell.publish_seconds = last - first
    while not deadline.expired():
        coordinator.check_alive()
        depth = peer.queue_depth(COORDINATOR_QUEUE)
        if depth is not None and depth[0] == 0:
            reply = wait_for_total(peer, "idle", len(bodies), deadline.within(2), 0.1)
            if reply is not None:
                cell.ingest_seconds = reply.received - first
                return True
        peer.pump(0.1)
    idle = count_status(peer, "idle", Deadline.after(15))
    dead = peer.queue_depth(DEAD_QUEUE)
    cell.notes.append(f"ingestion unfinished at the deadline: {idle} of {len(bodies)} tasks "
                      f"taken, {dead[0] if dead else '?'} dead-lettered")
    return False


@dataclass
class Probes:
    """A task-info and a node-list request every PROBE_EVERY during the drain, each sent on
    time whether or not the earlier ones were answered (a client does not wait for another's
    reply), so a slow reply shows as itself and not as fewer samples."""

    tasks: int  # task-info asks about bench-000000 .. this many, spread over the queue
    every: float = PROBE_EVERY  # seconds between rounds; 0: only the round behind the join
    outstanding: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> kind, sent
    next_at: float = 0.0
    rounds: int = 0
    join_id: str | None = None  # the first node-list, right behind the joining node-sets

    def task_name(self) -> str:
        return f"bench-{(self.rounds * 7919) % max(1, self.tasks):06d}"


def probe_step(peer: Peer, probes: Probes, cell: Cell, send: bool = True) -> None:
    now = time.monotonic()
    for correlation_id, (kind, sent) in list(probes.outstanding.items()):
        reply = peer.take_reply(correlation_id)
        if reply is not None:
            if correlation_id == probes.join_id:
                cell.join_latency = reply.latency
            cell.probe_latencies[kind].append(reply.latency)
            del probes.outstanding[correlation_id]
        elif now - sent > PROBE_TIMEOUT:
            peer.forget(correlation_id)
            cell.probe_timeouts[kind] += 1
            del probes.outstanding[correlation_id]
    if send and now >= probes.next_at:
        asks = {"node-list": {"command": "node-list"},
                "task-info": {"command": "task-info", "name": probes.task_name()}}
        for kind in ("node-list", "task-info"):
            correlation_id = peer.ask(asks[kind])
            probes.outstanding[correlation_id] = (kind, now)
            if probes.join_id is None:
                probes.join_id = correlation_id
        probes.rounds += 1
        probes.next_at = max(probes.next_at + probes.every, now) if probes.every else math.inf


class Server(Protocol):
    """What a drain needs of the process deciding: a coordinator or the floor."""

    @property
    def pid(self) -> int | None: ...

    def check_alive(self) -> None: ...


@dataclass
class FloorServer:
    child: ChildProcess

    @property
    def pid(self) -> int | None:
        return self.child.process.pid

    def check_alive(self) -> None:
        self.child.poll(0.0)


def drain(peer: Peer, sim: ChildProcess, coordinator: Server, cell: Cell,
          deadline: Deadline, probe_every: float = PROBE_EVERY) -> None:
    """Nodes join; wait for the W-th task-run, probing the coordinator's responsiveness
    (not the floor's: it answers no request)."""
    sim.send("join")
    joined = float(sim.wait_for("joined", deadline.within(60)))
    pids = {"coordinator": coordinator.pid, "simulator": sim.process.pid,
            "broker": broker_pid()}
    probes = None if cell.floor else Probes(cell.tasks, probe_every)
    try:
        with recording(pids, cell.usage):
            if probes is not None:
                probe_step(peer, probes, cell)  # lands right behind the N joining node-sets
            wait_for_last_run(peer, sim, coordinator, probes, cell, deadline)
            if probes is not None:
                finish_probes(peer, probes, cell, deadline)
    finally:  # also on Ctrl-C: keep what was measured
        record_drain(cell, sim.latest.get("progress", SimStats()), joined)


def wait_for_last_run(peer: Peer, sim: ChildProcess, coordinator: Server,
                      probes: Probes | None, cell: Cell, deadline: Deadline) -> None:
    last_progress, last_distinct = time.monotonic(), 0
    while not deadline.expired():
        due = probes.next_at if probes is not None else math.inf
        peer.pump(min(0.05, max(0.0, due - time.monotonic())))
        sim.poll(0.0)
        stats: SimStats = sim.latest.get("progress", SimStats())
        if probes is not None:
            probe_step(peer, probes, cell)
        if stats.expected_run is not None:
            return
        if stats.distinct > last_distinct:
            last_progress, last_distinct = time.monotonic(), stats.distinct
        elif time.monotonic() - last_progress > STALL:
            cell.notes.append(f"stalled: no new task-run for {STALL:.0f} s")
            return
        coordinator.check_alive()
    cell.notes.append("cell deadline reached during the drain")


def finish_probes(peer: Peer, probes: Probes, cell: Cell, deadline: Deadline) -> None:
    """Wait for the replies still due (no new requests), each up to PROBE_TIMEOUT."""
    limit = deadline.within(PROBE_TIMEOUT)
    while probes.outstanding and not limit.expired():
        peer.pump(0.05)
        probe_step(peer, probes, cell, send=False)
    for correlation_id, (kind, _sent) in probes.outstanding.items():
        cell.probe_timeouts[kind] += 1
        peer.forget(correlation_id)
    probes.outstanding.clear()


def record_drain(cell: Cell, stats: SimStats, joined: float) -> None:
    cell.decisions = stats.distinct
    if stats.first_run is None:
        cell.notes.append("no task-run arrived at all")
        return
    cell.first_after_join = stats.first_run - joined
    end = stats.expected_run or stats.last_run
    assert end is not None
    cell.drain_seconds = end - stats.first_run


def check_simulator(cell: Cell, final: SimStats | None, heartbeat: float) -> None:
    if final is None:
        return
    if final.duplicates:
        cell.notes.append(f"{final.duplicates} task-runs for tasks already run")
    if final.kills:
        cell.notes.append(f"{final.kills} task-kills received")
    if final.max_heartbeat_gap > max(5.0, heartbeat * 1.25):
        cell.notes.append(f"simulator fell behind: a node-set gap of "
                          f"{final.max_heartbeat_gap:.1f} s")


def simulator_for(url: str, cell: Cell, options: Options) -> ChildProcess:
    """The cell's simulated nodes (not started), the same for Vespid and the floor."""
    spec = SimSpec(url, make_nodes(cell.nodes), cell.tasks, options.heartbeat, options.delay)
    return ChildProcess(simulator_main, (spec,), "node simulator")


def run_cell(cell: Cell, options: Options, deadline: Deadline) -> None:
    if cell.floor:
        run_floor_cell(cell, options, deadline)
        return
    bodies = make_tasks(cell.tasks, options.seed)
    with ExitStack() as stack:
        url = stack.enter_context(private_vhost("vespid-bench-sched"))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vespid-bench-")))
        coordinator = Coordinator(url, workdir, env=options.coordinator_env)
        stack.callback(coordinator.stop)
        coordinator.start()
        peer = Peer(url)
        stack.callback(peer.close)
        sim = simulator_for(url, cell, options)
        try:
            coordinator.wait_ready(peer, deadline.within(90))
            sim.start()
            stack.callback(sim.stop)
            sim.wait_for("declared", deadline.within(300))
            log.info("  %d nodes declared; queueing %d tasks", cell.nodes, cell.tasks)
            if ingest(peer, coordinator, bodies, cell, deadline):
                log.info("  ingested in %.1f s; nodes join", cell.ingest_seconds or 0)
                drain(peer, sim, coordinator, cell, deadline, options.probe_every)
                if cell.decisions >= cell.tasks:
                    reply = wait_for_total(peer, "complete", cell.tasks, deadline.within(60))
                    cell.completed = (int(reply.body["total"]) if reply else
                                      count_status(peer, "complete", Deadline.after(15)))
        except BenchError as exc:
            cell.notes.append(str(exc))
        finally:
            check_simulator(cell, sim.stop() if sim.process.pid else None, options.heartbeat)
            coordinator.stop()
            if options.keep_logs is not None:
                options.keep_logs.mkdir(parents=True, exist_ok=True)
                kept = options.keep_logs / f"coordinator-{cell.nodes}x{cell.tasks}.log"
                shutil.copyfile(coordinator.log_path, kept)
                log.info("  the coordinator's log: %s", kept)
            note = describe_log(coordinator.log_summary())
            if note:
                cell.notes.append(note)


def run_floor_cell(cell: Cell, options: Options, deadline: Deadline) -> None:
    """The same cell with the contract's floor deciding (bench/floor.py, DrainFloor): the
    same tasks held, the same simulated nodes joining; its rate bounds any coordinator's."""
    bodies = make_tasks(cell.tasks, options.seed)
    with ExitStack() as stack:
        url = stack.enter_context(private_vhost("vespid-bench-sched-floor"))
        peer = Peer(url)
        stack.callback(peer.close)
        floor = ChildProcess(drain_floor_main, (url, cell.tasks), "floor coordinator")
        sim = simulator_for(url, cell, options)
        try:
            for child, ready in ((floor, "ready"), (sim, "declared")):
                child.start()
                stack.callback(child.stop)
                child.wait_for(ready, deadline.within(300))
            log.info("  %d nodes declared; queueing %d tasks at the floor", cell.nodes,
                     cell.tasks)
            if hold_all(peer, floor, bodies, cell, deadline):
                drain(peer, sim, FloorServer(floor), cell, deadline)
                cell.completed = floor_completes(floor, cell.tasks, deadline.within(60))
        except BenchError as exc:
            cell.notes.append(str(exc))
        finally:
            check_simulator(cell, sim.stop() if sim.process.pid else None, options.heartbeat)


def hold_all(peer: Peer, floor: ChildProcess, bodies: list[bytes], cell: Cell,
             deadline: Deadline) -> bool:
    """Queue every task; True once the floor holds them all (their events confirmed)."""
    first, last = peer.publish_many(bodies)
    cell.publish_seconds = last - first
    while not deadline.expired():
        floor.poll(0.05)
        stats: FloorStats = floor.latest.get("progress", FloorStats())
        if stats.creates >= len(bodies):
            cell.ingest_seconds = time.monotonic() - first
            log.info("  the floor holds them after %.1f s; nodes join", cell.ingest_seconds)
            return True
    cell.notes.append("the floor did not take every task-create in time")
    return False


def floor_completes(floor: ChildProcess, tasks: int, deadline: Deadline) -> int:
    while not deadline.expired():
        floor.poll(0.05)
        stats: FloorStats = floor.latest.get("progress", FloorStats())
        if stats.completes >= tasks:
            break
    return int(floor.latest.get("progress", FloorStats()).completes)


# ---- the grid and the report --------------------------------------------------------------
def run_grid(options: Options) -> list[Cell]:
    """Cheapest cells first (by queue depth, then nodes), so the cap skips the dearest; with
    --floor, each cell's floor right after it."""
    grid = Deadline.after(options.cap)
    order = sorted(((n, w) for n in options.nodes for w in options.tasks),
                   key=lambda nodes_tasks: (nodes_tasks[1], nodes_tasks[0]))
    cells = [Cell(n, w, floor) for n, w in order
             for floor in ((False, True) if options.floor else (False,))]
    for index, cell in enumerate(cells):
        try:
            run_or_skip(cell, options, grid)
        except KeyboardInterrupt:
            cell.notes.append("interrupted (Ctrl-C or signal) during this cell")
            for later in cells[index + 1:]:
                later.skipped = True
                later.notes.append("not run: interrupted")
            report_interrupted(cells)
    return cells


def run_or_skip(cell: Cell, options: Options, grid: Deadline) -> None:
    if grid.expired():
        cell.skipped = True
        cell.notes.append(f"skipped: the grid cap of {options.cap / 60:g} min was reached")
        return
    log.info("cell: %d nodes x %d tasks%s (%.0f s left of the grid cap)", cell.nodes,
             cell.tasks, ", the contract's floor" if cell.floor else "", grid.remaining())
    run_cell(cell, options, grid.within(CELL_CAP))


def report_interrupted(cells: list[Cell]) -> None:
    """Print what was measured before the interrupt, then exit like an interrupt."""
    write_report("Vespid scheduling benchmark (interrupted)", report_sections(cells, None))
    sys.exit(130)


def row(cell: Cell) -> list[str]:
    who = "contract floor" if cell.floor else "Vespid"
    if cell.skipped:
        return [who, str(cell.nodes), f"{cell.tasks:,}", *["—"] * 10, "; ".join(cell.notes)]
    per_second = rate(cell.decisions, cell.drain_seconds)
    partial = cell.decisions < cell.tasks
    decided = (f"{fmt(per_second)} (partial: {cell.decisions:,}/{cell.tasks:,})" if partial
               else fmt(per_second))
    return [who, str(cell.nodes), f"{cell.tasks:,}",
            fmt(rate(cell.tasks, cell.ingest_seconds)),
            fmt(cell.first_after_join, 2), fmt(cell.drain_seconds, 2), decided,
            fmt(ms(1 / per_second) if per_second else None, 3),
            fmt(ms(cell.join_latency)),
            *(latencies(cell.probe_latencies[kind], cell.probe_timeouts[kind])
              for kind in PROBE_KINDS),
            " / ".join(cell.usage[who].text() if who in cell.usage else "—"
                       for who in USAGE_ORDER),
            "—" if cell.completed is None else f"{cell.completed:,}",
            "; ".join(cell.notes) or ""]


def latencies(samples: list[float], timeouts: int) -> str:
    """median / p95 / max in ms (n samples), and how many went unanswered."""
    if not samples:
        text = "—"
    else:
        ordered = sorted(samples)
        text = (f"{fmt(ms(statistics.median(ordered)))} / {fmt(ms(p95(ordered)))} / "
                f"{fmt(ms(ordered[-1]))} (n={len(ordered)})")
    if timeouts:
        text += f" ({timeouts} unanswered in {PROBE_TIMEOUT:.0f} s)"
    return text


def p95(ordered: list[float]) -> float:
    """The 95th percentile of sorted samples (nearest rank)."""
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


USAGE_ORDER = ("coordinator", "simulator", "broker")


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


HEADERS = ["decided by", "nodes", "queued tasks", "ingest (creates/s)", "1st run after join (s)",
           "1st→W-th run (s)", "decisions/s", "ms/decision", "node-list at join (ms)",
           "task-info during drain, median / p95 / max (ms)",
           "node-list during drain, median / p95 / max (ms)",
           "CPU (waiting for a CPU) coordinator / simulator / RabbitMQ",
           "complete",
           "notes"]


def decision_rate(cell: Cell) -> float | None:
    return rate(cell.decisions, cell.drain_seconds) if cell.decisions >= cell.tasks else None


def floor_ratios(cells: list[Cell]) -> list[str]:
    """Vespid's decisions/s over the floor's, cell by cell (the same run, one after the
    other), and what the floor's rate says of the target."""
    floors = {(c.nodes, c.tasks): decision_rate(c) for c in cells if c.floor}
    lines = []
    for cell in cells:
        bound = floors.get((cell.nodes, cell.tasks))
        vespid = decision_rate(cell)
        if cell.floor or not bound or not vespid:
            continue
        lines.append(f"- {cell.nodes} nodes x {cell.tasks:,} tasks: Vespid {vespid:,.0f} "
                     f"decisions/s, the contract's floor {bound:,.0f}: Vespid reaches "
                     f"**{vespid / bound:.2f}** of the floor; the floor is "
                     f"{bound / TARGET_DECISIONS:.2f} of the target of "
                     f"{TARGET_DECISIONS:,}/s.")
    if not lines:
        return []
    return ["The contract's floor (bench/floor.py, DrainFloor): a raw-pika stand-in that "
            "holds the same tasks and keeps each node busy up to its cores, doing only what "
            "WIRE.md makes a coordinator do for a decision (task-run, `started` and "
            "`completed` events, acks after publisher confirms), no state, store, matching "
            "or replies: no coordinator of this contract decides faster on this machine.\n\n"
            + "\n".join(lines)]


def target_lines(cells: list[Cell]) -> list[str]:
    """Issue 14's targets 3 and 4, for each cell that measures them: the figure, its share
    of the target, and whether it is met."""
    lines = []
    for cell in cells:
        if cell.floor or cell.skipped or cell.nodes != TARGET_NODES:
            continue
        decided = decision_rate(cell)
        if cell.tasks == TARGET_TASKS and decided is not None:
            share = decided / TARGET_DECISIONS
            lines.append(f"- Target 3, ≥ {TARGET_DECISIONS:,} decisions/s at {TARGET_NODES:,} "
                         f"nodes x {TARGET_TASKS:,} queued: {decided:,.0f}/s, **{share:.2f}** "
                         f"of it: {met(decided >= TARGET_DECISIONS)}.")
        lines += [request_target(cell, kind) for kind in PROBE_KINDS
                  if len(cell.probe_latencies[kind]) >= MIN_P95_SAMPLES]
    return ["Issue 14's targets:\n\n" + "\n".join(lines)] if lines else []


def request_target(cell: Cell, kind: str) -> str:
    found = p95(sorted(cell.probe_latencies[kind]))
    unanswered = cell.probe_timeouts[kind]
    verdict = met(found <= TARGET_P95 and not unanswered)
    if unanswered:
        verdict += f" ({unanswered} unanswered)"
    return (f"- Target 4, a {kind}'s p95 ≤ {ms(TARGET_P95):g} ms while {TARGET_NODES:,} nodes "
            "work, "
            f"{cell.tasks:,} queued: {fmt(ms(found))} ms, **{found / TARGET_P95:.2f}** of the "
            f"limit: {verdict}.")


def met(yes: bool) -> str:
    return "met" if yes else "not met"


def report_sections(cells: list[Cell], options: Options | None) -> list[str]:
    sections = [markdown_table(HEADERS, [row(c) for c in cells]), *target_lines(cells),
                *floor_ratios(cells)]
    every = options.probe_every if options is not None else PROBE_EVERY
    if options is not None:
        sections.append(
            f"Settings: node-set every {options.heartbeat:g} s per simulated node, "
            f"task-complete {options.delay * 1000:g} ms after each task-run, grid cap "
            f"{options.cap / 60:g} min, cell cap {CELL_CAP / 60:g} min, stall limit "
            f"{STALL:g} s, task mix seed {options.seed}, requests every {every:g} s"
            + "".join(f", {k}={v}" for k, v in options.coordinator_env.items()) + ".")
    sections.append(
        "How to read it: *decisions/s* = W / (time from the first to the W-th task-run seen "
        "by the simulated nodes); *ms/decision* is its inverse. *node-list at join* is a "
        "request sent right behind the N joining node-sets, so it waits for the first "
        "scheduling pass over the full queue; the next two columns are a task-info and a "
        f"node-list sent every {every * 1000:g} ms (0: none) from the join until the W-th "
        "run (each on time, answered or not), with the number of samples. *CPU* is each "
        "process's time on a CPU over the wall time from the join until the W-th run and "
        "the replies still due (100% = one core; the machine has the cores listed above, "
        "shared with RabbitMQ), and in brackets its time runnable but waiting for a CPU "
        "(/proc schedstat): the two add up to about 100% for a process that never waits "
        "for work, which is CPU-bound and gets no more because the machine is busy. "
        "*ingest* counts from the first publish to the task-list reply that saw all W tasks idle. "
        "*complete* is task-list status complete once the drain ended (for the floor, the "
        "task-completes it took).")
    return sections


def parse_options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduling",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="nodes 10, 100 x tasks 1k, 10k; 3 min cap")
    parser.add_argument("--nodes", type=int, nargs="+", help="override the node counts")
    parser.add_argument("--tasks", type=int, nargs="+", help="override the queue depths")
    parser.add_argument("--cap-minutes", type=float, help="wall-clock cap for the grid")
    parser.add_argument("--heartbeat", type=float, default=4.0,
                        help="seconds between one simulated node's node-sets (default 4)")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="task-complete this long after the task-run (default 0)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="SETTING=VALUE",
                        help="a coordinator setting for every cell, e.g. node_batch=25 "
                             "(passed as VESPID_NODE_BATCH)")
    parser.add_argument("--floor", action="store_true",
                        help="run each cell a second time with the contract's floor (a "
                             "raw-pika stand-in doing only what WIRE.md requires for a "
                             "decision) and print Vespid's share of its rate")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR",
                        help="copy each cell's coordinator log (JSON lines, warnings and "
                             "up) into DIR, e.g. to read why tasks ran twice")
    parser.add_argument("--probe-every", type=float, default=PROBE_EVERY, metavar="SECONDS",
                        help="seconds between the drain's rounds of requests (a task-info "
                             f"and a node-list; default {PROBE_EVERY:g}); 0 sends only the "
                             "first round, behind the join, to see what the requests cost")
    args = parser.parse_args(argv)
    nodes, tasks, cap = QUICK_GRID if args.quick else FULL_GRID
    return Options(args.nodes or nodes, args.tasks or tasks,
                   60 * args.cap_minutes if args.cap_minutes else cap,
                   args.heartbeat, args.delay_ms / 1000, args.seed,
                   {"VESPID_" + k.strip().upper(): v for k, v in
                    (item.split("=", 1) for item in args.set)}, args.keep_logs,
                   args.floor, args.probe_every)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    install_signal_handlers()
    options = parse_options(argv)
    cells = run_grid(options)
    write_report("Vespid scheduling benchmark", report_sections(cells, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
