"""Rules where execution matters, with real node agents: cores, repositories, deep trees."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.processes import VespidProcess, cli
from tests.raw import RawPeer

pytestmark = pytest.mark.integration


def done(raw: RawPeer, name: str, timeout: float = 60) -> dict[str, object]:
    return raw.wait_for(name, lambda i: i["status"] == "complete", timeout=timeout)


def test_elastic_cores_reach_the_task_as_vespid_cores_and_in_task_info(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, tmp_path: Path) -> None:
    start_node("box1", {"memory": 4000, "cores": 6})
    out = tmp_path / "cores.txt"
    raw.request({"command": "task-create", "name": "elastic",
                 "requirements": {"cores": 2, "cores_max": None},
                 "executable_pyscript":
                 f"import os; open({str(out)!r}, 'w').write(os.environ['VESPID_CORES'])"})

    info = done(raw, "elastic")

    assert out.read_text() == "6"
    assert info["allocated"] == {"cores": 6}


def test_node_agents_label_themselves_so_a_task_can_pin_a_node(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer) -> None:
    start_node("box1")
    start_node("box2")
    raw.request({"command": "task-create", "name": "pinned", "executable_pyscript": "pass",
                 "requirements": {"usage_require_node_box2": True}})

    assert done(raw, "pinned")["node"] == "box2"


def test_a_repository_is_claimed_held_by_the_tree_then_released_and_emptied(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, tmp_path: Path) -> None:
    scratch = tmp_path / "general"
    start_node("box1", {"memory": 4000, "cores": 4}, {
        "//box1/vespid/general": {"path": scratch, "type": "general"},
        "//box1/vespid/main": {"path": tmp_path / "main", "type": "main", "persist": True}})
    start_node("box2", {"memory": 4000, "cores": 4})
    child = textwrap.dedent("""
        import os, pathlib
        assert pathlib.Path('parent.txt').read_text() == 'from parent'
        pathlib.Path('child.txt').write_text(os.environ['VESPID_NODE'])
    """)
    parent = textwrap.dedent(f"""
        import os, pathlib
        pathlib.Path('parent.txt').write_text('from parent')
        from vespid.client import Client
        with Client() as vespid:
            kid = vespid.create_task("child", {child!r},
                                     repositories={{"env": {{"local": True}}}})
            assert kid.wait(timeout=60).ok
    """)
    raw.request({"command": "task-create", "name": "holder", "executable_pyscript": parent,
                 "repositories": {"env": {"request": "general", "local": True},
                                  "cache": {"request": "main", "local": True}}})
    raw.request({"command": "task-create", "name": "second", "executable_pyscript": "pass",
                 "repositories": {"env": {"request": "general", "local": True}}})

    info = done(raw, "holder")
    kid = raw.info(info["children"][0])
    second = done(raw, "second")

    assert info["success"] == "ok" and kid["success"] == "ok", (info, kid)
    assert info["path"] == "//box1/vespid/general"
    assert info["environment"]["repo_env"] == "//box1/vespid/general"
    assert info["holds"] == {"env": "//box1/vespid/general", "cache": "//box1/vespid/main"}
    assert kid["node"] == "box1" and kid["path"] == "//box1/vespid/general"
    assert second["time-start"] >= info["time-finish"]  # it waited for the only one
    assert list(scratch.iterdir()) == []  # non-persistent: emptied on release


def test_a_persistent_repository_keeps_its_contents_for_the_next_holder(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, tmp_path: Path) -> None:
    start_node("box1", {"memory": 4000, "cores": 4}, {
        "//box1/vespid/main": {"path": tmp_path / "main", "type": "main", "persist": True},
        "//box1/vespid/tmp": {"path": tmp_path / "tmp", "type": "tmp"}})
    claim = {"env": {"request": "main", "local": True},
             "scratch": {"request": "tmp", "local": True}}
    raw.request({"command": "task-create", "name": "first", "repositories": claim,
                 "executable_pyscript": "import pathlib; pathlib.Path('build.o').write_text('1')"})
    done(raw, "first")

    raw.request({"command": "task-create", "name": "incremental", "repositories": claim,
                 "executable_pyscript": "import pathlib; "
                                        "assert pathlib.Path('build.o').read_text() == '1'"})

    assert done(raw, "incremental")["success"] == "ok"
    assert (tmp_path / "main" / "build.o").exists()


def test_a_tree_deeper_than_the_farm_is_wide_does_not_deadlock(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer) -> None:
    start_node("box1", {"memory": 4000, "cores": 2})
    level = textwrap.dedent("""
        import os
        from vespid.client import Client
        depth = int(os.environ.get("DEPTH", "0"))
        if depth < 5:
            with Client() as vespid:
                kid = vespid.create_task(f"level{depth + 1}", open(__file__).read(),
                                         environment={"DEPTH": str(depth + 1)})
                assert kid.wait(timeout=120).ok
    """)
    raw.request({"command": "task-create", "name": "level0", "executable_pyscript": level,
                 "environment": {"DEPTH": "0"}})

    info = done(raw, "level0", timeout=120)

    assert info["success"] == "ok"
    depth, name = 0, "level0"
    while raw.info(name)["children"]:
        name, depth = raw.info(name)["children"][0], depth + 1
    assert depth == 5


def test_the_root_shows_the_worst_severity_of_its_tree_and_the_cli_draws_it(
        amqp_url: str, coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer) -> None:
    start_node("box1")
    parent = textwrap.dedent("""
        from vespid.client import Client
        with Client() as vespid:
            good = vespid.create_task("good", "pass", name_pretty="Good part")
            bad = vespid.create_task("bad", "raise SystemExit(3)", name_pretty="Bad part")
            vespid.wait_all([good.name, bad.name], timeout=60)
    """)
    raw.request({"command": "task-create", "name": "root", "name_pretty": "Nightly",
                 "executable_pyscript": parent})

    info = done(raw, "root")
    drawn = cli(amqp_url, "tasks", "--tree")

    assert (info["success"], info["tree_success"]) == ("ok", "fatal")
    lines = drawn.stdout.splitlines()
    assert lines[0].startswith("Nightly  [complete fatal (tree) on box1]")  # its tree's worst
    children = sorted(line.split("  [")[0][3:] for line in lines[1:])
    assert children == ["Bad part", "Good part"]
    assert lines[-1].startswith("└─ ")
    assert any("Bad part  [complete fatal" in line for line in lines[1:])


def test_cli_explain_says_why_an_idle_task_waits(
        amqp_url: str, coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer) -> None:
    start_node("box1", {"memory": 1000, "cores": 2})
    raw.request({"command": "task-create", "name": "whale", "executable_pyscript": "pass",
                 "requirements": {"memory": 99000}})

    result = cli(amqp_url, "explain", "whale")

    assert result.returncode == 0
    assert "whale waits because:" in result.stdout
    assert "box1: too small (memory needs 99000, has 1000)" in result.stdout
