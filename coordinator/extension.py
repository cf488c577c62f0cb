"""What an extension of the coordinator is, and how the processor runs a list of them.

The core (state, engine, matcher, store, processor, service) schedules tasks and nothing
else. Anything beside that — a second dialect, file transfer, metrics — is an Extension:
it brings its own message models and handlers, its own slice of state and the tables that
hold it, and follows the tasks through hooks. Each processor holds its own list, so two
processors in one test never share one, and a hook that raises is logged and counted while
the others and the batch go on (as dramatiq's middleware is): an extension never stops the
scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from vespid.shared.logs import get_logger

if TYPE_CHECKING:
    from vespid.coordinator.engine import Context
    from vespid.coordinator.state import State, Task
    from vespid.coordinator.store import Store

log = get_logger(__name__)
@dataclass(frozen=True)
class ReplyLater:
    """A reply read from disk: made once the batch committed, so no file is read inside the
    transaction. `produce` may raise ProtocolError, answered as any refusal is."""

    produce: Callable[[], BaseModel]


@dataclass(frozen=True)
class Encoded:
    """A reply body with its bytes already written: for a large reply assembled from
    parts encoded once and kept (the node-list's entries). `data` must be `body` encoded."""

    body: dict[str, Any]
    data: bytes


# A model of shared/, or a body built by hand as the dict such a model describes (for a
# large, frequent reply; a unit test holds it to its model), or one already encoded;
# None: the plain `ack`.
Reply = BaseModel | dict[str, Any] | Encoded | ReplyLater | None
Handler = Callable[["Context", Any], Reply]
E = TypeVar("E", bound="Extension")


class Extension:
    """One concern beside the scheduler. Every method has a do-nothing default, so an
    extension says only what it takes part in."""

    name = "extension"

    def handlers(self) -> Mapping[type, Handler]:
        """The messages it answers: model type -> handler, merged into the dispatch table."""
        return {}

    def reads(self) -> Collection[type]:
        """Which of its messages only read (change no state, send nothing but the reply):
        the coordinator answers those from the committed state in a turn of their own,
        ahead of the nodes' traffic."""
        return ()

    def load(self, store: Store, state: State) -> None:
        """Read its slice of state from its own tables (at start, and after a failed batch
        was rolled back)."""

    def flush(self, store: Store) -> None:
        """Write what changed of its slice; called inside the batch's transaction."""

    def started(self, ctx: Context, task: Task) -> None:
        """A task was just given to a node."""

    def ended(self, ctx: Context, task: Task) -> None:
        """A task just completed (its severity, results and attempt are final)."""

    def tick(self, ctx: Context) -> None:
        """About once a second, in its own transaction."""

    def handled(self, command: str) -> None:
        """A message was decoded and dispatched (for counting; no state here)."""

    def rejected(self, code: str) -> None:
        """A message was refused with this error code."""


class Extensions:
    """A processor's extensions, each hook called in isolation from the others."""

    def __init__(self, extensions: Iterable[Extension]) -> None:
        self.members = list(extensions)
        self.failures = 0

    def find(self, kind: type[E]) -> E:
        """The member of that class (tests and tools look inside one this way)."""
        return next(e for e in self.members if isinstance(e, kind))

    def handlers(self, core: Mapping[type, Handler]) -> dict[type, Handler]:
        """The one dispatch table: the core's handlers and every extension's. Two owners of
        one message type is a wiring mistake, refused at start rather than routed by luck."""
        table = dict(core)
        for extension in self.members:
            for kind, handler in extension.handlers().items():
                if kind in table:
                    raise ValueError(f"{extension.name} handles {kind.__name__}, which is "
                                     "already handled")
                table[kind] = handler
        return table

    def reads(self, core: Collection[type]) -> frozenset[type]:
        return frozenset(core).union(*(extension.reads() for extension in self.members))

    def load(self, store: Store, state: State) -> None:
        for extension in self.members:
            extension.load(store, state)

    def flush(self, store: Store) -> None:
        for extension in self.members:
            extension.flush(store)

    def started(self, ctx: Context, task: Task) -> None:
        for extension in self.members:
            self._isolated(extension.started, ctx, task)

    def ended(self, ctx: Context, task: Task) -> None:
        for extension in self.members:
            self._isolated(extension.ended, ctx, task)

    def tick(self, ctx: Context) -> None:
        for extension in self.members:
            self._isolated(extension.tick, ctx)

    def handled(self, command: str) -> None:
        for extension in self.members:
            self._isolated(extension.handled, command)

    def rejected(self, code: str) -> None:
        for extension in self.members:
            self._isolated(extension.rejected, code)

    def _isolated(self, hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            self.failures += 1
            log.exception("extension_hook_failed", hook=getattr(hook, "__qualname__", hook),
                          failures=self.failures)
