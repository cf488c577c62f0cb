"""The wire contract as pydantic models: one model per message, one decoder for all of them.

Every message body is a JSON object whose `command` names its model. `decode()` turns any
body into a model or raises one `ProtocolError` carrying the error code and a sentence for
the contract's `error` reply, so no handler ever sees malformed input.
"""

from __future__ import annotations

import json
import math
import sys
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticSerializationError, from_json, to_json

from vespid.shared.errors import ProtocolError
from vespid.shared.wire import Said, body_of, describe_validation_error

TASK_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
NODE_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024



def _not_a_folder_link(name: str) -> str:
    # Nodes and the log server keep a task's files in a folder named after it (and a node's
    # cgroup after the node): `.` and `..` match the contract's pattern but name the folder
    # itself or its parent, so no task or node may be called that.
    if name in (".", ".."):
        raise ValueError(f"{name!r} names a folder, not a task or node")
    return name


TaskName = Annotated[str, Field(pattern=TASK_NAME_PATTERN), AfterValidator(_not_a_folder_link)]
NodeName = Annotated[str, Field(pattern=NODE_NAME_PATTERN), AfterValidator(_not_a_folder_link)]


class Severity(StrEnum):
    """How well a task went; ordered, and a task's severity never goes down."""

    OK = "ok"
    WARNING = "warning"
    ERROR = "error"
    FATAL = "fatal"
    TERMINATED = "terminated"

    @property
    def rank(self) -> int:
        return _SEVERITY_ORDER.index(self)

    @property
    def failed(self) -> bool:
        """error, fatal or terminated: what fails a build (ok and warning do not)."""
        return self.rank >= Severity.ERROR.rank

    def worst(self, other: Severity | None) -> Severity:
        if other is None or self.rank >= other.rank:
            return self
        return other


_SEVERITY_ORDER = list(Severity)


class TaskStatus(StrEnum):
    """`null` on the wire means idle; `IDLE` is only our in-memory name for it."""

    IDLE = "idle"
    WORKING = "working"
    COMPLETE = "complete"


# Every model and adapter here is built (its validator and serializer made) on first use,
# not at import (defer_build): a process uses few of them (a coordinator answers its first
# request with a handful; a node never meets the replies), and building all of them at
# import was the costliest part of the coordinator's imports. Same schemas either way.
class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              defer_build=True)


class _OpenMessage(BaseModel):
    """Messages from nodes may carry fields newer agents add; we keep them, we don't fail."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True,
                              defer_build=True)


RequirementValue = bool | int | float | None


def _parse_unbounded(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value.lower() in ("inf", "infinity")):
        return math.inf
    return value


class RepositoryRequest(_Message):
    request: str | None = None
    local: bool = False


class _Defined(_Message):
    """The fields of `task-create` that define a task (everything but `command`), each checked
    alone: what a task-info-response shows of its task too."""

    name: TaskName
    name_pretty: str | None = None
    parent: TaskName | None = None
    executable_pyscript: str | None = None
    executable_pyfile: str | None = None
    requirements: dict[str, RequirementValue] = Field(default_factory=dict)
    repositories: dict[str, RepositoryRequest] = Field(default_factory=dict)
    environment: dict[str, str] = Field(default_factory=dict)
    priority: int = 0
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                  description="seconds of running time")
    retries: int = Field(default=1, ge=0, le=100,
                         description="restarts after its node was lost under it")
    avoid_nodes: list[str] = Field(default_factory=list,
                                   description="nodes to use only when no other can serve")
    key: str | None = Field(default=None, min_length=1, max_length=200,
                            description="identity for idempotent creation: a child is "
                                        "(parent, key), a root (owner, key)")

    @field_validator("requirements", "repositories", "environment", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("requirements", mode="before")
    @classmethod
    def _check_requirements(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        checked: dict[str, Any] = {}
        for key, item in value.items():
            if key == "cores_max":
                item = _parse_unbounded(item)
            _check_requirement(key, item)
            checked[key] = item
        return checked

    @field_serializer("requirements")
    def _strict_json_requirements(self, value: dict[str, RequirementValue]) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v)
                for k, v in value.items()}


class TaskDefinition(_Defined):
    """The fields of `task-create` that define a task (everything but `command`)."""

    @model_validator(mode="after")
    def _one_executable(self) -> TaskDefinition:
        given = [x for x in (self.executable_pyscript, self.executable_pyfile) if x is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of executable_pyscript (the script's source) "
                "or executable_pyfile (a path on the node)"
            )
        return self

    @property
    def cores(self) -> float:
        return _number(self.requirements.get("cores"), 1.0)

    @property
    def cores_max(self) -> float:
        raw = self.requirements.get("cores_max", self.requirements.get("cores", 1))
        return _number(raw, math.inf)


def _number(value: RequirementValue, default: float) -> float:
    if value is None or isinstance(value, bool):
        return default
    return float(value)


def _check_requirement(key: str, value: Any, unbounded_ok: bool = True) -> None:
    if key.startswith("usage_"):
        if not isinstance(value, bool):
            raise ValueError(f"{key!r} is a label and must be true or false")
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{key!r} is a resource amount and must be a number")
    if value < 0:
        raise ValueError(f"{key!r} must not be negative")
    if math.isinf(value) and not (unbounded_ok and key == "cores_max"):
        raise ValueError(f"{key!r} must be finite (only a task's cores_max may be unbounded)")


# Which fields a definition was given, one object for each combination: each waiting task
# would otherwise keep a set of its own (a model never changes it: they are frozen).
_FIELDS_SETS: dict[frozenset[str], Any] = {}


class TaskCreate(TaskDefinition):
    command: Literal["task-create"]

    def definition(self) -> TaskDefinition:
        # Validated once, as this message: its fields are a valid definition already.
        fields = {name: getattr(self, name) for name in TaskDefinition.model_fields}
        if self.executable_pyscript is not None:
            # Tasks of one kind mostly run one script: one copy for all of them.
            fields["executable_pyscript"] = sys.intern(self.executable_pyscript)
        given = frozenset(self.model_fields_set - {"command"})
        return TaskDefinition.model_construct(_FIELDS_SETS.setdefault(given, given), **fields)


class TaskInfo(_Message):
    command: Literal["task-info"]
    name: str


class TaskCancel(_Message):
    command: Literal["task-cancel"]
    name: str


class TaskUpdate(_Message):
    command: Literal["task-update"]
    name: str
    success: Severity
    message: str | None = None
    attempt: int | None = None
    node: str | None = None


class TaskWait(_Message):
    """A running task waits for others (`waiting` true) or is done waiting (false).

    While it waits its cores go back to the pool, so a tree deeper than the farm is wide
    cannot deadlock with every core held by a parent that waits."""

    command: Literal["task-wait"]
    name: str
    waiting: bool


class NodeDrain(_Message):
    """Stop giving a node work; its agent finishes what runs, then exits.

    Sent by a client to the coordinator, which marks the node and forwards it to the node."""

    command: Literal["node-drain"]
    name: NodeName


class StateCheck(_Message):
    """Ask the coordinator to verify its state (used resources, holds, queue)."""

    command: Literal["state-check"]


TaskListStatus = Literal["idle", "working", "complete"]


class TaskList(_Message):
    command: Literal["task-list"]
    status: TaskListStatus | None = None
    parent: str | None = None
    limit: int = Field(default=1000, ge=1, le=100_000)


class NodeList(_Message):
    command: Literal["node-list"]


class TreeTimeline(_Message):
    """Read-only: every task of one tree with its attempts' times (dashboard, `vespid
    timeline`)."""

    command: Literal["tree-timeline"]
    root: TaskName
    limit: int = Field(default=10_000, ge=1, le=100_000)


class AttemptList(_Message):
    """Read-only: the attempts that were running at any time in [since, until] on the farm,
    oldest first (the dashboard's timeline)."""

    command: Literal["attempt-list"]
    since: float = Field(ge=0)
    until: float | None = Field(default=None, ge=0)
    limit: int = Field(default=20_000, ge=1, le=100_000)


class FarmHistory(_Message):
    """Read-only: the coordinator's recent samples of its own figures (the farm charts)."""

    command: Literal["farm-history"]
    since: float | None = Field(default=None, ge=0)


class NodeRepository(_Message):
    # Extra fields are dropped, not kept: they would be echoed in node-list replies.
    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str
    persist: bool = False


class NodeSet(_OpenMessage):
    command: Literal["node-set"]
    name: NodeName
    capabilities: dict[str, RequirementValue] = Field(default_factory=dict)
    repositories: dict[str, NodeRepository] = Field(default_factory=dict)
    activetasks: dict[str, Any] = Field(default_factory=dict)
    draining: bool = False
    leaving: bool = False  # the agent's last word before it exits: gone, not lost
    log_dir: str | None = None  # where on the node its agent keeps task logs
    version: str | None = None
    protocol: int | None = None
    started: float | None = None  # when this agent process started: a restart is a new one

    @field_validator("capabilities", "repositories", "activetasks", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("activetasks", mode="before")
    @classmethod
    def _list_of_names(cls, value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(x, str) for x in value):
            return {name: {} for name in value}
        return value

    @field_validator("capabilities", mode="before")
    @classmethod
    def _check_capabilities(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key, item in value.items():
                _check_requirement(key, item, unbounded_ok=False)
        return value


class TaskComplete(_OpenMessage):
    command: Literal["task-complete"]
    name: str
    node: str
    success: Severity
    attempt: int | None = None
    message: str | None = None
    # Why it ended, for programs: exit, signal, timeout, memory, killed, start; null: it ran
    # to its end (or the node does not say).
    cause: str | None = None
    # Result files ({name, sha256}) sent ahead as blob-chunks; anything malformed in it is
    # dropped by the coordinator, never a reason to lose the completion.
    results: Any = None


class TaskRun(_OpenMessage):
    command: Literal["task-run"]
    name: str
    executable_pyscript: str | None = None
    executable_pyfile: str | None = None
    path: str | None = None
    log: str
    cores: float
    allocated: dict[str, float] = Field(default_factory=dict)
    environment: dict[str, str] = Field(default_factory=dict)
    attempt: int = 1
    timeout: float | None = None
    memory: float | None = None  # MB asked for: the node enforces it with a margin
    resources: list[dict[str, str]] = Field(default_factory=list)  # sha256 -> path to place


class RepositoryClean(_OpenMessage):
    command: Literal["repository-clean"]
    repository: str


class TaskKill(_OpenMessage):
    command: Literal["task-kill"]
    name: str
    attempt: int | None = None
    reason: str | None = None


# ---- what the coordinator answers and announces ------------------------------------------
# Replies and events are `Said` models: whatever way one is dumped, it carries the fields it
# was built with and no default of the model's (docs/protocol.md, sections 3 and 4).


class AckReply(Said):
    """`ack`: the answer to a request that has no response of its own. `name` is the
    request's; for a keyed task-create that matched a task made before (`existing`), the
    name of that task."""

    command: Literal["ack"]
    name: str | None
    existing: bool = False


class ErrorReply(Said):
    """`error`: the request was refused; `error` is the code, `message` a sentence to act on."""

    command: Literal["error"]
    error: str
    message: str


class _Times(Said):
    """When a task was created, last started and finished: Unix seconds, or null."""

    time_create: float | None = Field(default=None, alias="time-create")
    time_start: float | None = Field(default=None, alias="time-start")
    time_finish: float | None = Field(default=None, alias="time-finish")


class AttemptRecord(Said):
    """One start of a task (task-info `attempts`). Open: the coordinator keeps more with it
    (`allocated`) than the contract names."""

    model_config = ConfigDict(extra="allow")

    attempt: int
    node: str | None
    start: float
    end: float | None
    why: str | None
    lost: bool
    cause: str | None = None
    late: list[str] = Field(default_factory=list)


class TreeFailure(Said):
    """A descendant that ended error, fatal or terminated (task-info `tree_failures`)."""

    name: str
    name_pretty: str | None
    success: Severity | None
    message: str | None
    node: str | None


class TaskInfoResponse(_Defined, _Times):
    """`task-info-response`, and the body of every `task.<event>.<name>` event: the stored
    definition (its `requirements` the effective ones), then what became of the task.

    Open, since views.py builds it from the task: what the contract names is typed here. An
    unknown name is answered with the required fields only (`status: "invalid"`); a known
    task's carries the others too, but for `tree_failures`, `tree_failures_total` and
    `waiting_reason`, which task-info replies add and events never carry."""

    model_config = ConfigDict(extra="allow")

    command: Literal["task-info-response"]
    name: str  # whatever was asked for: an unknown name need not be a valid one
    status: Literal["working", "complete", "invalid"] | None
    success: Severity | None
    node: str | None
    log: str | None
    children: list[str]
    owner: str | None = None
    path: str | None = None
    allocated: dict[str, float] | None = None
    attempt: int = 0
    message: str | None = None
    holds: dict[str, str] = Field(default_factory=dict)
    attempts: list[AttemptRecord] = Field(default_factory=list)
    lent_cores: float | None = None
    tree_success: Severity | None = None
    tree_complete: bool | None = None
    tree_failures: list[TreeFailure] = Field(default_factory=list)
    tree_failures_total: int = 0
    waiting_reason: list[str] | None = None


class TaskSummary(_Times):
    """One entry of `task-list-response`: `children` is how many, not which."""

    name: str
    name_pretty: str | None
    parent: str | None
    status: Literal["working", "complete"] | None
    success: Severity | None
    node: str | None
    priority: int
    attempt: int
    children: int
    tree_success: Severity | None
    tree_complete: bool


class TaskListResponse(Said):
    command: Literal["task-list-response"]
    total: int  # how many matched, before `limit`
    tasks: list[TaskSummary]


class NodeSummary(Said):
    """One entry of `node-list-response` (views.node_summary)."""

    name: str
    alive: bool
    draining: bool
    left: bool
    accepting: bool
    why_not_accepting: str | None
    version: str | None
    protocol: int | None
    last_seen: float
    capabilities: dict[str, RequirementValue]
    free: dict[str, float]
    repositories: dict[str, NodeRepository]
    activetasks: list[str]


class NodeListResponse(Said):
    command: Literal["node-list-response"]
    nodes: list[NodeSummary]


AttemptOutcome = Literal["running", "lost", "replaced", "ok", "warning", "error", "fatal",
                         "terminated"]


class TimelineAttempt(Said):
    """One attempt as a bar: where and when it ran and how it ended. `outcome` is `running`
    while it runs, `lost` if its node was lost under it, `replaced` if it ended and the task
    was started again for another reason, else the task's severity. `late` is true when
    its node reported on it after it had been replaced. `cores` is what it was granted.
    `queued` is when it began to wait for this start: the task's creation for its first
    attempt, the end of the one before for a later one."""

    task: str
    attempt: int
    node: str
    queued: float | None = None
    start: float
    end: float | None
    outcome: AttemptOutcome
    why: str | None = None
    late: bool = False
    cores: float = 0.0


class TimelineTask(_Times):
    """One task of a tree-timeline. `waiting_reason` is why it waits now (idle tasks);
    `waited_for` the last reason the coordinator saw while it waited, kept after it
    started."""

    name: str
    parent: str | None
    status: Literal["working", "complete"] | None
    success: Severity | None
    virtual: bool = False
    waiting_reason: str | None = None
    waited_for: str | None = None
    attempts: list[TimelineAttempt]


class TreeTimelineResponse(Said):
    command: Literal["tree-timeline-response"]
    root: str
    now: float
    total: int  # tasks in the tree, before `limit`
    tasks: list[TimelineTask]  # parents before their children


class AttemptListResponse(Said):
    command: Literal["attempt-list-response"]
    now: float
    since: float
    truncated: bool  # more attempts fell in the window than `limit`
    attempts: list[TimelineAttempt]


class NodeSample(Said):
    cores: float
    cores_used: float
    memory: float  # MB, as node-set gives it
    memory_used: float


class FarmSample(Said):
    """The farm at one moment: tasks waiting and running, tasks started since the sample
    before, and each live node's use."""

    time: float
    queued: int
    running: int
    started: int
    nodes: dict[str, NodeSample]


class FarmHistoryResponse(Said):
    command: Literal["farm-history-response"]
    interval: float  # seconds between samples
    samples: list[FarmSample]  # oldest first


class StateCheckResponse(Said):
    command: Literal["state-check-response"]
    ok: bool
    problems: list[str]
    tasks: int
    nodes: int
    waiting: int


from vespid.shared.blobs import BlobChunk, BlobGet  # noqa: E402 - needs ProtocolError only

InboundMessage = Annotated[
    TaskCreate | TaskInfo | TaskCancel | TaskUpdate | TaskWait | TaskList | NodeList | NodeSet
    | TaskComplete | NodeDrain | StateCheck | BlobChunk | BlobGet | TreeTimeline | AttemptList
    | FarmHistory,
    Field(discriminator="command"),
]
NodeMessage = Annotated[TaskRun | TaskKill | RepositoryClean | NodeDrain | BlobChunk,
                        Field(discriminator="command")]

_inbound = TypeAdapter[Any](InboundMessage, config=ConfigDict(defer_build=True))
_node_inbound = TypeAdapter[Any](NodeMessage, config=ConfigDict(defer_build=True))
INBOUND_COMMANDS = ("task-create", "task-info", "task-cancel", "task-update", "task-wait",
                    "task-list", "node-list", "node-set", "task-complete", "node-drain",
                    "state-check", "blob-chunk", "blob-get", "tree-timeline", "attempt-list",
                    "farm-history")
NODE_COMMANDS = ("task-run", "task-kill", "repository-clean", "node-drain", "blob-chunk")


def parse_body(body: bytes, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> dict[str, Any]:
    """Bytes to a JSON object, or a ProtocolError saying what is wrong with them."""
    if len(body) > max_bytes:
        raise ProtocolError(
            "too_large",
            f"the message is {len(body)} bytes, more than the limit of {max_bytes}; "
            "ship large scripts as executable_pyfile on the node instead",
        )
    try:
        data = from_json(body)  # pydantic-core's parser: 3 times as fast as json's
    except ValueError:
        data = _standard_json(body)  # what json.loads takes (a lone surrogate), or its error
    if not isinstance(data, dict):
        raise ProtocolError("invalid_json", "the body must be a JSON object, not "
                            f"{type(data).__name__}")
    return data


def _standard_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("invalid_json", f"the body is not UTF-8 JSON: {exc}") from None


def decode_command(data: dict[str, Any]) -> Any:
    """A parsed body of the command dialect to its model; ProtocolError on anything invalid.
    (vespid.shared.inbound.decode takes both dialects.)"""
    return _validate(_inbound, data, INBOUND_COMMANDS)


def decode_node_message(body: bytes) -> Any:
    return _validate(_node_inbound, parse_body(body), NODE_COMMANDS)


def _validate(adapter: TypeAdapter[Any], data: dict[str, Any], known: tuple[str, ...]) -> Any:
    command = data.get("command")
    if command is None:
        raise ProtocolError("invalid_message", "the message has no 'command' field; "
                            f"expected one of: {', '.join(known)}")
    if command not in known:
        raise ProtocolError("unknown_command", f"unknown command {command!r}; "
                            f"expected one of: {', '.join(known)}")
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise ProtocolError("invalid_message", describe_validation_error(str(command), exc)) \
            from None


# Made once: json.dumps with options builds a new encoder on every call.
_STRICT_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode(payload: BaseModel | dict[str, Any]) -> bytes:
    """Strict JSON (no NaN/Infinity) as the contract requires, compact, in UTF-8.

    pydantic-core's encoder writes it (3 times as fast as json's: every event and reply
    the coordinator sends goes through here, a node-list of 1,000 nodes is 300 KB). Where
    its output holds a non-finite number, or it cannot take a value, the standard encoder
    does the work instead, and refuses what strict JSON cannot say (ValueError, TypeError).
    """
    data = payload.model_dump(mode="json", by_alias=True) if isinstance(payload, BaseModel) \
        else payload
    try:
        encoded = to_json(data, inf_nan_mode="constants")
    except PydanticSerializationError:
        return _standard_encoding(data)
    if b"Infinity" in encoded or b"NaN" in encoded:  # perhaps only inside a string
        return _standard_encoding(data)
    return encoded


def _standard_encoding(data: Any) -> bytes:
    return _STRICT_JSON.encode(data).encode("utf-8")


def ack_reply(name: str | None) -> dict[str, Any]:
    return body_of(AckReply(command="ack", name=name))


def existing_reply(name: str) -> dict[str, Any]:
    """A keyed task-create that matched a task already made: nothing new was created."""
    return body_of(AckReply(command="ack", name=name, existing=True))


def error_reply(code: str, message: str) -> dict[str, Any]:
    return body_of(ErrorReply(command="error", error=code, message=message))
