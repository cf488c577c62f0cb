"""What the coordinator's decoder (vespid.shared.inbound, over shared/protocol.py) accepts,
what it refuses and how it says so."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from vespid.shared.errors import ProtocolError
from vespid.shared.inbound import decode
from vespid.shared.protocol import (
    NodeList,
    NodeSet,
    Severity,
    TaskCancel,
    TaskComplete,
    TaskCreate,
    TaskInfo,
    TaskList,
    TaskUpdate,
    encode,
    parse_body,
)


def body(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode("utf-8")


def create(**fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"command": "task-create", "name": "build.1",
                               "executable_pyscript": "print('hi')"}
    message.update(fields)
    return message


def strict_json(raw: bytes) -> Any:
    def reject(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(raw, parse_constant=reject)


def refusal(raw: bytes, **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode(raw, **kwargs)
    return caught.value


# --- valid messages -----------------------------------------------------------------------


def test_a_full_task_create_decodes_with_every_field_kept() -> None:
    message = decode(body(create(
        name_pretty="Build one", parent="root", requirements={"cores": 2, "memory": 512,
                                                              "usage_require_gpu": True},
        repositories={"env": {"request": "conda", "local": True}},
        environment={"A": "1"}, priority=7)))

    assert isinstance(message, TaskCreate)
    assert message.name == "build.1"
    assert message.name_pretty == "Build one"
    assert message.parent == "root"
    assert message.requirements == {"cores": 2, "memory": 512, "usage_require_gpu": True}
    assert message.repositories["env"].request == "conda"
    assert message.repositories["env"].local is True
    assert message.environment == {"A": "1"}
    assert message.priority == 7


def test_a_minimal_task_create_gets_empty_defaults_and_priority_zero() -> None:
    message = decode(body(create(requirements=None, environment=None)))

    assert isinstance(message, TaskCreate)
    assert message.requirements == {}
    assert message.environment == {}
    assert message.repositories == {}
    assert message.priority == 0
    assert message.cores == 1.0
    assert message.cores_max == 1.0


def test_a_task_create_with_a_pyfile_instead_of_a_pyscript_is_accepted() -> None:
    message = decode(body({"command": "task-create", "name": "t", "executable_pyfile": "/x.py"}))

    assert isinstance(message, TaskCreate)
    assert message.executable_pyfile == "/x.py"
    assert message.executable_pyscript is None


def test_the_definition_of_a_task_create_has_no_command_but_the_same_fields() -> None:
    message = decode(body(create(requirements={"cores": 3}, priority=2)))

    definition = message.definition()

    assert "command" not in definition.model_dump()
    assert definition.name == message.name
    assert definition.requirements == {"cores": 3}
    assert definition.priority == 2


@pytest.mark.parametrize(("message", "model", "checks"), [
    ({"command": "task-info", "name": "t1"}, TaskInfo, {"name": "t1"}),
    ({"command": "task-cancel", "name": "t1"}, TaskCancel, {"name": "t1"}),
    ({"command": "task-update", "name": "t1", "success": "warning", "message": "slow"},
     TaskUpdate, {"name": "t1", "success": Severity.WARNING, "message": "slow"}),
    ({"command": "task-complete", "name": "t1", "node": "n1", "success": "ok"},
     TaskComplete, {"name": "t1", "node": "n1", "success": Severity.OK, "attempt": None}),
    ({"command": "task-list", "status": "working", "parent": "p", "limit": 5},
     TaskList, {"status": "working", "parent": "p", "limit": 5}),
    ({"command": "task-list"}, TaskList, {"status": None, "parent": None, "limit": 1000}),
    ({"command": "node-list"}, NodeList, {}),
])
def test_each_other_client_command_decodes_to_its_model(
        message: dict[str, Any], model: type, checks: dict[str, Any]) -> None:
    decoded = decode(body(message))

    assert type(decoded) is model
    for field, expected in checks.items():
        assert getattr(decoded, field) == expected


def test_a_node_set_decodes_capabilities_repositories_and_activetasks() -> None:
    decoded = decode(body({
        "command": "node-set", "name": "box-1",
        "capabilities": {"cores": 8, "memory": 16000, "usage_gpu": True},
        "repositories": {"env1": {"type": "conda", "persist": True}},
        "activetasks": {"t1": {"pid": 12}},
    }))

    assert isinstance(decoded, NodeSet)
    assert decoded.name == "box-1"
    assert decoded.capabilities == {"cores": 8, "memory": 16000, "usage_gpu": True}
    assert decoded.repositories["env1"].type == "conda"
    assert decoded.repositories["env1"].persist is True
    assert set(decoded.activetasks) == {"t1"}
    assert decoded.draining is False


def test_a_node_set_may_list_its_active_tasks_as_plain_names() -> None:
    decoded = decode(body({"command": "node-set", "name": "n", "activetasks": ["a", "b"]}))

    assert decoded.activetasks == {"a": {}, "b": {}}


def test_a_node_set_with_null_collections_means_empty_ones() -> None:
    decoded = decode(body({"command": "node-set", "name": "n", "capabilities": None,
                           "repositories": None, "activetasks": None}))

    assert decoded.capabilities == {}
    assert decoded.repositories == {}
    assert decoded.activetasks == {}


def test_a_node_set_from_a_newer_agent_with_extra_fields_is_kept_not_refused() -> None:
    decoded = decode(body({"command": "node-set", "name": "n", "uptime": 42}))

    assert isinstance(decoded, NodeSet)
    assert decoded.model_extra == {"uptime": 42}


# --- unbounded cores_max ------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b'{"command":"task-create","name":"t","executable_pyscript":"x",'
    b'"requirements":{"cores":2,"cores_max":Infinity}}',
    b'{"command":"task-create","name":"t","executable_pyscript":"x",'
    b'"requirements":{"cores":2,"cores_max":"inf"}}',
    b'{"command":"task-create","name":"t","executable_pyscript":"x",'
    b'"requirements":{"cores":2,"cores_max":null}}',
], ids=["json-Infinity", "string-inf", "null"])
def test_an_unbounded_cores_max_becomes_infinity_and_is_encoded_back_as_null(raw: bytes) -> None:
    decoded = decode(raw)

    assert decoded.requirements["cores_max"] == math.inf
    assert decoded.cores_max == math.inf
    assert decoded.cores == 2.0
    encoded = encode(decoded)
    assert b"Infinity" not in encoded
    assert strict_json(encoded)["requirements"] == {"cores": 2, "cores_max": None}


def test_an_unbounded_cores_max_survives_an_encode_decode_round_trip() -> None:
    first = decode(body(create(requirements={"cores_max": "inf"})))

    second = decode(encode(first))

    assert second.requirements["cores_max"] == math.inf
    assert second.definition() == first.definition()


def test_a_finite_cores_max_stays_the_number_it_was() -> None:
    decoded = decode(body(create(requirements={"cores": 1, "cores_max": 4})))

    assert decoded.cores_max == 4.0
    assert json.loads(encode(decoded))["requirements"]["cores_max"] == 4


def test_encode_refuses_to_emit_infinity_or_nan() -> None:
    with pytest.raises(ValueError):
        encode({"x": math.inf})
    with pytest.raises(ValueError):
        encode({"x": math.nan})


def test_encode_writes_compact_json_that_reads_back_the_same() -> None:
    encoded = encode({"command": "ack", "name": "é"})

    assert b" " not in encoded
    assert json.loads(encoded.decode("utf-8")) == {"command": "ack", "name": "é"}


# --- malformed input ----------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"not json", b"{\"command\": ", b"\xff\xfe{}", b""])
def test_a_body_that_is_not_utf8_json_is_invalid_json(raw: bytes) -> None:
    error = refusal(raw)

    assert error.code == "invalid_json"
    assert "JSON" in error.message


@pytest.mark.parametrize(("raw", "expected"), [
    (b'{"cores_max": Infinity, "x": -Infinity}', {"cores_max": math.inf, "x": -math.inf}),
    (b'{"name": "\\ud800"}', {"name": "\ud800"}),  # a lone surrogate, as json.loads takes it
    (b'{"a": 1, "a": 2}', {"a": 2}),
    (b'{"big": 100000000000000000000000000000}', {"big": 10**29}),
    ('{"name": "na\u00efve \u2713"}'.encode(), {"name": "na\u00efve \u2713"}),
], ids=["infinity", "lone-surrogate", "repeated-key", "big-int", "utf-8"])
def test_a_body_reads_as_the_standard_parser_reads_it(raw: bytes, expected: dict[str, Any]
                                                      ) -> None:
    assert parse_body(raw) == expected == json.loads(raw)


@pytest.mark.parametrize(("raw", "kind"), [(b"[1, 2]", "list"), (b'"task-info"', "str"),
                                           (b"42", "int"), (b"null", "NoneType")])
def test_a_json_body_that_is_not_an_object_is_invalid_json(raw: bytes, kind: str) -> None:
    error = refusal(raw)

    assert error.code == "invalid_json"
    assert "object" in error.message
    assert kind in error.message


def test_a_message_without_command_or_type_is_invalid_and_lists_the_commands() -> None:
    error = refusal(body({"name": "t1"}))

    assert error.code == "invalid_message"
    assert "'command'" in error.message
    assert "task-create" in error.message


@pytest.mark.parametrize("command", ["frobnicate", "task-run", "TASK-CREATE"])
def test_an_unknown_command_is_refused_naming_it(command: str) -> None:
    error = refusal(body({"command": command, "name": "t"}))

    assert error.code == "unknown_command"
    assert repr(command) in error.message
    assert "node-set" in error.message


def test_a_message_with_a_type_instead_of_a_command_is_an_unknown_type() -> None:
    error = refusal(body({"type": "TaskCreatedEvent", "task_id": "x"}))

    assert error.code == "unknown_type"
    assert "TaskCreatedEvent" in error.message


def test_a_body_over_the_size_limit_is_too_large() -> None:
    raw = body(create(executable_pyscript="x" * 2000))

    error = refusal(raw, max_bytes=1024)

    assert error.code == "too_large"
    assert str(len(raw)) in error.message
    assert "1024" in error.message


def test_a_body_exactly_at_the_size_limit_is_accepted() -> None:
    raw = body({"command": "node-list"})

    assert isinstance(decode(raw, max_bytes=len(raw)), NodeList)


@pytest.mark.parametrize(("message", "field", "hint"), [
    ({"command": "task-create", "executable_pyscript": "x"}, "name", "required"),
    (create(name="has space"), "name", "pattern"),
    (create(name="x" * 201), "name", "pattern"),
    (create(executable_pyscript=None), "executable", "exactly one"),
    (create(executable_pyfile="/a.py"), "executable", "exactly one"),
    (create(requirements={"memory": "lots"}), "memory", "number"),
    (create(requirements={"memory": -5}), "memory", "negative"),
    (create(requirements={"cores": "inf"}), "cores", "number"),
    (create(requirements={"usage_gpu": 1}), "usage_gpu", "true or false"),
    (create(requirements=[1, 2]), "requirements", "dictionary"),
    (create(environment={"A": 1}), "environment.A", "string"),
    (create(priority="high"), "priority", "integer"),
    (create(colour="blue"), "colour", "not a field"),
    ({"command": "task-info"}, "name", "required"),
    ({"command": "task-update", "name": "t", "success": "great"}, "success", "ok"),
    ({"command": "task-complete", "name": "t", "success": "ok"}, "node", "required"),
    ({"command": "task-list", "limit": 0}, "limit", "greater than"),
    ({"command": "task-list", "status": "sleeping"}, "status", "idle"),
    ({"command": "node-set", "name": "n", "capabilities": {"cores": "eight"}}, "cores",
     "number"),
    ({"command": "node-set", "name": "bad/name"}, "name", "pattern"),
])
def test_an_ill_formed_message_is_invalid_and_the_message_names_the_field(
        message: dict[str, Any], field: str, hint: str) -> None:
    error = refusal(body(message))

    assert error.code == "invalid_message"
    assert error.message.startswith(f"{message['command']}: ")
    assert field in error.message
    assert hint in error.message


def test_a_non_finite_resource_other_than_cores_max_is_refused() -> None:
    error = refusal(b'{"command":"task-create","name":"t","executable_pyscript":"x",'
                    b'"requirements":{"cores":Infinity}}')

    assert error.code == "invalid_message"
    assert "'cores'" in error.message
    assert "finite" in error.message


def test_a_negative_infinite_cores_max_is_refused() -> None:
    error = refusal(b'{"command":"task-create","name":"t","executable_pyscript":"x",'
                    b'"requirements":{"cores_max":-Infinity}}')

    assert error.code == "invalid_message"
    assert "cores_max" in error.message


def test_a_message_with_many_problems_reports_the_first_five_and_counts_the_rest() -> None:
    message = {"command": "task-create", "name": [1], "name_pretty": 5, "parent": 6,
               "executable_pyscript": "x", "environment": "e", "priority": "high",
               "bad1": 0, "bad2": 0}

    error = refusal(body(message))

    assert error.code == "invalid_message"
    assert error.message.count(";") == 4
    assert error.message.endswith("(and 2 more problems)")


def test_a_protocol_error_carries_its_message_as_its_text() -> None:
    error = refusal(b"{}")

    assert str(error) == error.message


# --- severity -------------------------------------------------------------------------------


def test_severities_rank_ok_warning_error_fatal_terminated() -> None:
    ordered = [Severity.OK, Severity.WARNING, Severity.ERROR, Severity.FATAL,
               Severity.TERMINATED]

    assert [s.rank for s in ordered] == [0, 1, 2, 3, 4]
    assert [s.value for s in ordered] == ["ok", "warning", "error", "fatal", "terminated"]


@pytest.mark.parametrize(("a", "b", "expected"), [
    (Severity.OK, Severity.WARNING, Severity.WARNING),
    (Severity.WARNING, Severity.OK, Severity.WARNING),
    (Severity.ERROR, Severity.FATAL, Severity.FATAL),
    (Severity.TERMINATED, Severity.FATAL, Severity.TERMINATED),
    (Severity.OK, Severity.TERMINATED, Severity.TERMINATED),
    (Severity.ERROR, Severity.ERROR, Severity.ERROR),
    (Severity.OK, None, Severity.OK),
    (Severity.FATAL, None, Severity.FATAL),
])
def test_worst_of_two_severities_is_the_higher_ranked(
        a: Severity, b: Severity | None, expected: Severity) -> None:
    assert a.worst(b) is expected


@pytest.mark.parametrize("name", [".", ".."])
def test_a_task_or_node_named_like_a_folder_link_is_refused(name: str) -> None:
    with pytest.raises(ProtocolError) as task:
        decode(json.dumps({"command": "task-create", "name": name,
                           "executable_pyscript": "pass"}).encode())
    with pytest.raises(ProtocolError) as node:
        decode(json.dumps({"command": "node-set", "name": name, "capabilities": {}}).encode())

    assert task.value.code == node.value.code == "invalid_message"
    assert "names a folder" in task.value.message


def test_encode_gives_what_the_standard_encoder_gives_read_back() -> None:
    body = {"command": "task-info-response", "name": "a.b:c-1", "name_pretty": "naïve ✓",
            "time_create": 1795682254.7299554, "tiny": 1e-05, "huge": 1e16,
            "big": 10**30, "requirements": {"cores": 2.0, "cores_max": None},
            "children": ["x", "y"], "success": Severity.WARNING, "ok": True}

    encoded = encode(body)

    assert json.loads(encoded.decode("utf-8")) == json.loads(json.dumps(body))
    assert b" " not in encoded.replace("naïve ✓".encode(), b"")


def test_encode_takes_strings_that_spell_nan_or_infinity() -> None:
    body = {"command": "ack", "name": "NaN-Infinity-build"}

    assert json.loads(encode(body)) == body
