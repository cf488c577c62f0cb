"""The servers' settings: each one model from the same base as every process (flags >
`VESPID_*` env > a TOML file given with --config), printed without secrets at start."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from vespid.shared.settings import ClientSettings


class LogServerSettings(ClientSettings):
    log_store: Path | None = Field(
        default=None, description="where the log server keeps logs: <task>/attempt-<n>.log "
                                  "(flag --dir, env VESPID_LOG_STORE)")


class DashboardSettings(ClientSettings):
    dashboard_host: str = Field(default="127.0.0.1",
                                description="address to listen on (flag --host)")
    dashboard_port: int = Field(default=8080, ge=1, le=65535,
                                description="HTTP port (flag --port)")
