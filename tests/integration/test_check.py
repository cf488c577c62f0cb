"""`vespid coordinator --check`: asks the running coordinator, else reads the state file, and
does either without loading the client library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.processes import VespidProcess, base_env, cli

# Runs the check the CLI runs, then says which client or server modules it loaded.
PROBE = """\
import sys
from pathlib import Path
from vespid.coordinator.main import check
from vespid.coordinator.settings import CoordinatorSettings
code = check(CoordinatorSettings(state=Path(sys.argv[1])))
loaded = sorted(m for m in sys.modules if m.startswith(("vespid.client", "vespid.servers")))
print("exit", code, "loaded", ",".join(loaded) or "-")
"""


def probe(amqp_url: str, state: Path) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, str(state)], env=base_env(amqp_url),
                          capture_output=True, text=True, timeout=60, check=True).stdout


def test_the_check_asks_the_running_coordinator_without_the_client(
        amqp_url: str, coordinator: VespidProcess, tmp_path: Path) -> None:
    shown = probe(amqp_url, tmp_path / "not-the-state-file.sqlite3")

    assert "checked the running coordinator: 0 tasks, 0 nodes, 0 waiting" in shown
    assert "consistent" in shown
    assert "exit 0 loaded -" in shown


def test_with_no_coordinator_the_check_reads_the_state_file_without_the_client(
        amqp_url: str, coordinator: VespidProcess, tmp_path: Path) -> None:
    script = tmp_path / "one.py"
    script.write_text("pass\n")
    assert cli(amqp_url, "submit", "--name", "one", str(script)).returncode == 0
    state = Path(coordinator.args[coordinator.args.index("--state") + 1])
    coordinator.kill()

    shown = probe(amqp_url, state)

    assert f"checked the state file {state} (no coordinator answered): 1 task" in shown
    assert "exit 0 loaded -" in shown
