"""PostgreSQL store: the state of a farm whose coordinators run on more than one machine.

Same tables and guarantees as the SQLite store (a batch's state and outbox commit in one
transaction), plus fencing, so that two coordinators never both write: a coordinator that
becomes active takes a new epoch (`take_over`), and every transaction first reads the epoch
under a share lock and refuses to go on if it is no longer its own. A takeover's update
waits for a batch in flight to finish, and every later batch of the old coordinator sees
the new epoch: its commits are refused, it stops itself, and nothing it decided after
losing the lease is committed, so nothing of it reaches a node.

A coordinator that is paused (SIGSTOP, a frozen VM) inside a transaction would hold that
share lock for ever; the server ends such a session after `IDLE_IN_TRANSACTION`, so a
standby's takeover waits that long at most.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from vespid.coordinator.store import SCHEMA, Store
from vespid.shared.errors import StoreError, StoreUnavailable, Superseded
from vespid.shared.logs import get_logger
from vespid.shared.transport import redact

log = get_logger(__name__)

IDLE_IN_TRANSACTION = "5s"
# What means the connection or its transaction is gone (the server went away, or ended an
# idle transaction), as opposed to a statement that is wrong.
LOST = (psycopg.OperationalError, psycopg.InterfaceError, psycopg.InternalError)
CONNECT_TIMEOUT_SECONDS = 5

LEASE = """
CREATE TABLE IF NOT EXISTS coordinator_lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL,
    holder TEXT NOT NULL,
    taken_at DOUBLE PRECISION NOT NULL
);
INSERT INTO coordinator_lease VALUES (1, 0, '', 0) ON CONFLICT (id) DO NOTHING;
"""


class PostgresStore(Store):
    PLACEHOLDER = "%s"
    shared = True

    def __init__(self, url: str) -> None:
        super().__init__()
        self.location = redact(url)
        self._url = url
        self.epoch: int | None = None  # set by take_over; None: not fenced (--check, tests)
        try:
            self._db = psycopg.connect(url, autocommit=True,
                                       connect_timeout=CONNECT_TIMEOUT_SECONDS,
                                       application_name="vespid-coordinator")
            self._db.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION}'")
            # One statement per schema change, under a lock: coordinators starting together
            # would otherwise race on CREATE ... IF NOT EXISTS.
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(7531)")
                self._db.execute(SCHEMA.format(integer="BIGINT", blob="BYTEA", head="") + LEASE)
                self._migrate()
        except psycopg.Error as exc:
            raise StoreUnavailable(f"PostgreSQL at {self.location}: {_reason(exc)}") from None

    # ---- dialect -------------------------------------------------------------------------
    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._translated():
            cursor = self._db.execute(self._sql(sql) if params else sql, params or None)
            return cursor.fetchall() if cursor.description else []

    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        with self._translated(), self._db.cursor() as cursor:
            cursor.executemany(sql, rows)

    def _upsert(self, table: str, columns: Sequence[str]) -> str:
        names = ", ".join(columns)
        marks = ", ".join(["%s"] * len(columns))
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns[1:])
        return (f"INSERT INTO {table} ({names}) VALUES ({marks}) "
                f"ON CONFLICT ({columns[0]}) DO UPDATE SET {updates}")

    def _has_column(self, table: str, column: str) -> bool:
        return bool(self._execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ? AND column_name = ?", (table, column)))

    def close(self) -> None:
        self._db.close()

    @property
    def in_transaction(self) -> bool:
        return self._db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._translated(), self._db.transaction():
            self._check_epoch()
            yield

    # ---- fencing -------------------------------------------------------------------------
    def take_over(self, holder: str) -> int:
        """Take a new epoch: from this commit on, the previous holder's are refused."""
        with self._translated():
            while True:
                try:
                    with self._db.transaction():
                        # Waits for a batch in flight, but not for ever: a session stuck in
                        # the middle of a pipeline (cut off, paused) is not ended by
                        # idle_in_transaction_session_timeout, so end it here.
                        self._db.execute(f"SET LOCAL lock_timeout = '{IDLE_IN_TRANSACTION}'")
                        row = self._db.execute(
                            "UPDATE coordinator_lease SET epoch = epoch + 1, holder = %s, "
                            "taken_at = %s WHERE id = 1 RETURNING epoch",
                            (holder, time.time())).fetchone()
                    break
                except psycopg.errors.LockNotAvailable:
                    ended = self._db.execute(
                        "SELECT pid, pg_terminate_backend(pid) FROM pg_locks "
                        "WHERE relation = 'coordinator_lease'::regclass AND granted "
                        "AND pid <> pg_backend_pid()").fetchall()
                    log.warning("stuck_holder_ended", sessions=[pid for pid, _ in ended])
        assert row is not None
        self.epoch = int(row[0])
        log.info("state_taken_over", epoch=self.epoch, holder=holder)
        return self.epoch

    def explain_loss(self, error: StoreError) -> StoreError:
        """A connection that broke may have been ended by a coordinator taking over (its
        take_over ends a session stuck holding the lease): a fresh connection reads the lease
        so that the operator is told which it was."""
        if self.epoch is None or isinstance(error, Superseded):
            return error
        try:
            with psycopg.connect(self._url, autocommit=True,
                                 connect_timeout=CONNECT_TIMEOUT_SECONDS) as fresh:
                row = fresh.execute(
                    "SELECT epoch, holder FROM coordinator_lease WHERE id = 1").fetchone()
        except psycopg.Error:
            return error
        if row is None or int(row[0]) == self.epoch:
            return error
        return Superseded(f"coordinator {row[1]} took over this state (epoch {row[0]}, this "
                          f"one held {self.epoch}); this one's connection was ended")

    def verify_lease(self) -> None:
        with self._translated(), self._db.transaction():
            self._check_epoch()

    def lease(self) -> tuple[int, str]:
        """(epoch, holder) as the database has them now."""
        rows = self._execute("SELECT epoch, holder FROM coordinator_lease WHERE id = 1")
        return int(rows[0][0]), str(rows[0][1])

    def _check_epoch(self) -> None:
        if self.epoch is None:
            return
        row = self._db.execute(
            "SELECT epoch, holder FROM coordinator_lease WHERE id = 1 FOR SHARE").fetchone()
        assert row is not None
        if int(row[0]) != self.epoch:
            raise Superseded(f"coordinator {row[1]} took over this state (epoch {row[0]}, "
                             f"this one held {self.epoch})")

    @contextmanager
    def _translated(self) -> Iterator[None]:
        # psycopg's errors never leave this module: the processor must tell a store that
        # failed (stop, never carry on from memory) from a message that did.
        try:
            yield
        except LOST as exc:
            raise StoreUnavailable(f"PostgreSQL at {self.location}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


