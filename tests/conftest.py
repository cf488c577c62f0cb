from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import processes
from tests.broker import Broker, find_broker
from tests.postgres import fresh_database
from tests.processes import VespidProcess
from tests.raw import RawPeer

# A run that goes on past this (a broker that blocks publishers makes every test wait for its
# timeout) stops with what it has, so CI reports failures instead of running out of time.
SESSION_BUDGET_SECONDS = float(os.environ.get("VESPID_TEST_BUDGET_SECONDS", "3600"))
_session_started = time.monotonic()
EXIT_STATUS = pytest.StashKey[int]()  # pytest's, kept for pytest_unconfigure


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    spent = time.monotonic() - _session_started
    if spent > SESSION_BUDGET_SECONDS:
        pytest.exit(f"the test run has taken {spent:.0f} s, over its budget of "
                    f"{SESSION_BUDGET_SECONDS:.0f} s (VESPID_TEST_BUDGET_SECONDS), after "
                    f"{nodeid}: stopping here", returncode=1)


def pytest_unconfigure(config: pytest.Config) -> None:
    """A thread a test left running (a consumer still blocked on a socket) would keep the
    interpreter from exiting after the summary, and CI would wait for it until its own
    timeout: name it and leave with pytest's status."""
    left = [t for t in threading.enumerate()
            if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if left:
        sys.stderr.write("threads left running by the tests (ended with the process): "
                         f"{', '.join(t.name for t in left)}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(config.stash.get(EXIT_STATUS, 1))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    with find_broker() as found:
        yield found


@pytest.fixture
def amqp_url(broker: Broker) -> Iterator[str]:
    """A vhost of this test's own: no test ever sees another's messages."""
    with broker.fresh_vhost() as url:
        yield url


@pytest.fixture
def started(amqp_url: str) -> Iterator[list[VespidProcess]]:
    procs: list[VespidProcess] = []
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture
def postgres_state() -> Iterator[str]:
    """A PostgreSQL database of this test's own, as a coordinator's --state."""
    with fresh_database() as url:
        yield url


@pytest.fixture
def coordinator_state() -> str | None:
    """The state a test's coordinator keeps: None for a SQLite file in its folder; a module
    overrides this to run its tests on PostgreSQL too."""
    return None


@pytest.fixture
def coordinator(amqp_url: str, tmp_path: Path, started: list[VespidProcess],
                coordinator_state: str | None) -> VespidProcess:
    proc = processes.coordinator(amqp_url, tmp_path / "coordinator",
                                 state=coordinator_state).start()
    started.append(proc)
    proc.wait_for_log("coordinator_consuming")
    return proc


@pytest.fixture
def start_node(amqp_url: str, tmp_path: Path, started: list[VespidProcess]
               ) -> Callable[..., VespidProcess]:
    def start(name: str = "box1", capabilities: dict[str, Any] | None = None,
              repositories: dict[str, dict[str, Any]] | None = None,
              **env: str) -> VespidProcess:
        proc = processes.node(amqp_url, tmp_path / "nodes", name, capabilities,
                              repositories, **env).start()
        started.append(proc)
        proc.wait_for_log("node_connected")
        return proc

    return start


@pytest.fixture
def raw(amqp_url: str) -> Iterator[RawPeer]:
    peer = RawPeer(amqp_url)
    yield peer
    peer.close()


@pytest.fixture
def logserver(amqp_url: str, tmp_path: Path, started: list[VespidProcess]) -> Path:
    """A running `vespid logserver`; returns the folder it keeps logs in."""
    folder = tmp_path / "central-logs"
    proc = VespidProcess(["logserver", "--dir", str(folder)], tmp_path / "logserver.log",
                         processes.base_env(amqp_url), tmp_path).start()
    started.append(proc)
    proc.wait_for_log("logserver_started")
    return folder
