"""The coordinator's cost per turn, in process: no broker and no pika, only its Processor.

A Processor on SQLite (a temporary file) takes W task-creates with no node around, then the
node-sets of N simulated nodes (bench.scheduling's mix of nodes and tasks); then the drain:
each turn hands it B task-completes of running tasks, as the node channel would, and the
task-runs it decides are taken as running. Printed per batch size B: milliseconds per turn,
decisions per CPU-second, and the matching pass alone (`matcher.match` per drain pass,
median). What a turn costs at B = 10 is mostly its fixed part, which a 30 ms turn
(`turn_seconds`) cannot spend on messages (bench/results-scheduling.md).

    .venv/bin/python -m bench.pass_cost [--nodes 1000] [--tasks 100000] [--batch 10 50 100]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from bench.common import log, markdown_table, setup_logging, write_report
from bench.scheduling import make_nodes, make_tasks
from vespid.coordinator import matcher
from vespid.coordinator.processor import Delivery, Outcome, Processor
from vespid.coordinator.settings import CoordinatorSettings
from vespid.coordinator.store import open_store

INGEST_BATCH = 500
START = 1_000_000.0  # the Processor's clock, in seconds
TURN_CLOCK = 0.01  # the clock moves this much a turn (no tick runs: nothing times out)


@dataclass
class Result:
    batch: int
    decisions: int = 0
    turns: int = 0
    cpu_seconds: float = 0.0
    passes: list[float] = field(default_factory=list)  # matcher.match, seconds each


class TimedMatch:
    """Wraps matcher.match (engine calls it through the module) to time each pass that had
    nodes to offer."""

    def __init__(self) -> None:
        self.original: Callable[..., Any] = matcher.match
        self.seconds: list[float] = []

    def __call__(self, queue: Any, offers: Any, **options: Any) -> Any:
        started = time.perf_counter()
        result = self.original(queue, offers, **options)
        if offers:
            self.seconds.append(time.perf_counter() - started)
        return result


class Drain:
    """One Processor, its tasks queued and its nodes joined; turns of task-completes."""

    def __init__(self, nodes: int, tasks: int, folder: Path) -> None:
        settings = CoordinatorSettings(state=folder / "state.db")
        self.processor = Processor(open_store(folder / "state.db"), settings, now=START)
        self.now = START
        self.running: deque[tuple[str, str, int]] = deque()  # (node, task, attempt)
        bodies = make_tasks(tasks, seed=1)
        for first in range(0, tasks, INGEST_BATCH):
            self._take(self._process(bodies[first:first + INGEST_BATCH]))
        self._take(self._process([json.dumps(
            {"command": "node-set", "name": n.name, "capabilities": n.capabilities,
             "repositories": n.repositories, "activetasks": []}).encode()
            for n in make_nodes(nodes)]))

    def _process(self, bodies: list[bytes]) -> Outcome:
        return self.processor.process([Delivery(body) for body in bodies], self.now)

    def _take(self, outcome: Outcome) -> None:
        """The task-runs decided are running now; the broker confirms everything at once."""
        for entry in outcome.outbox:
            if entry.command == "task-run":
                run = json.loads(entry.body)
                self.running.append((entry.routing_key.removeprefix("node."), run["name"],
                                     run["attempt"]))
        self.processor.confirmed([entry.id for entry in outcome.outbox], self.now)

    def turn(self, batch: int) -> int:
        """B task-completes in one batch; returns how many tasks it started."""
        self.now += TURN_CLOCK
        done = [self.running.popleft() for _ in range(min(batch, len(self.running)))]
        before = len(self.running)
        self._take(self._process([json.dumps(
            {"command": "task-complete", "name": name, "node": node, "success": "ok",
             "attempt": attempt}).encode() for node, name, attempt in done]))
        return len(self.running) - before


def measure(nodes: int, tasks: int, batch: int, decisions: int) -> Result:
    result = Result(batch)
    with tempfile.TemporaryDirectory(prefix="vespid-bench-pass-") as folder:
        log.info("batch %d: queueing %d tasks, %d nodes join", batch, tasks, nodes)
        drain = Drain(nodes, tasks, Path(folder))
        timed = TimedMatch()
        matcher.match = timed
        try:
            started = time.process_time()
            while result.decisions < decisions and drain.running:
                result.decisions += drain.turn(batch)
                result.turns += 1
            result.cpu_seconds = time.process_time() - started
        finally:
            matcher.match = timed.original
        result.passes = timed.seconds
    return result


def row(result: Result) -> list[str]:
    per_turn = 1000 * result.cpu_seconds / max(1, result.turns)
    passes = (f"{1000 * statistics.median(result.passes):.2f}" if result.passes else "—")
    return [str(result.batch), f"{result.decisions:,}", str(result.turns), f"{per_turn:.2f}",
            f"{result.decisions / result.turns:.1f}" if result.turns else "—",
            f"{result.decisions / result.cpu_seconds:,.0f}" if result.cpu_seconds else "—",
            passes]


HEADERS = ["task-completes a turn (B)", "decisions", "turns", "ms a turn (CPU)",
           "decisions a turn", "decisions per CPU-second", "matcher.match a pass, median (ms)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pass_cost",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=1000,
                        help="simulated nodes that join once the tasks are queued (default "
                             "1000)")
    parser.add_argument("--tasks", type=int, default=100_000,
                        help="tasks queued before the drain (default 100000)")
    parser.add_argument("--batch", type=int, nargs="+", default=[10, 50, 100],
                        help="task-completes handed over a turn (one drain each)")
    parser.add_argument("--decisions", type=int, default=4000,
                        help="how many decisions each drain measures (default 4000)")
    args = parser.parse_args(argv)
    setup_logging()
    # The coordinator's own log lines (a node joined, a task started) are not the report;
    # its loggers are cached on first use, as the coordinator has them (shared/logs.py).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
                        cache_logger_on_first_use=True)
    results = [measure(args.nodes, args.tasks, batch, args.decisions) for batch in args.batch]
    write_report("Vespid coordinator cost per turn (in process)", [
        markdown_table(HEADERS, [row(r) for r in results]),
        f"{args.nodes} nodes, {args.tasks:,} tasks queued (bench.scheduling's mix, seed 1), "
        "SQLite in a temporary folder, no broker: a turn is `Processor.process` of B "
        "task-completes, its scheduling pass and commit included; the CPU time is this "
        "process's. The first pass after the join is not counted."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
