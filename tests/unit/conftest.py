"""Fixtures of the coordinator's unit tests: a processor on a real store, SQLite and
PostgreSQL alike (every test that takes `store` or `proc` runs on both); and of the node
agent's: a supervisor, alone (`supervisor`) or with each containment (`contained`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import fresh_database, in_schema
from tests.unit.test_processor import T0, settings
from tests.unit.test_supervisor import GRACE, Tracked, end_everything
from vespid.coordinator.processor import Processor
from vespid.coordinator.store import Store, open_store
from vespid.node_agent.containment import CgroupV1, Containment, ProcessGroupOnly
from vespid.node_agent.supervisor import Supervisor


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    with fresh_database("vespid_unit") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def state_location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's state lives: reopen it with open_store(state_location)."""
    if request.param == "sqlite":
        return tmp_path / "s.db"
    return in_schema(request.getfixturevalue("postgres_database"))


@pytest.fixture
def store(state_location: Path | str) -> Iterator[Store]:
    opened = open_store(state_location)
    yield opened
    opened.close()


@pytest.fixture
def proc(store: Store, tmp_path: Path) -> Processor:
    return Processor(store, settings(tmp_path), now=T0)


# ---- the node agent's supervisor (test_supervisor.py, test_forkserver.py) ------------------
@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    made = Tracked(kill_grace=GRACE)
    yield made
    end_everything(made)


@pytest.fixture(params=["process-group", "cgroup-v1"])
def contained(request: pytest.FixtureRequest) -> Iterator[Supervisor]:
    """A supervisor with the process group alone, then with a cgroup-v1 cell per attempt."""
    found: Containment
    if request.param == "cgroup-v1":
        detected = CgroupV1.detect("unit-supervisor")
        if detected is None:
            pytest.skip("no writable cgroup-v1 hierarchy on this machine")
        found = detected
    else:
        found = ProcessGroupOnly()
    made = Tracked(kill_grace=GRACE, containment=found)
    yield made
    end_everything(made)
    found.release()
