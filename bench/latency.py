"""Latency benchmark: how long a task waits between its task-create and its task-run at a
node, under a light steady load (issue 14, target 2: p50 <= 3 ms, p99 <= 20 ms at 100/s).

A raw-pika client publishes task-creates at a steady rate (open loop: each at its own due
time, whatever the coordinator does); simulated raw nodes (10 nodes of 64 cores) answer every
task-run with a task-complete at once. Per task: the moment the client publishes its
task-create to the moment the simulator receives its task-run (both CLOCK_MONOTONIC, shared
by all processes on Linux). The first tasks warm the pipeline and are not counted.

The floor: the same bodies at the same rate through the same two quorum-queue hops with only
bench.throughput's raw pika relay between them, stamped the same way, so the report shows
how much of the latency is the broker's and how much the coordinator's.

    .venv/bin/python -m bench.latency [--quick] [--rate R] [--tasks T] [--nodes N] [--no-raw]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pika

from bench.common import (
    BenchError,
    ChildProcess,
    Deadline,
    Peer,
    SimSpec,
    bench_parser,
    broker_pid,
    child_setup,
    connection_parameters,
    fmt,
    log,
    markdown_table,
    private_vhost,
    process_cpu_seconds,
    run_bench,
    simulator_main,
    size_options,
    start_bench,
    task_create,
    vespid_farm,
    wind_down,
)
from bench.throughput import (
    QUORUM,
    RAW_IN,
    RAW_OUT,
    DrainStats,
    node_specs,
    relay_main,
    wait_for_nodes,
)

FULL_TASKS, QUICK_TASKS = 6_000, 1_000  # at 100/s: one minute, ten seconds
RATE = 100.0
NODES = 10
WARMUP = 100  # tasks sent first and left out of the figures
TARGET_P50, TARGET_P99 = 3.0, 20.0  # ms
TAIL_WAIT = 30.0  # seconds after the last publish for the last task-runs to arrive
SLOWEST = 5


@dataclass
class Run:
    label: str
    tasks: int
    rate: float
    nodes: int
    warmup: int
    sent: dict[str, float] = field(default_factory=dict)  # task -> when its create went out
    received: dict[str, float] = field(default_factory=dict)  # task -> first task-run
    late_max: float = 0.0  # how far behind its schedule the publisher fell, at worst
    wall: float | None = None  # first publish -> last task-run (or the end of the wait)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds used
    machine_cpu: float | None = None  # CPU seconds all processes used (/proc/stat)
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        return [task_name(index) for index in range(self.warmup, self.warmup + self.tasks)]

    def latencies_ms(self) -> list[float]:
        """Of the measured tasks whose task-run arrived, in publish order."""
        return [1000 * (self.received[n] - self.sent[n]) for n in self.names()
                if n in self.received and n in self.sent]


def task_name(index: int) -> str:
    return f"lat-{index:06d}"


def make_bodies(count: int) -> list[tuple[str, bytes]]:
    return [(task_name(i), task_create(task_name(i), {"cores": 1, "memory": 100}))
            for i in range(count)]


# ---- the measured part --------------------------------------------------------------------
Send = Callable[[bytes], None]
Check = Callable[[], None]


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (all but idle and iowait), /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(value) for value in fields]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def wait_until(peer: Peer, due: float) -> None:
    """Serve the connection (heartbeats) until `due`; returns at once if it has passed."""
    while (left := due - time.monotonic()) > 0:
        peer.pump(left)


def publish_paced(peer: Peer, send: Send, check: Check, bodies: list[tuple[str, bytes]],
                  run: Run, deadline: Deadline) -> None:
    """One message every 1/rate s, each stamped the moment it goes out; `check` about once
    a second (raises if a process it watches died)."""
    start = time.monotonic() + 0.05
    for index, (name, body) in enumerate(bodies):
        due = start + index / run.rate
        wait_until(peer, due)
        now = time.monotonic()
        run.late_max = max(run.late_max, now - due)
        run.sent[name] = now
        send(body)
        if index % int(max(1.0, run.rate)) == 0:
            check()
            if deadline.expired():
                run.notes.append(f"deadline reached after {index + 1} of {len(bodies)} "
                                 "publishes")
                return


def wait_for_last_runs(child: ChildProcess, expect: int, deadline: Deadline) -> None:
    """Until the child's progress (SimStats or DrainStats) counts `expect` distinct tasks."""
    while not deadline.expired():
        child.poll(0.1)
        progress = child.latest.get("progress")
        if progress is not None and progress.distinct >= expect:
            return


def measure(peer: Peer, send: Send, check: Check, receiver: ChildProcess,
            pids: dict[str, int | None], run: Run, deadline: Deadline) -> None:
    """Publish paced, wait for the last arrival, take CPU use and the receiver's stamps."""
    bodies = make_bodies(run.warmup + run.tasks)
    pids = {**pids, "publisher": os.getpid()}
    before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
    busy = machine_busy_seconds()
    first = time.monotonic()
    log.info("first publish at monotonic %.4f s (to line up with other processes' stamps)",
             first)
    publish_paced(peer, send, check, bodies, run, deadline)
    wait_for_last_runs(receiver, len(run.sent), deadline.within(TAIL_WAIT))
    wall = time.monotonic() - first
    busy_after = machine_busy_seconds()
    if busy is not None and busy_after is not None:
        run.machine_cpu = busy_after - busy
    for name, pid in pids.items():
        now, then = process_cpu_seconds(pid), before[name]
        if now is not None and then is not None:
            run.cpu[name] = now - then
    final = receiver.stop()
    run.received = receiver.latest.get("run-times") or {}
    run.duplicates = getattr(final, "duplicates", 0)
    end = max(run.received.values(), default=None)
    run.wall = wall if end is None else end - first


def run_vespid(run: Run, deadline: Deadline) -> None:
    with ExitStack() as stack:
        farm = vespid_farm(stack, "vespid-bench-lat")
        url, coordinator, peer = farm.url, farm.coordinator, farm.peer
        spec = SimSpec(url, node_specs(run.nodes), run.warmup + run.tasks, record_runs=True)
        sim = ChildProcess(simulator_main, (spec,), "node simulator")

        def check() -> None:
            sim.poll(0)
            coordinator.check_alive()

        try:
            coordinator.wait_ready(peer, deadline.within(90))
            sim.start()
            stack.callback(sim.stop)
            sim.wait_for("declared", deadline.within(120))
            sim.send("join")
            wait_for_nodes(peer, run.nodes, deadline.within(60))
            log.info("vespid: %d nodes up; %d task-creates at %g/s (%d of them warm-up)",
                     run.nodes, run.warmup + run.tasks, run.rate, run.warmup)
            pids = {"coordinator": coordinator.pid, "RabbitMQ": broker_pid(),
                    "simulator": sim.process.pid}
            measure(peer, peer.publish, check, sim, pids, run, deadline)
        except BenchError as exc:
            run.notes.append(str(exc))
        finally:
            wind_down(sim, coordinator, run.notes)


# ---- the raw pika floor -------------------------------------------------------------------
def stamper_main(url: str, pipe: Connection) -> None:
    """Consume the relay's output, stamping each task's first arrival (as the simulator)."""
    child_setup()
    try:
        connection = pika.BlockingConnection(connection_parameters(url, "vespid-bench-stamp"))
        channel = connection.channel()
        stamps: dict[str, float] = {}

        def on_message(_ch: Any, _method: Any, _props: Any, body: bytes) -> None:
            now = time.monotonic()
            stamps.setdefault(str(json.loads(body)["name"]), now)

        channel.basic_consume(RAW_OUT, on_message, auto_ack=True)
        pipe.send(("ready", None))
        next_report = 0.0
        while not (pipe.poll() and pipe.recv() == "stop"):
            connection.process_data_events(time_limit=0.02)
            if time.monotonic() >= next_report:
                pipe.send(("progress", DrainStats(distinct=len(stamps))))
                next_report = time.monotonic() + 0.25
        pipe.send(("run-times", stamps))
        pipe.send(("final", DrainStats(distinct=len(stamps))))
        connection.close()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        with contextlib.suppress(Exception):
            pipe.send(("error", repr(exc)))
        sys.exit(1)


def run_raw(run: Run, deadline: Deadline) -> None:
    """The same paced bodies through quorum queue -> pika relay (confirms) -> quorum queue."""
    with ExitStack() as stack:
        url = stack.enter_context(private_vhost("vespid-bench-lat-raw"))
        peer = Peer(url, "vespid-bench-raw-publisher")
        stack.callback(peer.close)
        for queue in (RAW_IN, RAW_OUT):
            peer.channel.queue_declare(queue, durable=True, arguments=QUORUM)
        stamper = ChildProcess(stamper_main, (url,), "stamper")
        relay = ChildProcess(relay_main, (url,), "relay")

        def check() -> None:
            stamper.poll(0)
            relay.poll(0)

        try:
            for child in (stamper, relay):
                child.start()
                stack.callback(child.stop)
                child.wait_for("ready", deadline.within(60))
            log.info("raw: relay up; %d messages at %g/s", run.warmup + run.tasks, run.rate)
            pids = {"relay": relay.process.pid, "RabbitMQ": broker_pid(),
                    "stamper": stamper.process.pid}
            measure(peer, partial(peer.publish, key=RAW_IN, exchange=""), check, stamper,
                    pids, run, deadline)
        except BenchError as exc:
            run.notes.append(str(exc))


# ---- the report ---------------------------------------------------------------------------
def percentile(ordered: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of a sorted list."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def verdict(value: float | None, target: float) -> str:
    if value is None:
        return "—"
    return "met" if value <= target else "**missed**"


HEADERS = ["pipeline", "tasks measured", "creates/s", "mean (ms)", "p50 (ms)", "p90 (ms)",
           "p99 (ms)", "p99.9 (ms)", "max (ms)",
           f"target (p50 ≤ {TARGET_P50:g}, p99 ≤ {TARGET_P99:g} ms)"]


def figures_row(run: Run, with_verdict: bool) -> list[str]:
    values = sorted(run.latencies_ms())
    p50, p99 = percentile(values, 0.50), percentile(values, 0.99)
    mean = sum(values) / len(values) if values else None
    target = (f"p50 {verdict(p50, TARGET_P50)}, p99 {verdict(p99, TARGET_P99)}"
              if with_verdict else "(floor, no target)")
    return [run.label, f"{len(values):,} / {run.tasks:,}", fmt(run.rate), fmt(mean, 2),
            fmt(p50, 2), fmt(percentile(values, 0.90), 2), fmt(p99, 2),
            fmt(percentile(values, 0.999), 2), fmt(values[-1] if values else None, 2),
            target]


def cpu_line(run: Run) -> str:
    if not run.wall or not run.cpu:
        return "—"
    count = run.warmup + run.tasks
    parts = [f"{name} {100 * seconds / run.wall:.0f}% ({1000 * seconds / count:.2f} ms a task)"
             for name, seconds in run.cpu.items()]
    if run.machine_cpu is not None:
        others = max(0.0, run.machine_cpu - sum(run.cpu.values()))
        parts.append(f"everything else on the machine {100 * others / run.wall:.0f}% "
                     "(other processes and the kernel's own work)")
    return f"CPU over {run.wall:.1f} s (100% = one core): " + ", ".join(parts)


def slowest_line(run: Run) -> str:
    names = [n for n in run.names() if n in run.received and n in run.sent]
    if not names:
        return "—"
    first = min(run.sent.values())
    worst = sorted(names, key=lambda n: run.sent[n] - run.received[n])[:SLOWEST]
    parts = [f"{1000 * (run.received[n] - run.sent[n]):.1f} ms at {run.sent[n] - first:.2f} s"
             for n in worst]
    return f"slowest {len(worst)} (latency at seconds into the run): " + ", ".join(parts)


def notes_lines(run: Run) -> list[str]:
    missing = sum(1 for n in run.names() if n not in run.received)
    notes = [cpu_line(run), slowest_line(run), *run.notes]
    if missing:
        notes.append(f"{missing} measured tasks did not arrive within {TAIL_WAIT:g} s of "
                     "the last publish")
    if run.duplicates:
        notes.append(f"{run.duplicates} duplicate task-runs")
    notes.append(f"the publisher was at most {1000 * run.late_max:.1f} ms behind its "
                 "schedule (each message is stamped when it actually went out)")
    return [f"- {note}" for note in notes]


def report_sections(runs: list[Run]) -> list[str]:
    rows = [figures_row(run, index == 0) for index, run in enumerate(runs)]
    sections = [markdown_table(HEADERS, rows)]
    sections += [f"{run.label}:\n" + "\n".join(notes_lines(run)) for run in runs]
    settings = runs[0] if runs else None
    if settings is not None:
        sections.append(
            f"Settings: {settings.nodes} simulated raw nodes (64 cores each, every task-run "
            "answered by a task-complete at once, node-sets every 4 s on the node channel); "
            f"{settings.warmup} warm-up messages first, not counted; tasks of 1 core, 100 MB.")
    sections.append(
        "How to read it: *latency* is, per task, the time from the client publishing its "
        "task-create (persistent, no confirm) to the simulated node receiving its task-run: "
        "the broker's quorum queue in, the coordinator's batch (decode, decide, SQLite "
        "commit, publish task-run and events with confirms), the node's quorum queue out. "
        "The client publishes open loop at a fixed rate, so a slow task does not delay the "
        "next one's send, and queueing shows in the tail. The *raw pika relay* row sends the "
        "same bodies at the same rate through the same two hops with nothing in between but "
        "a pika relay (consume, decode, publish with confirms, ack after confirm, as in "
        "bench.throughput): the floor the broker and pika set on this machine. Everything "
        "shares the cores listed above.")
    return sections


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench.latency", __doc__)
    size_options(parser, QUICK_TASKS, FULL_TASKS, "measured tasks (after the warm-up)",
                 "wall-clock cap for each pipeline (default 10)", 10.0)
    parser.add_argument("--rate", type=float, default=RATE,
                        help=f"task-creates per second (default {RATE:g})")
    parser.add_argument("--nodes", type=int, default=NODES,
                        help=f"simulated nodes (default {NODES})")
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help=f"messages sent first and not counted (default {WARMUP})")
    parser.add_argument("--no-raw", action="store_true",
                        help="skip the raw pika relay (the broker's floor)")
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    start_bench()
    args = parse_args(argv)
    tasks = args.tasks or (QUICK_TASKS if args.quick else FULL_TASKS)
    runs = [Run("vespid (coordinator + raw nodes)", tasks, args.rate, args.nodes, args.warmup)]
    if not args.no_raw:
        runs.append(Run("raw pika relay (floor)", tasks, args.rate, args.nodes, args.warmup))

    def measure() -> None:
        run_vespid(runs[0], Deadline.after(60 * args.cap_minutes))
        if len(runs) > 1:
            run_raw(runs[1], Deadline.after(60 * args.cap_minutes))

    return run_bench("Vespid latency benchmark", measure, lambda: report_sections(runs))


if __name__ == "__main__":
    sys.exit(main())
