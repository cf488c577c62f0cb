"""How the store keeps tasks: a complete task's definition in the store only, a state file
of the form before the definition column upgraded when opened, a damaged row refused with
a sentence. SQLite and PostgreSQL alike."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic_core import from_json

from tests.unit.test_processor import T0, info, node_set, send, settings, task_create
from vespid.coordinator import store as store_module
from vespid.coordinator.check import check_state
from vespid.coordinator.processor import Processor
from vespid.coordinator.records import dumps, loads
from vespid.coordinator.state import Task
from vespid.coordinator.store import SqliteStore, Store, open_store
from vespid.shared.errors import StoreError
from vespid.shared.protocol import TaskStatus

# The tables as a state before the definition column had them.
OLD_SCHEMA = """
CREATE TABLE tasks (name TEXT PRIMARY KEY, seq {integer} NOT NULL, status TEXT NOT NULL,
                    parent TEXT, record TEXT NOT NULL);
CREATE TABLE nodes (name TEXT PRIMARY KEY, record TEXT NOT NULL);
"""
SCRIPT = "print('hi')\n"


def old_definition(name: str, parent: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"name": name, "name_pretty": name.upper(), "parent": parent,
            "executable_pyscript": SCRIPT, "executable_pyfile": None,
            "requirements": {"cores": 1}, "repositories": {}, "environment": {"A": "1"},
            "priority": 0, "timeout": None, "retries": 1, "avoid_nodes": [], "key": None,
            **fields}


def old_record(definition: dict[str, Any], seq: int, status: str, **fields: Any
               ) -> dict[str, Any]:
    """Every field, the definition among them, as the store wrote a task before."""
    record = {"seq": seq, "time_create": T0, "status": status, "success": None,
              "node": None, "allocated": {}, "attempt": 0, "time_start": None,
              "time_finish": None, "message": None, "log": None, "path": None,
              "dispatched_at": None, "seen_on_node": False, "cancel_requested": False,
              "holds": {}, "lent_cores": 0.0, "virtual": False, "owner": None,
              "resources": [], "results": [], "definition": definition, "attempts": []}
    record.update(fields)
    return record


def attempt(node: str, start: float, end: float | None, why: str | None) -> dict[str, Any]:
    return {"attempt": 1, "node": node, "start": start, "end": end, "why": why,
            "lost": False, "cause": None, "allocated": {"cores": 1.0}, "late": []}


OLD_TASKS = [
    old_record(old_definition("root", key="build-1"), 1, "complete", success="warning",
               node="n1", allocated={"cores": 1.0}, attempt=1, time_start=T0 + 1,
               time_finish=T0 + 2, message="done, with warnings", owner="alice",
               attempts=[attempt("n1", T0 + 1, T0 + 2, "done, with warnings")]),
    old_record(old_definition("child", parent="root"), 2, "complete", success="ok",
               node="n1", allocated={"cores": 1.0}, attempt=1, time_start=T0 + 1,
               time_finish=T0 + 2, owner="alice", attempts=[attempt("n1", T0 + 1, T0 + 2, "ok")]),
    old_record(old_definition("waiting", requirements={"cores": 1, "cores_max": None,
                                                       "memory": 99999},
                              repositories={"env": {"request": "general", "local": False}}),
               3, "idle", owner="alice"),
]


def write_old_state(location: Path | str, rows: list[tuple[str, str, str | None, str]]) -> None:
    """A state file (or database) as the coordinator wrote it before; rows: name, status,
    parent, record."""
    values = [(name, seq, status, parent, record)
              for seq, (name, status, parent, record) in enumerate(rows, 1)]
    if isinstance(location, Path):
        with sqlite3.connect(location) as db:
            db.executescript(OLD_SCHEMA.format(integer="INTEGER"))
            db.executemany("INSERT INTO tasks VALUES (?,?,?,?,?)", values)
        return
    with psycopg.connect(location, autocommit=True) as db:
        db.execute(OLD_SCHEMA.format(integer="BIGINT"))
        with db.cursor() as cursor:
            cursor.executemany("INSERT INTO tasks VALUES (%s,%s,%s,%s,%s)", values)


def old_rows() -> list[tuple[str, str, str | None, str]]:
    return [(r["definition"]["name"], r["status"], r["definition"]["parent"], json.dumps(r))
            for r in OLD_TASKS]


def reopened(location: Path | str, tmp_path: Path) -> tuple[Store, Processor]:
    store = open_store(location)
    return store, Processor(store, settings(tmp_path), now=T0 + 60)


def test_a_state_of_the_old_form_is_upgraded_and_reads_as_before(
        state_location: Path | str, tmp_path: Path) -> None:
    write_old_state(state_location, old_rows())

    store, proc = reopened(state_location, tmp_path)
    try:
        root, child, waiting = (info(proc, n, T0 + 60) for n in ("root", "child", "waiting"))
        kept = {name: task.stored for name, task in proc.state.tasks.items()}
    finally:
        store.close()

    assert (root["status"], root["success"], root["name_pretty"], root["key"]) == \
        ("complete", "warning", "ROOT", "build-1")
    assert root["executable_pyscript"] == SCRIPT and root["environment"] == {"A": "1"}
    assert root["children"] == ["child"] and root["tree_complete"] is True
    assert root["attempts"] == [attempt("n1", T0 + 1, T0 + 2, "done, with warnings")]
    assert (child["status"], child["parent"], child["owner"]) == ("complete", "root", "alice")
    assert waiting["status"] is None
    assert waiting["requirements"] == {"cores": 1, "cores_max": None, "memory": 99999,
                                       "usage_user_alice": True}
    assert waiting["repositories"] == {"env": {"request": "general", "local": False}}
    assert kept == {"root": True, "child": True, "waiting": True}


def test_an_upgraded_state_opens_again_unchanged(
        state_location: Path | str, tmp_path: Path) -> None:
    write_old_state(state_location, old_rows())
    for _ in range(2):
        store, proc = reopened(state_location, tmp_path)
        try:
            root = info(proc, "root", T0 + 60)
        finally:
            store.close()
        assert (root["status"], root["name_pretty"]) == ("complete", "ROOT")


def test_a_damaged_row_of_the_old_form_is_refused_with_its_name(
        state_location: Path | str) -> None:
    rows = old_rows()
    rows[1] = ("child", "complete", "root", '{"seq": 2, "status": "complete"}')
    write_old_state(state_location, rows)

    with pytest.raises(StoreError, match=r"task .child. .* cannot be upgraded: KeyError"):
        open_store(state_location)


def insert_task(store: Store, name: str, status: str, record: str,
                definition: str | None = None) -> None:
    with store.transaction():
        store._execute("INSERT INTO tasks VALUES (?,?,?,?,?,?)",
                       (name, 2, status, None, record, definition))


@pytest.mark.parametrize("status, record, definition", [
    ("idle", "{not json", None),
    ("idle", '{"seq": 2, "time_create": 1.0, "no_such_field": 1}', None),
    ("idle", '{"seq": 2, "time_create": 1.0}', '{"name": "t2", "requirements": "lots"}'),
    ("idle", '{"seq": 2, "time_create": 1.0}', None),  # a waiting task without a definition
    # What loading a complete task reads of its record (store.HEAD).
    ("complete", "{not json", None),
    ("complete", '{"seq": 2, "time_create": 1.0, "success": "great"}', None),
    ("complete", '{"seq": 2, "time_create": 1.0, "holds": ["ws"]}', None),
])
def test_a_damaged_row_is_refused_with_its_name_not_a_traceback(
        store: Store, proc: Processor, status: str, record: str, definition: str | None
) -> None:
    send(proc, task_create("t1"))
    if isinstance(store, SqliteStore) and status == "complete" and record == "{not json":
        # SQLite derives a complete task's head from its record: it refuses to store one
        # that is not JSON at all.
        with pytest.raises(sqlite3.OperationalError, match="malformed JSON"):
            insert_task(store, "t2", status, record, definition)
        return
    insert_task(store, "t2", status, record, definition)

    with pytest.raises(StoreError, match=r"task .t2. in the state at .* cannot be read"):
        store.load_state()


@pytest.mark.parametrize("record, reason", [
    ('[1, 2]', "it is list, not an object"),
    ('{"seq": 2, "time_create": 1.0, "no_such_field": 1}', "no_such_field"),
    ('{"seq": 2, "time_create": 1.0, "attempts": [{"attempt": 1, "node": "n1", '
     '"start": 1.0, "no_such_field": 1}]}', "an attempt has fields"),
    ('{"seq": 2, "time_create": 1.0, "attempts": [{"attempt": 1, "start": 1.0}]}',
     "an attempt has fields"),  # an attempt without its node
    ('{"seq": 2, "success": "error"}', "no time_create"),
])
def test_a_complete_task_whose_record_is_damaged_loads_and_says_so_when_read(
        store: Store, proc: Processor, record: str, reason: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Its history is damaged, not what anything is decided from: the coordinator starts,
    # and the task shows what its columns hold and why the rest is missing.
    send(proc, task_create("t1"))
    insert_task(store, "t2", "complete", record)
    state = store.load_state()
    task = state.tasks["t2"]
    assert (task.status, task.seq) == (TaskStatus.COMPLETE, 2)
    assert "task_record_unreadable" not in capsys.readouterr().out, "read before anyone asked"
    assert [p for p in check_state(state) if "t2" in p] == \
        [f"task t2: its stored record cannot be read ({task.unreadable})"]
    assert task.unreadable is not None and reason in task.unreadable

    assert task.attempt_spans() == []
    assert task.attempts == [] and task.node is None and task.time_create == 0.0
    assert task.message is not None and reason in task.message
    logged = capsys.readouterr().out
    assert logged.count("task_record_unreadable") == 1 and "task=t2" in logged
    # Changed later (a note, a late report), it keeps its record as the store has it.
    task.message = "a note"
    state.dirty_tasks.add("t2")
    with store.transaction():
        store.flush(state)
    assert store._execute("SELECT record FROM tasks WHERE name = 't2'") == [(record,)]


def test_a_complete_task_keeps_its_definition_in_the_store_only(proc: Processor) -> None:
    send(proc, node_set())
    send(proc, task_create("t1", name_pretty="first", priority=3, environment={"B": "2"}))
    send(proc, {"command": "task-complete", "name": "t1", "node": "n1", "success": "ok",
                "attempt": 1})
    task = proc.state.tasks["t1"]

    assert task.status is TaskStatus.COMPLETE and task._definition is None
    assert (task.name_pretty, task.priority) == ("first", 3)
    shown = info(proc, "t1")
    assert (shown["executable_pyscript"], shown["environment"]) == ("print('hi')", {"B": "2"})
    assert task.definition.environment == {"B": "2"}
    # The same create again is recognised as the same task, read back from the store.
    again = send(proc, task_create("t1", name_pretty="first", priority=3,
                                   environment={"B": "2"}), reply_to="c")
    assert again.replies[0].body == {"command": "ack", "name": "t1"}


def test_a_record_is_written_as_json_that_reads_back_as_json_dumps_would() -> None:
    record = {"seq": 7, "time_start": 1795682254.7299554, "name_pretty": "naïve ✓",
              "allocated": {"cores": math.inf, "memory": 1e-05}, "attempts": [{"why": None}]}

    text = dumps(record)

    assert isinstance(text, str)
    assert json.loads(text) == json.loads(json.dumps(record))
    assert from_json(text) == record


def finished_farm(proc: Processor) -> None:
    """Complete tasks of every kind: a tree with a repository hold, a keyed root, a child
    that failed, one cancelled before it ran; and one still waiting."""
    send(proc, {**node_set(), "repositories": {"ws": {"type": "workspace"}}})
    send(proc, task_create("root", key="build-7", name_pretty="Root",
                           repositories={"env": {"request": "workspace", "local": True}}))
    send(proc, task_create("kid", parent="root", environment={"B": "2"}))
    send(proc, task_create("gone", requirements={"cores": 1, "memory": 10**9}))
    send(proc, {"command": "task-cancel", "name": "gone"}, now=T0 + 1)
    send(proc, task_create("waits", requirements={"cores": 1, "memory": 10**9}))
    send(proc, {"command": "task-update", "name": "kid", "success": "warning",
                "message": "slow"}, now=T0 + 2)
    send(proc, {"command": "task-complete", "name": "kid", "node": "n1", "success": "error",
                "attempt": 1}, now=T0 + 3)
    send(proc, {"command": "task-complete", "name": "root", "node": "n1", "success": "ok",
                "attempt": 1}, now=T0 + 4)


def test_loaded_complete_tasks_read_their_records_only_when_asked_and_show_the_same(
        state_location: Path | str, store: Store, proc: Processor, tmp_path: Path) -> None:
    finished_farm(proc)
    names = sorted(proc.state.tasks)
    before = {name: info(proc, name, T0 + 10) for name in names}
    listed = send(proc, {"command": "task-list", "limit": 100}, T0 + 10, reply_to="c")
    store.close()

    again, reloaded = reopened(state_location, tmp_path)
    try:
        complete = [t for t in reloaded.state.tasks.values() if t.status is TaskStatus.COMPLETE]
        assert {t.name for t in complete} == {"root", "kid", "gone"}
        assert all(t._pending is not None for t in complete), "read before anyone asked"
        assert reloaded.state.tree_worst["root"].value == "error"
        assert reloaded.state.keys, "the keyed root is known by its key"
        assert {name: info(reloaded, name, T0 + 10) for name in names} == before
        assert all(t._pending is None for t in complete)
        relisted = send(reloaded, {"command": "task-list", "limit": 100}, T0 + 10,
                        reply_to="c")
        assert relisted.replies[0].body == listed.replies[0].body
    finally:
        again.close()


def test_sqlite_loads_complete_tasks_without_parsing_their_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    location = tmp_path / "s.db"
    store = open_store(location)
    finished_farm(Processor(store, settings(tmp_path), now=T0))
    store.close()
    parsed: list[str] = []
    real_loads = store_module.loads
    monkeypatch.setattr(store_module, "loads", lambda text: parsed.append(text) or
                        real_loads(text))

    again, reloaded = reopened(location, tmp_path)
    try:
        complete = {r for (r,) in again._execute("SELECT record FROM tasks "
                                                 "WHERE status = 'complete'")}
        assert len(complete) == 3 and parsed, "the waiting task's record is parsed"
        assert not complete & set(parsed), "a complete task's record was parsed at the load"
        assert reloaded.state.tasks["root"].key == "build-7"
        assert reloaded.state.tree_worst["root"].value == "error"
    finally:
        again.close()


def test_a_sqlite_state_without_the_head_column_gets_it_and_loads_as_before(
        tmp_path: Path) -> None:
    location = tmp_path / "s.db"
    store = open_store(location)
    proc = Processor(store, settings(tmp_path), now=T0)
    finished_farm(proc)
    names = sorted(proc.state.tasks)
    before = {name: info(proc, name, T0 + 10) for name in names}
    keys = dict(proc.state.keys)
    store.close()
    with sqlite3.connect(location) as db:  # the table as the version before wrote it
        db.executescript("""
            CREATE TABLE old_tasks (name TEXT PRIMARY KEY, seq INTEGER NOT NULL,
                status TEXT NOT NULL, parent TEXT, record TEXT NOT NULL, definition TEXT);
            INSERT INTO old_tasks SELECT name, seq, status, parent, record, definition
                FROM tasks;
            DROP TABLE tasks;
            ALTER TABLE old_tasks RENAME TO tasks;""")

    for _ in range(2):  # upgraded once, then opened as it is
        again, reloaded = reopened(location, tmp_path)
        try:
            assert again._execute("SELECT head FROM tasks WHERE name = 'root'") == \
                [('["build-7",null,"ok",{"env":"ws"}]',)]
            assert reloaded.state.keys == keys
            assert {name: info(reloaded, name, T0 + 10) for name in names} == before
        finally:
            again.close()
    # Written by a version that knows nothing of it (a positional insert, an update of the
    # record alone), the head still follows the record.
    with sqlite3.connect(location) as db:
        db.execute("INSERT INTO tasks VALUES (?,?,?,?,?,?)",
                   ("late", 9, "complete", None, '{"seq": 9, "time_create": 1.0, '
                    '"key": "k9", "success": "warning"}', None))
        db.execute("UPDATE tasks SET record = ? WHERE name = 'root'",
                   ('{"seq": 1, "time_create": 1.0, "success": "error"}',))
        heads = dict(db.execute("SELECT name, head FROM tasks WHERE name IN ('late', 'root')"))
    assert heads == {"late": '["k9",null,"warning",null]', "root": '[null,null,"error",null]'}


def test_a_sqlite_state_of_the_previous_form_with_a_record_not_json_is_refused_by_name(
        tmp_path: Path) -> None:
    location = tmp_path / "s.db"
    with sqlite3.connect(location) as db:
        db.executescript("""
            CREATE TABLE tasks (name TEXT PRIMARY KEY, seq INTEGER NOT NULL,
                status TEXT NOT NULL, parent TEXT, record TEXT NOT NULL, definition TEXT);
            INSERT INTO tasks VALUES ('t7', 1, 'complete', NULL, '{not json', NULL);""")

    with pytest.raises(StoreError, match=r"task 't7' .* cannot be upgraded: its record is "
                                         r"not JSON"):
        open_store(location)


@contextmanager
def loaded_kid(state_location: Path | str, store: Store, proc: Processor,
               tmp_path: Path) -> Iterator[Task]:
    """The child of a finished farm, as a restarted coordinator loads it."""
    finished_farm(proc)
    store.close()
    again, reloaded = reopened(state_location, tmp_path)
    try:
        yield reloaded.state.tasks["kid"]
    finally:
        again.close()


def test_a_sqlite_library_too_old_for_the_state_is_said_in_a_sentence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 30, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.30.1")

    with pytest.raises(StoreError, match=r"SQLite library is version 3\.30\.1; .* needs 3\.31 "
                                         r"or newer"):
        open_store(tmp_path / "s.db")
    assert not (tmp_path / "s.db").exists()


def test_a_loaded_task_gives_its_attempt_spans_without_keeping_its_record_parsed(
        state_location: Path | str, store: Store, proc: Processor, tmp_path: Path) -> None:
    with loaded_kid(state_location, store, proc, tmp_path) as kid:
        spans = kid.attempt_spans()

        assert isinstance(kid._pending, str), "the timeline's reading kept the record parsed"
        assert spans == [(a.start, a.attempt, a.end) for a in kid.attempts]


def test_a_field_set_before_a_loaded_task_was_read_is_kept_when_the_rest_is_read(
        state_location: Path | str, store: Store, proc: Processor, tmp_path: Path) -> None:
    with loaded_kid(state_location, store, proc, tmp_path) as kid:
        kid.message = "written first"

        assert kid.node == "n1"  # reads the rest of the record
        assert kid.message == "written first"
        assert [a.attempt for a in kid.attempts] == [1]
        assert kid.attempt_spans() == [(a.start, a.attempt, a.end) for a in kid.attempts]


def test_text_only_the_standard_parser_takes_is_written_and_read_back_across_a_restart(
        state_location: Path | str, store: Store, proc: Processor, tmp_path: Path) -> None:
    # A lone surrogate: what a result file whose name is not UTF-8 becomes in Python.
    send(proc, node_set())
    send(proc, task_create("t1"))
    send(proc, b'{"command": "task-update", "name": "t1", "success": "warning", '
               b'"message": "r\\udce9sum"}')
    send(proc, {"command": "task-complete", "name": "t1", "node": "n1", "success": "ok",
                "attempt": 1})
    assert proc.state.tasks["t1"].message == "r\udce9sum"
    store.close()

    again, reloaded = reopened(state_location, tmp_path)
    try:
        assert info(reloaded, "t1")["message"] == "r\udce9sum"
    finally:
        again.close()
    assert loads(dumps({"name": "r\udce9sum"})) == {"name": "r\udce9sum"}


def test_tasks_of_one_kind_share_a_shape_and_a_label_is_never_taken_for_a_number() -> None:
    from vespid.coordinator.state import Task
    from vespid.shared.protocol import TaskDefinition

    def made(name: str, requirements: dict[str, Any], owner: str | None = None) -> Task:
        # Unvalidated, as a definition read back from the store is: 1 would be refused.
        definition = TaskDefinition.model_construct(name=name, executable_pyscript="pass",
                                                    requirements=requirements)
        return Task.new(definition, 1, T0, owner=owner)

    first = made("a", {"cores": 2, "usage_gpu": True}).shape()
    assert made("b", {"cores": 2, "usage_gpu": True}).shape() is first  # made once per kind
    counted = made("c", {"cores": 2, "usage_gpu": 1}).shape()  # equal to True, not a label
    assert "gpu" in first.labels.carried and "gpu" not in counted.labels.carried
    owned = made("d", {"cores": 2, "usage_gpu": True}, owner="alice").shape()
    assert "user_alice" in owned.labels.carried and owned is not first
    # A value that cannot be a key (only a damaged stored row has one) is shaped as before.
    assert made("e", {"cores": 2, "odd": [1]}).shape().cores == 2.0
