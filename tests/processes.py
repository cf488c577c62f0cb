"""Real Vespid processes for integration tests, each with its own log file."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAST = {
    "VESPID_HEARTBEAT_INTERVAL": "0.5",
    "VESPID_MISSED_HEARTBEATS": "4",
    "VESPID_DISPATCH_GRACE": "3",
    "VESPID_KILL_GRACE": "2",
    "VESPID_LOG_FORMAT": "json",
}


@dataclass
class VespidProcess:
    args: list[str]
    log_path: Path
    env: dict[str, str]
    cwd: Path
    process: subprocess.Popen[bytes] | None = field(default=None)
    # A command that runs the process elsewhere (`ip netns exec NS`); it must exec it, so
    # that the pid is the process's own.
    wrap: list[str] = field(default_factory=list)

    def start(self) -> VespidProcess:
        handle = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "vespid.client.cli", *self.args], cwd=self.cwd,
            env=self.env,
            stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        handle.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 20.0, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log()[after:]):
                return
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited early:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in {self.args[0]} log within {timeout} s:\n"
                             f"{self.log()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(timeout=30)

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets and its state and does nothing."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def base_env(url: str, **extra: str) -> dict[str, str]:
    # Settings of the outer shell would leak into the processes under test; TLS files are
    # how a test points them at its own CA.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VESPID_") or k.startswith("VESPID_TLS_")}
    env.update(FAST)
    env["VESPID_AMQP_URL"] = url
    env.update(extra)
    return env


def coordinator(url: str, workdir: Path, state: str | None = None,
                **extra: str) -> VespidProcess:
    """A coordinator working in `workdir`, on a SQLite file there unless `state` names
    another store (a postgresql:// URL)."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = VespidProcess(["coordinator", "--state", state or str(workdir / "state.sqlite3")],
                         workdir / "coordinator.log", base_env(url, **extra), workdir)
    return proc


def node(url: str, workdir: Path, name: str, capabilities: dict[str, Any] | None = None,
         repositories: dict[str, dict[str, Any]] | None = None,
         **extra: str) -> VespidProcess:
    home = workdir / name
    home.mkdir(parents=True, exist_ok=True)
    lines = [f'name = "{name}"', f'work_dir = "{home / "work"}"', "[capabilities]"]
    for key, value in (capabilities or {"memory": 4000, "cores": 4}).items():
        lines.append(f"{key} = {_toml(value)}")
    for network_name, spec in (repositories or {}).items():
        lines.append(f'[repositories."{network_name}"]')
        lines += [f"{key} = {_toml(value)}" for key, value in spec.items()]
    config = home / "node.toml"
    config.write_text("\n".join(lines) + "\n")
    return VespidProcess(["node", "--config", str(config)], home / "agent.log",
                         base_env(url, **extra), home)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str | Path):
        return f'"{value}"'
    return str(value)


def cli(url: str, *args: str, cwd: Path | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vespid.client.cli", *args], cwd=cwd,
                          env=base_env(url), capture_output=True, text=True, timeout=timeout)
