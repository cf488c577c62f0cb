"""What the CLI shows of trees, attempts and outcomes, from task-info and task-list bodies."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

import pytest

from vespid.client.api import TaskState, child_key, is_node_pin
from vespid.client.cli import (
    EXIT_OK,
    EXIT_TASK_FAILED,
    _ancestors,
    _outcome,
    render_info,
    render_tree,
)


def summary(name: str, parent: str | None, created: float, children: int = 0,
            success: str | None = "ok", tree: str | None = None) -> dict[str, Any]:
    return {"name": name, "name_pretty": None, "parent": parent, "status": "complete",
            "success": success, "node": "n1", "time-create": created, "children": children,
            "tree_success": tree or success, "tree_complete": True}


class FakeClient:
    """Answers task-info for the tasks it holds, and counts the questions."""

    def __init__(self, tasks: dict[str, dict[str, Any]]) -> None:
        self.tasks, self.asked = tasks, []

    def info(self, name: str) -> TaskState:
        self.asked.append(name)
        return TaskState.model_validate(self.tasks[name])


def test_tasks_tree_fetches_left_out_ancestors_and_draws_newest_tree_first() -> None:
    listed = [summary("new-root", None, 50.0),
              summary("leaf", "mid", 40.0)]  # its parent and grandparent fell past --limit
    client = FakeClient({
        "mid": {**summary("mid", "old-root", 20.0), "children": ["leaf", "other"]},
        "old-root": {**summary("old-root", None, 10.0, tree="fatal"), "children": ["mid"]},
    })

    drawn = render_tree(listed + _ancestors(client, listed)).splitlines()

    assert sorted(client.asked) == ["mid", "old-root"]
    assert drawn[0].startswith("new-root")
    assert drawn[1].startswith("old-root") and "fatal (tree)" in drawn[1]
    assert "mid" in drawn[2] and "leaf" in drawn[3]
    assert any("1 more not shown" in line for line in drawn)


def test_info_shows_each_attempt_and_the_failed_descendants() -> None:
    info = {"name": "build", "status": "complete", "success": "ok", "children": ["a", "b"],
            "tree_success": "fatal", "tree_complete": True, "tree_failures_total": 1,
            "tree_failures": [{"name": "b", "name_pretty": "Data build 2/2", "success": "fatal",
                               "message": "the script exited with status 3", "node": "n2"}],
            "attempts": [
                {"attempt": 1, "node": "nodeB", "start": 100.0, "end": 110.0, "lost": True,
                 "why": "node nodeB was lost (no heartbeat for 15 s) while the task ran",
                 "late": ["task-complete ok"]},
                {"attempt": 2, "node": "nodeA", "start": 111.0, "end": 120.0, "lost": False,
                 "why": "ok"}]}

    shown = render_info(info)

    assert "attempts   2" in shown
    assert "#1 on nodeB" in shown and "LOST, node nodeB was lost" in shown
    assert "late reports: task-complete ok" in shown
    assert "#2 on nodeA" in shown and "(9.0 s): ok" in shown
    assert "Data build 2/2: fatal (the script exited with status 3)" in shown


@pytest.mark.parametrize(("success", "tree", "root_only", "code"), [
    ("ok", "fatal", False, EXIT_TASK_FAILED),
    ("ok", "fatal", True, EXIT_OK),
    ("ok", "warning", False, EXIT_OK),
    ("ok", "terminated", False, EXIT_TASK_FAILED),
    ("warning", "warning", True, EXIT_TASK_FAILED),
    ("ok", "ok", False, EXIT_OK),
])
def test_the_exit_code_is_the_trees_outcome_unless_root_only(
        success: str, tree: str, root_only: bool, code: int,
        capsys: pytest.CaptureFixture[str]) -> None:
    state = TaskState.model_validate({
        "name": "root", "status": "complete", "success": success, "tree_success": tree,
        "tree_complete": True, "tree_failures_total": int(tree not in ("ok", "warning")),
        "tree_failures": [] if tree in ("ok", "warning") else
        [{"name": "c", "name_pretty": "Step 3", "success": tree, "message": None}]})

    result = _outcome(state, argparse.Namespace(json=True, root_only=root_only))

    assert result == code
    if code == EXIT_TASK_FAILED and not root_only:
        assert "Step 3" in capsys.readouterr().err


def test_children_keys_count_per_pretty_name_and_pins_are_recognised() -> None:
    keys = [child_key("p-test-keys", label) for label in ("a", "b", "a")]

    assert keys == ["a#1", "b#1", "a#2"]
    assert len(child_key("p-test-keys", "x" * 300)) <= 200
    assert is_node_pin("usage_require_node_box1") and is_node_pin("usage_prefer_node_box1")
    assert not is_node_pin("usage_require_gpu") and not is_node_pin("usage_node_box1")


@pytest.mark.parametrize("args", [["completion"]])
def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(args: list[str]) -> None:
    """`vespid tasks | head` on a long list: the reader goes away before the CLI is done
    writing. The command stops as `yes | head` would, with no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    try:
        done = subprocess.run([sys.executable, "-m", "vespid.client.cli", *args],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)

    assert done.stderr == ""
    assert done.returncode == 141
