"""The dashboard's time views in a real headless Chromium, on a farm of real node agents: the
timeline's lanes and bars (a lost attempt after an agent is killed), a tree's critical path,
the farm charts. VESPID_TIMELINE_SCREENSHOT=docs/timeline.png keeps the README's picture."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import processes
from tests.integration import test_dashboard
from tests.processes import VespidProcess
from tests.raw import RawPeer
from vespid.client import Client
from vespid.client.timeline import OUTCOME_COLOURS

pytestmark = pytest.mark.integration
browser, dashboard_port = test_dashboard.browser, test_dashboard.dashboard_port  # fixtures

# root makes three children that end ok, warning and fatal, and waits for them.
SMALL_TREE = textwrap.dedent("""
    from vespid.client import Client
    with Client() as vespid:
        kids = [vespid.create_task("good", "import time; time.sleep(1)"),
                vespid.create_task("careful", "from vespid.client import Client\\n"
                                   "with Client() as c: c.report('warning', 'flaky test')"),
                vespid.create_task("bad", "raise SystemExit(3)")]
        vespid.wait_all([kid.name for kid in kids], timeout=60)
""")
# Its first attempt sleeps until its agent is killed under it; the retry ends at once.
SLEEPER = "import os, time; time.sleep(600 if os.environ['VESPID_ATTEMPT'] == '1' else 1)"
# root makes fast1, slow (which makes slower, the longest sleeper) and fast2, and waits for
# them: slow is neither the first nor the last child made, and it decides when root ends.
SLOW = textwrap.dedent("""
    from vespid.client import Client
    with Client() as vespid:
        assert vespid.create_task("slower", "import time; time.sleep(3)").wait(timeout=60).ok
""")
CHAIN = textwrap.dedent(f"""
    from vespid.client import Client
    with Client() as vespid:
        kids = [vespid.create_task("fast1", "import time; time.sleep(0.3)"),
                vespid.create_task("slow", {SLOW!r}),
                vespid.create_task("fast2", "import time; time.sleep(0.3)")]
        assert all(s.ok for s in vespid.wait_all([k.name for k in kids], timeout=60).values())
""")

LONG = {"compile-core", "package-deb", "package-rpm", "integration", "bench", "e2e-chrome",
        "notarize"}
BARS = """return [...document.querySelectorAll(arguments[0])].map(e => ({
    task: e.dataset.task, attempt: Number(e.dataset.attempt), node: e.dataset.node,
    classes: e.className.split(/\\s+/), text: e.innerText,
    fill: getComputedStyle(e).backgroundColor}));"""


@pytest.fixture
def coordinator(amqp_url: str, tmp_path: Path, started: list[VespidProcess]) -> VespidProcess:
    """A coordinator that samples its figures every second: the charts fill quickly."""
    proc = processes.coordinator(amqp_url, tmp_path / "coordinator",
                                 VESPID_HISTORY_INTERVAL="1").start()
    started.append(proc)
    proc.wait_for_log("coordinator_consuming")
    return proc


def until(read: Callable[[], Any], what: str, timeout: float = 30,
          good: Callable[[Any], bool] = bool) -> Any:
    """Poll `read` until `good` holds for what it returns (the page redraws every 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = read()
        except Exception:  # noqa: BLE001 - the page redraws under us; read again
            found = None
        if found is not None and good(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.25)


def bars(browser: Any, selector: str = "#timeline .vis-item.attempt") -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = browser.execute_script(BARS, selector)
    return found


def outcome(bar: dict[str, Any]) -> str:
    return next(c.removeprefix("outcome-") for c in bar["classes"] if c.startswith("outcome-"))


def lanes(browser: Any) -> list[str]:
    found: list[str] = browser.execute_script(
        "return [...document.querySelectorAll('#timeline .vis-label .lane')]"
        ".map(e => e.dataset.node)")
    return found


def open_lane(browser: Any, node: str) -> None:
    """Click a node's lane label: it opens to a lane per core slot."""
    def click() -> bool:  # a label being redrawn can't be clicked for a moment: again
        label = browser.find_element("css selector", f'#timeline .lane[data-node="{node}"]')
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", label)
        label.click()
        return True

    until(click, f"a click on {node}'s lane")
    until(lambda: browser.execute_script(
        "return document.querySelector(`#timeline .lane[data-node='${arguments[0]}']`)"
        ".closest('.vis-label').className", node),
        f"{node}'s lane open", good=lambda classes: "expanded" in classes.split())


def rgb(colour: str) -> str:
    red, green, blue = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({red}, {green}, {blue})"


def base(name: str) -> str:
    """A child's name without the client's unique suffix."""
    return name.split("_")[0]


def by_task(found: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(base(b["task"]), b["attempt"]): b for b in found}


def test_the_timeline_has_a_lane_per_node_a_bar_per_attempt_and_marks_the_lost_one(
        amqp_url: str, coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, dashboard_port: int, browser: Any) -> None:
    agents = {name: start_node(name, {"memory": 4000, "cores": 2}) for name in ("box1", "box2")}
    browser.set_window_size(1280, 800)
    browser.get(f"http://127.0.0.1:{dashboard_port}/#timeline")
    raw.request({"command": "task-create", "name": "root", "executable_pyscript": SMALL_TREE})
    raw.wait_for("root", lambda i: i["status"] == "complete" and i["tree_complete"], timeout=60)
    first = until(lambda: bars(browser), "four ended bars", good=lambda found: len(found) == 4
                  and not any("outcome-running" in b["classes"] for b in found))
    shown_lanes = lanes(browser)

    raw.request({"command": "task-create", "name": "sleeper", "executable_pyscript": SLEEPER})
    victim = raw.wait_for("sleeper", lambda i: i["status"] == "working")["node"]
    survivor = ({"box1", "box2"} - {victim}).pop()
    running = until(lambda: by_task(bars(browser)).get(("sleeper", 1)), "the sleeper's bar")
    agents[victim].kill(signal.SIGKILL)
    retried = raw.wait_for("sleeper", lambda i: i["status"] == "complete", timeout=40)
    after = until(lambda: by_task(bars(browser)), "the lost attempt and its retry",
                  good=lambda found: len(found) == 6 and not any(
                      "outcome-running" in b["classes"] for b in found.values()))
    lost, retry = after[("sleeper", 1)], after[("sleeper", 2)]
    lane_text = browser.find_element("css selector", f'#timeline .lane[data-node="{victim}"]').text
    with Client(amqp_url) as client:
        listed = client.attempts(time.time() - 600).attempts

    assert sorted(shown_lanes) == ["box1", "box2"]
    # One bar per attempt, where the coordinator says it ran, coloured by how it ended.
    assert sorted((base(b["task"]), b["node"], outcome(b)) for b in first) == sorted(
        (base(a.task), a.node, a.outcome) for a in listed if a.task != "sleeper")
    assert sorted(outcome(b) for b in first) == ["fatal", "ok", "ok", "warning"]
    assert all(b["fill"] == rgb(OUTCOME_COLOURS[outcome(b)]) for b in first)
    assert (running["node"], outcome(running)) == (victim, "running")
    assert (retried["success"], retried["node"], retried["attempt"]) == ("ok", survivor, 2)
    # Lost is a class and a word on the bar, not a colour alone; the retry is a bar of its own.
    assert (lost["node"], outcome(lost)) == (victim, "lost") and "lost" in lost["text"]
    assert (retry["node"], outcome(retry)) == (survivor, "ok")
    assert {(base(a.task), a.attempt, a.node, a.outcome) for a in listed if a.task == "sleeper"} \
        == {("sleeper", 1, victim, "lost"), ("sleeper", 2, survivor, "ok")}
    assert "lost" in lane_text


def test_hover_click_and_a_lane_opened_to_its_core_slots(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess], raw: RawPeer,
        dashboard_port: int, browser: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    start_node("box1", {"memory": 4000, "cores": 2})
    for name in ("one", "two"):
        raw.request({"command": "task-create", "name": name,
                     "executable_pyscript": "import time; time.sleep(2)"})
    for name in ("one", "two"):
        raw.wait_for(name, lambda i: i["status"] == "complete", timeout=30)
    browser.set_window_size(1280, 800)
    browser.get(f"http://127.0.0.1:{dashboard_port}/#timeline/1")
    until(lambda: bars(browser), "two ended bars", good=lambda found: len(found) == 2
          and not any("outcome-running" in b["classes"] for b in found))

    bar = browser.find_element("css selector", '#timeline .vis-item[data-task="one"]')
    ActionChains(browser).move_to_element(bar).perform()
    hover = until(lambda: " ".join(t.text for t in browser.find_elements(
        "css selector", ".vis-tooltip") if t.is_displayed()), "a tooltip")
    bar.click()
    detail = until(lambda: browser.find_element("css selector", "#detail").text,
                   "the task page", good=lambda text: "log of attempt 1" in text)
    open_lane(browser, "box1")
    # Opened, the node shows a lane per core it granted, and each bar sits in one of them.
    rows = until(lambda: browser.execute_script("""
        const slots = [...document.querySelectorAll('#timeline .vis-label.slot-lane')]
          .filter(e => e.offsetHeight > 0).map(e => e.getBoundingClientRect());
        const bars = [...document.querySelectorAll('#timeline .vis-item.attempt')]
          .map(e => e.getBoundingClientRect());
        const lane = b => slots.findIndex(s => b.top >= s.top && b.bottom <= s.bottom);
        return slots.length && bars.length === 2 ? [slots.length, bars.map(lane)] : null;"""),
        "each bar in a slot lane", good=lambda found: -1 not in found[1])

    assert "one — attempt 1" in hover and "node box1, " in hover
    assert "waited " in hover and "before start" in hover and "ran 2." in hover
    assert detail.startswith("one ") and "box1" in detail
    assert rows[0] == 2 and sorted(rows[1]) == [0, 1]  # two at once: one in each slot


def test_the_tree_view_marks_the_chain_that_took_longest_and_the_farm_charts_fill(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess], raw: RawPeer,
        dashboard_port: int, browser: Any) -> None:
    start_node("box1", {"memory": 4000, "cores": 8})
    raw.request({"command": "task-create", "name": "root", "executable_pyscript": CHAIN})
    info = raw.wait_for("root", lambda i: i["status"] == "complete" and i["tree_complete"],
                        timeout=60)
    browser.set_window_size(1280, 800)
    browser.get(f"http://127.0.0.1:{dashboard_port}/")
    # From the task list: the task's page links its tree in time.
    until(lambda: [row.click() for row in browser.find_elements("css selector", "#tree div")
                   if row.get_attribute("data-name") == "root"], "root in the task list")
    until(lambda: browser.find_element("link text", "its tree in time"), "the link").click()

    labels = until(lambda: browser.execute_script(
        "return [...document.querySelectorAll('#tree-chart .tree-label')]"
        ".map(e => [e.dataset.task, e.classList.contains('critical'), e.innerText])"),
        "five tasks in the tree view", good=lambda found: len(found) == 5)
    tree_bars = bars(browser, "#tree-chart .vis-item.attempt")
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    browser.get(f"http://127.0.0.1:{dashboard_port}/#farm")
    charts = until(lambda: browser.execute_script("""
        const ids = ['queue', 'started', 'cores', 'memory'];
        const drawn = ids.map(id => document.querySelectorAll(
          `#chart-${id} path.vis-graph-group0, #chart-${id} rect.vis-graph-group0`).length);
        return drawn.every(n => n > 0) ? document.getElementById('farm-charts').innerText : null;
        """), "four charts drawn", timeout=20)
    farm_overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")

    assert info["success"] == "ok"
    assert {base(task) for task, critical, _ in labels if critical} == {"root", "slow", "slower"}
    assert {base(b["task"]) for b in tree_bars if "critical" in b["classes"]} \
        == {"root", "slow", "slower"}
    assert len(tree_bars) == 5 and {outcome(b) for b in tree_bars} == {"ok"}
    # Depth first: slower right under its parent slow, not under its uncle fast2.
    assert [base(task) for task, _, _ in labels] == ["root", "fast1", "slow", "slower", "fast2"]
    assert all("waited " in text and "ran " in text for _, _, text in labels)
    assert overflow <= 0 and farm_overflow <= 0
    assert "box1" in charts and "queued" in charts and "started per minute" in charts


def test_a_farm_of_three_for_the_readme_picture(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess], raw: RawPeer,
        dashboard_port: int, browser: Any, tmp_path: Path) -> None:
    """Three nodes, a tree of a dozen builds and a node lost under one of them: the page
    fits 1,280 px and every lane and bar is drawn (and the picture is kept on demand)."""
    for name in ("linux-01", "linux-02"):
        start_node(name, {"memory": 8000, "cores": 4})
    builds = textwrap.dedent("""
        import time
        from vespid.client import Client
        plan = [("compile-core", 6), ("compile-ui", 4), ("unit-tests", 3), ("lint", 1),
                ("docs", 2), ("package-deb", 5), ("package-rpm", 5), ("integration", 8),
                ("bench", 7), ("e2e-chrome", 6), ("e2e-firefox", 6), ("notarize", 9)]
        with Client() as vespid:
            kids = []
            for name, seconds in plan:
                script = f"import time; time.sleep({seconds})"
                if name == "lint":
                    script = "from vespid.client import Client\\n" \\
                             "with Client() as c: c.report('warning', '3 style issues')"
                if name == "e2e-firefox":
                    script = f"import time; time.sleep({seconds}); raise SystemExit(2)"
                kids.append(vespid.create_task(name, script))
                time.sleep(0.3)
            vespid.wait_all([k.name for k in kids], timeout=120)
    """)
    began = time.time()
    raw.request({"command": "task-create", "name": "nightly", "executable_pyscript": builds})
    raw.wait_for("nightly", lambda i: i["status"] == "working")
    mac = start_node("mac-01", {"memory": 8000, "cores": 2})  # joins with the builds, not root
    # The Mac's agent dies while one of the longer builds runs there: that attempt is lost.
    until(lambda: _running_on(raw, "mac-01", LONG), "a long build on mac-01", timeout=60)
    mac.kill(signal.SIGKILL)
    raw.wait_for("nightly", lambda i: i["status"] == "complete" and i["tree_complete"],
                 timeout=120)
    browser.set_window_size(1280, 800)
    minutes = (time.time() - began + 3) / 60  # the window the whole run fills
    browser.get(f"http://127.0.0.1:{dashboard_port}/#timeline/{minutes:.2f}")
    found = until(lambda: bars(browser), "every bar ended", good=lambda b: len(b) >= 14
                  and not any("outcome-running" in x["classes"] for x in b))
    open_lane(browser, "linux-01")
    time.sleep(2.5)  # one refresh: the opened node's bars move to its core lanes
    picture = Path(os.environ.get("VESPID_TIMELINE_SCREENSHOT", tmp_path / "timeline.png"))
    browser.save_screenshot(str(picture))
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")

    assert sorted(lanes(browser)) == ["linux-01", "linux-02", "mac-01"]
    assert {outcome(b) for b in found} >= {"ok", "warning", "fatal", "lost"}
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert overflow <= 0


def _running_on(raw: RawPeer, node: str, names: set[str]) -> bool:
    listed = raw.request({"command": "node-list"})["nodes"]
    return any(n["name"] == node and any(base(t) in names for t in n["activetasks"])
               for n in listed)


def test_the_api_and_static_routes_answer_and_refuse_plainly(
        coordinator: VespidProcess, start_node: Callable[..., VespidProcess], raw: RawPeer,
        dashboard_port: int) -> None:
    start_node("box1", {"memory": 4000, "cores": 3})
    raw.request({"command": "task-create", "name": "quick", "executable_pyscript": "pass"})
    raw.wait_for("quick", lambda i: i["status"] == "complete")
    root = f"http://127.0.0.1:{dashboard_port}"

    def get(path: str) -> tuple[int, str, bytes]:
        try:
            with urllib.request.urlopen(root + path, timeout=15) as reply:
                return reply.status, reply.headers["Content-Type"], reply.read()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.headers["Content-Type"], refused.read()

    status, kind, script = get("/static/vendor/vis-timeline/vis-timeline-graph2d.min.js")
    licence = get("/static/vendor/vis-timeline/LICENSE.md")[2]
    timeline = json.loads(get("/api/timeline")[2])
    tree = json.loads(get("/api/tree/quick")[2])
    history = json.loads(get("/api/history")[2])

    assert (status, kind) == (200, "text/javascript; charset=utf-8") and b"Graph2d" in script
    assert b"Apache-2.0" in licence and b"MIT" in licence
    for outside in ("/static/../dashboard.py", "/static/%2e%2e/dashboard.py",
                    "/static/__init__.py", "/static/vendor/"):
        assert get(outside)[0] == 404, outside
    assert [(n["name"], n["cores"]) for n in timeline["nodes"]] == [("box1", 3.0)]
    assert [(a["task"], a["attempt"], a["node"], a["outcome"], a["slot"])
            for a in timeline["attempts"]] == [("quick", 1, "box1", "ok", 0)]
    assert tree["critical"] == ["quick"] and [t["name"] for t in tree["tasks"]] == ["quick"]
    assert history["interval"] == 1.0 and isinstance(history["samples"], list)
    bad_since = get("/api/timeline?since=yesterday")
    unknown = get("/api/tree/nope")
    assert bad_since[0] == 400 and b"since must be Unix seconds" in bad_since[2]
    assert unknown[0] == 400 and b"nope" in unknown[2]
