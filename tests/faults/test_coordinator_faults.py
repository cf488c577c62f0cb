"""The coordinator and the broker fail under load; every acknowledged task still ends."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from tests.processes import VespidProcess, base_env, cli
from tests.raw import RawPeer

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def coordinator_state(request: pytest.FixtureRequest) -> str | None:
    """Every fault here is tried on both stores."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_state"))


def complete_tasks(raw: RawPeer, total: int) -> list[dict[str, Any]]:
    reply = raw.request({"command": "task-list", "status": "complete", "limit": total})
    return list(reply["tasks"])


def wait_all_complete(amqp_url: str, total: int, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        peer = RawPeer(amqp_url)
        try:
            done = complete_tasks(peer, total)
        except (AssertionError, pika.exceptions.AMQPError):
            done = []
        finally:
            peer.close()
        if len(done) >= total or time.monotonic() > deadline:
            return done
        time.sleep(1)


def test_every_task_completes_while_the_coordinator_is_sigkilled_repeatedly(
        amqp_url: str, coordinator: VespidProcess,
        start_node: Callable[..., VespidProcess], raw: RawPeer) -> None:
    for name in ("box1", "box2", "box3"):
        start_node(name, {"memory": 8000, "cores": 4})
    total = 2000
    for i in range(total):
        raw.send({"command": "task-create", "name": f"flow-{i:04d}",
                  "executable_pyscript": "pass"})
        if i % 400 == 399:
            raw.connection.process_data_events(time_limit=0)

    started = time.monotonic()
    kills = 0
    for _ in range(6):
        time.sleep(2)
        coordinator.kill()
        kills += 1
        # A repeated message must change nothing: send duplicates while it is down.
        for i in range(0, total, 50):
            raw.send({"command": "task-create", "name": f"flow-{i:04d}",
                      "executable_pyscript": "pass"})
        coordinator.start()
    done = wait_all_complete(amqp_url, total, timeout=300)
    elapsed = time.monotonic() - started

    names = {t["name"] for t in done}
    assert len(done) == total and names == {f"flow-{i:04d}" for i in range(total)}
    assert {t["success"] for t in done} == {"ok"}
    duplicated = sum(1 for t in done if t["attempt"] > 1)
    check = cli(amqp_url, "coordinator", "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    print(f"\ncoordinator SIGKILL x{kills}: {total} tasks, 0 lost, {duplicated} re-run, "
          f"all done in {elapsed:.0f} s")


@pytest.fixture
def broker_restart() -> Iterator[Callable[[], None]]:
    stopped = False

    def restart() -> None:
        nonlocal stopped
        subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, timeout=120)
        stopped = True
        time.sleep(3)
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, timeout=120)
        subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, timeout=120)
        stopped = False

    yield restart
    if stopped:
        subprocess.run(["rabbitmqctl", "-q", "start_app"], check=False, timeout=120)


def test_work_finishes_across_a_broker_restart_and_no_output_is_lost(
        amqp_url: str, coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, broker_restart: Callable[[], None], tmp_path: Path,
        started: list[VespidProcess]) -> None:
    central = tmp_path / "central-logs"
    logserver = VespidProcess(["logserver", "--dir", str(central)], tmp_path / "logserver.log",
                              base_env(amqp_url), tmp_path).start()
    started.append(logserver)
    logserver.wait_for_log("logserver_started")
    agent = start_node("box1", {"memory": 4000, "cores": 2})
    talker = ("import time\nfor i in range(60):\n    print(f'line {i}', flush=True)\n"
              "    time.sleep(0.1)\n")
    raw.request({"command": "task-create", "name": "talker", "executable_pyscript": talker})
    for i in range(10):
        raw.request({"command": "task-create", "name": f"queued-{i}",
                     "executable_pyscript": "import time; time.sleep(0.2)"})
    raw.wait_for("talker", lambda i: i["status"] == "working")
    raw.close()

    broker_restart()
    done = wait_all_complete(amqp_url, 11, timeout=120)

    assert len(done) == 11 and {t["success"] for t in done} == {"ok"}
    expected = [f"line {i}" for i in range(60)]
    log = (agent.log_path.parent / "work" / "logs" / "talker" / "attempt-1.log").read_text()
    assert [line for line in log.splitlines() if line.startswith("line")] == expected
    # The lines written while the broker was away reach the central copy too, in order.
    deadline = time.monotonic() + 30
    while not (central / "talker" / "attempt-1.json").exists() or '"complete": true' not in \
            (central / "talker" / "attempt-1.json").read_text():
        assert time.monotonic() < deadline, "the log server never got the end of the log"
        time.sleep(0.2)
    assert (central / "talker" / "attempt-1.log").read_text().splitlines() == expected


def test_a_coordinator_paused_longer_than_the_node_timeout_loses_no_node_on_waking(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess], raw: RawPeer,
        tmp_path: Path) -> None:
    """A coordinator that heard nothing for a while (SIGSTOP here; a commit the disk held
    up, a starved machine) finds the nodes' heartbeats waiting in its socket. Its stall is
    not their silence: no node is lost and the running task is not started again. Before,
    the overdue tick ran before the waiting node-sets were read, and lost every node."""
    start_node("box1", {"memory": 4000, "cores": 2})
    marker = tmp_path / "ran"
    raw.request({"command": "task-create", "name": "long", "executable_pyscript":
                 f"import pathlib, time; p = pathlib.Path({str(marker)!r}); "
                 "p.open('a').write('ran\\n'); time.sleep(8)"})
    raw.wait_for("long", lambda i: i["status"] == "working")
    offset = len(coordinator.log())

    coordinator.pause()
    time.sleep(6)  # three times the node timeout of these tests (0.5 s x 4)
    coordinator.resume()

    done = raw.wait_for("long", lambda i: i["status"] == "complete", timeout=60)
    assert done["success"] == "ok"
    assert [a["attempt"] for a in done["attempts"]] == [1]
    assert marker.read_text() == "ran\n"
    woken = coordinator.log()[offset:]
    assert '"node_lost"' not in woken and '"task_requeued"' not in woken, woken[-3000:]
    assert '"coordinator_stalled"' in woken


def test_a_poison_message_is_dead_lettered_by_the_delivery_limit_not_redelivered_forever(
        coordinator: VespidProcess, raw: RawPeer) -> None:
    coordinator.kill()  # stand in for a coordinator that dies on this message every time
    raw.send({"command": "task-info", "name": "poison"})
    channel = raw.channel
    deliveries = 0

    def fail_on_it(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
        nonlocal deliveries
        deliveries += 1
        ch.basic_nack(method.delivery_tag, requeue=True)

    # A consumer (basic.get is refused on single-active-consumer queues) that fails on it.
    channel.basic_consume("vespid.coordinator", fail_on_it)
    deadline = time.monotonic() + 30
    last = -1
    while deliveries != last and time.monotonic() < deadline:
        last = deliveries
        raw.connection.process_data_events(time_limit=1.0)

    props, body = raw.get("vespid.dead")

    assert json.loads(body)["name"] == "poison"
    assert props.headers["x-first-death-reason"] == "delivery_limit"
    assert deliveries == 21  # the first delivery and 20 redeliveries
