"""Fixtures of the coordinator's unit tests: a processor on a real SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_processor import T0, settings
from vespid.coordinator.processor import Processor
from vespid.coordinator.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "s.db")
    yield opened
    opened.close()


@pytest.fixture
def proc(store: Store, tmp_path: Path) -> Processor:
    return Processor(store, settings(tmp_path), now=T0)
