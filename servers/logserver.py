"""`vespid logserver --dir DIR`: keeps every task's output, one file per attempt.

The log server consumes every chunk node agents stream (vespid.logs, key log.<task>) and
writes it at its byte offset into DIR/<task>/attempt-<n>.log, the file of the attempt the
chunk says it came from: repeats and late chunks land in the right place, and a stale
attempt can never write into another's file. It answers `log-get` requests with what it has
(`vespid logs`, vespid.client.logs, asks them). A message it cannot handle is dead-lettered
to vespid.dead with the reason, never retried forever.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vespid.servers.settings import LogServerSettings
from vespid.shared import logs as logging_setup
from vespid.shared import topology
from vespid.shared.errors import ConfigError, ProtocolError
from vespid.shared.logwire import (
    LogChunk,
    LogResponse,
    decode_log_message,
    whole_characters,
)
from vespid.shared.protocol import encode, error_reply
from vespid.shared.settings import ClientSettings
from vespid.shared.transport import (
    close_quietly,
    connect,
    declared,
    guarded,
    keep_reconnecting,
    properties,
    publish_confirmed,
)

APP_ID = "vespid-logserver"
ATTEMPT_FILE = re.compile(r"^attempt-(\d+)\.log$")
READ_BYTES = 256 * 1024


class TaskLogs:
    """The files of one task's log in the log server's folder: one per attempt."""

    def __init__(self, folder: Path, task: str) -> None:
        self.folder = folder / task

    def path(self, attempt: int) -> Path:
        return self.folder / f"attempt-{attempt}.log"

    def attempts(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        found = (ATTEMPT_FILE.match(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def meta(self, attempt: int) -> dict[str, Any]:
        try:
            data = json.loads((self.folder / f"attempt-{attempt}.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def set_meta(self, attempt: int, **fields: Any) -> None:
        meta = self.meta(attempt)
        if all(meta.get(k) == v for k, v in fields.items()):
            return
        (self.folder / f"attempt-{attempt}.json").write_text(json.dumps(meta | fields))


class LogServer:
    def __init__(self, folder: Path, settings: ClientSettings) -> None:
        self.folder, self.settings = folder, settings
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = logging_setup.get_logger(__name__)
        self.stopping = False
        self._noted: set[tuple[str, int]] = set()

    def run(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        keep_reconnecting(self._session, self.log)

    def _session(self) -> None:
        connection = connect(self.settings.broker_parameters(APP_ID))
        channel = guarded(connection.channel)
        guarded(channel.confirm_delivery)
        self._declare(channel)
        guarded(lambda: channel.basic_qos(prefetch_count=200))
        guarded(lambda: channel.basic_consume(topology.LOG_SERVER_QUEUE, self._on_message))
        self.log.info("logserver_started", folder=str(self.folder))
        try:
            while not self.stopping:
                guarded(lambda: connection.process_data_events(time_limit=0.5))
        finally:
            close_quietly(connection)

    def _declare(self, channel: Any) -> None:
        # An older Vespid declared vespid.logserver without a delivery limit: deleting it
        # loses only chunks not yet written, which the nodes' local files keep.
        declared(lambda: topology.declare_log_server(channel),
                 f"declaring the log server's queue {topology.LOG_SERVER_QUEUE}")

    def _on_message(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        try:
            self._handle(channel, props, body)
        except ProtocolError as exc:
            self._refuse(channel, props, body, exc.code, exc.message)
        except OSError as exc:  # a full disk, say: keep the chunk for an operator
            self._refuse(channel, props, body, "internal", f"its log file: {exc}")
        channel.basic_ack(method.delivery_tag)

    def _refuse(self, channel: Any, props: Any, body: bytes, code: str, message: str) -> None:
        """As the contract says of every invalid message: whoever waits for an answer gets an
        `error` reply (not a timeout); anything else goes to vespid.dead with the reason."""
        if not props.reply_to:
            self._reject(channel, body, f"{code}: {message}")
            return
        self.log.warning("log_request_refused", error=code, reason=message)
        self._reply(channel, props, "error", error_reply(code, message))

    def _reply(self, channel: Any, props: Any, kind: str,
               payload: BaseModel | dict[str, Any]) -> None:
        channel.basic_publish("", props.reply_to, encode(payload), properties(
            kind, app_id=APP_ID, persistent=False, correlation_id=props.correlation_id))

    def _reject(self, channel: Any, body: bytes, reason: str) -> None:
        self.log.warning("log_message_rejected", reason=reason)
        publish_confirmed(channel, topology.DEAD_EXCHANGE, "", body, properties(
            "rejected", app_id=APP_ID, headers={topology.ERROR_HEADER: reason}),
            mandatory=False)

    def _handle(self, channel: Any, props: Any, body: bytes) -> None:
        message = decode_log_message(body)
        if isinstance(message, LogChunk):
            self._store(message)
        elif props.reply_to:  # a log-get nobody waits for needs no answer
            self._reply(channel, props, "log-response",
                        self.read(message.task, message.attempt, message.offset))

    def _store(self, chunk: LogChunk) -> None:
        logs = TaskLogs(self.folder, chunk.task)
        path = logs.path(chunk.attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "r+b" if path.exists() else "wb") as handle:
            handle.seek(chunk.offset)
            handle.write(chunk.content())
        # Which node wrote it, and whether it ended: noted once, not at every chunk.
        if chunk.eof:
            logs.set_meta(chunk.attempt, node=chunk.node, complete=True)
        elif (chunk.task, chunk.attempt) not in self._noted:
            logs.set_meta(chunk.attempt, node=chunk.node)
            self._noted.add((chunk.task, chunk.attempt))

    def read(self, task: str, attempt: int | None, offset: int) -> LogResponse:
        """Part of one attempt's log (the latest when `attempt` is None), with the list of
        every attempt kept, so a reader can say that others exist."""
        logs = TaskLogs(self.folder, task)
        attempts = logs.attempts()
        chosen = attempt if attempt is not None else (attempts[-1] if attempts else 1)
        path = logs.path(chosen)
        data = b""
        if path.exists():
            with path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read(READ_BYTES)
            if len(data) == READ_BYTES:  # more follows: end on a whole character
                data = whole_characters(data)
        meta = logs.meta(chosen)
        node = meta.get("node")  # a file the server wrote, but on a disk anyone may edit
        return LogResponse(task=task, attempt=chosen, attempts=attempts,
                           node=node if isinstance(node, str) else None,
                           offset=offset, data=data.decode("utf-8", errors="replace"),
                           size=len(data), known=path.exists(),
                           complete=bool(meta.get("complete")))


def cmd_logserver(args: argparse.Namespace) -> int:
    settings = LogServerSettings.load(args.config, amqp_url=args.amqp_url, log_store=args.dir)
    if settings.log_store is None:
        raise ConfigError("say where to keep the logs: --dir DIR, VESPID_LOG_STORE, or "
                          "log_store in the --config file")
    logging_setup.configure(settings.log_level, settings.json_logs)
    logging_setup.get_logger(__name__).info("settings", **settings.redacted())
    LogServer(settings.log_store, settings).run()
    return 0


def add_commands(sub: Any) -> None:
    server = sub.add_parser("logserver", help="keep every task's output in a folder",
                            description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    server.add_argument("--dir", type=Path,
                        help="where logs are kept: <task>/attempt-<n>.log, one per attempt "
                             "(env VESPID_LOG_STORE)")
    server.add_argument("--config", type=Path, help="TOML settings file")
    server.add_argument("--amqp-url", help="broker URL (env VESPID_AMQP_URL)")
    server.set_defaults(handler=cmd_logserver)
