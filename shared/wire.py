"""What the models of both dialects share: how a refused field reads, and how a model is sent.

shared/protocol.py (messages named by `command`) and shared/golem.py (the Golem-style dialect,
named by `type`) both build on this module and never import each other.
"""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
)


def describe_validation_error(kind: str, exc: ValidationError,
                              within: tuple[str, ...] = ()) -> str:
    """One readable sentence per problem, e.g. `task-create: requirements.memory: ...`;
    `within`: the path to the part of the message that was checked alone."""
    parts = []
    for error in exc.errors(include_url=False)[:5]:
        location = ".".join([*within, *(str(x) for x in error["loc"] if x != kind)])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "is not a field of this command (check the spelling)"
        parts.append(f"{location}: {message}" if location else message)
    more = exc.error_count() - len(parts)
    suffix = f" (and {more} more problems)" if more > 0 else ""
    return f"{kind}: " + "; ".join(parts) + suffix


def body_of(message: BaseModel) -> dict[str, Any]:
    """The JSON object of a message as its sender built it: only the fields it was given.

    A default is the receiver's to apply, so a field the sender left out stays out: the
    body means to the receiver exactly what a body written by hand with those fields would
    (and a receiver older than a field's default never meets that field)."""
    return message.model_dump(mode="json", by_alias=True, exclude_unset=True)


class Said(BaseModel):
    """A reply or event that says only what it was built with, however it is dumped.

    One model serves bodies that differ in which optional fields they carry (a plain `ack`
    and a keyed one's `"existing": true`; the task-info of a task and of an unknown name):
    a default fills in a field for whoever reads the model, never a key on the wire.

    Done by dumping unset fields away (pydantic-core applies that to every nested model)
    rather than by a serializer of each model's own: a wrap serializer runs Python per
    instance, and a node-list of 1,000 entries took three times as long to dump through it."""

    # Built on first use, as the messages are (see shared/protocol.py, _Message).
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              defer_build=True)

    def model_dump(self, **options: Any) -> dict[str, Any]:
        options.setdefault("exclude_unset", True)
        return super().model_dump(**options)

    def model_dump_json(self, **options: Any) -> str:
        options.setdefault("exclude_unset", True)
        return super().model_dump_json(**options)
