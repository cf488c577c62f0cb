"""`make demo`: a coordinator, a node agent and a small task tree on this machine.

Starts both processes with their logs under ./demo-run, submits a parent task that fans
out into children from inside its script, follows it to the end, prints the tree and
where every log is, then stops what it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_fixed

from vespid.shared.errors import VespidError
from vespid.shared.transport import DEFAULT_URL, connect, connection_parameters

RUN_DIR = Path("demo-run")
# A vhost per run: two people running the demo on one broker never share one, and each
# removes only its own.
DEMO_VHOST = f"vespid-demo-{uuid.uuid4().hex[:8]}"
PARENT_SCRIPT = '''
from vespid.client import Client, current_task

with Client() as vespid:
    parts = [vespid.create_task(f"compile_{i}", f"print('compiling part {i}')",
                                name_pretty=f"Compile part {i + 1}/3",
                                requirements={"cores": 1, "memory": 100})
             for i in range(3)]
    results = vespid.wait_all([p.name for p in parts], timeout=120)
    print("children finished:", sorted(s.success for s in results.values()))
'''


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen([sys.executable, "-m", "vespid.client.cli", *args], env=env,
                                stdout=handle, stderr=subprocess.STDOUT)


def private_vhost(url: str) -> str:
    """A vhost of the demo's own when this machine's broker can make one (rabbitmqctl), so
    the demo neither sees nor disturbs anything else on the broker."""
    ctl = shutil.which("rabbitmqctl")
    if "VESPID_AMQP_URL" in os.environ or ctl is None:
        return url
    for args in (["add_vhost", DEMO_VHOST], ["set_permissions", "-p", DEMO_VHOST, "guest",
                                            ".*", ".*", ".*"]):
        if subprocess.run([ctl, "-q", *args], capture_output=True, timeout=60).returncode:
            return url
    return url.rsplit("/", 1)[0] + "/" + DEMO_VHOST


def drop_vhost(url: str) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl and url.endswith("/" + DEMO_VHOST):
        subprocess.run([ctl, "-q", "delete_vhost", DEMO_VHOST], capture_output=True, timeout=60)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM drains; a second one ends what still runs; then no more waiting."""
    for attempt in range(3):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if attempt < 2 else signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)


def main() -> int:
    url = private_vhost(os.environ.get("VESPID_AMQP_URL", DEFAULT_URL))
    try:
        connect(connection_parameters(url, name="vespid-demo"), give_up_after=3).close()
    except VespidError as exc:
        say(f"Cannot run the demo: {exc}")
        return 3
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    RUN_DIR.mkdir()
    (RUN_DIR / "node.toml").write_text(
        f'name = "demo-node"\nwork_dir = "{(RUN_DIR / "node").resolve()}"\n'
        "[capabilities]\nmemory = 2000\ncores = 4\n")
    env = {**os.environ, "VESPID_AMQP_URL": url, "VESPID_LOG_FORMAT": "json"}
    procs = [
        start(["coordinator", "--state", str(RUN_DIR / "state.sqlite3")],
              RUN_DIR / "coordinator.log", env),
        start(["node", "--config", str(RUN_DIR / "node.toml")], RUN_DIR / "node.log", env),
    ]
    say("started a coordinator and a node agent (logs in demo-run/)")
    try:
        wait_until_ready(url)
        return run_tree(url)
    except VespidError as exc:
        say(f"The demo failed: {exc}")
        return 1
    finally:
        stop(procs)
        drop_vhost(url)


def wait_until_ready(url: str) -> None:
    """Until the coordinator answers and the node has registered (both take a moment)."""
    from vespid.client.api import Client

    @retry(retry=retry_if_exception_type(VespidError), stop=stop_after_delay(30),
           wait=wait_fixed(0.2), reraise=True)
    def node_registered() -> None:
        with Client(url, timeout=2) as vespid:
            if not vespid.nodes():
                raise VespidError("the demo node has not registered yet")

    node_registered()


def run_tree(url: str) -> int:
    from vespid.client.api import Client

    with Client(url) as vespid:
        root = vespid.create_task("demo_tree", PARENT_SCRIPT, name_pretty="Demo build",
                                  requirements={"cores": 1, "memory": 100})
        say(f"submitted {root.name}; waiting for it and its children ...")
        started = time.monotonic()
        state = root.wait(timeout=120)
        say(f"finished in {time.monotonic() - started:.1f} s\n")
        say(f"{state.name_pretty:<22} {state.success:<8} {state.name}")
        for child in state.children:
            info = vespid.info(child)
            say(f"  {info.name_pretty or child:<20} {info.success:<8} on {info.node}")
    logs = (RUN_DIR / "node" / "logs").resolve()
    say(f"\ntask logs:        {logs}/<task>/attempt-<n>.log")
    say(f"coordinator log:  {(RUN_DIR / 'coordinator.log').resolve()}")
    say(f"node agent log:   {(RUN_DIR / 'node.log').resolve()}")
    return 0 if state.ok else 1


if __name__ == "__main__":
    sys.exit(main())
