"""Prometheus metrics of the coordinator (prometheus-client), served on `metrics_port`.

Counters and histograms are updated where things happen (the extension's hooks); gauges
that summarise state (tasks by status, node use) are refreshed on the coordinator's tick,
in its own thread, so a scrape never reads state while it changes.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram, start_http_server

from vespid.coordinator.engine import Context
from vespid.coordinator.extension import Extension
from vespid.coordinator.state import State, Task

BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

TASKS = Gauge("vespid_tasks", "Tasks by status and success", ["status", "success"])
QUEUE_WAIT = Histogram("vespid_task_queue_wait_seconds", "From creation to start",
                       buckets=BUCKETS)
RUN_TIME = Histogram("vespid_task_run_seconds", "From start to completion", buckets=BUCKETS)
NODE_USE = Gauge("vespid_node_utilisation", "Share of a node's resource in use",
                 ["node", "resource"])
NODES = Gauge("vespid_nodes", "Nodes by state", ["state"])
MESSAGES = PromCounter("vespid_messages_total", "Messages handled", ["command"])
REJECTED = PromCounter("vespid_messages_rejected_total", "Messages rejected", ["error"])


class Metrics(Extension):
    """Counts what the processor handles and observes tasks as they start and end; the
    summary gauges are refreshed on the tick."""

    name = "metrics"

    def __init__(self, port: int) -> None:
        self.port = port

    def serve(self) -> None:
        start_http_server(self.port)

    def handled(self, command: str) -> None:
        MESSAGES.labels(command).inc()

    def rejected(self, code: str) -> None:
        REJECTED.labels(code).inc()

    def started(self, ctx: Context, task: Task) -> None:
        if task.time_start is not None and task.attempt == 1:
            QUEUE_WAIT.observe(max(task.time_start - task.time_create, 0.0))

    def ended(self, ctx: Context, task: Task) -> None:
        if task.time_start is not None and task.time_finish is not None and not task.virtual:
            RUN_TIME.observe(max(task.time_finish - task.time_start, 0.0))

    def tick(self, ctx: Context) -> None:
        refresh(ctx.state)


def refresh(state: State) -> None:
    counts = Counter((t.status.value, t.success.value if t.success else "none")
                     for t in state.tasks.values())
    TASKS.clear()
    for (status, success), count in counts.items():
        TASKS.labels(status, success).set(count)
    NODE_USE.clear()
    for node in state.nodes.values():
        for resource, total in node.resources().items():
            if total > 0:
                NODE_USE.labels(node.name, resource).set(node.used.get(resource, 0.0) / total)
    states = Counter("lost" if not n.alive else "draining" if n.draining else "up"
                     for n in state.nodes.values())
    for name in ("up", "draining", "lost"):
        NODES.labels(name).set(states.get(name, 0))
