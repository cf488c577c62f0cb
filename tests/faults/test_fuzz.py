"""Hypothesis-made messages of every command, and random bytes, against a live coordinator."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.processes import VespidProcess, cli
from tests.raw import RawNode, RawPeer

pytestmark = pytest.mark.integration

COMMANDS = ["task-create", "task-info", "task-cancel", "task-update", "task-wait", "task-list",
            "node-list", "node-set", "task-complete", "node-drain", "state-check"]
NAMES = st.sampled_from(["a", "b", "parent", "fz-1", "n1", "bad name", "", "x" * 201])
SCALARS = (st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False)
           | st.text(max_size=20) | NAMES)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
FIELDS = {
    "name": NAMES, "parent": NAMES | st.none(), "node": NAMES, "success":
    st.sampled_from(["ok", "warning", "error", "fatal", "terminated", "bogus"]),
    "executable_pyscript": st.just("pass") | JSON, "requirements":
    st.dictionaries(st.sampled_from(["memory", "cores", "cores_max", "gpus", "usage_x",
                                     "usage_require_x", "usage_prefer_y"]), SCALARS),
    "repositories": st.dictionaries(st.sampled_from(["env", "cache"]), JSON),
    "environment": st.dictionaries(st.text(max_size=8), SCALARS), "priority": JSON,
    "capabilities": st.dictionaries(st.sampled_from(["memory", "cores", "usage_x"]), SCALARS),
    "activetasks": JSON, "attempt": JSON, "waiting": JSON, "status": JSON, "limit": JSON,
    "timeout": JSON, "retries": JSON,
}


@st.composite
def messages(draw: Callable[..., Any]) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        raw: bytes = draw(st.binary(max_size=64))
        return raw
    body = {"command": draw(st.sampled_from(COMMANDS))}
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True)):
        body[key] = draw(FIELDS[key])
    return json.dumps(body).encode()


def test_generated_messages_never_crash_the_coordinator_or_break_its_state(
        amqp_url: str, coordinator: VespidProcess, raw: RawPeer) -> None:
    RawNode(raw, "n1", {"memory": 8000, "cores": 8}).node_set([])
    raw.request({"command": "task-create", "name": "parent", "executable_pyscript": "pass"})
    answered: list[str] = []

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(messages())
    def every_message_is_answered(body: bytes) -> None:
        reply = raw.request(body, timeout=10)
        assert reply["command"] in {"ack", "error", "task-info-response", "task-list-response",
                                    "node-list-response", "state-check-response"}, reply
        if reply["command"] == "error":
            assert reply["message"] and "Traceback" not in reply["message"]
        answered.append(reply["command"])

    every_message_is_answered()

    assert coordinator.process is not None and coordinator.process.poll() is None
    assert "internal" not in coordinator.log()
    check = cli(amqp_url, "coordinator", "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert len(answered) >= 100
