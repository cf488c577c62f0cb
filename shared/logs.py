"""structlog set-up: one event per line, JSON when not on a terminal, never print()."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import structlog

# Info and debug events logged inside `held_until_commit`, as (method, event dict).
_held: ContextVar[list[tuple[str, MutableMapping[str, Any]]] | None] = ContextVar(
    "vespid_held_logs", default=None)
_HELD_LEVELS = frozenset({"debug", "info"})


def _hold(_logger: Any, method: str, event: MutableMapping[str, Any]
          ) -> MutableMapping[str, Any]:
    held = _held.get()
    if held is None or method not in _HELD_LEVELS:
        return event
    held.append((method, event))
    raise structlog.DropEvent


@contextmanager
def held_until_commit() -> Iterator[None]:
    """Info and debug events logged in the block come out once it ends without an error
    (its transaction committed), and not at all if it raises: a line such as task_started
    never tells of a decision that was rolled back (a coordinator paused mid-batch, then
    fenced out at its commit, logged starts that never happened). Warnings and errors come
    out at once."""
    held: list[tuple[str, MutableMapping[str, Any]]] = []
    token = _held.set(held)
    try:
        yield
    finally:
        _held.reset(token)
    log = structlog.get_logger()
    for method, event in held:
        getattr(log, method)(**event)


def configure(level: str = "info", json_output: bool | None = None) -> None:
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,  # before _hold: as bound when logged
            _hold,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # pika logs through the standard library; keep its chatter out unless it matters.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def get_logger(name: str, **bound: Any) -> Any:
    # Lazy: a module-level logger made at import takes the configuration set at start
    # (binding here would freeze the default console one, and mix it into JSON logs).
    return structlog.get_logger(name, **bound)
