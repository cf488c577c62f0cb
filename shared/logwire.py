"""The task-log messages on the wire (exchange vespid.logs), one model each.

A node agent streams `log-chunk`s; a reader asks the log server with `log-get` and gets a
`log-response`. docs/protocol.md (section 11) says what each field means. Senders build these
models and `encode()` them; receivers validate with them, so a malformed message is refused
with a sentence saying what is wrong, never half-handled.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictInt,
    ValidationError,
    field_validator,
    model_serializer,
)

from vespid.shared.errors import ProtocolError
from vespid.shared.protocol import TaskName, parse_body
from vespid.shared.wire import describe_validation_error

MAX_ATTEMPT = 1_000_000
Attempt = Annotated[StrictInt, Field(gt=0, le=MAX_ATTEMPT)]


LogTask = TaskName  # `.` and `..` are refused there: they would name folders
M = TypeVar("M", bound="_LogMessage")


class _LogMessage(BaseModel):
    # Fields a newer peer adds are ignored, as they were before these models: an older log
    # server keeps storing what a newer agent streams. Built on first use, as the messages
    # of shared/protocol.py are: the coordinator imports these and never uses them.
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)


class LogChunk(_LogMessage):
    """Bytes of one attempt's output at their offset in that attempt's log file."""

    command: Literal["log-chunk"]
    task: LogTask
    attempt: Attempt = 1  # a chunk without it (an agent before v1.1) is attempt 1
    node: str | None = None
    offset: StrictInt = Field(ge=0)
    data: str | None = None  # the bytes as UTF-8 text, when they are valid UTF-8
    data_base64: str | None = None  # else as base64 (a cut inside a character, binary output)
    eof: bool = False  # the last chunk of the attempt: its process exited, all was sent

    @field_validator("data_base64")
    @classmethod
    def _is_base64(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                base64.b64decode(value, validate=True)
            except binascii.Error as exc:
                raise ValueError(f"not base64: {exc}") from None
        return value

    @model_serializer(mode="wrap")
    def _absent_not_null(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The same bytes as before these models: a reader tells text from base64 by which key
        # is present, so an unused one is left out, not sent as null (and `eof` only at the end).
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items()
                if value is not None and not (key == "eof" and value is False)}

    @classmethod
    def carrying(cls, task: str, attempt: int, node: str, offset: int,
                 data: bytes) -> LogChunk:
        """The chunk of `data` at `offset` (built, not validated: the agent made every field,
        and a name the log server refuses is dead-lettered there, as before)."""
        text: str | None = None
        encoded: str | None = None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            encoded = base64.b64encode(data).decode("ascii")
        return cls.model_construct(command="log-chunk", task=task, attempt=attempt, node=node,
                                   offset=offset, data=text, data_base64=encoded)

    @classmethod
    def end(cls, task: str, attempt: int, node: str, offset: int) -> LogChunk:
        """The last chunk of an attempt: no data, `eof`."""
        return cls.model_construct(command="log-chunk", task=task, attempt=attempt, node=node,
                                   offset=offset, data="", eof=True)

    def content(self) -> bytes:
        if self.data_base64 is not None:  # base64 wins when a peer sends both, as before
            return base64.b64decode(self.data_base64)
        return (self.data or "").encode("utf-8")


class LogGet(_LogMessage):
    """Ask the log server for part of one attempt's log (sent with `reply_to`)."""

    command: Literal["log-get"]
    task: LogTask
    attempt: Attempt | None = None  # null: the latest attempt the server keeps
    offset: StrictInt = Field(default=0, ge=0)


class LogResponse(_LogMessage):
    """Up to 256 KiB of an attempt's log from `offset`, and what the server keeps of it."""

    command: Literal["log-response"] = "log-response"
    task: str
    attempt: int  # the attempt it is (the latest, when the request said null)
    attempts: list[int]  # every attempt the server keeps, ascending
    node: str | None  # the node that wrote it
    offset: int
    data: str  # the bytes as text (invalid UTF-8 replaced); `size` counts the bytes
    size: int
    known: bool  # the server has that attempt
    complete: bool  # its end (`eof`) arrived


LOG_SERVER_MODELS: dict[str, type[LogChunk] | type[LogGet]] = {
    "log-chunk": LogChunk, "log-get": LogGet}


def decode_log_message(body: bytes) -> LogChunk | LogGet:
    """What comes to the log server's queue, as its model; ProtocolError saying what is
    wrong with anything else."""
    data = parse_body(body)
    model = LOG_SERVER_MODELS.get(str(data.get("command")))
    if model is None:
        raise ProtocolError("unknown_command", f"unknown command {data.get('command')!r}; "
                            f"expected one of: {', '.join(LOG_SERVER_MODELS)}")
    return validated(model, data)


def validated(model: type[M], data: dict[str, Any]) -> M:
    """`data` as a `model`, or ProtocolError("invalid_message") saying which field is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError("invalid_message", describe_validation_error(
            str(data.get("command")), exc)) from None


def whole_characters(data: bytes) -> bytes:
    """`data` less a UTF-8 character cut off at its end (at most 3 bytes), so text read in
    parts never shows a character split in two as two replacement marks."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: its character started further back
        length = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 \
            else 4 if byte >> 3 == 0b11110 else 1
        return data if length <= back else data[:-back]
    return data
