"""The node agent's broker loop: heartbeat, take task-runs and task-kills, report results.

One thread owns one pika connection. Task processes never run inside a pika callback:
the loop alternates `process_data_events(time_limit=...)` with reaping children, so AMQP
heartbeats keep flowing while tasks run for hours. Results produced while the broker is
away wait in memory and are sent, in order, before the first node-set after reconnecting.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from vespid.node_agent import containment, retention
from vespid.node_agent.files import collect_results, place_resources
from vespid.node_agent.logstream import LogStreams, attempt_log, note
from vespid.node_agent.settings import NodeSettings
from vespid.node_agent.supervisor import Finished, Launch, Supervisor
from vespid.shared import PROTOCOL_VERSION, topology
from vespid.shared.blobs import BlobChunk, BlobStore
from vespid.shared.errors import BrokerError, ProtocolError
from vespid.shared.logs import get_logger
from vespid.shared.protocol import (
    NodeDrain,
    NodeRepository,
    NodeSet,
    RepositoryClean,
    Severity,
    TaskComplete,
    TaskKill,
    TaskRun,
    decode_node_message,
    encode,
)
from vespid.shared.transport import (
    close_quietly,
    connect,
    consumers,
    declared,
    guarded,
    keep_reconnecting,
    properties,
    publish_confirmed,
    user_of,
    wake,
)

APP_ID = "vespid-node"
VERSION = "0.1.0"
REMEMBERED_RESULTS = 10_000
CLEANUP_SECONDS = 30.0


class NodeAgent:
    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.log = get_logger(__name__, node=settings.name)
        self.containment = containment.detect(settings.name, settings.containment)
        self.supervisor = Supervisor(kill_grace=settings.kill_grace,
                                     memory_margin=settings.memory_margin,
                                     containment=self.containment,
                                     launch=settings.launch,
                                     on_exit=lambda: wake(self._connection))
        self.superseded: dict[str, TaskRun] = {}  # newer attempts waiting for the old to die
        self.blobs = BlobStore(settings.work_dir / "blobs")
        self.folders: dict[str, Path] = {}  # task -> working folder, for its results
        self.produced: dict[str, list[dict[str, Any]]] = {}  # task -> result files
        self.logs = LogStreams(settings.log_dir, settings.name)
        self.logserver_present = False  # a log server's queue takes what we stream
        self._next_cleanup = 0.0
        self.user = user_of(settings.amqp_url)
        self.unsent: list[Finished] = []
        self.results: OrderedDict[str, Finished] = OrderedDict()
        self.draining = False
        self.stop_now = False
        self._connection: Any = None
        self._channel: Any = None
        self._coordinator_key = topology.COORDINATOR_KEY
        self._consumer_tag: str | None = None
        self._next_heartbeat = 0.0
        self.started = time.time()

    # ---- lifecycle -------------------------------------------------------------------
    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        self.log.info("node_started", capabilities=self.settings.capabilities,
                      repositories=sorted(self.settings.repositories))
        # Said once: what ending a task reaches on this machine, and what it does not.
        log_containment = self.log.info if self.containment.contains_detached \
            else self.log.warning
        log_containment("task_containment", kind=self.containment.kind,
                        detail=containment.describe(self.containment))
        ended = self.containment.sweep()
        if ended:
            self.log.warning("stale_task_processes_ended", processes=ended)
        resumed = self.logs.resume_unshipped(set())
        if resumed:
            self.log.info("earlier_attempt_logs_to_ship", attempts=resumed)
        keep_reconnecting(self._session, self.log)
        self.supervisor.close()
        self.containment.release()
        self.log.info("node_stopped")

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.draining:
            self.log.warning("node_stopping_now", signal=signal.Signals(signum).name)
            self.stop_now = True
            self.supervisor.kill_all("the node agent was stopped")
            return
        self._drain(f"signal {signal.Signals(signum).name}")

    def _drain(self, why: str) -> None:
        """Take no new work, finish what runs, then exit."""
        if not self.draining:
            self.log.info("node_draining", reason=why, running=sorted(self.supervisor.running))
        self.draining = True
        self._next_heartbeat = 0.0  # tell the coordinator at once

    def _finished(self) -> bool:
        return self.draining and not self.supervisor.running and not self.unsent

    def _session(self) -> None:
        if self._finished() or self.stop_now:
            return  # asked to stop while the broker was away, with nothing left to report
        try:
            self._open()
            while not self._finished():
                self._step()
            self._send_node_set(leaving=True)  # gone on purpose: not to be taken for lost
        finally:
            close_quietly(self._connection)
            self._connection = self._channel = self._consumer_tag = None
        # Work done while disconnected is never lost: keep reaping until we can report.
        self._reap()

    def _open(self) -> None:
        self._connection = connect(self.settings.broker_parameters(
            f"{APP_ID}-{self.settings.name}", heartbeat=30),
            stop_when=lambda: self._finished() or self.stop_now)
        self._channel = guarded(self._connection.channel)
        guarded(self._channel.confirm_delivery)
        declared(lambda: topology.declare_node(self._channel, self.settings.name),
                 f"declaring this node's queue {topology.node_queue(self.settings.name)}")
        guarded(lambda: topology.declare_logs(self._channel))
        self.logserver_present = self._logserver_listens()
        self._coordinator_key = self._channel_to_coordinator()
        guarded(lambda: self._channel.basic_qos(prefetch_count=self.settings.prefetch))
        self._flush_results()
        self._send_node_set()
        # Consumed even while draining: a task-run already on its way was assigned before
        # the coordinator knew, and is run rather than lost.
        self._consumer_tag = guarded(lambda: self._channel.basic_consume(
            topology.node_queue(self.settings.name), self._on_message))
        self.log.info("node_connected", queue=topology.node_queue(self.settings.name),
                      sends_to=self._coordinator_key)

    def _channel_to_coordinator(self) -> str:
        """The node channel when the coordinator declared it (contract v1.1), else the
        request channel. Chosen once per connection: everything this agent sends goes one
        way, so its task-complete always arrives before the node-set that follows it."""
        has_node_channel = consumers(self._connection, topology.COORDINATOR_NODE_QUEUE)
        return (topology.COORDINATOR_NODE_KEY if has_node_channel is not None
                else topology.COORDINATOR_KEY)

    def _step(self) -> None:
        guarded(lambda: self._connection.process_data_events(time_limit=0.2))
        self._reap()
        if self.unsent:
            # A task's whole output reaches the broker before its task-complete; then the
            # task-complete, which the coordinator's next decision for this slot waits on;
            # the log's end, its note and the task's files after it, off that path.
            self._stream_logs(ends=False)
            self._flush_results()
        self._stream_logs()
        if time.time() >= self._next_heartbeat:
            # A log server started after this agent connected is seen within a heartbeat,
            # so what ends from then on counts as shipped and is kept for retain_after_shipped.
            self.logserver_present = self._logserver_listens()
            self._send_node_set()
        if time.time() >= self._next_cleanup:
            self._clean_finished()

    # ---- messages in -----------------------------------------------------------------
    def _on_message(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        try:
            self._check_sender(props.user_id)
            message = decode_node_message(body)
        except ProtocolError as exc:
            self.log.error("node_message_rejected", error=exc.code, reason=exc.message)
            # Kept for the operators in vespid.dead, with the reason, not dropped.
            self._publish_raw(topology.DEAD_EXCHANGE, "", body,
                              {topology.ERROR_HEADER: f"{exc.code}: {exc.message}"})
            channel.basic_ack(method.delivery_tag)
            return
        if isinstance(message, TaskRun):
            self._start(message)
        elif isinstance(message, TaskKill):
            self.supervisor.kill(message.name, message.reason or "the coordinator asked",
                                 message.attempt)
        elif isinstance(message, BlobChunk):
            self._keep_chunk(message)
        elif isinstance(message, NodeDrain):
            self._drain("the coordinator asked (vespid drain)")
        elif isinstance(message, RepositoryClean):
            self._clean(message.repository)
        # Acked once the process runs and is recorded: a task's lifetime is never bounded by
        # the broker's delivery-acknowledgement timeout.
        channel.basic_ack(method.delivery_tag)

    def _logserver_listens(self) -> bool:
        """Whether a log server's queue exists on this vhost (then what we stream is kept
        there even while the log server itself is down)."""
        return consumers(self._connection, topology.LOG_SERVER_QUEUE) is not None

    def _clean_finished(self) -> None:
        # Often enough for a short retention to be kept to, never more than twice a second;
        # a retention of 0 is kept as each task's log ends (`_stream_logs`).
        s = self.settings
        kept = [t for t in (s.retain_after_shipped, s.retain_unshipped_ok,
                            s.retain_unshipped_failed) if t > 0]
        self._next_cleanup = time.time() + min(CLEANUP_SECONDS, max(0.5, min(kept) / 2)) \
            if kept else time.time() + CLEANUP_SECONDS
        self._remove_due()

    def _remove_due(self, only: str | None = None) -> None:
        running = {(name, r.run.attempt) for name, r in self.supervisor.running.items()}
        removed = retention.clean(self.settings, running | set(self.logs.streams), time.time(),
                                  only)
        if removed:
            self.log.info("finished_task_files_removed", tasks=removed)

    def _check_sender(self, user_id: str | None) -> None:
        """Only the coordinator may make this machine run code; RabbitMQ vouches for user_id."""
        expected = self.settings.coordinator_user
        if expected is not None and user_id != expected:
            raise ProtocolError("forbidden", f"sent by {user_id or 'an unnamed user'}, not by "
                                f"the coordinator ({expected}): not run")

    def _start(self, run: TaskRun) -> None:
        log = self.log.bind(task=run.name, attempt=run.attempt)
        current = self.supervisor.running.get(run.name)
        if current is not None:
            if current.run.attempt < run.attempt:
                log.warning("older_attempt_superseded", running=current.run.attempt)
                self.supervisor.kill(run.name, "a newer attempt of the task arrived")
                self.superseded[run.name] = run
            else:
                log.info("duplicate_task_run_ignored")
            return
        previous = self.results.get(run.name)
        if previous is not None and previous.attempt >= run.attempt:
            log.info("finished_task_reported_again")
            self.unsent.append(previous)
            return
        failed = self._launch(run)
        if failed is not None:
            self._record(failed)

    def _keep_chunk(self, chunk: BlobChunk) -> None:
        try:
            self.blobs.put_chunk(chunk)
        except ProtocolError as exc:  # the task that needs it fails, saying so
            self.log.error("file_rejected", sha256=chunk.sha256, reason=exc.message)

    def _clean(self, name: str) -> None:
        """Empty a released, non-persistent repository for its next holder."""
        repository = self.settings.repositories.get(name)
        if repository is None or repository.persist or not repository.path.is_dir():
            return
        for entry in repository.path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        self.log.info("repository_cleaned", repository=name, path=str(repository.path))

    def _launch(self, run: TaskRun) -> Finished | None:
        try:
            launch = self._plan(run)
        except (OSError, ValueError) as exc:
            return Finished(run.name, run.attempt, Severity.FATAL,
                            f"could not prepare the task: {exc}", "start")
        return self.supervisor.start(run, launch)

    def _plan(self, run: TaskRun) -> Launch:
        work = self.settings.work_dir
        cwd = self._working_dir(run)
        if run.executable_pyscript is not None:
            script = work / "scripts" / f"{run.name}.py"
            script.parent.mkdir(parents=True, exist_ok=True)
            script.write_text(run.executable_pyscript, encoding="utf-8")
        elif run.executable_pyfile is not None:
            script = (cwd / run.executable_pyfile).resolve()
            if not script.is_file():
                raise ValueError(f"executable_pyfile {run.executable_pyfile!r} is not a file "
                                 f"in {cwd}")
        else:
            raise ValueError("the task-run carries no script")
        place_resources(self.blobs, run, cwd)
        if "VESPID_GOLEM_TASK_ID" in run.environment:
            self.folders[run.name] = cwd
        return Launch(script=script.resolve(), cwd=cwd, env=self._environment(run),
                      log_file=self.logs.follow(run.name, run.attempt))

    def _working_dir(self, run: TaskRun) -> Path:
        repository = self.settings.repositories.get(run.path or "")
        if repository is not None:
            repository.path.mkdir(parents=True, exist_ok=True)
            return repository.path.resolve()
        scratch = self.settings.work_dir / "scratch" / run.name
        scratch.mkdir(parents=True, exist_ok=True)
        return scratch.resolve()

    def _environment(self, run: TaskRun) -> dict[str, str]:
        env = dict(os.environ)
        env.update(run.environment)
        env.update({
            "VESPID_TASK": run.name,
            "VESPID_AMQP_URL": self.settings.amqp_url,
            "VESPID_CORES": f"{run.cores:g}",
            "VESPID_NODE": self.settings.name,
            "VESPID_ATTEMPT": str(run.attempt),
            "PYTHONUNBUFFERED": "1",
        })
        return env

    # ---- messages out ----------------------------------------------------------------
    def _reap(self) -> None:
        for result in self.supervisor.reap():
            self._record(result)
            newer = self.superseded.pop(result.name, None)
            if newer is not None:
                self._start(newer)

    def _stream_logs(self, ends: bool = True) -> None:
        for chunk in self.logs.pending(ends):
            # Not mandatory: with no log server listening the local copy is the log.
            publish_confirmed(self._channel, topology.LOGS_EXCHANGE,
                              topology.log_key(chunk.task), encode(chunk),
                              properties("log-chunk", app_id=APP_ID), mandatory=False)
            self.logs.sent(chunk, delivered=self.logserver_present)
            if chunk.eof:
                self._remove_due(only=chunk.task)

    def _record(self, result: Finished) -> None:
        # What retention decides on, kept beside the log: with the log's end when it streams
        # (one write, after the task-complete), else now.
        ended = {"ended": time.time(), "success": result.success.value}
        if not self.logs.finish(result.name, result.attempt, **ended):
            log_file = attempt_log(self.settings.log_dir, result.name, result.attempt)
            if log_file.exists():
                note(log_file, **ended)
        folder = self.folders.pop(result.name, None)
        if folder is not None and result.success is Severity.OK:
            self.produced[result.name] = collect_results(self.blobs, folder)
        self.results[result.name] = result
        while len(self.results) > REMEMBERED_RESULTS:
            self.results.popitem(last=False)
        self.unsent.append(result)

    def _flush_results(self) -> None:
        while self.unsent and self._channel is not None:
            result = self.unsent[0]
            files = self.produced.get(result.name, [])
            for produced in files:  # the files first: the coordinator keeps them on arrival
                for chunk in self.blobs.file_chunks(produced["sha256"]):
                    self._publish(chunk)
            self._publish(TaskComplete(
                command="task-complete", name=result.name, node=self.settings.name,
                success=result.success, attempt=result.attempt, message=result.message,
                cause=result.cause, results=files))
            self.produced.pop(result.name, None)
            self.unsent.pop(0)

    def _send_node_set(self, leaving: bool = False) -> None:
        s = self.settings
        self._publish(NodeSet(
            command="node-set", name=s.name, capabilities=s.capabilities,
            repositories={k: NodeRepository(type=r.type, persist=r.persist)
                          for k, r in s.repositories.items()},
            activetasks={name: {"attempt": r.run.attempt, "pid": r.process.pid}
                         for name, r in self.supervisor.running.items()},
            draining=self.draining, leaving=leaving, log_dir=str(s.log_dir.resolve()),
            version=VERSION, protocol=PROTOCOL_VERSION, started=self.started))
        self._next_heartbeat = time.time() + s.heartbeat_interval

    def _publish(self, message: NodeSet | TaskComplete | BlobChunk) -> None:
        if self._channel is None:
            raise BrokerError("not connected")
        publish_confirmed(self._channel, topology.EXCHANGE, self._coordinator_key,
                          encode(message), properties(message.command, app_id=APP_ID,
                                                      user_id=self.user))

    def _publish_raw(self, exchange: str, key: str, body: bytes,
                     headers: dict[str, Any]) -> None:
        # Not mandatory: a broker without the coordinator's vespid.dead queue yet must not
        # make the agent fail on a message it already judged bad.
        publish_confirmed(self._channel, exchange, key, body,
                          properties("rejected", app_id=APP_ID, headers=headers),
                          mandatory=False)

