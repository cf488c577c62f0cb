"""The coordinator's settings: one frozen model from flags, `VESPID_*` env and a TOML file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from vespid.shared.protocol import DEFAULT_MAX_BODY_BYTES
from vespid.shared.settings import ProcessSettings
from vespid.shared.transport import redact

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class CoordinatorSettings(ProcessSettings):
    state: Path | str = Field(
        default=Path("vespid-state.sqlite3"),
        description="where all scheduling state is kept: a SQLite file, or a "
                    "postgresql://user@host/db URL for a farm with standby coordinators")
    broker_heartbeat: int = Field(
        default=10, ge=1, le=600,
        description="AMQP heartbeat in seconds: how soon the broker gives a silent (paused, "
                    "cut off) coordinator's queues to a standby, about twice this")
    heartbeat_interval: float = Field(default=5.0, gt=0,
                                      description="seconds between a node's node-set messages")
    missed_heartbeats: int = Field(default=3, ge=1,
                                   description="a node silent this many intervals is lost")
    dispatch_grace: float = Field(
        default=15.0, gt=0,
        description="seconds a node may take to report a task, from when the broker took "
                    "its task-run, before the coordinator believes the node does not have it")
    prefetch: int = Field(default=500, ge=1, le=65535,
                          description="requests in flight at most (node messages: node_prefetch)")
    node_prefetch: int = Field(
        default=500, ge=1, le=65535,
        description="messages from nodes (node-set, task-complete) in flight at most (a "
                    "turn handles node_batch of them)")
    node_batch: int = Field(
        default=500, ge=1, le=65535,
        description="node messages handled (and committed) in one turn at most")
    turn_seconds: float = Field(
        default=0.03, gt=0, le=10,
        description="how long a turn of node messages may take, about: a turn takes as "
                    "many as fit with the tasks they let start, by what each cost lately "
                    "(at least 10, at most node_batch), and its scheduling pass goes on at "
                    "the next turn past twice what fits. Requests are answered between "
                    "turns, so this bounds how long one waits behind the nodes' traffic; "
                    "longer turns commit less often")
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    results_dir: Path | None = Field(default=None,
                                     description="where Golem-style results are kept: "
                                                 "<results_dir>/<task_id>-output/<index>/ "
                                                 "(default: vespid-results beside the state)")
    blob_dir: Path | None = Field(default=None,
                                  description="resources and results by sha256 (default: "
                                              "vespid-blobs beside the state file)")
    max_file_bytes: int = Field(default=256 * 1024 * 1024, ge=1,
                                description="largest resource or result file accepted")
    golem_max_failures: int = Field(default=3, ge=1,
                                    description="failed or timed-out attempts of one part "
                                                "before its task fails")
    golem_max_wrong_answers: int = Field(default=3, ge=1,
                                         description="WRONG_ANSWER verdicts for one part "
                                                     "before its task fails")
    metrics_port: int | None = Field(default=None, ge=1, le=65535,
                                     description="serve Prometheus metrics on this port")
    history_interval: float = Field(
        default=5.0, gt=0, le=3600,
        description="seconds between samples of queue depth, starts and node use (the "
                    "dashboard's farm charts, `farm-history`)")
    history_keep: float = Field(
        default=6 * 3600.0, gt=0,
        description="seconds of samples kept, in memory only (a restart starts afresh)")
    timeline_keep: float = Field(
        default=24 * 3600.0, gt=0,
        description="how far back `attempt-list` (the dashboard's timeline) finds "
                    "attempts by start time; running attempts are always found")
    require_user_id: bool = Field(
        default=False,
        description="refuse requests that carry no user_id: with per-user credentials this "
                    "stops a client from creating ownerless tasks with any label it likes")
    admins: list[str] = Field(default_factory=list,
                              description="users who may cancel or verify anyone's tasks")
    log_location: str | None = Field(
        default=None,
        description="where a task's log lives, as task-info shows it: a template with "
                    "{node}, {task}, {attempt}; default: <node>:<the log folder its agent "
                    "reports>/<task>/attempt-<n>.log, a real path on that machine")

    @field_validator("state", mode="before")
    @classmethod
    def _path_unless_url(cls, value: object) -> object:
        if isinstance(value, str) and not value.startswith(POSTGRES_SCHEMES):
            return Path(value)
        return value

    @property
    def state_file(self) -> Path | None:
        """The SQLite file, or None when the state is in PostgreSQL."""
        return self.state if isinstance(self.state, Path) else None

    @property
    def beside_state(self) -> Path:
        """Where files default to: next to a state file; for PostgreSQL, the working folder
        (give every coordinator of a farm the same shared folder instead)."""
        return self.state_file.parent if self.state_file is not None else Path.cwd()

    @property
    def results_path(self) -> Path:
        return self.results_dir or self.beside_state / "vespid-results"

    @property
    def blobs_path(self) -> Path:
        return self.blob_dir or self.beside_state / "vespid-blobs"

    def redacted(self) -> dict[str, Any]:
        data = super().redacted()
        data["state"] = redact(str(self.state))
        return data

    @property
    def node_timeout(self) -> float:
        return self.heartbeat_interval * self.missed_heartbeats
