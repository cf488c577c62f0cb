"""Fencing of the PostgreSQL store: once a newer coordinator took the state over, an older
one can commit nothing, however it was held up."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.postgres import in_schema
from vespid.coordinator.pgstore import PostgresStore
from vespid.coordinator.state import Node
from vespid.shared.errors import StoreUnavailable, Superseded


@pytest.fixture
def url(postgres_database: str) -> str:
    return in_schema(postgres_database)


@pytest.fixture
def opened(url: str) -> Iterator[list[PostgresStore]]:
    stores: list[PostgresStore] = []
    yield stores
    for store in stores:
        store.close()


def open_(url: str, opened: list[PostgresStore]) -> PostgresStore:
    store = PostgresStore(url)
    opened.append(store)
    return store


def write_node(store: PostgresStore, name: str) -> None:
    state = store.load_state()
    node = Node(name=name, capabilities={"cores": 1}, repositories={}, last_seen=0.0)
    state.join(node)
    with store.transaction():
        store.flush(state)


def test_each_takeover_takes_a_newer_epoch(url: str, opened: list[PostgresStore]) -> None:
    first, second = open_(url, opened), open_(url, opened)

    assert first.take_over("a") < second.take_over("b")
    assert second.lease() == (second.epoch, "b")


def test_the_superseded_coordinator_commits_nothing_more(
        url: str, opened: list[PostgresStore]) -> None:
    old, new = open_(url, opened), open_(url, opened)
    old.take_over("old")
    write_node(old, "before")
    new.take_over("new")

    with pytest.raises(Superseded, match="new took over"):
        write_node(old, "after")
    with pytest.raises(Superseded):
        old.verify_lease()

    assert set(new.load_state().nodes) == {"before"}
    write_node(new, "by-the-new-one")  # the new holder writes as usual
    assert set(new.load_state().nodes) == {"before", "by-the-new-one"}


def test_a_takeover_waits_for_the_batch_in_flight_and_the_next_batch_is_refused(
        url: str, opened: list[PostgresStore]) -> None:
    old, new = open_(url, opened), open_(url, opened)
    old.take_over("old")
    took: list[int] = []
    state = old.load_state()
    state.join(Node(name="in-flight", capabilities={}, repositories={}, last_seen=0.0))
    with old.transaction():
        taker = threading.Thread(target=lambda: took.append(new.take_over("new")))
        taker.start()
        time.sleep(0.5)
        assert took == []  # it waits: the batch holds the lease row
        old.flush(state)
    taker.join(timeout=10)

    assert took and "in-flight" in new.load_state().nodes  # that batch was committed whole
    with pytest.raises(Superseded):
        write_node(old, "next")


def test_a_coordinator_paused_inside_a_batch_cannot_hold_off_a_takeover(
        url: str, opened: list[PostgresStore]) -> None:
    paused, standby = open_(url, opened), open_(url, opened)
    paused.take_over("paused")
    batch = paused.transaction()
    batch.__enter__()  # and then nothing: the process is stopped mid-batch

    started = time.monotonic()
    standby.take_over("standby")  # the server ends the idle transaction after 5 s

    assert time.monotonic() - started < 30
    with pytest.raises(StoreUnavailable) as lost:
        batch.__exit__(None, None, None)
    # The operator is told the session was ended by a takeover, not just that it broke.
    explained = paused.explain_loss(lost.value)
    assert isinstance(explained, Superseded) and "standby took over" in str(explained)


def test_a_lost_connection_without_a_takeover_stays_a_lost_connection(
        url: str, opened: list[PostgresStore]) -> None:
    store = open_(url, opened)
    store.take_over("only")
    lost = StoreUnavailable("PostgreSQL at x: server closed the connection unexpectedly")

    assert store.explain_loss(lost) is lost
