"""The Golem-style dialect (after golemfactory/golemrpc's message API): models and defaults.

Messages carry `type` instead of `command`. A CreateTask's `task` keeps every field it was
given, known or not, and gains the seed's defaults for the ones left out.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from vespid.shared.errors import ProtocolError
from vespid.shared.wire import Said, describe_validation_error

DURATION = re.compile(r"^(\d{1,3}):([0-5]\d):([0-5]\d)$")
TASK_TYPES = ("Python", "GLambda", "Fractal")
NO_VERIFICATION, EXTERNALLY_VERIFIED = "None", "External"


class SubtaskVerificationState(IntEnum):
    UNKNOWN_SUBTASK = 0
    WAITING = 1
    IN_PROGRESS = 2
    VERIFIED = 3
    WRONG_ANSWER = 4
    NOT_SURE = 5
    TIMEOUT = 6


def parse_duration(text: Any, field: str) -> float:
    """`HH:MM:SS` to seconds, or a ValueError that names the field."""
    match = DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{field} must be a duration HH:MM:SS, not {text!r}")
    hours, minutes, seconds = (int(g) for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ValueError(f"{field} must be longer than 00:00:00")
    return float(total)


def default_task_name() -> str:
    return uuid.uuid1().hex.upper()[:24]


class GolemTaskSpec(BaseModel):
    """`task` of a CreateTask: the seed's fields with their defaults, extras kept as given."""

    model_config = ConfigDict(extra="allow", defer_build=True)

    type: str
    bid: float = Field(default=1.0, ge=0)
    subtasks_count: int = Field(default=1, ge=1, le=10_000)
    subtask_timeout: str = "00:10:00"
    timeout: str = "00:10:00"
    task_name: str = Field(default_factory=default_task_name)
    resources: list[str] = Field(default_factory=list)
    resources_mapped: dict[str, str] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    verification: dict[str, Any] = Field(default_factory=lambda: {"type": NO_VERIFICATION})

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in TASK_TYPES:
            raise ValueError(f"task type {value!r} is not supported here; use one of "
                             f"{', '.join(TASK_TYPES)}")
        return value

    @field_validator("subtask_timeout", "timeout")
    @classmethod
    def _duration(cls, value: str, info: Any) -> str:
        parse_duration(value, str(info.field_name))
        return value

    @field_validator("bid")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("bid must be a finite number")
        return value

    @field_validator("resources_mapped")
    @classmethod
    def _relative(cls, value: dict[str, str]) -> dict[str, str]:
        for source, destination in value.items():
            if destination.startswith("/") or ".." in destination.split("/"):
                raise ValueError(f"resources_mapped[{source!r}] = {destination!r} must be a "
                                 "relative path inside the working folder")
        return value

    @field_validator("verification")
    @classmethod
    def _verification(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type") not in (NO_VERIFICATION, EXTERNALLY_VERIFIED):
            raise ValueError('verification.type must be "None" or "External"')
        return value

    @property
    def seconds(self) -> float:
        return parse_duration(self.timeout, "timeout")

    @property
    def subtask_seconds(self) -> float:
        return parse_duration(self.subtask_timeout, "subtask_timeout")

    @property
    def external(self) -> bool:
        return self.verification.get("type") == EXTERNALLY_VERIFIED

    def as_given(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# Built on first use, as shared/protocol.py's models are: most coordinators never meet this
# dialect.
class _Golem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class CreateTask(_Golem):
    type: Literal["CreateTask"]
    task: GolemTaskSpec
    # Resources already uploaded by the requester: path as given -> sha256 of its content.
    resource_digests: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(
        default_factory=dict)


class VerifyResults(_Golem):
    type: Literal["VerifyResults"]
    task_id: str
    subtask_id: str
    verdict: int


class AbortTask(_Golem):
    type: Literal["AbortTask"]
    task_id: str


class RestartTask(_Golem):
    type: Literal["RestartTask"]
    task_id: str


class RestartSubtasks(_Golem):
    type: Literal["RestartSubtasks"]
    task_id: str
    subtask_ids: list[str] = Field(min_length=1)


class ListTasks(_Golem):
    type: Literal["ListTasks"]


class GetTaskState(_Golem):
    type: Literal["GetTaskState"]
    task_id: str


# ---- what the coordinator answers and announces (docs/protocol.md, 10.2 to 10.7) ---------
# `Said` models, as in shared/protocol.py: each carries the fields it was built with, no more.

class GolemStatus(StrEnum):
    """A Golem-style task's status, as the wire spells it."""

    ACTIVE = "computing"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"
    TIMEOUT = "timeout"


class SubtaskState(StrEnum):
    """A subtask's state; an attempt's is one of them too (never waiting, verifying, failed,
    restarted)."""

    WAITING = "waiting"
    STARTING = "starting"
    COMPUTING = "computing"
    VERIFYING = "verifying"
    FINISHED = "finished"
    FAILURE = "failure"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    FAILED = "failed"
    RESTARTED = "restarted"


class TaskCreatedEvent(Said):
    """The reply to CreateTask and RestartTask, and the event that follows them."""

    type: Literal["TaskCreatedEvent"]
    task_id: str
    task: GolemTaskSpec  # defaults filled in, extra fields kept


class VerificationRequired(Said):
    type: Literal["VerificationRequired"]
    task_id: str
    subtask_id: str
    task: GolemTaskSpec
    results: list[str]  # that subtask's files, on the coordinator's machine


class ResultFile(Said):
    """One file of `TaskResults.files`: what the node reported of it (`size` when it said),
    and which subtask made it. Open: a node's other fields are passed on as given."""

    model_config = ConfigDict(extra="allow")

    name: str
    sha256: str
    subtask_id: str
    index: int
    size: int | None = None


class TaskResults(Said):
    type: Literal["TaskResults"]
    task_id: str
    task: GolemTaskSpec
    results: list[str]
    files: list[ResultFile]


class TaskFailedEvent(Said):
    type: Literal["TaskFailedEvent"]
    task_id: str
    reason: str


class TaskTimeoutEvent(Said):
    type: Literal["TaskTimeoutEvent"]
    task_id: str
    reason: str


class TaskAbortedEvent(Said):
    type: Literal["TaskAbortedEvent"]
    task_id: str


class VerifyResultsAck(Said):
    type: Literal["VerifyResultsAck"]
    task_id: str
    subtask_id: str
    verdict: int
    acted: bool
    message: str | None  # why not, when not acted on


class TaskAborted(Said):
    type: Literal["TaskAborted"]
    task_id: str
    status: GolemStatus  # after the abort: a task that had ended already keeps its status


class SubtasksRestarted(Said):
    type: Literal["SubtasksRestarted"]
    task_id: str
    subtask_ids: list[str]


class GolemTaskSummary(Said):
    """One task of `TaskList`, and the first fields of `TaskState`."""

    task_id: str
    task_name: str
    task_type: str
    status: GolemStatus
    created: float
    subtasks_count: int
    subtasks_finished: int


class GolemTaskList(Said):
    """`TaskList`, the reply to ListTasks (named apart from the seed's task-list request)."""

    type: Literal["TaskList"]
    tasks: list[GolemTaskSummary]


class SubtaskAttempt(Said):
    task: str  # the Vespid task of the attempt
    node: str | None
    state: SubtaskState
    start: float
    end: float | None


class SubtaskInfo(Said):
    subtask_id: str
    index: int
    state: SubtaskState
    node: str | None
    attempts: list[SubtaskAttempt]
    wrong_answers: int


class GolemTaskState(GolemTaskSummary):
    """`TaskState`, the reply to GetTaskState (named apart from the client's TaskState)."""

    type: Literal["TaskState"]
    task: GolemTaskSpec
    results: list[str]
    reason: str | None
    subtasks: list[SubtaskInfo]


GolemMessage = Annotated[
    CreateTask | VerifyResults | AbortTask | RestartTask | RestartSubtasks | ListTasks
    | GetTaskState,
    Field(discriminator="type"),
]
_golem = TypeAdapter[Any](GolemMessage, config=ConfigDict(defer_build=True))
GOLEM_TYPES = ("CreateTask", "VerifyResults", "AbortTask", "RestartTask", "RestartSubtasks",
               "ListTasks", "GetTaskState")


def decode_golem(data: dict[str, Any]) -> Any:
    kind = data.get("type")
    if kind not in GOLEM_TYPES:
        raise ProtocolError("unknown_type", f"message type {kind!r} is not supported; "
                            f"expected one of: {', '.join(GOLEM_TYPES)}")
    try:
        json.dumps(data, allow_nan=False)
    except ValueError:
        raise ProtocolError("invalid_message", f"{kind}: a field is not serialisable as strict "
                            "JSON (NaN or Infinity)") from None
    try:
        return _golem.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError("invalid_message", describe_validation_error(str(kind), exc)) \
            from None
