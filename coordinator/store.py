"""Persistence of the coordinator's state and of its outbox: SQLite (WAL) embedded, or
PostgreSQL for a farm with standby coordinators (coordinator/pgstore.py).

The outbox holds every message a state change causes, written in the same transaction as
the change, and deleted once the broker confirmed it. A coordinator killed at any point
therefore re-sends on restart what it had decided but not yet delivered: nothing decided
is lost, and receivers treat a repeat as a no-op.

Both stores share everything but their SQL dialect and how a transaction starts: `Store`
holds the logic, a subclass the connection and the statements that differ.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vespid.coordinator.records import dumps, loads
from vespid.coordinator.state import Attempt, Node, State, Task, stored_definition
from vespid.shared.errors import StoreError
from vespid.shared.protocol import Severity, TaskDefinition, TaskStatus

# Both dialects: {integer} and {blob} are their names for a 64-bit integer and for bytes;
# {head}, what a dialect derives from a task's record (SqliteStore.HEAD_COLUMN).
TASKS = """
CREATE TABLE IF NOT EXISTS {table} (
    name TEXT PRIMARY KEY,
    seq {integer} NOT NULL,
    status TEXT NOT NULL,
    parent TEXT,
    record TEXT NOT NULL,
    definition TEXT{head}
);
"""
TASK_INDEXES = ("CREATE INDEX IF NOT EXISTS tasks_parent ON tasks(parent)",
                "CREATE INDEX IF NOT EXISTS tasks_seq ON tasks(seq)")
SCHEMA = TASKS.replace("{table}", "tasks") + "".join(f"{index};\n" for index in TASK_INDEXES) + """
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id {integer} PRIMARY KEY,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    command TEXT NOT NULL,
    body {blob} NOT NULL,
    headers TEXT,
    file TEXT
);
"""
# An extension's table: one JSON record per key.
EXTENSION_TABLE = "CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, record TEXT NOT NULL)"
OUTBOX_COLUMNS = "id, exchange, routing_key, command, body, headers, file"
# What loading the state needs of a complete task besides its name, parent and seq: its
# HEAD, read out of its record (Task.complete_loaded).
HEAD = ("key", "owner", "success", "holds")
TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_COMPLETE = TaskStatus.COMPLETE.value  # read once per task at a load: not through the enum


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    exchange: str
    routing_key: str
    command: str
    body: bytes
    headers: dict[str, Any] | None = None
    file: str | None = None  # a kept file (sha256) to stream to routing_key, not `body`


class Store(ABC):
    """State and outbox over SQL; subclasses supply the connection and the dialect."""

    # `?` or `%s`, and how a row replaces the row of the same key.
    PLACEHOLDER = "?"
    location: str
    # Several coordinators may open it (one active, the others standing by).
    shared = False

    def __init__(self) -> None:
        self._tables: set[str] = set()  # extension tables made since this store opened

    # ---- what a dialect supplies ---------------------------------------------------------
    @abstractmethod
    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement; the rows it returns (none for a write)."""

    @abstractmethod
    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    @abstractmethod
    def _upsert(self, table: str, columns: Sequence[str]) -> str:
        """The statement that writes a row, replacing the row with the same first column."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[None]:
        """One batch: its state and its outbox commit together or not at all."""

    @abstractmethod
    def close(self) -> None: ...

    @property
    @abstractmethod
    def in_transaction(self) -> bool:
        """Whether a transaction is open now (what must run after commit can check it)."""

    def explain_loss(self, error: StoreError) -> StoreError:
        """Why the store was lost, as precisely as can be told afterwards: a store nobody
        else writes has only the error itself."""
        return error

    def take_over(self, holder: str) -> int:
        """Become the one coordinator writing this state; returns the epoch now held. A
        store only one process can open (SQLite) has nobody to fence."""
        return 0

    def verify_lease(self) -> None:
        """Raise Superseded if another coordinator took the state over since take_over
        (never, for a store nobody else opens)."""
        return None

    # ---- shared --------------------------------------------------------------------------
    def _sql(self, sql: str) -> str:
        return sql if self.PLACEHOLDER == "?" else sql.replace("?", self.PLACEHOLDER)

    def _rows(self, sql: str) -> Iterable[tuple[Any, ...]]:
        """The rows of a query, for reading many: a dialect may stream them."""
        return self._execute(sql)

    # What a dialect's tasks table holds of a complete task's HEAD, derived from its record
    # by the database on every write (whichever version of Vespid wrote it), as a JSON list
    # of the values; NULL where it keeps none, and the record is parsed here.
    HEAD_SQL = "NULL"

    def load_state(self) -> State:
        """The state as the store has it. A complete task is loaded from its HEAD, its record
        kept as text until it is read (Task.complete_loaded), its definition left in the
        store (Task.definition reads it back): parsing and keeping 100,000 of either was
        most of a restart's time and memory."""
        state = State()
        for (record,) in self._execute("SELECT record FROM nodes"):
            state.add_node(Node.from_record(json.loads(record)))
        # In order of the seq index (sorting them was a third of reading them).
        for row in self._rows(f"SELECT name, parent, status, seq, {self.HEAD_SQL}, record, CASE "
                              "WHEN status = 'complete' THEN NULL ELSE definition END FROM "
                              "tasks ORDER BY seq"):
            state.add_task(self._task(*row))
        state.drop_released_holds()
        return state

    def _task(self, name: str, parent: str | None, status: str, seq: int, head: str | None,
              record: str, definition: str | None) -> Task:
        try:
            if status == _COMPLETE:
                key, owner, success, holds = _head_of(loads(record)) if head is None \
                    else _head_listed(loads(head))
                return Task.complete_loaded(name, parent, seq, key, owner, success, holds,
                                            record, self.definition_of)
            if definition is None:
                raise ValueError("it is not complete and has no definition")
            return Task.from_record(name, parent, status, loads(record),
                                    stored_definition(loads(definition)), self.definition_of)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StoreError(f"task {name!r} in the state at {self.location} cannot be read: "
                             f"{type(exc).__name__}: {exc}") from None

    def definition_of(self, name: str) -> dict[str, Any]:
        """A task's definition as written when it was created (JSON, as the wire shows it)."""
        rows = self._execute("SELECT definition FROM tasks WHERE name = ?", (name,))
        if not rows or rows[0][0] is None:
            raise StoreError(f"task {name!r} has no definition in the state at {self.location}")
        definition: dict[str, Any] = json.loads(rows[0][0])
        return definition

    def _migrate(self) -> None:
        """A state written before definitions had a column of their own keeps each in its
        task's record, with every other field: split them, once, in one transaction."""
        if self._has_column("tasks", "definition"):
            return
        self._execute("ALTER TABLE tasks ADD COLUMN definition TEXT")
        rows = []
        for name, record in self._execute("SELECT name, record FROM tasks"):
            try:
                upgraded, definition = upgrade_record(json.loads(record))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise StoreError(f"task {name!r} in the state at {self.location} cannot be "
                                 f"upgraded: {type(exc).__name__}: {exc}") from None
            rows.append((dumps(upgraded), dumps(definition), name))
        self._execute_many(self._sql("UPDATE tasks SET record = ?, definition = ? "
                                     "WHERE name = ?"), rows)

    @abstractmethod
    def _has_column(self, table: str, column: str) -> bool: ...

    def records(self, table: str) -> list[dict[str, Any]]:
        """Every record of an extension's table (made on first use)."""
        self._made(table)
        return [json.loads(r) for (r,) in self._execute(f"SELECT record FROM {table}")]

    def put_records(self, table: str, records: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Write (key, record) rows of an extension's table; call inside a transaction."""
        rows = [(key, dumps(record)) for key, record in records]
        if not rows:
            return  # the usual batch: nothing of this extension changed
        self._made(table)
        self._execute_many(self._upsert(table, ("key", "record")), rows)

    def _made(self, table: str) -> None:
        # Once per table and store, not once per batch.
        if table not in self._tables:
            self._execute(EXTENSION_TABLE.format(table=_table(table)))
            self._tables.add(table)

    def flush(self, state: State) -> None:
        """Write what changed in `state`; call inside a transaction. A task's definition
        never changes: it is written with the task's first row only."""
        new, changed, kept = [], [], []
        tasks = [state.tasks[name] for name in state.dirty_tasks]
        for t in tasks:
            if t.unreadable:  # its record stays as it is on disk: it is all there is of it
                kept.append((t.status.value, t.name))
            elif t.stored:
                changed.append((t.status.value, dumps(t.to_record()), t.name))
            else:
                new.append((t.name, t.seq, t.status.value, t.parent, dumps(t.to_record()),
                            dumps(t.definition_json())))
        self._execute_many(
            self._upsert("tasks", ("name", "seq", "status", "parent", "record", "definition")),
            new)
        # A task's seq never changes once written. Set again, SQLite rewrote its entry in the
        # seq index all the same: 7 % of the pages each batch wrote in a 1,000-node drain.
        self._execute_many(
            self._sql("UPDATE tasks SET status = ?, record = ? WHERE name = ?"), changed)
        self._execute_many(self._sql("UPDATE tasks SET status = ? WHERE name = ?"), kept)
        for t in tasks:
            t.definition_stored(self.definition_of)
        self._execute_many(
            self._upsert("nodes", ("name", "record")),
            [(n, dumps(state.nodes[n].to_record())) for n in state.dirty_nodes],
        )
        state.dirty_tasks.clear()
        state.dirty_nodes.clear()

    def next_outbox_id(self) -> int:
        rows = self._execute("SELECT COALESCE(MAX(id), 0) FROM outbox")
        return int(rows[0][0]) + 1

    def add_outbox(self, entries: Iterable[OutboxEntry]) -> None:
        self._execute_many(
            self._sql(f"INSERT INTO outbox({OUTBOX_COLUMNS}) VALUES (?,?,?,?,?,?,?)"),
            [
                (e.id, e.exchange, e.routing_key, e.command, e.body,
                 dumps(e.headers) if e.headers else None, e.file)
                for e in entries
            ],
        )

    def delete_outbox(self, ids: Iterable[int]) -> None:
        self._execute_many(self._sql("DELETE FROM outbox WHERE id = ?"), [(i,) for i in ids])

    def pending_outbox(self) -> list[OutboxEntry]:
        rows = self._execute(f"SELECT {OUTBOX_COLUMNS} FROM outbox ORDER BY id")
        return [
            OutboxEntry(r[0], r[1], r[2], r[3], bytes(r[4]), json.loads(r[5]) if r[5] else None,
                        r[6])
            for r in rows
        ]


class SqliteStore(Store):
    # A stored generated column: SQLite derives it in C whenever a row is written, by any
    # version (an older one's positional insert does not see it), so it always agrees with
    # the record; reading it instead of parsing 100,000 records was a third of a restart.
    # (A record that is not JSON cannot be written at all.)
    HEAD_COLUMN = (",\n    head TEXT GENERATED ALWAYS AS (CASE WHEN status = 'complete' "
                   "THEN json_extract(record, " + ", ".join(f"'$.{field}'" for field in HEAD)
                   + ") END) STORED")
    HEAD_SQL = "head"

    # Stored generated columns came in 3.31; JSON functions are built in from 3.38 and in
    # nearly every build before it.
    MIN_VERSION = (3, 31, 0)

    def __init__(self, path: Path) -> None:
        super().__init__()
        if sqlite3.sqlite_version_info < self.MIN_VERSION:
            raise StoreError(
                f"this Python's SQLite library is version {sqlite3.sqlite_version}; the "
                "coordinator's state needs 3.31 or newer: upgrade the system's libsqlite3, or "
                "keep the state in PostgreSQL (--state postgresql://...)")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.location = str(path)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode is durable against a process crash, which is what we guard
        # against here; FULL would add an fsync per batch for power loss.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA.format(integer="INTEGER", blob="BLOB",
                                             head=self.HEAD_COLUMN))
        self._add_missing_columns()
        with self.transaction():
            self._migrate()
            self._add_head()

    def _add_head(self) -> None:
        """A state written before the head column: the table made again with it (SQLite adds
        no stored generated column to a table), once, at about 15 µs a task."""
        if "head" in {row[1] for row in self._db.execute("PRAGMA table_xinfo(tasks)")}:
            return
        damaged = self._execute("SELECT name FROM tasks WHERE status = 'complete' AND NOT "
                                "json_valid(record) LIMIT 1")
        if damaged:
            raise StoreError(f"task {damaged[0][0]!r} in the state at {self.location} cannot be "
                             "upgraded: its record is not JSON")
        columns = "name, seq, status, parent, record, definition"
        self._db.execute(TASKS.format(table="tasks_upgraded", integer="INTEGER",
                                      head=self.HEAD_COLUMN))
        self._db.execute(f"INSERT INTO tasks_upgraded ({columns}) SELECT {columns} FROM tasks")
        self._db.execute("DROP TABLE tasks")
        self._db.execute("ALTER TABLE tasks_upgraded RENAME TO tasks")
        for index in TASK_INDEXES:
            self._db.execute(index)

    def _add_missing_columns(self) -> None:
        # A state file written before files were streamed has an outbox without `file`.
        if not self._has_column("outbox", "file"):
            self._db.execute("ALTER TABLE outbox ADD COLUMN file TEXT")

    def _has_column(self, table: str, column: str) -> bool:
        return column in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def _rows(self, sql: str) -> Iterable[tuple[Any, ...]]:
        return self._db.execute(sql)

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, params).fetchall()

    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._db.executemany(sql, rows)

    def _upsert(self, table: str, columns: Sequence[str]) -> str:
        # Positional: a table made before extensions named its key column differently.
        marks = ",".join("?" * len(columns))
        return f"INSERT OR REPLACE INTO {table} VALUES ({marks})"

    def close(self) -> None:
        self._db.close()

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def upgrade_record(old: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A task's record as a state before the definition column wrote it (every field, the
    definition among them): its record now, and its definition, validated."""
    data = dict(old)
    definition = TaskDefinition.model_validate(data.pop("definition"))
    data.pop("_definition_json", None)
    attempts = [Attempt.from_record(a) for a in data.pop("attempts", [])]
    success = data.pop("success", None)
    task = Task.new(definition, data.pop("seq"), data.pop("time_create"),
                    status=TaskStatus(data.pop("status")), attempts=attempts,
                    success=Severity(success) if success else None, **data)
    return task.to_record(), task.definition_json()


def _head_of(record: Any) -> tuple[Any, Any, Any, dict[str, str]]:
    """A complete task's HEAD, from its parsed record (of JSON that is not an object, none,
    as HEAD_SQL gives it then: the task says what is wrong when its record is read)."""
    if not isinstance(record, dict):
        return None, None, None, {}
    holds = record.get("holds") or {}
    if not isinstance(holds, dict):
        raise TypeError(f"its holds are {type(holds).__name__}, not an object")
    return record.get("key"), record.get("owner"), record.get("success"), holds


def _head_listed(values: list[Any]) -> tuple[Any, Any, Any, dict[str, str]]:
    """A complete task's HEAD as HEAD_SQL gives it: a list of the values, null where none."""
    return _head_of(dict(zip(HEAD, values, strict=True)))


def default_holder() -> str:
    """Who takes the state over, as the lease shows it: host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def open_store(location: str | Path) -> Store:
    """The store a `--state` value names: a postgresql:// URL, or else a SQLite file."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):  # as CoordinatorSettings.state
        from vespid.coordinator.pgstore import PostgresStore  # psycopg only when used

        return PostgresStore(text)
    return SqliteStore(Path(text))


def _table(name: str) -> str:
    if not TABLE_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a table name")
    return name
