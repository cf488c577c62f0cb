"""SQLite persistence (WAL) of the coordinator's state and of its outbox.

The outbox holds every message a state change causes, written in the same transaction as
the change, and deleted once the broker confirmed it. A coordinator killed at any point
therefore re-sends on restart what it had decided but not yet delivered: nothing decided
is lost, and receivers treat a repeat as a no-op.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vespid.coordinator.state import Node, State, Task

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    parent TEXT,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_parent ON tasks(parent);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    command TEXT NOT NULL,
    body BLOB NOT NULL,
    headers TEXT,
    file TEXT
);
"""
# An extension's table: one JSON record per key.
EXTENSION_TABLE = "CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, record TEXT NOT NULL)"
TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]*")


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    exchange: str
    routing_key: str
    command: str
    body: bytes
    headers: dict[str, Any] | None = None
    file: str | None = None  # a kept file (sha256) to stream to routing_key, not `body`


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode is durable against a process crash, which is what we guard
        # against here; FULL would add an fsync per batch for power loss.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._add_missing_columns()
        self._tables: set[str] = set()  # extension tables made since this store opened

    def _add_missing_columns(self) -> None:
        # A state file written before files were streamed has an outbox without `file`.
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        if "file" not in columns:
            self._db.execute("ALTER TABLE outbox ADD COLUMN file TEXT")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def load_state(self) -> State:
        state = State()
        for (record,) in self._db.execute("SELECT record FROM nodes"):
            state.add_node(Node.from_record(json.loads(record)))
        for (record,) in self._db.execute("SELECT record FROM tasks ORDER BY seq"):
            state.add_task(Task.from_record(json.loads(record)))
        state.drop_released_holds()
        return state

    def records(self, table: str) -> list[dict[str, Any]]:
        """Every record of an extension's table (made on first use)."""
        self._made(table)
        return [json.loads(r) for (r,) in self._db.execute(f"SELECT record FROM {table}")]

    def put_records(self, table: str, records: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Write (key, record) rows of an extension's table; call inside a transaction."""
        rows = [(key, json.dumps(record)) for key, record in records]
        if not rows:
            return  # the usual batch: nothing of this extension changed
        self._made(table)
        # Positional: a table made before extensions named its key column differently.
        self._db.executemany(f"INSERT OR REPLACE INTO {table} VALUES (?, ?)", rows)

    def _made(self, table: str) -> None:
        # Once per table and store, not once per batch.
        if table not in self._tables:
            self._db.execute(EXTENSION_TABLE.format(table=_table(table)))
            self._tables.add(table)

    def flush(self, state: State) -> None:
        """Write what changed in `state`; call inside a transaction."""
        self._db.executemany(
            "INSERT OR REPLACE INTO tasks(name, seq, status, parent, record) VALUES (?,?,?,?,?)",
            [
                (t.name, t.seq, t.status.value, t.parent, json.dumps(t.to_record()))
                for t in (state.tasks[name] for name in state.dirty_tasks)
            ],
        )
        self._db.executemany(
            "INSERT OR REPLACE INTO nodes(name, record) VALUES (?, ?)",
            [(n, json.dumps(state.nodes[n].to_record())) for n in state.dirty_nodes],
        )
        state.dirty_tasks.clear()
        state.dirty_nodes.clear()

    def next_outbox_id(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()
        return int(row[0]) + 1

    def add_outbox(self, entries: Iterable[OutboxEntry]) -> None:
        self._db.executemany(
            "INSERT INTO outbox(id, exchange, routing_key, command, body, headers, file) "
            "VALUES (?,?,?,?,?,?,?)",
            [
                (e.id, e.exchange, e.routing_key, e.command, e.body,
                 json.dumps(e.headers) if e.headers else None, e.file)
                for e in entries
            ],
        )

    def delete_outbox(self, ids: Iterable[int]) -> None:
        self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def pending_outbox(self) -> list[OutboxEntry]:
        rows = self._db.execute(
            "SELECT id, exchange, routing_key, command, body, headers, file FROM outbox "
            "ORDER BY id")
        return [
            OutboxEntry(r[0], r[1], r[2], r[3], bytes(r[4]), json.loads(r[5]) if r[5] else None,
                        r[6])
            for r in rows
        ]


def _table(name: str) -> str:
    if not TABLE_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a table name")
    return name
