"""A URL setting that names several broker addresses, the first of them dead: every process
(coordinator, node agent, CLI, and the task scripts the agent starts) moves on to one that
answers. The three-node cluster itself is tests/ha."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests import processes
from tests.processes import VespidProcess, cli

pytestmark = pytest.mark.integration


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def cluster_url(amqp_url: str) -> str:
    """The test's vhost on a dead address first, then on the real broker."""
    dead = urlsplit(amqp_url)._replace(netloc=f"guest:guest@127.0.0.1:{unused_port()}")
    return f"{urlunsplit(dead)},{amqp_url}"


@pytest.fixture
def farm(cluster_url: str, tmp_path: Path) -> Iterator[list[VespidProcess]]:
    procs = [processes.coordinator(cluster_url, tmp_path / "coordinator").start()]
    procs[0].wait_for_log("coordinator_consuming")
    procs.append(processes.node(cluster_url, tmp_path / "nodes", "box1").start())
    procs[1].wait_for_log("node_connected")
    yield procs
    for proc in procs:
        proc.stop()


def test_every_process_skips_a_dead_address_and_a_tree_completes(
        cluster_url: str, farm: list[VespidProcess], tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    # The task script is a client too: it reaches the broker through the same setting.
    script.write_text(
        "from vespid.client import Client\n"
        "with Client() as vespid:\n"
        "    child = vespid.create_task('child', \"print('child')\")\n"
        "    assert vespid.wait_all([child.name], timeout=60)[child.name].ok\n")

    result = cli(cluster_url, "submit", str(script), "--wait", "--timeout", "90", "--json",
                 timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["success"] == "ok"
    assert "broker_unreachable_retrying" in farm[0].log() + farm[1].log() + result.stderr
