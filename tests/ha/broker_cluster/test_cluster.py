"""A RabbitMQ cluster of three nodes under a farm of two coordinators (PostgreSQL state) and
three agents: one node stopped under load and started again loses nothing (issue 15)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import pytest

from tests import processes
from tests.faults.test_coordinator_faults import wait_all_complete
from tests.ha.cluster import LocalCluster, Node, connected_nodes
from tests.ha.test_standby import HA_ENV, assert_each_ran_once, marker_script, wait_active
from tests.processes import VespidProcess, cli
from tests.raw import RawPeer
from vespid.coordinator.service import SUPERSEDED_EXIT

pytestmark = [pytest.mark.integration, pytest.mark.ha]

# Which nodes each process lists first (indexes into the cluster's nodes), so that the
# connections spread over the three: the coordinators on hare2 and hare3, an agent on each.
COORDINATOR_ORDERS = {"c1": (1, 0, 2), "c2": (2, 0, 1)}
AGENT_ORDERS = {"box1": (0, 1, 2), "box2": (1, 2, 0), "box3": (2, 0, 1)}


@pytest.fixture
def start_coordinator(cluster: LocalCluster, vhost: str, tmp_path: Path, state_url: str,
                      started: list[VespidProcess]
                      ) -> Callable[[str, Sequence[int]], VespidProcess]:
    """A coordinator on the shared state, listing the nodes in `order`."""
    def start(name: str, order: Sequence[int]) -> VespidProcess:
        proc = processes.coordinator(cluster.url(vhost, order), tmp_path / name,
                                     state=state_url,
                                     VESPID_BLOB_DIR=str(tmp_path / "blobs"),
                                     VESPID_RESULTS_DIR=str(tmp_path / "results"),
                                     **HA_ENV).start()
        started.append(proc)
        proc.wait_for_log("coordinator_consuming|coordinator_standing_by", timeout=60)
        return proc

    return start


@pytest.fixture
def start_agent(cluster: LocalCluster, vhost: str, tmp_path: Path,
                started: list[VespidProcess]) -> Callable[[str], VespidProcess]:
    def start(name: str) -> VespidProcess:
        url = cluster.url(vhost, AGENT_ORDERS[name])
        proc = processes.node(url, tmp_path / "nodes", name,
                              {"memory": 8000, "cores": 4}).start()
        started.append(proc)
        proc.wait_for_log("node_connected")
        return proc

    return start


def log_times(proc: VespidProcess, event: str, offset: int = 0) -> list[float]:
    """When (Unix time, from its JSON log) the process logged `event` after `offset`."""
    times = []
    for line in proc.log()[offset:].splitlines():
        if f'"{event}"' in line:
            stamp = json.loads(line)["timestamp"].replace("Z", "+00:00")
            times.append(datetime.fromisoformat(stamp).timestamp())
    return times


def wait_until(what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


def on_node(cluster: LocalCluster, proc: VespidProcess) -> set[str]:
    return connected_nodes(cluster, proc.pid)


def running(procs: Sequence[VespidProcess]) -> list[VespidProcess]:
    return [p for p in procs if p.process is not None and p.process.poll() is None]


def name_of(proc: VespidProcess) -> str:
    return proc.log_path.parent.name  # each process works in a folder named after it


def submit(raw: RawPeer, runs: Path, total: int) -> None:
    for i in range(total):
        raw.send({"command": "task-create", "name": f"flow-{i:04d}",
                  "executable_pyscript": marker_script(runs)})
        if i % 200 == 199:
            raw.connection.process_data_events(time_limit=0)
    raw.connection.process_data_events(time_limit=0)


def first_start_after(coordinators: Sequence[VespidProcess], offsets: dict[int, int],
                      after: float) -> float | None:
    times = [t for p in coordinators for t in log_times(p, "task_started", offsets[id(p)])
             if t > after]
    return min(times, default=None)


@pytest.mark.parametrize("stopped", ["active", "standby"],
                         ids=["the-active-coordinators-node", "the-standbys-node"])
def test_a_broker_node_stopped_under_load_and_started_again_loses_no_task(
        stopped: str, cluster: LocalCluster, vhost: str, amqp_url: str, first_node_url: str,
        tmp_path: Path, start_coordinator: Callable[[str, Sequence[int]], VespidProcess],
        start_agent: Callable[[str], VespidProcess], raw: RawPeer) -> None:
    all_nodes = sorted(n.name for n in cluster.nodes)
    assert sorted(cluster.running_nodes()) == all_nodes
    coordinators = [start_coordinator(name, order)
                    for name, order in COORDINATOR_ORDERS.items()]
    agents = [start_agent(name) for name in AGENT_ORDERS]
    active = wait_active(coordinators, {})  # the first node-set woke one of them
    standby = next(p for p in coordinators if p is not active)
    members = cluster.queue_members(vhost)
    # The coordinator's queues and each agent's are replicated to all three nodes.
    for queue in ("vespid.coordinator", "vespid.coordinator.node",
                  *(f"vespid.node.{name}" for name in AGENT_ORDERS)):
        assert members[queue] == all_nodes, (queue, members)

    runs = tmp_path / "runs"
    runs.mkdir()
    total = 1000
    submit(raw, runs, total)
    wait_until("tasks flowing", lambda: len(list(runs.iterdir())) >= 100, timeout=120)

    # The node that coordinator is connected to: the first one its URL lists.
    chosen = active if stopped == "active" else standby
    victim: Node = cluster.nodes[COORDINATOR_ORDERS[name_of(chosen)][0]]
    survivors = {n.short for n in cluster.nodes if n is not victim}
    assert on_node(cluster, chosen) == {victim.short}
    on_victim = [p for p in agents if on_node(cluster, p) == {victim.short}]
    assert on_victim, "no agent on the node to stop: the URL orders do not spread them"
    offsets = {id(p): len(p.log()) for p in [*coordinators, *agents]}
    stopped_at = time.time()
    cluster.stop_app(victim)
    down_at = time.time()
    assert victim.name not in cluster.running_nodes()

    # Tasks flow again through the nodes still up.
    wait_until("a task started after the node went down",
               lambda: first_start_after(coordinators, offsets, down_at) is not None,
               timeout=90)
    resumed_at = first_start_after(coordinators, offsets, down_at)
    assert resumed_at is not None
    if stopped == "active":
        # It lost its consumer with its connection: the broker made the standby's consumer
        # the active one, the standby took the state over, and the old coordinator,
        # reconnected to a node still up, found itself fenced out and stopped (status 3).
        assert wait_active([standby], offsets) is standby
        assert active.process is not None
        assert active.process.wait(timeout=60) == SUPERSEDED_EXIT, active.log()[-3000:]
        ended = active.log()[offsets[id(active)]:]
        assert '"broker_lost_reconnecting"' in ended
        assert '"superseded": true' in ended, ended
        # Its supervisor starts it again: a standby, on a node still up.
        coordinators.append(start_coordinator("c-again", COORDINATOR_ORDERS[name_of(active)]))
        offsets[id(coordinators[-1])] = 0
    else:
        # The standby reconnects and stands by; the active one never stopped deciding.
        assert standby.process is not None and standby.process.poll() is None
        assert "coordinator_active" not in standby.log()[offsets[id(standby)]:]
        assert '"broker_lost_reconnecting"' in standby.log()[offsets[id(standby)]:]
    # Every agent and every coordinator still running is connected to a node still up.
    wait_until("every process on a node still up",
               lambda: all(on_node(cluster, p) and on_node(cluster, p) <= survivors
                           for p in running([*coordinators, *agents])),
               timeout=60)
    reconnected = {name_of(p): min(log_times(p, "node_connected", offsets[id(p)]))
                   - stopped_at for p in on_victim}
    time.sleep(5)  # the node stays down a while, tasks flowing meanwhile
    cluster.start_app(victim)
    assert sorted(cluster.running_nodes()) == all_nodes

    done = wait_all_complete(first_node_url, total, timeout=180)
    assert_each_ran_once(done, runs, total)
    assert running(agents) == agents, "an agent stopped"
    assert len(running(coordinators)) == 2, "a coordinator stopped"
    check = cli(amqp_url, "coordinator", "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert cluster.queue_members(vhost)["vespid.coordinator"] == all_nodes
    agents_back = ", ".join(f"{name} {s:.1f} s" for name, s in reconnected.items())
    print(f"\nbroker node {victim.name} ({stopped} coordinator's) stopped, stop_app took "
          f"{down_at - stopped_at:.1f} s: next task started {resumed_at - stopped_at:.1f} s "
          f"after the stop; agents on it reconnected after {agents_back}")
