"""The dashboard in a real headless Chromium: it shows tasks and follows their state live."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import VespidProcess, base_env
from tests.raw import RawPeer

pytestmark = pytest.mark.integration
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and shutil.which("chromedriver")):
        reason = "Debian's chromium and chromium-driver are not installed (.ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def dashboard_port(amqp_url: str, tmp_path: Path, started: list[VespidProcess]) -> int:
    """A running `vespid dashboard`; returns its HTTP port on 127.0.0.1."""
    port = free_port()
    dashboard = VespidProcess(["dashboard", "--port", str(port)], tmp_path / "dashboard.log",
                              base_env(amqp_url), tmp_path).start()
    started.append(dashboard)
    dashboard.wait_for_log("dashboard_serving")
    return port


def wait_for_text(browser: Any, selector: str, expected: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = " | ".join(e.text for e in browser.find_elements("css selector", selector))
        except Exception:  # noqa: BLE001 - the page redraws under us; read again
            text = ""
        if expected in text:
            return text
        time.sleep(0.2)
    raise AssertionError(f"{expected!r} never appeared in {selector}: {text!r}")


def test_the_page_shows_tasks_and_nodes_and_follows_a_task_to_completion(
        tmp_path: Path, coordinator: VespidProcess, start_node: Callable[..., VespidProcess],
        raw: RawPeer, dashboard_port: int, browser: Any) -> None:
    port = dashboard_port
    start_node("box1")
    doomed = start_node("box2", repositories={"//box2/ws": {"path": tmp_path / "ws", "type": "ws"}})
    raw.request({"command": "task-create", "name": "slow-build", "name_pretty": "Slow build",
                 "executable_pyscript": "import time; time.sleep(3)"})
    raw.request({"command": "task-create", "name": "whale", "executable_pyscript": "pass",
                 "requirements": {"memory": 999999}})
    raw.request({"command": "task-create", "name": "nightly", "name_pretty": "Nightly",
                 "executable_pyscript": "from vespid.client import Client\n"
                 "with Client() as c: c.create_task('bad', 'raise SystemExit(3)').wait(60)"})

    browser.get(f"http://127.0.0.1:{port}/")
    working = wait_for_text(browser, "#tree div", "working Slow build")
    nodes = wait_for_text(browser, "#nodes tbody", "box1")
    done = wait_for_text(browser, "#tree div", "complete ok Slow build", timeout=30)
    # The root ended ok itself, but its child failed: the list shows the tree's outcome.
    wait_for_text(browser, "#tree div", "complete fatal (tree) Nightly", timeout=30)
    for row in browser.find_elements("css selector", "#tree div"):
        if "whale" in row.text:
            row.click()
    detail = wait_for_text(browser, "#detail", "too small")
    for row in browser.find_elements("css selector", "#tree div"):
        if "Slow build" in row.text:
            row.click()
    attempts = wait_for_text(browser, "#detail", "log of attempt 1")  # each attempt's log
    free_repo = wait_for_text(browser, "#repos tbody", "//box2/ws")
    doomed.kill()
    lost_repo = wait_for_text(browser, "#repos tbody", "unavailable (node lost)")
    browser.set_window_size(1280, 900)  # a laptop: nothing may need a horizontal scroll
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")

    assert "idle whale" in working and "up" in nodes
    assert "complete ok Slow build box1" in done
    assert "memory needs 999999" in detail
    assert "#1" in attempts and "box1" in attempts
    assert "ws free" in free_repo and "//box2/ws ws unavailable (node lost)" in lost_repo
    assert overflow <= 0
