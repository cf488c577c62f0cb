"""`vespid logs NAME [-f]`: a task's output as the log server keeps it, then live.

`vespid logs -f` subscribes to the task's chunks first, then asks the log server for the
history, then prints what comes live after it, until the node says the output ended. The log
server itself is vespid.servers.logserver.
"""

from __future__ import annotations

import argparse
import codecs
import re
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from vespid.client.api import CONNECT_SECONDS
from vespid.shared import topology
from vespid.shared.errors import (
    BrokerError,
    ConfigError,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    TaskNotFound,
)
from vespid.shared.logs import get_logger
from vespid.shared.logwire import LogChunk, LogGet, LogResponse, validated
from vespid.shared.protocol import TASK_NAME_PATTERN, encode, parse_body
from vespid.shared.settings import ClientSettings, client_settings
from vespid.shared.transport import (
    CONNECTION_ERRORS,
    close_quietly,
    connect,
    guarded,
    properties,
    refusal,
    require_consumer,
)

T = TypeVar("T")
log = get_logger(__name__)
NO_LOG_SERVER = "start one with `vespid logserver --dir DIR`"


def _asking(action: Callable[[], T]) -> T:
    """Run a pika call of the reader; say in a sentence what a refusal means."""
    try:
        return action()
    except CONNECTION_ERRORS as exc:
        refused = refusal(exc)
        if refused is not None and refused[0] == 404:  # vespid.logs was never declared
            raise RequestTimeout(f"no log server has run on this vhost: {NO_LOG_SERVER}") \
                from None
        if refused is not None:
            raise BrokerError(f"the broker refused: {refused[1]}") from None
        raise BrokerError(f"lost the broker: {exc!r}") from None


class LogReader:
    """What `vespid logs` does: history from the log server, then the live chunks.

    It declares nothing (a client may not): the exchange exists once a log server or a node
    agent has run on the vhost."""

    def __init__(self, settings: ClientSettings, timeout: float) -> None:
        self.connection = connect(settings.broker_parameters("vespid-logs"),
                                  give_up_after=min(timeout, CONNECT_SECONDS), quiet=True)
        # Nobody would answer a log-get: say so now, not after the timeout.
        require_consumer(self.connection, topology.LOG_SERVER_QUEUE, "log server",
                         NO_LOG_SERVER)
        self.channel = guarded(self.connection.channel)
        self.timeout = timeout
        self.replies: dict[str, dict[str, Any]] = {}
        self.live: list[LogChunk] = []
        _asking(lambda: self.channel.basic_consume(topology.DIRECT_REPLY_TO, self._on_reply,
                                                   auto_ack=True))

    def _on_reply(self, _ch: Any, _m: Any, props: Any, body: bytes) -> None:
        self.replies[props.correlation_id] = parse_body(body)

    def follow(self, task: str) -> None:
        def subscribe() -> None:
            queue = self.channel.queue_declare("", exclusive=True,
                                               auto_delete=True).method.queue
            self.channel.queue_bind(queue, topology.LOGS_EXCHANGE, topology.log_key(task))
            self.channel.basic_consume(queue, self._on_chunk, auto_ack=True)

        _asking(subscribe)

    def _on_chunk(self, _ch: Any, _m: Any, _props: Any, body: bytes) -> None:
        try:
            self.live.append(validated(LogChunk, parse_body(body)))
        except ProtocolError as exc:  # someone else's garbage must not end our reading
            log.warning("log_chunk_ignored", error=exc.code, reason=exc.message)

    def history(self, task: str, attempt: int | None, offset: int) -> LogResponse:
        request = validated(LogGet, {"command": "log-get", "task": task, "attempt": attempt,
                                     "offset": offset})
        correlation_id = uuid.uuid4().hex
        props = properties("log-get", app_id="vespid-logs", persistent=False,
                           reply_to=topology.DIRECT_REPLY_TO, correlation_id=correlation_id)
        props.expiration = str(round(self.timeout * 1000))  # never answered after we left
        _asking(lambda: self.channel.basic_publish(
            topology.LOGS_EXCHANGE, topology.LOG_REQUEST_KEY, encode(request), props))
        deadline = time.monotonic() + self.timeout
        while correlation_id not in self.replies:
            if time.monotonic() > deadline:
                raise RequestTimeout(f"no log server answered: {NO_LOG_SERVER}")
            _asking(lambda: self.connection.process_data_events(time_limit=0.2))
        reply = self.replies.pop(correlation_id)
        if reply.get("command") == "error":  # the log server refused the request
            raise RemoteError(str(reply.get("error")), str(reply.get("message")))
        return validated(LogResponse, reply)

    def print_log(self, task: str, *, follow: bool = False, attempt: int | None = None,
                  every: bool = False) -> None:
        """The latest attempt (or `attempt`, or `every` one in turn); -f: then live."""
        if follow:
            self.follow(task)
        first = self.history(task, attempt, 0)
        if not first.known and not follow:
            raise TaskNotFound(f"the log server has no log for {task!r}"
                               + (f" attempt {attempt}" if attempt else ""))
        shown = first.attempts if every else [first.attempt]
        others = [a for a in first.attempts if a not in shown]
        if others:
            _note(f"attempt {first.attempt} of {task}; also kept: attempt "
                  f"{', '.join(map(str, others))} (--attempt N, or --all)")
        offset, complete = 0, False
        for number in shown:
            reply = first if number == first.attempt else self.history(task, number, 0)
            if every:
                _note(f"=== attempt {number}" + (f" on {reply.node}" if reply.node
                                                   else "") + " ===")
            offset, complete = self._print_history(task, number, reply)
        if follow:
            self._follow_live(task, shown[-1], offset, complete)
        close_quietly(self.connection)

    def _print_history(self, task: str, attempt: int,
                       reply: LogResponse) -> tuple[int, bool]:
        offset = 0
        while True:
            sys.stdout.write(reply.data)
            offset += reply.size
            if reply.size == 0:
                break
            reply = self.history(task, attempt, offset)
        sys.stdout.flush()
        return offset, reply.complete

    def _follow_live(self, task: str, attempt: int, offset: int, complete: bool) -> None:
        """Print the followed attempt's chunks as they come; a newer attempt's first chunk
        means the task started again: say so and follow that one from its start."""
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while not complete:
            _asking(lambda: self.connection.process_data_events(time_limit=0.5))
            for chunk in sorted(self.live, key=lambda c: (c.attempt, c.offset)):
                if chunk.attempt > attempt:
                    _note(f"=== attempt {chunk.attempt} started" + (
                        f" on {chunk.node}" if chunk.node else "") + " ===")
                    attempt, offset, complete = chunk.attempt, 0, False
                    text.reset()
                if chunk.attempt != attempt:
                    continue
                offset = _print_new(chunk, offset, text)
                complete = complete or chunk.eof
            self.live.clear()
            sys.stdout.flush()


def _print_new(chunk: LogChunk, offset: int, text: codecs.IncrementalDecoder) -> int:
    """Print what of `chunk` lies past `offset` (a repeat prints nothing); the new offset.
    `text` decodes across chunks: a character split between two is printed whole."""
    data = chunk.content()
    end = chunk.offset + len(data)
    if end <= offset:
        return offset
    sys.stdout.write(text.decode(data[max(offset - chunk.offset, 0):]))
    return end


def _note(text: str) -> None:
    sys.stderr.write(f"vespid logs: {text}\n")


def cmd_logs(args: argparse.Namespace) -> int:
    if not re.fullmatch(TASK_NAME_PATTERN, args.name):
        raise ConfigError(f"{args.name!r} is not a task name")
    if args.attempt is not None and args.attempt < 1:
        raise ConfigError("--attempt counts from 1")
    LogReader(client_settings(args.amqp_url), args.request_timeout).print_log(
        args.name, follow=args.follow, attempt=args.attempt, every=args.all)
    return 0


def add_commands(sub: Any, client_options: Any) -> None:
    reader = sub.add_parser(
        "logs", help="print a task's log: its latest attempt (-f: follow it live)",
        description="Print a task's output as the log server keeps it: the latest attempt by "
                    "default (it says when earlier ones exist), one attempt with --attempt N, "
                    "or every attempt in turn with --all.")
    reader.add_argument("name")
    which = reader.add_mutually_exclusive_group()
    which.add_argument("--attempt", type=int, help="show this attempt (1 is the first)")
    which.add_argument("--all", action="store_true", help="show every attempt, oldest first")
    reader.add_argument("-f", "--follow", action="store_true",
                        help="keep printing the current attempt until the task's output ends "
                             "(switching to a newer attempt if the task starts again)")
    reader.set_defaults(handler=cmd_logs)
    client_options(reader)
