"""The failure paths a person meets first: each bad setting ends the command at once, with the
exit code scripts rely on and one sentence naming the cause and the fix."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pika
import pytest

from tests.broker import Broker
from tests.processes import VespidProcess, base_env, cli
from tests.processes import coordinator as coordinator_process
from tests.raw import RawNode, RawPeer

pytestmark = pytest.mark.integration
QUICK = 5.0  # seconds a bad setting may take to be reported; the request timeout is 30


def timed(url: str, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = cli(url, *args, "--request-timeout", "30")
    return result, time.monotonic() - started


def with_vhost(url: str, vhost: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + vhost


@pytest.mark.parametrize(("case", "code", "says"), [
    ("malformed URL", 2, "is not an AMQP URL"),
    ("wrong password", 2, "refused the login of user 'guest'"),
    ("missing vhost", 2, "has no vhost 'vespid-no-such-vhost'"),
    ("unreachable port", 3, "no RabbitMQ broker answers at 127.0.0.1:1"),
    ("no coordinator", 3, "no coordinator has run on this vhost"),
])
def test_a_bad_setting_ends_a_client_command_at_once_with_a_sentence(
        amqp_url: str, case: str, code: int, says: str) -> None:
    url = {"malformed URL": "notaurl",
           "wrong password": amqp_url.replace("guest:guest@", "guest:wrong@"),
           "missing vhost": with_vhost(amqp_url, "vespid-no-such-vhost"),
           "unreachable port": "amqp://guest:guest@127.0.0.1:1/%2F",
           "no coordinator": amqp_url}[case]

    result, took = timed(url, "tasks")

    assert (result.returncode, took < QUICK) == (code, True), (took, result.stderr)
    assert says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) <= 2


def test_no_log_server_is_said_at_once(amqp_url: str, coordinator: VespidProcess) -> None:
    result, took = timed(amqp_url, "logs", "anything")

    assert (result.returncode, took < QUICK) == (3, True), (took, result.stderr)
    assert "no log server has run on this vhost" in result.stderr
    assert "vespid logserver --dir" in result.stderr


def test_a_coordinator_meeting_a_queue_with_other_arguments_stops_with_a_sentence(
        broker: Broker, amqp_url: str, tmp_path: Path) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    connection.channel().queue_declare("vespid.coordinator", durable=True,
                                       arguments={"x-queue-type": "quorum"})
    connection.close()
    proc = coordinator_process(amqp_url, tmp_path / "coordinator").start()

    assert proc.process is not None
    code = proc.process.wait(timeout=30)  # stops, instead of retrying forever

    assert code == 2
    said = proc.log()
    assert "PRECONDITION_FAILED" in said and "delete it" in said and "Traceback" not in said


def test_a_known_node_whose_queue_has_other_arguments_is_named_when_the_coordinator_stops(
        broker: Broker, amqp_url: str, tmp_path: Path) -> None:
    # A start declares the known nodes' queues pipelined, without waiting for each answer;
    # a queue the broker refuses must still end the process with a sentence naming it.
    proc = coordinator_process(amqp_url, tmp_path / "coordinator").start()
    proc.wait_for_log("coordinator_consuming")
    peer = RawPeer(amqp_url)
    try:
        RawNode(peer, "box1", {"cores": 2}).node_set([])
        listed = peer.request({"command": "node-list"})
        deadline = time.monotonic() + 15
        while [n["name"] for n in listed["nodes"]] != ["box1"]:
            assert time.monotonic() < deadline, listed
            listed = peer.request({"command": "node-list"})
    finally:
        peer.close()
    proc.stop()
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_delete("vespid.node.box1")
    channel.queue_declare("vespid.node.box1", durable=True)  # classic: not what v1.1 says
    connection.close()

    again = coordinator_process(amqp_url, tmp_path / "coordinator").start()
    assert again.process is not None
    code = again.process.wait(timeout=60)  # stops, instead of retrying forever

    said = again.log()
    assert code == 2, said
    assert "declaring the queue of node box1" in said and "PRECONDITION_FAILED" in said
    assert "Traceback" not in said


def test_a_node_agent_with_a_wrong_password_stops_with_a_sentence(
        amqp_url: str, tmp_path: Path) -> None:
    bad = amqp_url.replace("guest:guest@", "guest:wrong@")
    config = tmp_path / "node.toml"
    config.write_text(f'name = "box1"\nwork_dir = "{tmp_path / "work"}"\n')

    result = subprocess.run([sys.executable, "-m", "vespid.client.cli", "node", "--config",
                             str(config)], env=base_env(bad), capture_output=True, text=True,
                            timeout=60)

    assert result.returncode == 2, result.stderr
    assert "refused the login" in result.stderr


def test_cancelling_a_finished_task_says_there_is_nothing_to_cancel(
        amqp_url: str, tmp_path: Path, started: list[VespidProcess]) -> None:
    # The raw node says node-set once: a long heartbeat timeout keeps it alive however slowly
    # a loaded machine starts the two CLI processes below.
    coordinator = coordinator_process(amqp_url, tmp_path / "coordinator",
                                      VESPID_MISSED_HEARTBEATS="600").start()
    started.append(coordinator)
    coordinator.wait_for_log("coordinator_consuming")
    peer = RawPeer(amqp_url)
    RawNode(peer, "small", {"memory": 4000, "cores": 2}).node_set([])
    for name in ("gone", "whale"):
        peer.request({"command": "task-create", "name": name, "executable_pyscript": "pass",
                      "requirements": {"memory": 99999999}})
    peer.request({"command": "task-cancel", "name": "gone"})
    peer.close()

    again = cli(amqp_url, "cancel", "gone")
    explained = cli(amqp_url, "explain", "whale")

    assert again.returncode == 0 and "nothing to cancel" in again.stdout, again.stdout
    assert "memory needs 99999999, has 4000" in explained.stdout, explained.stdout
