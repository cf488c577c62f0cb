"""Fixtures of the coordinator's unit tests: a processor on a real store, SQLite and
PostgreSQL alike (every test that takes `store` or `proc` runs on both)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import fresh_database, in_schema
from tests.unit.test_processor import T0, settings
from vespid.coordinator.processor import Processor
from vespid.coordinator.store import Store, open_store


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
