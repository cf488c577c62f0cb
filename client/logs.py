"""Central task logs: `vespid logserver --dir DIR` keeps them, `vespid logs NAME [-f]` reads.

The log server consumes every chunk node agents stream (vespid.logs, key log.<task>) and
writes it at its byte offset into DIR/<task>.log, so repeats and late chunks land in the
right place; it answers `log-get` requests with what it has. `vespid logs -f` subscribes to
the task's chunks first, then asks for the history, then prints what comes live after it,
until the node says the output ended.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from vespid.node_agent.logstream import chunk_bytes
from vespid.shared import logs as logging_setup
from vespid.shared import topology
from vespid.shared.errors import ConfigError, RequestTimeout, TaskNotFound
from vespid.shared.protocol import encode, parse_body
from vespid.shared.transport import (
    DEFAULT_URL,
    close_quietly,
    connect,
    connection_parameters,
    guarded,
    keep_reconnecting,
    properties,
)

APP_ID = "vespid-logserver"
SAFE_TASK = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
READ_BYTES = 256 * 1024


class LogServer:
    def __init__(self, folder: Path, url: str) -> None:
        self.folder, self.url = folder, url
        self.done = folder / ".complete"
        self.done.mkdir(parents=True, exist_ok=True)
        self.log = logging_setup.get_logger(__name__)
        self.stopping = False

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        keep_reconnecting(self._session, self.log)

    def _session(self) -> None:
        connection = connect(connection_parameters(self.url, name=APP_ID))
        channel = guarded(connection.channel)
        guarded(lambda: topology.declare_log_server(channel))
        guarded(lambda: channel.basic_qos(prefetch_count=200))
        guarded(lambda: channel.basic_consume(topology.LOG_SERVER_QUEUE, self._on_message))
        self.log.info("logserver_started", folder=str(self.folder))
        try:
            while not self.stopping:
                guarded(lambda: connection.process_data_events(time_limit=0.5))
        finally:
            close_quietly(connection)

    def _on_message(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        message = parse_body(body)
        task = str(message.get("task", ""))
        if not SAFE_TASK.match(task):
            self.log.warning("log_message_ignored", task=task[:50])
        elif message.get("command") == "log-chunk":
            self._store(task, message)
        elif message.get("command") == "log-get" and props.reply_to:
            reply = self.read(task, int(message.get("offset", 0)))
            channel.basic_publish("", props.reply_to, encode(reply), properties(
                "log-response", app_id=APP_ID, persistent=False,
                correlation_id=props.correlation_id))
        channel.basic_ack(method.delivery_tag)

    def _store(self, task: str, message: dict[str, Any]) -> None:
        path = self.folder / f"{task}.log"
        with open(path, "r+b" if path.exists() else "wb") as handle:
            handle.seek(int(message["offset"]))
            handle.write(chunk_bytes(message))
        if message.get("eof"):
            (self.done / task).touch()

    def read(self, task: str, offset: int) -> dict[str, Any]:
        path = self.folder / f"{task}.log"
        data = b""
        if path.exists():
            with path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read(READ_BYTES)
        return {"command": "log-response", "task": task, "offset": offset,
                "data": data.decode("utf-8", errors="replace"), "size": len(data),
                "known": path.exists(), "complete": (self.done / task).exists()}


class LogReader:
    """What `vespid logs` does: history from the log server, then the live chunks."""

    def __init__(self, url: str, timeout: float) -> None:
        self.connection = connect(connection_parameters(url, name="vespid-logs"))
        self.channel = guarded(self.connection.channel)
        topology.declare_logs(self.channel)
        self.timeout = timeout
        self.replies: dict[str, dict[str, Any]] = {}
        self.live: list[dict[str, Any]] = []
        self.channel.basic_consume(topology.DIRECT_REPLY_TO, self._on_reply, auto_ack=True)

    def _on_reply(self, _ch: Any, _m: Any, props: Any, body: bytes) -> None:
        self.replies[props.correlation_id] = parse_body(body)

    def follow(self, task: str) -> None:
        queue = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.channel.queue_bind(queue, topology.LOGS_EXCHANGE, topology.log_key(task))
        self.channel.basic_consume(queue, lambda _c, _m, _p, body: self.live.append(
            parse_body(body)), auto_ack=True)

    def history(self, task: str, offset: int) -> dict[str, Any]:
        correlation_id = uuid.uuid4().hex
        self.channel.basic_publish(topology.LOGS_EXCHANGE, topology.LOG_REQUEST_KEY, encode(
            {"command": "log-get", "task": task, "offset": offset}), properties(
            "log-get", app_id="vespid-logs", persistent=False,
            reply_to=topology.DIRECT_REPLY_TO, correlation_id=correlation_id))
        deadline = time.monotonic() + self.timeout
        while correlation_id not in self.replies:
            if time.monotonic() > deadline:
                raise RequestTimeout("no log server answered: start one with "
                                     "`vespid logserver --dir DIR`")
            self.connection.process_data_events(time_limit=0.2)
        return self.replies.pop(correlation_id)

    def print_log(self, task: str, follow: bool) -> None:
        if follow:
            self.follow(task)
        offset, complete = 0, False
        while True:
            reply = self.history(task, offset)
            if not reply["known"] and not follow:
                raise TaskNotFound(f"the log server has no log for {task!r}")
            sys.stdout.write(reply["data"])
            offset += len(str(reply["data"]).encode("utf-8"))
            complete = bool(reply["complete"])
            if reply["size"] == 0:
                break
        sys.stdout.flush()
        while follow and not complete:
            self.connection.process_data_events(time_limit=0.5)
            for body in sorted(self.live, key=lambda b: int(b["offset"])):
                data = chunk_bytes(body)
                if int(body["offset"]) + len(data) > offset:
                    sys.stdout.write(data[max(offset - int(body["offset"]), 0):]
                                     .decode("utf-8", errors="replace"))
                    offset = int(body["offset"]) + len(data)
                complete = complete or bool(body.get("eof"))
            self.live.clear()
            sys.stdout.flush()
        close_quietly(self.connection)


def cmd_logserver(args: argparse.Namespace) -> int:
    logging_setup.configure("info")
    LogServer(Path(args.dir), args.amqp_url or os.environ.get("VESPID_AMQP_URL")
              or DEFAULT_URL).run()
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    if not SAFE_TASK.match(args.name):
        raise ConfigError(f"{args.name!r} is not a task name")
    url = args.amqp_url or os.environ.get("VESPID_AMQP_URL") or DEFAULT_URL
    LogReader(url, args.request_timeout).print_log(args.name, args.follow)
    return 0


def add_commands(sub: Any, client_options: Any) -> None:
    server = sub.add_parser("logserver", help="keep every task's output in a folder",
                            description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    server.add_argument("--dir", required=True, help="where <task>.log files are kept")
    server.add_argument("--amqp-url", help="broker URL (env VESPID_AMQP_URL)")
    server.set_defaults(handler=cmd_logserver)
    reader = sub.add_parser("logs", help="print a task's log (-f: follow it live)")
    reader.add_argument("name")
    reader.add_argument("-f", "--follow", action="store_true",
                        help="keep printing until the task's output ends")
    reader.set_defaults(handler=cmd_logs)
    client_options(reader)
