"""`vespid timeline ROOT --out FILE` against a real coordinator and node agent."""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.processes import VespidProcess, cli
from tests.raw import RawPeer
from vespid.client import Client

pytestmark = pytest.mark.integration
SVG = "{http://www.w3.org/2000/svg}"

# root makes fast1, slow (which makes slower, the longest sleeper) and fast2, and waits for
# them: slow is neither the first nor the last child made, and it decides when root ends.
SLOW = textwrap.dedent("""
    from vespid.client import Client
    with Client() as vespid:
        assert vespid.create_task("slower", "import time; time.sleep(3)").wait(timeout=60).ok
""")
ROOT = textwrap.dedent(f"""
    from vespid.client import Client
    with Client() as vespid:
        kids = [vespid.create_task("fast1", "import time; time.sleep(0.3)"),
                vespid.create_task("slow", {SLOW!r}),
                vespid.create_task("fast2", "import time; time.sleep(0.3)")]
        states = vespid.wait_all([kid.name for kid in kids], timeout=60)
        assert all(state.ok for state in states.values())
""")


def bars(picture: Path) -> list[ET.Element]:
    return [r for r in ET.parse(picture).getroot().iter(f"{SVG}rect")
            if "bar" in r.get("class", "").split()]


def test_the_picture_has_a_bar_per_attempt_and_marks_the_chain_that_took_longest(
        amqp_url: str, coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, tmp_path: Path) -> None:
    start_node("box1", {"memory": 4000, "cores": 8})
    raw.request({"command": "task-create", "name": "root", "executable_pyscript": ROOT})
    info = raw.wait_for("root", lambda i: i["status"] == "complete", timeout=90)
    assert info["success"] == "ok" and info["tree_success"] == "ok", info
    picture = tmp_path / "x.svg"

    result = cli(amqp_url, "timeline", "root", "--out", str(picture))
    with Client(amqp_url) as client:
        tree = client.tree_timeline("root")

    assert result.returncode == 0, result.stderr
    drawn = bars(picture)
    attempts = [a for task in tree.tasks for a in task.attempts]
    assert len(tree.tasks) == 5 and len(drawn) == len(attempts) == 5
    assert sorted((b.get("data-task"), b.get("data-attempt"), b.get("data-node"))
                  for b in drawn) == sorted((a.task, str(a.attempt), a.node) for a in attempts)
    assert {b.get("data-outcome") for b in drawn} == {"ok"}
    critical = {str(b.get("data-task")).split("_")[0] for b in drawn
                if "critical" in b.get("class", "").split()}
    assert critical == {"root", "slow", "slower"}
    rows = [str(t.text).lstrip("★ ").split("·")[0] for t in ET.parse(picture).iter(f"{SVG}text")
            if "label" in t.get("class", "").split()]
    assert rows[0] == "root" and rows.index("slower") == rows.index("slow") + 1  # under it
    assert result.stdout.startswith(f"wrote {picture}: 5 tasks, 5 attempts; "
                                    "critical path: root → slow·")
    assert " → slower·" in result.stdout


def test_an_unknown_root_or_another_suffix_is_one_sentence_and_no_file(
        amqp_url: str, coordinator: VespidProcess, tmp_path: Path) -> None:
    unknown = cli(amqp_url, "timeline", "nope", "--out", str(tmp_path / "x.html"))
    png = cli(amqp_url, "timeline", "nope", "--out", str(tmp_path / "x.png"))

    assert unknown.returncode == 4
    assert unknown.stderr == ("vespid timeline: no task named 'nope'; `vespid tasks` lists "
                              "them\n")
    assert png.returncode == 2 and png.stderr.count("\n") == 1 and "Traceback" not in png.stderr
    assert list(tmp_path.glob("x.*")) == []
