"""Throughput benchmark: end-to-end task starts per second through the broker, and the
ceiling that raw pika reaches for the same number of messages on the same broker.

Vespid: a coordinator and 10 simulated raw nodes (64 cores each, every task completed the
moment its task-run arrives); one client publishes T task-creates as fast as it can.
Measured from the first publish to the last task-run received, and to the moment task-list
counts all T tasks complete.

Ceiling: a publisher sends T task-create bodies to a quorum queue; a relay consumes them and,
for each, publishes a task-run body to a second quorum queue with publisher confirms in a
window (acking each input once its output is confirmed); a third process drains the second
queue. Measured the same way: first publish to the T-th message drained.

    .venv/bin/python -m bench.throughput [--quick] [--tasks T]
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import pika

from bench.common import (
    JSON_PROPS,
    BenchError,
    ChildProcess,
    Coordinator,
    Deadline,
    NodeSpec,
    Peer,
    SelectChild,
    SimSpec,
    SimStats,
    bench_parser,
    broker_pid,
    child_setup,
    connection_parameters,
    count_status,
    describe_log,
    fmt,
    log,
    markdown_table,
    private_vhost,
    process_cpu_seconds,
    rate,
    run_bench,
    simulator_main,
    size_options,
    start_bench,
    task_create,
    vespid_farm,
    wait_for_total,
)

FULL_TASKS, QUICK_TASKS = 20_000, 3_000
NODES = 10
RAW_IN, RAW_OUT = "bench.raw.task-create", "bench.raw.task-run"
QUORUM = {"x-queue-type": "quorum"}
WINDOW = 1000  # relay: unconfirmed publishes (= unacked inputs) at most
STALL = 60.0


@dataclass
class Pipeline:
    name: str
    messages: int
    publish_seconds: float | None = None
    runs: int = 0
    to_last_run: float | None = None
    completes: int | None = None
    to_all_complete: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def run_rate(self) -> float | None:
        return rate(self.runs, self.to_last_run) if self.runs >= self.messages else None


def make_bodies(count: int) -> list[bytes]:
    return [task_create(f"tp-{index:06d}", {"cores": 1, "memory": 100})
            for index in range(count)]


def wait_for_runs(child: ChildProcess, expect: int, result: Pipeline, first: float,
                  deadline: Deadline, coordinator: Coordinator | None = None) -> None:
    """Until the child reports the expect-th message, no progress for STALL s, or deadline."""
    stats: Any = None
    last_progress, last_count = time.monotonic(), -1
    while not deadline.expired():
        child.poll(0.1)
        stats = child.latest.get("progress", stats)
        count = 0 if stats is None else stats.distinct
        if count > last_count:
            last_progress, last_count = time.monotonic(), count
        if stats is not None and stats.expected_run is not None:
            break
        if time.monotonic() - last_progress > STALL:
            result.notes.append(f"stalled: nothing new for {STALL:.0f} s")
            break
        if coordinator is not None:
            coordinator.check_alive()
    else:
        result.notes.append("deadline reached before the last task-run")
    if stats is not None:
        result.runs = stats.distinct
        end = stats.expected_run or stats.last_run
        result.to_last_run = None if end is None else end - first
        if getattr(stats, "duplicates", 0):
            result.notes.append(f"{stats.duplicates} duplicate task-runs")


# ---- vespid -------------------------------------------------------------------------------
def node_specs(nodes: int = NODES) -> list[NodeSpec]:
    return [NodeSpec(f"tp{index:02d}", {"cores": 64, "memory": 512_000})
            for index in range(nodes)]


def wait_for_nodes(peer: Peer, count: int, deadline: Deadline) -> None:
    while not deadline.expired():
        reply = peer.request({"command": "node-list"}, deadline.within(30))
        if reply is not None and sum(1 for n in reply.body.get("nodes", ())
                                     if n.get("accepting")) >= count:
            return
        peer.pump(0.2)
    raise BenchError(f"the coordinator did not list {count} accepting nodes in time")


Measure = Callable[[Peer, ChildProcess, Coordinator, list[bytes], Pipeline, Deadline], None]


def run_vespid(count: int, deadline: Deadline, nodes: int = NODES,
               measure: Measure | None = None) -> Pipeline:
    """The Vespid pipeline with `nodes` simulated nodes; `measure` (default measure_vespid)
    times it, so another bench can wrap the measured part."""
    result = Pipeline(f"vespid (coordinator + {nodes} raw nodes)", count)
    bodies = make_bodies(count)
    with ExitStack() as stack:
        farm = vespid_farm(stack, "vespid-bench-tp")
        url, coordinator, peer = farm.url, farm.coordinator, farm.peer
        sim = ChildProcess(simulator_main, (SimSpec(url, node_specs(nodes), count),),
                           "node simulator")
        try:
            coordinator.wait_ready(peer, deadline.within(90))
            sim.start()
            stack.callback(sim.stop)
            sim.wait_for("declared", deadline.within(120))
            sim.send("join")
            wait_for_nodes(peer, nodes, deadline.within(60))
            log.info("vespid: %d nodes up; publishing %d task-creates", nodes, count)
            (measure or measure_vespid)(peer, sim, coordinator, bodies, result, deadline)
        except BenchError as exc:
            result.notes.append(str(exc))
        finally:
            final: SimStats | None = sim.stop() if sim.process.pid else None
            if final is not None and final.kills:
                result.notes.append(f"{final.kills} task-kills received")
            coordinator.stop()
            note = describe_log(coordinator.log_summary())
            if note:
                result.notes.append(note)
    return result


def measure_vespid(peer: Peer, sim: ChildProcess, coordinator: Coordinator,
                   bodies: list[bytes], result: Pipeline, deadline: Deadline) -> None:
    pids = {"coordinator": coordinator.pid, "simulator": sim.process.pid,
            "RabbitMQ": broker_pid()}
    before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
    first, last = peer.publish_many(bodies)
    result.publish_seconds = last - first
    wait_for_runs(sim, len(bodies), result, first, deadline, coordinator)
    note_cpu(result, pids, before, time.monotonic() - first)
    if result.runs < len(bodies):
        return
    reply = wait_for_total(peer, "complete", len(bodies), deadline.within(120), 0.2)
    if reply is not None:
        result.completes = int(reply.body["total"])
        result.to_all_complete = reply.received - first
    else:
        result.completes = count_status(peer, "complete", Deadline.after(15))
        result.notes.append("not every task was complete before the deadline")


def note_cpu(result: Pipeline, pids: dict[str, int | None],
             before: dict[str, float | None], wall: float) -> None:
    """CPU share (100% = one core) of each process from the first publish until now."""
    shares = []
    for name, pid in pids.items():
        now, then = process_cpu_seconds(pid), before[name]
        if now is not None and then is not None and wall > 0:
            shares.append(f"{name} {100 * (now - then) / wall:.0f}%")
    if shares:
        result.notes.append("CPU until the last task-run: " + ", ".join(shares))


# ---- the raw pika ceiling -----------------------------------------------------------------
class Relay(SelectChild):
    """Consume task-creates, publish a task-run each with confirms, ack after confirm."""

    def __init__(self, url: str, pipe: Connection) -> None:
        super().__init__(url, "vespid-bench-relay", pipe)
        self.seq = 0
        self.unconfirmed: deque[tuple[int, int]] = deque()  # (publish seq, delivery tag)
        self.confirmed: set[int] = set()

    def run(self) -> None:
        self.connection.ioloop.call_later(0.2, self._check_pipe)
        self.connection.ioloop.start()

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.confirm_delivery(ack_nack_callback=self._on_confirm,
                                 callback=lambda _f: channel.basic_qos(
                                     prefetch_count=WINDOW, callback=lambda _q: self._consume()))

    def _consume(self) -> None:
        self.channel.basic_consume(RAW_IN, self._on_message)
        self.pipe.send(("ready", None))

    def _on_message(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        create = json.loads(body)
        run = {"command": "task-run", "name": create["name"],
               "executable_pyscript": create["executable_pyscript"], "path": None,
               "log": f"//relay/logs/{create['name']}.log", "cores": 1.0,
               "allocated": create["requirements"], "environment": {}, "attempt": 1}
        self.channel.basic_publish("", RAW_OUT, json.dumps(run).encode(), JSON_PROPS)
        self.seq += 1
        self.unconfirmed.append((self.seq, method.delivery_tag))

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if method.NAME != "Basic.Ack":
            raise BenchError("the broker refused (nacked) a relayed message")
        if method.multiple:
            self.confirmed.update(s for s, _ in self.unconfirmed if s <= method.delivery_tag)
        else:
            self.confirmed.add(method.delivery_tag)
        tag = None
        while self.unconfirmed and self.unconfirmed[0][0] in self.confirmed:
            seq, tag = self.unconfirmed.popleft()
            self.confirmed.discard(seq)
        if tag is not None:
            self.channel.basic_ack(delivery_tag=tag, multiple=True)

    def _check_pipe(self) -> None:
        if self.pipe.poll() and self.pipe.recv() == "stop":
            self.pipe.send(("final", None))
            self.connection.close()
            return
        self.connection.ioloop.call_later(0.2, self._check_pipe)


def relay_main(url: str, pipe: Connection) -> None:
    child_setup()
    try:
        Relay(url, pipe).run()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        with contextlib.suppress(Exception):
            pipe.send(("error", repr(exc)))
        sys.exit(1)


@dataclass
class DrainStats:
    distinct: int = 0
    first_run: float | None = None
    last_run: float | None = None
    expected_run: float | None = None


def drainer_main(url: str, expect: int, pipe: Connection) -> None:
    """Consume the task-run queue, parsing each body as a node would; report progress."""
    child_setup()
    try:
        connection = pika.BlockingConnection(connection_parameters(url, "vespid-bench-drain"))
        channel = connection.channel()
        stats = DrainStats()

        def on_message(_ch: Any, _method: Any, _props: Any, body: bytes) -> None:
            now = time.monotonic()
            json.loads(body)
            stats.distinct += 1
            stats.last_run = now
            stats.first_run = stats.first_run or now
            if stats.distinct == expect:
                stats.expected_run = now

        channel.basic_consume(RAW_OUT, on_message, auto_ack=True)
        pipe.send(("ready", None))
        while not (pipe.poll() and pipe.recv() == "stop"):
            connection.process_data_events(time_limit=0.05)
            pipe.send(("progress", DrainStats(**stats.__dict__)))
        pipe.send(("final", stats))
        connection.close()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        with contextlib.suppress(Exception):
            pipe.send(("error", repr(exc)))
        sys.exit(1)


def run_raw(count: int, deadline: Deadline) -> Pipeline:
    result = Pipeline("raw pika relay (ceiling)", count)
    bodies = make_bodies(count)
    with ExitStack() as stack:
        url = stack.enter_context(private_vhost("vespid-bench-raw"))
        peer = Peer(url, "vespid-bench-raw-publisher")
        stack.callback(peer.close)
        for queue in (RAW_IN, RAW_OUT):
            peer.channel.queue_declare(queue, durable=True, arguments=QUORUM)
        drainer = ChildProcess(drainer_main, (url, count), "drainer")
        relay = ChildProcess(relay_main, (url,), "relay")
        try:
            for child in (drainer, relay):
                child.start()
                stack.callback(child.stop)
                child.wait_for("ready", deadline.within(60))
            log.info("raw: relay and drainer up; publishing %d task-creates", count)
            pids = {"relay": relay.process.pid, "drainer": drainer.process.pid,
                    "RabbitMQ": broker_pid()}
            before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
            first, last = peer.publish_many(bodies, key=RAW_IN, exchange="")
            result.publish_seconds = last - first
            wait_for_runs(drainer, count, result, first, deadline)
            note_cpu(result, pids, before, time.monotonic() - first)
            relay.poll(0)
        except BenchError as exc:
            result.notes.append(str(exc))
    return result


# ---- report -------------------------------------------------------------------------------
HEADERS = ["pipeline", "tasks", "publish (s)", "publish rate (msg/s)",
           "1st publish → last task-run (s)", "task starts/s", "→ all complete (s)",
           "completes/s", "notes"]


def row(result: Pipeline) -> list[str]:
    runs = (f"{fmt(rate(result.runs, result.to_last_run))} (partial: "
            f"{result.runs:,}/{result.messages:,})" if result.runs < result.messages
            else fmt(result.run_rate))
    complete = (fmt(rate(result.completes or 0, result.to_all_complete))
                if result.to_all_complete else "—")
    return [result.name, f"{result.messages:,}", fmt(result.publish_seconds, 2),
            fmt(rate(result.messages, result.publish_seconds)),
            fmt(result.to_last_run, 2), runs, fmt(result.to_all_complete, 2), complete,
            "; ".join(result.notes)]


def report_sections(results: list[Pipeline]) -> list[str]:
    sections = [markdown_table(HEADERS, [row(r) for r in results])]
    vespid, raw = (results + [Pipeline("", 0)] * 2)[:2]
    if vespid.run_rate and raw.run_rate:
        sections.append(f"Ratio vespid / raw: **{vespid.run_rate / raw.run_rate:.2f}** "
                        f"({fmt(vespid.run_rate)} vs {fmt(raw.run_rate)} task starts/s)")
    else:
        sections.append("Ratio vespid / raw: — (a pipeline did not finish; see its notes)")
    sections.append(
        "How to read it: *task starts/s* = T / (time from the first task-create published "
        "to the T-th task-run received); the publisher, the broker and every consumer share "
        "the machine, so publishing competes with the pipeline. The raw relay does what the "
        "coordinator must at least do per task (consume, decode, publish a task-run with "
        "windowed confirms, ack after confirm) with no state, no SQLite, no events and no "
        "task-complete coming back: it is a ceiling, not a target. *→ all complete* is when "
        "task-list first counted all T tasks complete (polled every 0.2 s).")
    return sections


def main(argv: list[str] | None = None) -> int:
    start_bench()
    parser = bench_parser("bench.throughput", __doc__)
    size_options(parser, QUICK_TASKS, FULL_TASKS, "tasks (T)",
                 "wall-clock cap for each pipeline (default 10, --quick 3)")
    args = parser.parse_args(argv)
    count = args.tasks or (QUICK_TASKS if args.quick else FULL_TASKS)
    cap = 60 * (args.cap_minutes or (3 if args.quick else 10))
    results: list[Pipeline] = []

    def measure() -> None:
        results.append(run_vespid(count, Deadline.after(cap)))
        results.append(run_raw(count, Deadline.after(cap)))

    return run_bench("Vespid throughput benchmark", measure, lambda: report_sections(results))


if __name__ == "__main__":
    sys.exit(main())
