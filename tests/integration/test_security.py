"""Who may make a build machine run code: real users, real permissions, the real broker."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest

from tests.broker import Broker
from tests.processes import VespidProcess, cli
from tests.processes import coordinator as coordinator_process
from tests.processes import node as node_process
from tests.raw import RawPeer

pytestmark = pytest.mark.integration
MANAGEMENT = "http://localhost:15672"
ROLES = ["coordinator", "logserver", "node-box1", "node-box2", "alice", "bob"]


def management_answers() -> bool:
    request = urllib.request.Request(MANAGEMENT + "/api/overview")
    request.add_header("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")
    try:
        with urllib.request.urlopen(request, timeout=3):
            return True
    except OSError:
        return False


@dataclass
class Farm:
    name: str  # prefix of its users: `<name>-alice` is alice's login
    vhost: str
    env_dir: Path
    urls: dict[str, str]  # role -> URL
    admin_url: str

    def user(self, role: str) -> str:
        return f"{self.name}-{role}"


def setup_command(vhost: str, env_dir: Path, *extra: str,
                  farm: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vespid.client.cli", "broker", "setup", "--vhost", vhost,
         "--nodes", "box1,box2", "--clients", "alice,bob", "--env-dir", str(env_dir),
         "--management-url", MANAGEMENT, *(["--farm", farm] if farm else []), *extra],
        capture_output=True, text=True, timeout=60, env={**os.environ})


def set_up(broker: Broker, tmp_path: Path, vhost: str, name: str) -> Farm:
    env_dir = tmp_path / f"credentials-{name}"
    result = setup_command(vhost, env_dir, farm=name)
    assert result.returncode == 0, result.stderr
    urls = {role: (env_dir / f"{name}-{role}.env").read_text().splitlines()[0].split("=", 1)[1]
            for role in ROLES}
    broker.run_ctl(["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"])
    return Farm(name, vhost, env_dir, urls, broker.url_for(vhost))


def tear_down(broker: Broker, farm: Farm) -> None:
    broker.run_ctl(["delete_vhost", farm.vhost])
    for role in ROLES:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", farm.user(role)],
                       capture_output=True, timeout=60)


@pytest.fixture
def farm(broker: Broker, tmp_path: Path) -> Iterator[Farm]:
    if not management_answers():
        reason = ("the RabbitMQ management API does not answer at localhost:15672: "
                  "`rabbitmq-plugins enable rabbitmq_management` (.ci/run does)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    farm = set_up(broker, tmp_path, f"vespid-secure-{uuid.uuid4().hex[:8]}",
                  f"t{uuid.uuid4().hex[:8]}")
    try:
        yield farm
    finally:
        tear_down(broker, farm)


@pytest.fixture
def secured(farm: Farm, tmp_path: Path) -> Iterator[Farm]:
    procs: list[VespidProcess] = []
    coordinator = coordinator_process(farm.urls["coordinator"], tmp_path / "coord",
                                      VESPID_REQUIRE_USER_ID="true")
    procs.append(coordinator.start())
    coordinator.wait_for_log("coordinator_consuming")
    for name, caps in [("box1", {"memory": 4000, "cores": 2}),
                       ("box2", {"memory": 4000, "cores": 2,
                                 f"usage_require_user_{farm.user('bob')}": True})]:
        agent = node_process(farm.urls[f"node-{name}"], tmp_path / "nodes", name, caps,
                             VESPID_COORDINATOR_USER=farm.user("coordinator"))
        procs.append(agent.start())
        agent.wait_for_log("node_connected")
    yield farm
    for proc in procs:
        proc.stop()


def refused(action: Any) -> str:
    with pytest.raises((pika.exceptions.ChannelClosedByBroker,
                        pika.exceptions.AMQPChannelError)) as caught:
        action()
    return str(caught.value)


def test_broker_setup_is_idempotent_keeps_passwords_and_writes_private_files(
        farm: Farm) -> None:
    before = {p.name: p.read_text() for p in farm.env_dir.iterdir()}

    again = setup_command(farm.vhost, farm.env_dir, farm=farm.name)
    dry = setup_command(farm.vhost, farm.env_dir / "dry", "--dry-run", farm=farm.name)

    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_text() for p in farm.env_dir.iterdir() if p.is_file()} == before
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in farm.env_dir.iterdir()
               if p.is_file())
    assert f"would create user {farm.user('alice')}" in dry.stdout
    assert not (farm.env_dir / "dry").exists()
    coordinator_env = (farm.env_dir / f"{farm.user('coordinator')}.env").read_text()
    node_env = (farm.env_dir / f"{farm.user('node-box1')}.env").read_text()
    assert "VESPID_REQUIRE_USER_ID=true" in coordinator_env
    assert f"VESPID_COORDINATOR_USER={farm.user('coordinator')}" in node_env
    assert all(url.split(":")[2].split("@")[0] not in again.stdout for url in farm.urls.values())


def test_a_client_cannot_publish_to_a_node_queue(secured: Farm) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(secured.urls["alice"]))
    channel = connection.channel()
    channel.confirm_delivery()

    reason = refused(lambda: channel.basic_publish(
        "vespid", "node.box1", json.dumps({"command": "task-run", "name": "evil"}).encode()))

    assert "ACCESS_REFUSED" in reason
    connection.close()


def test_a_client_cannot_consume_a_node_queue(secured: Farm) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(secured.urls["alice"]))
    channel = connection.channel()

    reason = refused(lambda: channel.basic_consume("vespid.node.box1", lambda *_: None))

    assert "ACCESS_REFUSED" in reason
    connection.close()


def test_a_node_cannot_consume_another_nodes_queue(secured: Farm) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(secured.urls["node-box1"]))
    channel = connection.channel()

    reason = refused(lambda: channel.basic_consume("vespid.node.box2", lambda *_: None))

    assert "ACCESS_REFUSED" in reason
    connection.close()


def test_a_user_cannot_cancel_another_users_task(secured: Farm) -> None:
    created = cli(secured.urls["alice"], "submit", __file__, "--memory", "999999", "--json")
    name = json.loads(created.stdout)["name"]

    by_bob = cli(secured.urls["bob"], "cancel", name)
    by_alice = cli(secured.urls["alice"], "cancel", name)

    assert by_bob.returncode != 0 and f"belongs to {secured.user('alice')}" in by_bob.stderr
    assert by_alice.returncode == 0, by_alice.stderr


def test_a_user_cannot_take_another_users_label(secured: Farm, tmp_path: Path) -> None:
    script = tmp_path / "where.py"
    script.write_text("import os; print(os.environ['VESPID_NODE'])")

    posing = cli(secured.urls["alice"], "submit", str(script), "--label",
                 f"user_{secured.user('bob')}",
                 "--require", "node_box2", "--json")
    name = json.loads(posing.stdout)["name"]
    honest = cli(secured.urls["bob"], "submit", str(script), "--require", "node_box2",
                 "--wait", "--timeout", "60", "--json")

    time.sleep(1)
    info = json.loads(cli(secured.urls["alice"], "info", name, "--json").stdout)
    assert info["status"] is None and info["owner"] == secured.user("alice")
    # task-info shows the effective requirements: the claimed label is not among them
    assert info["requirements"].get(f"usage_user_{secured.user('alice')}") is True
    assert f"usage_user_{secured.user('bob')}" not in info["requirements"]
    assert honest.returncode == 0, honest.stderr
    assert json.loads(honest.stdout)["node"] == "box2"


def test_a_forged_task_run_on_the_right_queue_is_not_executed(secured: Farm,
                                                              tmp_path: Path) -> None:
    marker = tmp_path / "forged-ran"
    peer = RawPeer(secured.admin_url)  # a user allowed to write there, but not the coordinator
    dead = peer.channel.queue_declare("", exclusive=True).method.queue
    peer.channel.queue_bind(dead, "vespid.dead")
    peer.channel.basic_publish("", "vespid.node.box1", json.dumps({
        "command": "task-run", "name": "forged", "log": "x", "cores": 1,
        "executable_pyscript": f"open({str(marker)!r}, 'w').write('pwned')"}).encode(),
        pika.BasicProperties(user_id="guest", delivery_mode=2))

    props, body = peer.get(dead, timeout=15)

    assert json.loads(body)["name"] == "forged"
    assert "not by the coordinator" in props.headers["x-vespid-error"]
    time.sleep(1)
    assert not marker.exists()
    peer.close()


def test_the_log_server_runs_as_its_own_user_keeps_logs_and_can_do_nothing_else(
        secured: Farm, tmp_path: Path) -> None:
    folder = tmp_path / "central"
    server = VespidProcess(["logserver", "--dir", str(folder)], tmp_path / "logserver.log",
                           {**os.environ, "VESPID_AMQP_URL": secured.urls["logserver"]},
                           tmp_path).start()
    try:
        server.wait_for_log("logserver_started")
        script = tmp_path / "hello.py"
        script.write_text("print('hello from a secured farm')")
        submitted = cli(secured.urls["alice"], "submit", str(script), "--wait", "--json")
        name = json.loads(submitted.stdout)["name"]
        deadline = time.monotonic() + 20
        while not (folder / name / "attempt-1.log").exists():
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.1)
        shown = cli(secured.urls["alice"], "logs", name)
        peer = pika.BlockingConnection(pika.URLParameters(secured.urls["logserver"]))
        channel = peer.channel()
        channel.confirm_delivery()
        why = refused(lambda: channel.basic_publish("vespid", "node.box1", b"{}"))
        peer.close()
    finally:
        server.stop()

    assert submitted.returncode == 0, submitted.stderr
    assert shown.stdout == "hello from a secured farm\n", shown.stderr
    assert "ACCESS_REFUSED" in why


def test_a_message_without_user_id_controls_only_tasks_nobody_owns(
        farm: Farm, tmp_path: Path) -> None:
    # A coordinator that accepts messages without user_id (require_user_id off, as before
    # `broker setup` turned it on): ownership must hold all the same.
    coordinator = coordinator_process(farm.urls["coordinator"], tmp_path / "coord",
                                      VESPID_REQUIRE_USER_ID="false").start()
    alice, anonymous = RawPeer(farm.urls["alice"]), RawPeer(farm.urls["bob"])
    try:
        coordinator.wait_for_log("coordinator_consuming")
        signed = {"user_id": farm.user("alice")}
        alice.request({"command": "task-create", "name": "owned", "executable_pyscript": "pass",
                       "requirements": {"memory": 999999}}, props=signed)
        golem = alice.request({"type": "CreateTask", "task": {
            "type": "Python", "subtasks_count": 1, "options": {"script": "pass"},
            "verification": {"type": "External"}}}, props=signed)
        anonymous.request({"command": "task-create", "name": "ownerless",
                           "executable_pyscript": "pass", "requirements": {"memory": 999999}})

        refused_replies = [
            anonymous.request({"command": "task-cancel", "name": "owned"}),
            anonymous.request({"type": "AbortTask", "task_id": golem["task_id"]}),
            anonymous.request({"type": "VerifyResults", "task_id": golem["task_id"],
                               "subtask_id": "0", "verdict": 3})]
        owned = anonymous.info("owned")
        state = anonymous.request({"type": "GetTaskState", "task_id": golem["task_id"]})
        ownerless = anonymous.request({"command": "task-cancel", "name": "ownerless"})
        after = anonymous.info("ownerless")
    finally:
        alice.close()
        anonymous.close()
        coordinator.stop()

    assert [r.get("error") for r in refused_replies] == ["forbidden"] * 3, refused_replies
    assert "without user_id" in refused_replies[0]["message"]
    assert (owned["status"], owned["success"]) == (None, None)  # unchanged
    assert state["status"] != "aborted", state
    assert ownerless["command"] == "ack" and after["success"] == "terminated"


def test_two_farms_on_one_broker_keep_working_and_cannot_take_each_others_users(
        broker: Broker, farm: Farm, tmp_path: Path) -> None:
    other = set_up(broker, tmp_path, f"vespid-other-{uuid.uuid4().hex[:8]}",
                   f"u{uuid.uuid4().hex[:8]}")
    procs: list[VespidProcess] = []
    try:
        again = setup_command(f"vespid-third-{uuid.uuid4().hex[:8]}", tmp_path / "third",
                              farm=farm.name)  # the first farm's name on another vhost
        for each in (farm, other):
            coordinator = coordinator_process(each.urls["coordinator"],
                                              tmp_path / each.name / "coord")
            agent = node_process(each.urls["node-box1"], tmp_path / each.name / "nodes",
                                 "box1", {"memory": 4000, "cores": 2},
                                 VESPID_COORDINATOR_USER=each.user("coordinator"))
            procs += [coordinator.start(), agent.start()]
            coordinator.wait_for_log("coordinator_consuming")
            agent.wait_for_log("node_connected")
        script = tmp_path / "ok.py"
        script.write_text("pass")
        results = [cli(each.urls["alice"], "submit", str(script), "--wait", "--timeout", "60")
                   for each in (farm, other)]
    finally:
        for proc in procs:
            proc.stop()
        tear_down(broker, other)

    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert again.returncode == 2 and "belongs to another farm" in again.stderr, again.stderr
    assert not (tmp_path / "third").exists()


def test_secrets_never_appear_in_logs(secured: Farm, tmp_path: Path) -> None:
    logs = "".join(p.read_text() for p in tmp_path.rglob("*.log"))
    passwords = [url.split(":")[2].split("@")[0] for url in secured.urls.values()]

    assert logs and not any(password in logs for password in passwords)


def test_a_request_without_user_id_is_refused_so_nobody_creates_ownerless_tasks(
        secured: Farm) -> None:
    peer = RawPeer(secured.urls["alice"])

    reply = peer.request({"command": "task-create", "name": "anonymous",
                          "executable_pyscript": "pass",
                          "requirements": {"usage_user_bob": True}})

    assert reply["error"] == "unauthenticated"
    peer.close()
