"""Central logs: streamed by the node, kept by the log server, followed live by the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.processes import VespidProcess, base_env, cli
from tests.raw import RawPeer

pytestmark = pytest.mark.integration


def test_a_followed_log_prints_every_line_live_and_the_server_keeps_the_same_file(
        amqp_url: str, coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        logserver: Path, raw: RawPeer) -> None:
    agent = start_node("box1")
    script = ("import time\nfor i in range(30):\n    print(f'step {i}', flush=True)\n"
              "    time.sleep(0.05)\n")
    raw.request({"command": "task-create", "name": "chatty", "executable_pyscript": script})
    raw.wait_for("chatty", lambda i: i["status"] == "working")

    follower = subprocess.run([sys.executable, "-m", "vespid.client.cli", "logs", "-f",
                               "chatty"], env=base_env(amqp_url), capture_output=True,
                              text=True, timeout=60)
    raw.wait_for("chatty", lambda i: i["status"] == "complete")
    later = cli(amqp_url, "logs", "chatty")

    expected = "".join(f"step {i}\n" for i in range(30))
    local = (agent.log_path.parent / "work" / "logs" / "chatty" / "attempt-1.log").read_text()
    assert follower.returncode == 0, follower.stderr
    assert follower.stdout == expected
    assert later.stdout == expected and local == expected
    assert (logserver / "chatty" / "attempt-1.log").read_text() == expected


def test_logs_without_a_log_server_says_how_to_start_one(
        amqp_url: str, coordinator: VespidProcess) -> None:
    result = cli(amqp_url, "logs", "anything", "--request-timeout", "2")

    assert result.returncode == 3 and "vespid logserver --dir" in result.stderr
