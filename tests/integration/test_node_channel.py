"""The node channel of contract v1.1: nodes' traffic on `vespid.coordinator.node`, apart from
clients' requests on `vespid.coordinator`."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pika

from tests import processes
from tests.processes import VespidProcess
from tests.raw import RawNode, RawPeer

NODE_KEY = "coordinator.node"


@contextmanager
def paused(process: VespidProcess) -> Iterator[None]:
    """The process stopped (SIGSTOP) for the block: what is sent meanwhile queues up."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


def queue_heartbeats(peer: RawPeer, count: int) -> None:
    """`count` node-sets of node "chatty" (one core) on the node channel."""
    body = json.dumps({"command": "node-set", "name": "chatty", "capabilities": {"cores": 1},
                       "repositories": {}, "activetasks": {}}).encode()
    props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    for _ in range(count):
        peer.channel.basic_publish("vespid", NODE_KEY, body, props)


def test_a_raw_node_on_the_node_channel_is_heard_and_its_tasks_complete(
        amqp_url: str, coordinator: VespidProcess) -> None:
    peer = RawPeer(amqp_url)
    node = RawNode(peer, "far", {"cores": 2, "memory": 1000}, key=NODE_KEY)
    node.node_set([])
    peer.request({"command": "task-create", "name": "t1", "executable_pyscript": "pass"})
    [run] = node.runs(1)
    node.node_set({"t1": 1})
    node.complete(run)

    info = peer.wait_for("t1", lambda i: i["status"] == "complete")
    [listed] = peer.request({"command": "node-list"})["nodes"]
    peer.close()

    assert (info["success"], info["node"]) == ("ok", "far")
    assert listed["name"] == "far" and listed["alive"] is True


def test_the_project_agent_sends_on_the_node_channel(
        amqp_url: str, coordinator: VespidProcess,
        start_node: object) -> None:
    agent: VespidProcess = start_node("box1")  # type: ignore[operator]
    agent.wait_for_log("node_connected")

    connected = [json.loads(line) for line in agent.log().splitlines()
                 if '"node_connected"' in line]

    assert connected[-1]["sends_to"] == NODE_KEY


def test_a_request_is_answered_while_a_flood_of_node_traffic_still_waits(
        amqp_url: str, coordinator: VespidProcess) -> None:
    """Heartbeats of a large farm queued ahead of a request: the request is answered before
    they are all handled, since it has a queue (and a prefetch window) of its own. The
    coordinator is paused while both queue up, so the order is the test's, not the clock's."""
    flood = 20_000
    peer = RawPeer(amqp_url)
    with paused(coordinator):
        queue_heartbeats(peer, flood)
        asked = peer.send({"command": "task-info", "name": "nobody"}, reply=True)
    while asked not in peer.replies:
        peer.connection.process_data_events(time_limit=0.1)
    waiting = peer.channel.queue_declare("vespid.coordinator.node", passive=True)
    reply = json.loads(peer.replies[asked])
    peer.close()

    assert reply["status"] == "invalid"
    assert waiting.method.message_count > flood // 2, "the request waited for the node-sets"


def test_a_request_behind_a_full_window_of_node_messages_is_answered_before_they_are_handled(
        amqp_url: str, tmp_path: Path, started: list[VespidProcess]) -> None:
    """The coordinator already holds a full window of node-sets from new nodes (delivered,
    not yet handled) when a node-list comes: the reply lists fewer nodes than came ahead of
    it, because a request is answered between batches and not behind all the node
    messages in hand. Then every node is still heard (nothing is lost or left unacked).
    A turn here takes at most 20 node messages: with the default (as many as fit 30 ms, up
    to 500), a fast enough machine handles all of them in the turn the request arrives
    behind. (With 50 a turn and 400 node-sets, a loaded CI machine once handed the request
    over only after all 8 turns: the broker wrote the deliveries slower than the turns took.)"""
    coordinator = processes.coordinator(amqp_url, tmp_path / "coordinator",
                                        VESPID_NODE_BATCH="20").start()
    started.append(coordinator)
    coordinator.wait_for_log("coordinator_consuming")
    flood = 480  # within the node channel's window (node_prefetch 500): all delivered
    peer = RawPeer(amqp_url)
    props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    with paused(coordinator):
        for index in range(flood):
            body = json.dumps({"command": "node-set", "name": f"flood{index:03d}",
                               "capabilities": {"cores": 1}, "repositories": {},
                               "activetasks": {}}).encode()
            peer.channel.basic_publish("vespid", NODE_KEY, body, props)
        while peer.channel.queue_declare("vespid.coordinator.node",
                                         passive=True).method.message_count:
            peer.connection.process_data_events(time_limit=0.05)  # all handed over
        asked = peer.send({"command": "node-list"}, reply=True)
    while asked not in peer.replies:
        peer.connection.process_data_events(time_limit=0.1)
    listed = json.loads(peer.replies[asked])["nodes"]
    everyone = peer.request({"command": "node-list"})["nodes"]
    deadline = time.monotonic() + 30
    while len(everyone) < flood and time.monotonic() < deadline:
        peer.connection.process_data_events(time_limit=0.2)
        everyone = peer.request({"command": "node-list"})["nodes"]
    peer.close()

    assert len(listed) < flood, "the request waited for every node message ahead of it"
    assert len(everyone) == flood


def test_a_node_set_that_waited_behind_a_backlog_does_not_end_a_task_on_its_way(
        amqp_url: str, tmp_path: Path, started: list[VespidProcess]) -> None:
    """A node sends a node-set before it has read a task-run; behind a backlog of other
    nodes' messages it reaches the coordinator long after the dispatch grace (1 s here).
    It was queued within the grace, which is what counts (marks.py): the task runs once.
    Judged by arrival, it was taken for lost, and the node too, its heartbeat waiting in
    the broker (a busy farm's tasks ran twice). The backlog is queued while the coordinator
    is paused, and drains after it resumes (5 node messages a turn, so that it drains
    slowly on a fast machine too), while the task is dispatched and the node-set queued
    behind it."""
    coordinator = processes.coordinator(amqp_url, tmp_path / "coordinator",
                                        VESPID_NODE_BATCH="5",
                                        VESPID_DISPATCH_GRACE="1").start()
    started.append(coordinator)
    coordinator.wait_for_log("coordinator_consuming")
    flood = 40_000
    peer = RawPeer(amqp_url)
    node = RawNode(peer, "slowreader", {"cores": 2, "memory": 1000}, key=NODE_KEY)
    node.node_set([])
    deadline = time.monotonic() + 15
    while not peer.request({"command": "node-list"})["nodes"]:  # known before the flood
        assert time.monotonic() < deadline, "the node's first node-set was never handled"
        time.sleep(0.05)
    with paused(coordinator):
        queue_heartbeats(peer, flood)
        node.node_set([])  # its heartbeat, behind the flood too: it is not silent
    peer.request({"command": "task-create", "name": "on-its-way", "executable_pyscript": "x",
                  "retries": 0, "requirements": {"cores": 1, "memory": 500}})  # not chatty
    peer.wait_for("on-its-way", lambda i: i["status"] == "working")
    node.capabilities = {**node.capabilities, "usage_sent_after_the_dispatch": True}
    node.node_set([])  # it has not read the task-run yet; this one waits behind the flood
    dispatched = time.monotonic()
    deadline = dispatched + 120
    while not any(n["name"] == "slowreader" and n["capabilities"].get(
            "usage_sent_after_the_dispatch") for n in peer.request({"command": "node-list"},
                                                                   timeout=60)["nodes"]):
        assert time.monotonic() < deadline, "the node-set behind the flood was never handled"
        time.sleep(0.2)
    waited = time.monotonic() - dispatched
    info = peer.info("on-its-way")

    [run] = node.runs(1)
    node.node_set({run: 1})
    node.complete(run)
    done = peer.wait_for("on-its-way", lambda i: i["status"] == "complete")
    peer.close()

    assert waited > 1 + 1, f"the backlog drained in {waited:.1f} s: no wait past the grace"
    assert info["status"] == "working", info.get("message")
    assert (done["success"], done["node"]) == ("ok", "slowreader")
