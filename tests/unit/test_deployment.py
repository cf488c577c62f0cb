"""Deployment files: compose.yaml against the compose-spec, systemd units that drain."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_follows_the_compose_spec_schema() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "compose.yaml")], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "deploy" / "systemd" / name)
    return parser


def test_the_node_unit_restarts_on_failure_and_drains_on_stop() -> None:
    service = unit("vespid-node.service")["Service"]

    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert service["ExecStart"].split()[1:3] == ["node", "--config"]


def test_the_coordinator_unit_restarts_on_failure_with_its_state_kept() -> None:
    service = unit("vespid-coordinator.service")["Service"]

    assert service["Restart"] == "on-failure"
    assert "--state /var/lib/vespid/" in service["ExecStart"]
