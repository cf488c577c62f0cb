"""The log server and the dashboard read their settings as every process does: flags over
`VESPID_*` over a TOML file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from vespid.servers.logserver import cmd_logserver
from vespid.servers.settings import DashboardSettings, LogServerSettings
from vespid.shared.errors import ConfigError


def test_the_log_server_takes_its_folder_from_a_file_the_env_or_the_flag(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "logserver.toml"
    config.write_text('log_store = "/from/file"\namqp_url = "amqp://u:p@rabbit:5672/farm"\n')

    from_file = LogServerSettings.load(config)
    monkeypatch.setenv("VESPID_LOG_STORE", "/from/env")
    from_env = LogServerSettings.load(config)
    from_flag = LogServerSettings.load(config, log_store=Path("/from/flag"))

    assert from_file.log_store == Path("/from/file")
    assert from_file.amqp_url == "amqp://u:p@rabbit:5672/farm"
    assert from_env.log_store == Path("/from/env")
    assert from_flag.log_store == Path("/from/flag")
    assert "p@" not in str(from_file.redacted())


def test_a_log_server_told_no_folder_says_how_to_give_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VESPID_LOG_STORE", raising=False)
    args = argparse.Namespace(config=None, amqp_url=None, dir=None)

    with pytest.raises(ConfigError) as refused:
        cmd_logserver(args)

    assert "--dir DIR" in str(refused.value)


def test_the_dashboard_port_comes_from_the_env_and_a_bad_one_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESPID_DASHBOARD_PORT", "9090")
    assert DashboardSettings.load().dashboard_port == 9090

    monkeypatch.setenv("VESPID_DASHBOARD_PORT", "99999")
    with pytest.raises(ConfigError) as refused:
        DashboardSettings.load()
    assert "dashboard_port" in str(refused.value)
