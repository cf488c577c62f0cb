"""The node agent's settings: a TOML file (docs/examples/node.*.toml), `VESPID_*`, flags."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vespid.shared.protocol import NodeName, RequirementValue
from vespid.shared.settings import ProcessSettings


class RepositoryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(description="where the repository lives on this machine")
    type: str = Field(description="the repository type tasks request, e.g. general_1gb")
    persist: bool = Field(default=False, description="keep contents when released")


def detect_memory_mb() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1024 * 1024))


def detect_cores() -> int:
    return len(os.sched_getaffinity(0))


def _default_name() -> str:
    return socket.gethostname().split(".")[0] or "node"


class NodeSettings(ProcessSettings):
    name: NodeName = Field(default_factory=_default_name)
    capabilities: dict[str, RequirementValue] = Field(default_factory=dict)
    repositories: dict[str, RepositoryConfig] = Field(default_factory=dict)
    work_dir: Path = Field(default=Path("vespid-node"),
                           description="scratch folders, scripts and local task logs")
    heartbeat_interval: float = Field(default=5.0, gt=0)
    kill_grace: float = Field(default=10.0, ge=0,
                              description="seconds between SIGTERM and SIGKILL of a task")
    prefetch: int = Field(default=16, ge=1)
    coordinator_user: str | None = Field(
        default=None,
        description="run only messages whose broker-checked user_id is this user (the "
                    "coordinator's); unset: trust whatever reaches this node's queue")
    memory_margin: float = Field(
        default=1.5, ge=1.0,
        description="a task is killed (fatal) once its processes use more memory than it "
                    "asked for times this (the kernel's limit in its cgroup, else polled)")
    containment: Literal["auto", "cgroup-v2", "cgroup-v1", "process-group"] = Field(
        default="auto",
        description="how a task's processes are kept together: auto takes the best the "
                    "machine allows (a cgroup per attempt), else the process group alone")
    launch: Literal["fork", "spawn"] = Field(
        default="fork",
        description="how a task's `python script` starts: fork, as a fork of one warm "
                    "interpreter per agent (no interpreter start a task), except where the "
                    "task's environment changes how an interpreter starts (a PYTHON* "
                    "variable, the locale), which is then spawned; spawn, a new interpreter "
                    "each task")
    retain_after_shipped: float = Field(
        default=3600.0, ge=0,
        description="seconds a finished task's scratch folder, script and local log stay "
                    "after its log reached the log server")
    retain_unshipped_ok: float = Field(
        default=0.0, ge=0,
        description="with no log server: seconds the files of a task that ended ok stay")
    retain_unshipped_failed: float = Field(
        default=7 * 86400.0, ge=0,
        description="with no log server: seconds the files of a task that did not end ok "
                    "stay (the local log is then the only copy)")

    @field_validator("capabilities")
    @classmethod
    def _complete_capabilities(cls, value: dict[str, Any]) -> dict[str, Any]:
        caps = dict(value)
        caps.setdefault("memory", detect_memory_mb())
        caps.setdefault("cores", detect_cores())
        return caps

    @model_validator(mode="after")
    def _label_self(self) -> NodeSettings:
        # Lets a task pin itself to this machine with usage_require_node_<name>.
        self.capabilities.setdefault(f"usage_node_{self.name}", True)
        return self

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"
