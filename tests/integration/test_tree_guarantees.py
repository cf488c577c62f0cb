"""Trees a CI can trust, with real node agents and a real broker: a parent started again
re-attaches to its children (each runs once), a tree's failure is the root's failure,
requests nobody answered are never acted on, and only the node that ran a task adopts it."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.processes import VespidProcess, cli
from tests.raw import RawNode, RawPeer

pytestmark = pytest.mark.integration

CHILDREN = 6
CHILD = """
import os, time
with open({lines!r}, "a") as out:
    out.write("child {index} attempt " + os.environ["VESPID_ATTEMPT"] + "\\n")
time.sleep(4)
"""
PARENT = """
import os
from vespid.client import Client
with open({attempts!r}, "a") as out:
    out.write(os.environ["VESPID_ATTEMPT"] + "\\n")
with Client() as vespid:
    kids = [vespid.create_task(f"child{{i}}", {child!r}.replace("{{index}}", str(i)),
                               name_pretty=f"Data build {{i}}/{children}",
                               requirements={{"cores": 1, "usage_require_worker": True}})
            for i in range(1, {children} + 1)]
    with open({attempts!r}, "a") as out:
        out.write("re-attached " + str(sum(k.existing for k in kids)) + "\\n")
    done = vespid.wait_all([k.name for k in kids], timeout=120)
    assert all(s.ok for s in done.values()), done
"""


def parent_script(tmp_path: Path) -> str:
    child = CHILD.format(lines=str(tmp_path / "lines.txt"), index="{index}")
    return textwrap.dedent(PARENT.format(attempts=str(tmp_path / "attempts.txt"), child=child,
                                         children=CHILDREN))


@pytest.mark.parametrize("coordinator_killed", [False, True],
                         ids=["node-lost", "node-and-coordinator-lost"])
def test_a_parent_started_again_re_attaches_to_its_children_and_each_runs_once(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, tmp_path: Path, amqp_url: str, coordinator_killed: bool) -> None:
    parent_node = start_node("pnode", {"memory": 4000, "cores": 1})
    start_node("wnode", {"memory": 8000, "cores": CHILDREN, "usage_worker": True})
    raw.request({"command": "task-create", "name": "build", "name_pretty": "Build",
                 "executable_pyscript": parent_script(tmp_path),
                 "requirements": {"cores": 1, "usage_require_node_pnode": True}})
    lines = tmp_path / "lines.txt"
    deadline = time.monotonic() + 60
    while not lines.exists() or len(lines.read_text().splitlines()) < CHILDREN:
        assert time.monotonic() < deadline, "the children never all started"
        time.sleep(0.1)

    if coordinator_killed:  # the second creates then meet a coordinator that restarted
        coordinator.kill()
    parent_node.kill()  # SIGKILL: its parent process dies with it, mid-wait
    parent_node.start()
    if coordinator_killed:
        coordinator.start()

    root = raw.wait_for("build", lambda i: i["status"] == "complete", timeout=120)
    waited = cli(amqp_url, "wait", "build", "--json", "--timeout", "60")

    assert (tmp_path / "attempts.txt").read_text().splitlines() == \
        ["1", "re-attached 0", "2", f"re-attached {CHILDREN}"]
    assert sorted(lines.read_text().splitlines()) == \
        sorted(f"child {i} attempt 1" for i in range(1, CHILDREN + 1))
    assert len(root["children"]) == CHILDREN
    assert (root["success"], root["tree_success"], root["attempt"]) == ("ok", "ok", 2)
    assert root["attempts"][0]["lost"] is True
    assert waited.returncode == 0, waited.stdout + waited.stderr
    for child in root["children"]:  # the pin to pnode was not inherited
        info = raw.info(child)
        assert info["node"] == "wnode" and "usage_require_node_pnode" not in \
            info["requirements"], info


def test_a_raw_client_gets_the_first_task_back_for_the_same_key(
        coordinator: VespidProcess, raw: RawPeer) -> None:
    def create(name: str, parent: str | None, key: str) -> dict[str, object]:
        return raw.request({"command": "task-create", "name": name, "parent": parent,
                            "executable_pyscript": "pass", "key": key,
                            "requirements": {"usage_require_nowhere": True}})

    create("p1", None, "root-1")
    create("p2", None, "root-2")

    assert create("first", "p1", "compile#1") == {"command": "ack", "name": "first"}
    assert create("second", "p1", "compile#1") == \
        {"command": "ack", "name": "first", "existing": True}
    assert create("third", "p2", "compile#1") == {"command": "ack", "name": "third"}
    assert create("p1-again", None, "root-1") == \
        {"command": "ack", "name": "p1", "existing": True}
    assert raw.info("p1")["children"] == ["first"]
    assert raw.info("p2")["children"] == ["third"]
    assert raw.info("second")["status"] == "invalid"


def test_a_tree_with_a_fatal_child_fails_the_wait_and_names_the_child(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, amqp_url: str) -> None:
    start_node("box1", {"memory": 4000, "cores": 4})
    parent = textwrap.dedent("""
        from vespid.client import Client
        with Client() as vespid:
            good = vespid.create_task("good", "pass", name_pretty="Good step")
            bad = vespid.create_task("bad", "raise SystemExit(3)", name_pretty="Broken step")
            vespid.wait_all([good.name, bad.name], timeout=60)
    """)
    raw.request({"command": "task-create", "name": "tree-root", "executable_pyscript": parent})

    whole = cli(amqp_url, "wait", "tree-root", "--timeout", "60")
    root_only = cli(amqp_url, "wait", "tree-root", "--root-only", "--timeout", "60")
    listed = cli(amqp_url, "tasks", "--tree")

    assert whole.returncode == 1, whole.stdout + whole.stderr
    assert "Broken step" in whole.stderr and "fatal" in whole.stderr
    assert "Broken step: fatal" in whole.stdout  # render_info lists the failures
    assert root_only.returncode == 0, root_only.stdout + root_only.stderr
    root_line = next(line for line in listed.stdout.splitlines() if "tree-root" in line)
    assert "fatal" in root_line, listed.stdout


def test_submit_with_no_coordinator_fails_at_once(amqp_url: str, tmp_path: Path) -> None:
    script = tmp_path / "build.py"
    script.write_text("pass")

    started = time.monotonic()
    result = cli(amqp_url, "submit", str(script), "--request-timeout", "30")
    took = time.monotonic() - started

    assert result.returncode == 3, result.stdout + result.stderr
    assert "vespid coordinator" in result.stderr
    assert took < 15, f"waited {took:.0f} s: it must not wait out the 30 s request timeout"


def test_a_request_that_expired_in_the_queue_is_never_acted_on(
        coordinator: VespidProcess, raw: RawPeer, amqp_url: str) -> None:
    coordinator.kill()  # its queue stays, nobody consumes it
    refused = cli(amqp_url, "submit", __file__)
    assert refused.returncode == 3 and "no coordinator consumes" in refused.stderr, refused
    for name, ttl in (("expired", "300"), ("kept", None)):
        raw.send({"command": "task-create", "name": name, "executable_pyscript": "pass",
                  "requirements": {"usage_require_nowhere": True}},
                 props={"expiration": ttl} if ttl else None)
    time.sleep(1.5)
    coordinator.start()

    assert raw.wait_for("kept", lambda i: i["status"] != "invalid")["name"] == "kept"
    assert raw.info("expired")["status"] == "invalid"


def test_a_node_that_never_ran_a_task_cannot_take_it(
        coordinator: VespidProcess, raw: RawPeer, amqp_url: str) -> None:
    px = RawNode(raw, "px", {"cores": 4, "memory": 4000, "usage_gpu": True})
    second = RawPeer(amqp_url)  # pz listens on a connection of its own
    try:
        pz = RawNode(second, "pz", {"cores": 4, "memory": 4000})
        px.node_set([])
        pz.node_set([])
        raw.request({"command": "task-create", "name": "render", "executable_pyscript": "x",
                     "requirements": {"usage_require_gpu": True}})
        assert px.next_message()["command"] == "task-run"
        px.node_set({"render": 1})
        working = raw.wait_for("render", lambda i: i["status"] == "working")

        pz.node_set({"render": 1})  # claims the task while px still runs it
        kill = pz.next_message()
        after_claim = raw.info("render")

        deadline = time.monotonic() + 30  # px falls silent and is lost
        while raw.info("render")["status"] == "working":
            assert time.monotonic() < deadline, "px was never declared lost"
            pz.node_set([])
            time.sleep(0.3)
        pz.node_set({"render": 1})  # and claims it again once it waits
        second_kill = pz.next_message()
        time.sleep(0.5)
        after_loss = raw.info("render")
    finally:
        second.close()

    assert (kill["command"], kill["name"], second_kill["command"]) == \
        ("task-kill", "render", "task-kill")
    assert (after_claim["status"], after_claim["node"], after_claim["attempt"]) == \
        (working["status"], "px", 1)
    assert (after_loss["status"], after_loss["node"], after_loss["attempt"],
            after_loss["success"]) == (None, None, 1, None)


def test_a_drained_node_whose_agent_exited_is_gone_not_lost(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        amqp_url: str) -> None:
    agent = start_node("box1")
    assert cli(amqp_url, "drain", "box1").returncode == 0
    assert agent.process is not None
    agent.process.wait(timeout=30)
    time.sleep(3)  # longer than the test heartbeat timeout of 2 s

    nodes = json.loads(cli(amqp_url, "nodes", "--json").stdout)
    shown = cli(amqp_url, "nodes").stdout

    assert (nodes[0]["left"], nodes[0]["alive"]) == (True, False)
    assert "gone" in shown and "lost" not in shown
