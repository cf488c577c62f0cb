"""The contract's floor: what WIRE.md alone costs a task on this broker, with no scheduler.

A stand-in coordinator in raw pika does only what the contract makes every coordinator do
for a task, with the guarantees Vespid keeps, and nothing else: it consumes the task-create
from quorum queue `vespid.coordinator`, publishes the task's `created` and `started` events
and its task-run to the node's quorum queue, all with publisher confirms, and acknowledges
the task-create once they are confirmed; it consumes the task-complete from quorum queue
`vespid.coordinator.node`, publishes the `completed` event and acknowledges once that is
confirmed. No state, no store, no matching (nodes take turns), no replies. The nodes are the
same simulator the Vespid runs use.

So its rate bounds what any coordinator of this contract could reach on this machine with
pika: the three persistent quorum-queue messages a task (task-create, task-run,
task-complete) and three events. bench.vs_celery runs it beside Celery and Vespid.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from bench.common import (
    COORDINATOR_KEY,
    COORDINATOR_QUEUE,
    EXCHANGE,
    JSON_PROPS,
    NODE_CHANNEL_KEY,
    BenchError,
    ChildProcess,
    Deadline,
    Peer,
    SelectChild,
    SimSpec,
    child_setup,
    log,
    private_vhost,
    simulator_main,
)
from bench.throughput import Pipeline, make_bodies, node_specs, wait_for_runs
from vespid.shared.writes import coalesce_writes

NODE_QUEUE = "vespid.coordinator.node"
EVENTS = "vespid.events"
QUORUM = {"x-queue-type": "quorum"}
WINDOW = 1000  # unacknowledged deliveries per consumer, as the coordinator's window


@dataclass
class FloorStats:
    nodes: int = 0
    creates: int = 0  # task-creates taken (DrainFloor: held for the nodes)
    completes: int = 0
    expected_complete: float | None = None  # when the expect-th task-complete arrived


class FloorCoordinator(SelectChild):
    """Relays task-create → task-run and takes task-completes, with events and confirms."""

    def __init__(self, url: str, expect: int, events: bool, pipe: Connection) -> None:
        super().__init__(url, "vespid-bench-floor", pipe)
        self.events = events
        self.expect = expect
        self.stats = FloorStats()
        self.nodes: list[str] = []
        self.turn = 0
        self.seq = 0
        self.unconfirmed: deque[tuple[int, int]] = deque()  # (last publish seq, delivery tag)
        self.confirmed_to = 0  # every publish up to this one is confirmed
        self.confirmed_beyond: set[int] = set()  # confirmed out of order, above confirmed_to

    def run(self) -> None:
        self.connection.ioloop.call_later(0.1, self._report)
        self.connection.ioloop.start()

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.exchange_declare(EXCHANGE, "topic", durable=True)
        channel.exchange_declare(EVENTS, "topic", durable=True)
        for queue, key in ((COORDINATOR_QUEUE, COORDINATOR_KEY), (NODE_QUEUE, NODE_CHANNEL_KEY)):
            channel.queue_declare(queue, durable=True, arguments=QUORUM)
            channel.queue_bind(queue, EXCHANGE, key)
        channel.basic_qos(prefetch_count=WINDOW)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm,
                                 callback=lambda _frame: self._consume())

    def _consume(self) -> None:
        self.channel.basic_consume(COORDINATOR_QUEUE, self._on_request)
        self.channel.basic_consume(NODE_QUEUE, self._on_node_message)
        self.pipe.send(("ready", None))

    def _publish(self, exchange: str, key: str, body: dict[str, Any]) -> None:
        self.channel.basic_publish(exchange, key, json.dumps(body).encode(), JSON_PROPS)
        self.seq += 1

    def _event(self, kind: str, create: dict[str, Any], **changes: Any) -> None:
        if not self.events:
            return
        info = {"command": "task-info-response", "name": create["name"], "name_pretty": None,
                "parent": None, "executable_pyscript": create.get("executable_pyscript"),
                "requirements": create.get("requirements", {}), "repositories": {},
                "environment": {}, "time-create": time.time(), "time-start": None,
                "time-finish": None, "status": None, "success": None, "node": None,
                "log": None, "children": [], **changes}
        self._publish(EVENTS, f"task.{kind}.{create['name']}", info)

    def _on_request(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        create = json.loads(body)
        node = self.nodes[self.turn % len(self.nodes)]
        self.turn += 1
        self._event("created", create)
        self._run(node, create)
        self._hold(method.delivery_tag)

    def _run(self, node: str, create: dict[str, Any]) -> None:
        """The task-run to `node`, and the task's `started` event."""
        self._publish(EXCHANGE, f"node.{node}", {
            "command": "task-run", "name": create["name"],
            "executable_pyscript": create["executable_pyscript"], "path": None,
            "log": f"//{node}/logs/{create['name']}.log",
            "cores": float(create["requirements"].get("cores", 1)),
            "allocated": create["requirements"], "environment": {}, "attempt": 1})
        self._event("started", create, status="working", node=node, **{"time-start": time.time()})

    def _on_node_message(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        message = json.loads(body)
        if message.get("command") == "node-set":
            if message["name"] not in self.nodes:
                self.nodes.append(message["name"])
                self.stats.nodes = len(self.nodes)
            self._hold(method.delivery_tag)
            return
        self._event("completed", message, status="complete", success=message.get("success"),
                    **{"time-finish": time.time()})
        self.stats.completes += 1
        if self.stats.completes == self.expect:
            self.stats.expected_complete = time.monotonic()
        self._hold(method.delivery_tag)

    def _hold(self, tag: int) -> None:
        """Acknowledge `tag` once everything published so far is confirmed."""
        if not self.unconfirmed and self.seq <= self.confirmed_to:
            self.channel.basic_ack(delivery_tag=tag, multiple=True)
            return
        self.unconfirmed.append((self.seq, tag))

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if method.NAME != "Basic.Ack":
            raise BenchError("the broker refused (nacked) a message of the floor")
        # the broker may confirm out of publish order (a message no queue takes at once, one
        # for a quorum queue when its log has it): keep the contiguous mark
        if method.multiple:
            self.confirmed_to = max(self.confirmed_to, method.delivery_tag)
            if self.confirmed_beyond:
                self.confirmed_beyond = {s for s in self.confirmed_beyond
                                         if s > self.confirmed_to}
        else:
            self.confirmed_beyond.add(method.delivery_tag)
        while self.confirmed_to + 1 in self.confirmed_beyond:
            self.confirmed_to += 1
            self.confirmed_beyond.discard(self.confirmed_to)
        tag = None
        while self.unconfirmed and self.unconfirmed[0][0] <= self.confirmed_to:
            _seq, tag = self.unconfirmed.popleft()
        if tag is not None:
            self.channel.basic_ack(delivery_tag=tag, multiple=True)

    def _report(self) -> None:
        if self.pipe.poll() and self.pipe.recv() == "stop":
            self.pipe.send(("final", FloorStats(**self.stats.__dict__)))
            self.connection.close()
            return
        self.pipe.send(("progress", FloorStats(**self.stats.__dict__)))
        self.connection.ioloop.call_later(0.05, self._report)


class DrainFloor(FloorCoordinator):
    """The floor of a drain (bench.scheduling --floor): task-creates are held (the `created`
    event confirmed before the ack) until nodes join; then each node is kept busy up to its
    cores, and each task-complete frees its task's cores and sends the node the next held
    task (task-run and `started` event), all confirmed before the acks. Requirements other
    than cores are not looked at: no matching, only the contract's messages for a decision."""

    def __init__(self, url: str, expect: int, events: bool, pipe: Connection) -> None:
        super().__init__(url, expect, events, pipe)
        self.held: deque[dict[str, Any]] = deque()
        self.free: dict[str, float] = {}  # node -> cores not taken by a task-run
        self.taken: dict[str, float] = {}  # task -> its cores, while it runs

    def _on_request(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        create = json.loads(body)
        self._event("created", create)
        self.held.append(create)
        self.stats.creates += 1
        self._hold(method.delivery_tag)

    def _on_node_message(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        message = json.loads(body)
        joined = message.get("command") == "node-set"
        node = str(message.get("name") if joined else message.get("node"))
        if joined:
            if node not in self.free:
                self.free[node] = float(message["capabilities"].get("cores", 1))
                self.stats.nodes = len(self.free)
        else:
            self.free[node] += self.taken.pop(str(message["name"]), 0.0)
            self._event("completed", message, status="complete",
                        success=message.get("success"), **{"time-finish": time.time()})
            self.stats.completes += 1
            if self.stats.completes == self.expect:
                self.stats.expected_complete = time.monotonic()
        self._dispatch(node)
        self._hold(method.delivery_tag)

    def _dispatch(self, node: str) -> None:
        while self.held and self._cores(self.held[0]) <= self.free[node]:
            create = self.held.popleft()
            cores = self._cores(create)
            self.free[node] -= cores
            self.taken[create["name"]] = cores
            self._run(node, create)

    @staticmethod
    def _cores(create: dict[str, Any]) -> float:
        return float(create.get("requirements", {}).get("cores", 1))


def floor_main(url: str, expect: int, events: bool, pipe: Connection) -> None:
    _run_child(FloorCoordinator, url, expect, events, pipe)


def drain_floor_main(url: str, expect: int, pipe: Connection) -> None:
    _run_child(DrainFloor, url, expect, True, pipe)


def _run_child(kind: type[FloorCoordinator], url: str, expect: int, events: bool,
               pipe: Connection) -> None:
    child_setup()
    coalesce_writes()  # as the coordinator sends (shared/writes.py): the floor is no slower
    try:
        kind(url, expect, events, pipe).run()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        with contextlib.suppress(Exception):
            pipe.send(("error", repr(exc)))
        sys.exit(1)


def wait_for_completes(floor: ChildProcess, result: Pipeline, first: float,
                       deadline: Deadline) -> None:
    while not deadline.expired():
        floor.poll(0.05)
        stats = floor.latest.get("progress")
        if stats is not None and stats.expected_complete is not None:
            result.completes = stats.completes
            result.to_all_complete = stats.expected_complete - first
            return
    stats = floor.latest.get("progress")
    result.completes = None if stats is None else stats.completes
    result.notes.append("deadline reached before the last task-complete")


Measured = Callable[[dict[str, int | None]], contextlib.AbstractContextManager[Any]]


def run_floor(nodes: int, count: int, deadline: Deadline, measured: Measured,
              events: bool = True) -> Pipeline:
    """The floor with `nodes` simulated nodes; `measured(pids)` wraps the timed part.
    Without `events`, the three messages alone: how much of the floor the events are."""
    result = Pipeline(f"contract floor ({nodes} raw nodes)", count)
    bodies = make_bodies(count)
    with ExitStack() as stack:
        url = stack.enter_context(private_vhost("vespid-bench-floor"))
        peer = Peer(url, "vespid-bench-floor-publisher")
        stack.callback(peer.close)
        floor = ChildProcess(floor_main, (url, count, events), "floor coordinator")
        sim = ChildProcess(simulator_main, (SimSpec(url, node_specs(nodes), count),),
                           "node simulator")
        try:
            for child, ready in ((floor, "ready"), (sim, "declared")):
                child.start()
                stack.callback(child.stop)
                child.wait_for(ready, deadline.within(90))
            sim.send("join")
            while (floor.latest.get("progress") or FloorStats()).nodes < nodes:
                if deadline.expired():
                    raise BenchError("the floor coordinator did not hear every node in time")
                floor.poll(0.1)
            log.info("floor: %d nodes up; publishing %d task-creates", nodes, count)
            pids = {"coordinator (floor)": floor.process.pid, "simulator": sim.process.pid}
            with measured(pids):
                first, last = peer.publish_many(bodies)
                result.publish_seconds = last - first
                wait_for_runs(sim, count, result, first, deadline)
                if result.runs >= count:
                    wait_for_completes(floor, result, first, deadline)
        except BenchError as exc:
            result.notes.append(str(exc))
    return result
