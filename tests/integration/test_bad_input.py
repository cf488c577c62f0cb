"""Malformed messages never stop the coordinator: each gets an error reply or is dead-lettered."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.processes import VespidProcess
from tests.raw import RawPeer

pytestmark = pytest.mark.integration

GOOD = {"command": "task-create", "name": "good", "executable_pyscript": "pass"}


def create(**changes: Any) -> dict[str, Any]:
    message = {**GOOD, **changes}
    return {k: v for k, v in message.items() if v is not ...}


MALFORMED: list[tuple[str, bytes | dict[str, Any], str]] = [
    ("not json", b"{not json", "invalid_json"),
    ("not utf-8", b"\xff\xfe\x00", "invalid_json"),
    ("a json array", b"[1, 2, 3]", "invalid_json"),
    ("a json string", b'"task-create"', "invalid_json"),
    ("empty body", b"", "invalid_json"),
    ("no command", {"name": "x"}, "invalid_message"),
    ("unknown command", {"command": "task-explode", "name": "x"}, "unknown_command"),
    ("command of wrong type", {"command": 7}, "unknown_command"),
    ("unknown golem type", {"type": "Nope"}, "unknown_type"),
    ("missing name", create(name=...), "invalid_message"),
    ("name of wrong type", create(name=12), "invalid_message"),
    ("name with spaces", create(name="two words"), "invalid_message"),
    ("name too long", create(name="x" * 201), "invalid_message"),
    ("no executable", create(executable_pyscript=...), "invalid_message"),
    ("two executables", create(executable_pyfile="a.py"), "invalid_message"),
    ("requirements not an object", create(requirements=[1]), "invalid_message"),
    ("memory as a string", create(requirements={"memory": "lots"}), "invalid_message"),
    ("negative cores", create(requirements={"cores": -2}), "invalid_message"),
    ("label not boolean", create(requirements={"usage_gpu": 1}), "invalid_message"),
    ("environment value not a string", create(environment={"A": 1}), "invalid_message"),
    ("misspelled field", create(requirments={}), "invalid_message"),
    ("unknown parent", create(parent="nobody"), "unknown_parent"),
    ("bad severity", {"command": "task-update", "name": "x", "success": "meh"},
     "invalid_message"),
    ("node-set with bad capabilities", {"command": "node-set", "name": "n",
                                        "capabilities": {"memory": "big"}}, "invalid_message"),
    ("huge body", b'{"command":"task-create","pad":"' + b"x" * (5 * 1024 * 1024) + b'"}',
     "too_large"),
]


@pytest.mark.parametrize(("kind", "body", "code"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_request_gets_an_error_reply_a_person_can_act_on(
        coordinator: VespidProcess, raw: RawPeer, kind: str, body: Any, code: str) -> None:
    reply = raw.request(body)

    assert reply["command"] == "error", kind
    assert reply["error"] == code
    assert len(reply["message"]) > 20 and "Traceback" not in reply["message"]
    assert raw.request({"command": "task-info", "name": "anything"})["status"] == "invalid"


def test_malformed_messages_without_reply_to_are_dead_lettered_with_the_reason(
        coordinator: VespidProcess, raw: RawPeer) -> None:
    bodies = [b"{not json", json.dumps(create(requirements={"memory": "lots"})).encode()]
    for body in bodies:
        raw.send(body)

    reasons = []
    for body in bodies:
        props, dead = raw.get("vespid.dead")
        assert dead == body
        reasons.append(props.headers["x-vespid-error"])

    assert reasons[0].startswith("invalid_json")
    assert "requirements" in reasons[1] and "memory" in reasons[1]


def test_the_coordinator_keeps_serving_after_a_flood_of_bad_input(
        coordinator: VespidProcess, raw: RawPeer) -> None:
    for _kind, body, _code in MALFORMED:
        raw.send(body if isinstance(body, bytes) else json.dumps(body).encode())

    assert raw.request(GOOD) == {"command": "ack", "name": "good"}
    assert raw.info("good")["name"] == "good"
    assert coordinator.process is not None and coordinator.process.poll() is None


def test_a_repeated_task_create_is_acknowledged_and_a_different_one_conflicts(
        coordinator: VespidProcess, raw: RawPeer) -> None:
    assert raw.request(GOOD)["command"] == "ack"
    assert raw.request(GOOD)["command"] == "ack"

    reply = raw.request(create(executable_pyscript="print('different')"))

    assert reply["error"] == "conflict"
