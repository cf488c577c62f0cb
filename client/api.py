"""A small typed client: requests with direct reply-to, waiting on events, never polling."""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tenacity import (
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
)

from vespid.client import current_task
from vespid.shared import topology
from vespid.shared.errors import (
    NoCoordinator,
    PublishFailed,
    RemoteError,
    RequestTimeout,
    TaskNotFound,
    VespidError,
    WaitTimeout,
)
from vespid.shared.protocol import (
    TASK_NAME_PATTERN,
    AttemptList,
    AttemptListResponse,
    FarmHistory,
    FarmHistoryResponse,
    NodeDrain,
    NodeList,
    Severity,
    TaskCancel,
    TaskCreate,
    TaskInfo,
    TaskList,
    TaskListStatus,
    TaskUpdate,
    TaskWait,
    TreeTimeline,
    TreeTimelineResponse,
    encode,
    parse_body,
)
from vespid.shared.settings import ClientSettings, client_settings
from vespid.shared.transport import (
    close_quietly,
    connect,
    consumers,
    guarded,
    properties,
    publish_confirmed,
    require_consumer,
    user_of,
)
from vespid.shared.wire import body_of, describe_validation_error

APP_ID = "vespid-client"
CONNECT_SECONDS = 3.0  # a client retries a refused connection this long, then says why
PROBE_AFTER = 1.0  # seconds without a reply before checking that a coordinator still listens
CREATE_TRIES = 3  # a keyed create is safe to send again after a timeout
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]+")
Fields = ParamSpec("Fields")
Message = TypeVar("Message", bound=BaseModel)


@contextmanager
def refused_as(kind: str, *within: str) -> Iterator[None]:
    """A request the coordinator would refuse is refused here, before anything is sent, as
    the RemoteError its `error` reply used to become (code `invalid_message`, the
    coordinator's own sentence): callers and the CLI's exit codes see no difference.
    `within`: the path in the message to the part being checked on its own."""
    try:
        yield
    except ValidationError as exc:
        raise RemoteError("invalid_message",
                          describe_validation_error(kind, exc, within)) from None


def build(model: Callable[Fields, Message], *args: Fields.args,
          **fields: Fields.kwargs) -> Message:
    """A request as its shared model, refused here as the coordinator would refuse it."""
    with refused_as(str(fields.get("command") or fields.get("type"))):
        return model(*args, **fields)


class TaskState(BaseModel):
    """A task as task-info reports it (the wire names with `-` become `_`)."""

    # Built on first use: every `vespid` command imports this module, the coordinator too.
    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True,
                              defer_build=True)

    name: str
    status: str | None = None
    success: str | None = None
    name_pretty: str | None = None
    parent: str | None = None
    node: str | None = None
    log: str | None = None
    message: str | None = None
    children: list[str] = Field(default_factory=list)
    requirements: dict[str, Any] = Field(default_factory=dict)
    environment: dict[str, str] = Field(default_factory=dict)
    allocated: dict[str, float] | None = None
    attempt: int = 0
    time_create: float | None = Field(default=None, alias="time-create")
    time_start: float | None = Field(default=None, alias="time-start")
    time_finish: float | None = Field(default=None, alias="time-finish")

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    tree_success: str | None = None
    tree_complete: bool | None = None
    tree_failures: list[dict[str, Any]] = Field(default_factory=list)
    tree_failures_total: int = 0
    attempts: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.complete and self.success == "ok"

    @property
    def tree_failed(self) -> bool:
        """Something in its tree (itself included) ended error, fatal or terminated."""
        verdict = self.tree_success or self.success
        return verdict is not None and Severity(verdict).failed

    @property
    def tree_done(self) -> bool:
        """Complete, with every descendant complete too (a coordinator before v1.1 does not
        say: then the task alone decides)."""
        return self.complete and self.tree_complete is not False


@dataclass
class TaskHandle:
    client: Client
    name: str
    existing: bool = False  # the create matched a task made before (same key): re-attached

    def info(self) -> TaskState:
        return self.client.info(self.name)

    def wait(self, timeout: float | None = None, *, whole_tree: bool = True) -> TaskState:
        return self.client.wait(self.name, timeout, whole_tree=whole_tree)

    def cancel(self) -> None:
        self.client.cancel(self.name)

    def __str__(self) -> str:
        return self.name


def is_node_pin(flag: str) -> bool:
    """A flag that ties a task to particular nodes by name: not inherited by default."""
    return flag.startswith(("usage_require_node_", "usage_prefer_node_"))


_created: dict[tuple[str, str], int] = {}  # (parent, pretty name) -> creates so far


def child_key(parent: str, label: str) -> str:
    """`<pretty name>#<n>`: the n-th child of that name this process made under `parent`;
    the same again when the parent's script runs again and creates the same children."""
    count = _created.get((parent, label), 0) + 1
    _created[(parent, label)] = count
    if len(label) > 180:  # keys are at most 200 characters; keep long names distinct
        label = hashlib.sha256(label.encode()).hexdigest()
    return f"{label}#{count}"


def unique_name(name: str) -> str:
    """`<name>_<time>_<uuid>`, as the seed's client made names unique per user."""
    base = _UNSAFE.sub("_", name).strip("_")[:120] or "task"
    return f"{base}_{int(time.time())}_{uuid.uuid4()}"


@dataclass
class Client:
    url: str | None = None
    timeout: float = 30.0
    _connection: Any = field(default=None, init=False, repr=False)
    _channel: Any = field(default=None, init=False, repr=False)
    _replies: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)
    _parent_info: TaskState | None = field(default=None, init=False, repr=False)
    _coordinator_seen: bool = field(default=False, init=False, repr=False)
    settings: ClientSettings = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # flags > VESPID_* env > defaults, TLS files included, as every process reads them
        self.settings = client_settings(self.url)
        self.url = self.settings.amqp_url

    # ---- connection ------------------------------------------------------------------
    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        close_quietly(self._connection)
        self._connection = self._channel = None

    def _ensure_channel(self) -> Any:
        if self._channel is None or not self._channel.is_open:
            assert self.url is not None
            self._connection = connect(self.settings.broker_parameters(APP_ID),
                                       give_up_after=min(self.timeout, CONNECT_SECONDS),
                                       quiet=True)
            channel = guarded(self._connection.channel)
            guarded(channel.confirm_delivery)
            guarded(lambda: channel.basic_consume(topology.DIRECT_REPLY_TO, self._on_reply,
                                                  auto_ack=True))
            self._channel = channel
            self._coordinator_seen = False
        return self._channel

    def _on_reply(self, _channel: Any, _method: Any, props: Any, body: bytes) -> None:
        if props.correlation_id:
            self._replies[props.correlation_id] = parse_body(body)

    def _require_coordinator(self) -> None:
        """Fail at once, with what to do, when nothing could answer a request."""
        require_consumer(self._connection, topology.COORDINATOR_QUEUE, "coordinator",
                         "start `vespid coordinator` or check VESPID_AMQP_URL", NoCoordinator)
        self._coordinator_seen = True

    def _diagnose(self) -> str:
        """Why no answer came, as far as the broker can tell."""
        try:
            queue = consumers(self._connection, topology.COORDINATOR_QUEUE)
        except VespidError:
            return "is it running?"
        if queue is None or queue[0] == 0:
            return "no coordinator consumes its queue on this vhost any more"
        return f"it is busy ({queue[1]} messages queued before this one)"

    @staticmethod
    def _subscribe(channel: Any, keys: list[str]) -> str:
        queue: str = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for key in keys:
            channel.queue_bind(queue, topology.EVENTS_EXCHANGE, key)
        return queue

    def _pump(self, seconds: float) -> None:
        guarded(lambda: self._connection.process_data_events(time_limit=seconds))

    # ---- requests --------------------------------------------------------------------
    def request(self, message: BaseModel | dict[str, Any],
                timeout: float | None = None) -> dict[str, Any]:
        """Send one message to the coordinator and return its reply (raise on `error`).

        A model goes as the fields it was built with (`body_of`); a dict, as it is. The
        request expires when we stop waiting for it: a request nobody answered in time is
        dropped by the broker, never acted on later (so retrying it is safe)."""
        body = body_of(message) if isinstance(message, BaseModel) else message
        channel = self._ensure_channel()
        if not self._coordinator_seen:
            self._require_coordinator()
        wait_for = timeout or self.timeout
        correlation_id = uuid.uuid4().hex
        kind = str(body.get("command") or body.get("type"))  # either dialect
        props = properties(kind, app_id=APP_ID,
                           reply_to=topology.DIRECT_REPLY_TO, correlation_id=correlation_id)
        props.user_id = user_of(self.url or "")  # who we are, as the broker checks it
        props.expiration = str(max(1, round(wait_for * 1000)))
        try:
            publish_confirmed(channel, topology.EXCHANGE, topology.COORDINATOR_KEY,
                              encode(body), props)
        except PublishFailed:
            raise NoCoordinator("the coordinator's queue does not exist: start it with "
                                "`vespid coordinator`") from None
        start = time.monotonic()
        deadline, next_probe = start + wait_for, start + PROBE_AFTER
        while correlation_id not in self._replies:
            now = time.monotonic()
            if now >= deadline:
                raise RequestTimeout(f"the coordinator did not answer {kind} within "
                                     f"{wait_for:g} s; {self._diagnose()}")
            if now >= next_probe:  # a coordinator that went away is not waited for
                self._require_coordinator()
                next_probe = now + PROBE_AFTER
            self._pump(min(deadline, next_probe) - now)
        reply = self._replies.pop(correlation_id)
        if reply.get("command") == "error":
            raise RemoteError(str(reply.get("error")), str(reply.get("message")))
        return reply

    def create_task(
        self,
        name: str,
        script: str | None = None,
        *,
        pyfile: str | None = None,
        name_pretty: str | None = None,
        requirements: dict[str, Any] | None = None,
        repositories: dict[str, Any] | None = None,
        environment: dict[str, str] | None = None,
        priority: int = 0,
        parent: str | None = None,
        unique: bool = True,
        timeout: float | None = None,
        retries: int = 1,
        key: str | None = None,
        inherit_node_pin: bool = False,
    ) -> TaskHandle:
        """Create a task. Inside a task, the new one is its child and inherits its usage_
        flags and environment (not a pin to the parent's node unless `inherit_node_pin`),
        unless `parent` names another task.

        Every create carries a `key`, so it happens once however often it is sent. A task's
        own children are keyed by their pretty name and how many of that name it created
        before: a parent started again after its node was lost re-attaches to the children
        its earlier attempt made (the handle says `existing`), instead of making them twice.
        Pass `key` to choose the identity yourself."""
        requirements = dict(requirements or {})
        environment = dict(environment or {})
        own_child = parent is None and current_task() is not None
        parent = parent or current_task()
        if parent is not None:
            self._inherit(parent, requirements, environment, inherit_node_pin)
        elif not any(k.startswith("usage_user_") for k in requirements):
            requirements[f"usage_user_{_UNSAFE.sub('_', getpass.getuser())}"] = True
        full_name = unique_name(name) if unique else name
        if not re.fullmatch(TASK_NAME_PATTERN, full_name):
            raise ValueError(f"task name {full_name!r} must match {TASK_NAME_PATTERN}")
        if key is None:
            key = (child_key(parent, name_pretty or name) if own_child and parent
                   else uuid.uuid4().hex)
        # Every field given, None too: what goes out is what this client always sent.
        message = build(TaskCreate, command="task-create", name=full_name,
                        name_pretty=name_pretty or name, parent=parent,
                        executable_pyscript=script, executable_pyfile=pyfile,
                        requirements=requirements, repositories=repositories or {},
                        environment=environment, priority=priority, timeout=timeout,
                        retries=retries, key=key)
        reply = self._create(message)
        return TaskHandle(self, str(reply.get("name") or full_name),
                          existing=bool(reply.get("existing")))

    def _create(self, message: TaskCreate) -> dict[str, Any]:
        """Send a keyed task-create; a timeout is retried, since the key makes it once."""
        for attempt in Retrying(retry=retry_if_exception_type(RequestTimeout)
                                & retry_if_not_exception_type(NoCoordinator),
                                stop=stop_after_attempt(CREATE_TRIES), reraise=True):
            with attempt:
                return self.request(message)
        raise AssertionError("unreachable: Retrying reraises")  # pragma: no cover

    def _inherit(self, parent: str, requirements: dict[str, Any],
                 environment: dict[str, str], node_pin: bool) -> None:
        if self._parent_info is None or self._parent_info.name != parent:
            self._parent_info = self.info(parent)
        for key, value in self._parent_info.requirements.items():
            if key.startswith("usage_") and (node_pin or not is_node_pin(key)):
                requirements.setdefault(key, value)
        for key, value in self._parent_info.environment.items():
            environment.setdefault(key, value)

    def info(self, name: str) -> TaskState:
        reply = self.request(TaskInfo(command="task-info", name=name))
        if reply.get("status") == "invalid":
            raise TaskNotFound(f"no task named {name!r}")
        return TaskState.model_validate(reply)

    def cancel(self, name: str) -> None:
        self.request(TaskCancel(command="task-cancel", name=name))

    def report(self, success: Severity | str, message: str | None = None,
               name: str | None = None) -> None:
        """Raise the current task's severity (warning, error, ...) with a message; a
        severity that is none of them is a ValueError."""
        target = name or current_task()
        if target is None:
            raise ValueError("report() needs a task name outside a running task")
        attempt = os.environ.get("VESPID_ATTEMPT", "")
        # On itself, a task says which attempt and node it is: the coordinator tells a stale
        # attempt's report from the current one's (null, as about another task: unfenced).
        own = name is None and attempt.isdigit()
        self.request(TaskUpdate(command="task-update", name=target, success=Severity(success),
                                message=message, attempt=int(attempt) if own else None,
                                node=os.environ.get("VESPID_NODE") if own else None))

    def tasks(self, status: TaskListStatus | None = None, parent: str | None = None,
              limit: int = 1000) -> list[dict[str, Any]]:
        reply = self.request(build(TaskList, command="task-list", status=status, parent=parent,
                                   limit=limit))
        return list(reply["tasks"])

    def drain(self, node: str) -> None:
        """Stop giving the node work; its agent finishes what runs, then exits."""
        self.request(build(NodeDrain, command="node-drain", name=node))

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.request(NodeList(command="node-list"))["nodes"])

    # ---- time: what ran where, and when (read-only) ---------------------------------------
    def tree_timeline(self, root: str, limit: int = 10_000) -> TreeTimelineResponse:
        """Every task of the tree under `root`, parents first, with its attempts' times."""
        reply = self.request(build(TreeTimeline, command="tree-timeline", root=root,
                                   limit=limit))
        return TreeTimelineResponse.model_validate(reply)

    def attempts(self, since: float, until: float | None = None,
                 limit: int = 20_000) -> AttemptListResponse:
        """The attempts that ran at any time in [since, until] on the farm (Unix seconds)."""
        reply = self.request(build(AttemptList, command="attempt-list", since=since,
                                   until=until, limit=limit))
        return AttemptListResponse.model_validate(reply)

    def history(self, since: float | None = None) -> FarmHistoryResponse:
        """The coordinator's samples of queue depth, starts and node use, oldest first."""
        reply = self.request(build(FarmHistory, command="farm-history", since=since))
        return FarmHistoryResponse.model_validate(reply)

    # ---- waiting ---------------------------------------------------------------------
    def wait(self, name: str, timeout: float | None = None, *,
             whole_tree: bool = True) -> TaskState:
        """Block until the task completes (with `whole_tree`, and every descendant too);
        events, not polling. The result carries the tree's outcome (`tree_success`,
        `tree_failed`, and the failed descendants). Raise WaitTimeout."""
        return self.wait_all([name], timeout, whole_tree=whole_tree)[name]

    def wait_all(self, names: list[str], timeout: float | None = None, *,
                 whole_tree: bool = True) -> dict[str, TaskState]:
        channel = self._ensure_channel()
        done: dict[str, TaskState] = {}

        def finished(state: TaskState) -> bool:
            return state.tree_done if whole_tree else state.complete

        def on_event(_ch: Any, _method: Any, _props: Any, body: bytes) -> None:
            state = TaskState.model_validate(parse_body(body))
            if state.name in names and finished(state):
                done[state.name] = state

        # Subscribe first, then ask: a completion between the two cannot be missed. A tree
        # finishing after its root is announced as an `updated` event of the root.
        keys = [topology.event_key(event, name) for name in names
                for event in ("completed", "updated")]
        queue = guarded(lambda: self._subscribe(channel, keys))
        tag = guarded(lambda: channel.basic_consume(queue, on_event, auto_ack=True))
        # A task that waits for others lends its cores to them meanwhile.
        waiter = current_task() if current_task() not in names else None
        if waiter is not None:
            self.request(TaskWait(command="task-wait", name=waiter, waiting=True))
        try:
            for name in names:
                state = self.info(name)
                if finished(state):
                    done.setdefault(name, state)
            deadline = None if timeout is None else time.monotonic() + timeout
            while len(done) < len(names):
                left = 1.0 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(names) - set(done))
                    raise WaitTimeout(f"{len(missing)} task(s) not complete after "
                                      f"{timeout:g} s: {', '.join(missing[:5])}")
                self._pump(min(left, 1.0))
        finally:
            if channel.is_open:
                guarded(lambda: channel.basic_cancel(tag))
                guarded(lambda: channel.queue_delete(queue))
            if waiter is not None:
                self.request(TaskWait(command="task-wait", name=waiter, waiting=False))
        # Events carry no list of failures: ask for it where there is one to show.
        return {name: self.info(name) if state.tree_failed and not state.tree_failures
                else state for name, state in done.items()}
