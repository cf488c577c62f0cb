"""The coordinator's settings: one frozen model from flags, `VESPID_*` env and a TOML file."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from vespid.shared.protocol import DEFAULT_MAX_BODY_BYTES
from vespid.shared.settings import ProcessSettings


class CoordinatorSettings(ProcessSettings):
    state: Path = Field(default=Path("vespid-state.sqlite3"),
                        description="SQLite file holding all scheduling state")
    heartbeat_interval: float = Field(default=5.0, gt=0,
                                      description="seconds between a node's node-set messages")
    missed_heartbeats: int = Field(default=3, ge=1,
                                   description="a node silent this many intervals is lost")
    dispatch_grace: float = Field(
        default=15.0, gt=0,
        description="seconds a node may take to report a task it was sent before the "
                    "coordinator believes the node does not have it")
    prefetch: int = Field(default=500, ge=1, le=65535,
                          description="messages handled per batch at most")
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    log_location: str = Field(default="//{node}/vespid/logs/{task}.log",
                              description="where a task's log lives, as task-info shows it")

    @property
    def node_timeout(self) -> float:
        return self.heartbeat_interval * self.missed_heartbeats
