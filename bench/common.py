"""What both benchmarks share: deadlines, a private vhost, a coordinator process, a raw
AMQP peer, a simulator process that plays many raw nodes, and the Markdown report.

Everything here speaks only WIRE.md (raw pika), as a third-party node or client would, so
the figures measure the coordinator and the broker, not the project's client library.

Timing: every process stamps events with time.monotonic(), which on Linux is the one
system-wide CLOCK_MONOTONIC, so stamps taken in the simulator and in the benchmark process
can be subtracted from each other.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import heapq
import json
import logging
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pika.exceptions

log = logging.getLogger("bench")

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
EXCHANGE = "vespid"
COORDINATOR_KEY = "coordinator"
# Simulated nodes send on the node channel (contract v1.1), as the project's agent does.
NODE_CHANNEL_KEY = "coordinator.node"
COORDINATOR_QUEUE = "vespid.coordinator"
DEAD_QUEUE = "vespid.dead"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
NODE_QUEUE_ARGS = {"x-queue-type": "quorum", "x-single-active-consumer": True}
JSON_PROPS = pika.BasicProperties(content_type="application/json", delivery_mode=2)


class BenchError(Exception):
    """Something the benchmark cannot go on from; its text goes into the report's notes."""


# ---- time ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Deadline:
    """A point in monotonic time; every wait in the benchmarks is bounded by one."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def within(self, seconds: float) -> Deadline:
        """This deadline or `seconds` from now, whichever comes first."""
        return Deadline(min(self.at, time.monotonic() + seconds))


def setup_logging() -> None:
    """Progress goes to stderr; stdout carries only the final report."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="bench: %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP clean up like Ctrl-C does (processes stopped, vhost deleted).

    SIGINT is set explicitly too: a shell starts background jobs with it ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)


def die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM to this process when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_setup() -> None:
    """For helper processes: Ctrl-C is the parent's to handle; they are stopped by it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    logging.getLogger("pika").setLevel(logging.CRITICAL)


# ---- broker and vhost ---------------------------------------------------------------------
def base_url() -> str:
    return os.environ.get("VESPID_AMQP_URL", DEFAULT_URL)


def url_for(vhost: str) -> str:
    parts = urlsplit(base_url())
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


def rabbitmqctl(args: Sequence[str], timeout: float = 120.0) -> str:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise BenchError("rabbitmqctl is not on PATH; it is needed to create a private vhost")
    done = subprocess.run([ctl, "-q", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)
    if done.returncode != 0:
        raise BenchError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()[:300]}")
    return done.stdout.strip()


@contextlib.contextmanager
def private_vhost(prefix: str) -> Iterator[str]:
    """A fresh vhost for one run, deleted afterwards whatever happens; yields its URL."""
    name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    user = urlsplit(base_url()).username or "guest"
    rabbitmqctl(["add_vhost", name])
    try:
        rabbitmqctl(["set_permissions", "-p", name, user, ".*", ".*", ".*"])
        yield url_for(name)
    finally:
        _delete_vhost(name, Deadline.after(120))


def _delete_vhost(name: str, deadline: Deadline) -> None:
    """Retried for a while: the broker may be restarting (the fault tests stop it)."""
    while True:
        try:
            rabbitmqctl(["delete_vhost", name], timeout=max(10.0, deadline.remaining()))
            return
        except (BenchError, subprocess.TimeoutExpired) as exc:
            if deadline.expired():
                log.warning("could not delete vhost %s (delete it by hand: rabbitmqctl "
                            "delete_vhost %s): %s", name, name, exc)
                return
            if "does not exist" in str(exc):
                return
        time.sleep(min(3.0, deadline.remaining()))


def connection_parameters(url: str, name: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = 60
    params.blocked_connection_timeout = 120
    params.connection_attempts = 3
    params.retry_delay = 1
    params.client_properties = {"connection_name": name}
    return params


# ---- the coordinator process --------------------------------------------------------------
class VespidChild:
    """A `vespid …` process of the bench's own, in a session of its own (so a stop reaches
    its children too), its output in a log file."""

    what = "process"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self, arguments: list[str], cwd: Path, env: dict[str, str]) -> None:
        with self.log_path.open("ab") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vespid.client.cli", *arguments], cwd=cwd, env=env,
                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=die_with_parent)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(f"the {self.what} exited with code {self.process.returncode}: "
                             f"{self.log_tail(3)}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL to its whole session after `timeout`."""
        if not self.alive():
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("the %s did not stop %.0f s after SIGTERM; killing it", self.what,
                        timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.pid)

    def log_lines(self) -> list[str]:
        if not self.log_path.exists():
            return []
        return self.log_path.read_text(errors="replace").splitlines()

    def log_tail(self, lines: int) -> str:
        tail = [line.strip() for line in self.log_lines()[-lines:]]
        return " | ".join(tail)[:600] or "(no output)"

    def log_summary(self) -> Counter[str]:
        """Warnings and errors it logged, counted by event (non-JSON lines as `raw output`)."""
        return log_summary(self.log_lines())

    def log_records(self, event: str) -> list[dict[str, Any]]:
        """Its JSON log records of one event (e.g. task_process_exited)."""
        found = []
        for line in self.log_lines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    found.append(record)
        return found


def clean_environment(url: str, **settings: str) -> dict[str, str]:
    """This process's environment without VESPID_* settings, plus the broker URL, JSON
    logs and the settings given.

    Without PYTHONDONTWRITEBYTECODE too: a process measured keeps its compiled bytecode
    from one start to the next, as an installed Vespid does (pip compiles it at install).
    Under that variable every start compiled all of Vespid's modules again: about 80 ms of
    each coordinator start here, a fifth of what comes before its state loads."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VESPID_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(VESPID_AMQP_URL=url, VESPID_LOG_FORMAT="json", **settings)
    return env


class Coordinator(VespidChild):
    """`vespid coordinator` with a fresh state file, its output in a log file."""

    what = "coordinator"

    def __init__(self, url: str, workdir: Path, env: dict[str, str] | None = None,
                 log_level: str = "warning") -> None:
        super().__init__(workdir / "coordinator.log")
        self.url = url
        self.workdir = workdir
        self.log_level = log_level  # "info" adds its start-up milestones to the log
        self.extra_env = dict(env or {})  # settings of its own, e.g. VESPID_MAX_FILE_BYTES

    def start(self) -> None:
        env = clean_environment(self.url, VESPID_LOG_LEVEL=self.log_level, **self.extra_env)
        self.launch(["coordinator", "--state", str(self.workdir / "state.sqlite3")],
                    self.workdir, env)

    def wait_ready(self, peer: Peer, deadline: Deadline) -> None:
        """Until it consumes its queue and answers a node-list."""
        while not deadline.expired():
            self.check_alive()
            depth = peer.queue_depth(COORDINATOR_QUEUE)
            if depth is not None and depth[1] >= 1:
                reply = peer.request({"command": "node-list"}, deadline.within(10))
                if reply is not None:
                    return
            peer.pump(0.1)
        raise BenchError("the coordinator did not start consuming within the deadline: "
                         f"{self.log_tail(3)}")


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a live process has used (Linux /proc), or None."""
    return _stat_seconds(pid, 11)


def scheduler_seconds(pid: int | None) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds waiting in a run queue) of all a live process's threads."""
    if pid is None:
        return None
    on_cpu = waiting = 0
    try:
        for thread in Path(f"/proc/{pid}/task").iterdir():
            running, queued, _slices = (thread / "schedstat").read_text().split()
            on_cpu, waiting = on_cpu + int(running), waiting + int(queued)
    except (OSError, ValueError):
        return None
    return on_cpu / 1e9, waiting / 1e9


@dataclass(frozen=True)
class Usage:
    """One process over the measured part of a run (all its threads; /proc schedstat)."""

    cpu: float  # seconds on a CPU
    wait: float  # seconds runnable but waiting for a CPU (the machine was busy)
    wall: float

    def text(self) -> str:
        """`73% (27%)`: its share of one core on a CPU, and (runnable but waiting for one)."""
        if self.wall <= 0:
            return "—"
        return f"{100 * self.cpu / self.wall:.0f}% ({100 * self.wait / self.wall:.0f}%)"


@contextlib.contextmanager
def recording(pids: dict[str, int | None], into: dict[str, Usage]) -> Iterator[None]:
    """Fills `into` with each process's Usage over the `with` block, if it is still alive."""
    before = {name: scheduler_seconds(pid) for name, pid in pids.items()}
    start = time.monotonic()
    try:
        yield
    finally:
        wall = time.monotonic() - start
        for name, pid in pids.items():
            now, then = scheduler_seconds(pid), before[name]
            if now is not None and then is not None:
                into[name] = Usage(now[0] - then[0], now[1] - then[1], wall)


def children_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process's reaped children (cutime + cstime)."""
    return _stat_seconds(pid, 13)


def _stat_seconds(pid: int | None, first: int) -> float | None:
    """Two adjacent clock-tick fields of /proc/PID/stat (counted after the command), summed
    as seconds."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")


def broker_pid() -> int | None:
    """The local RabbitMQ node's beam.smp (the one booting `rabbit`), or None."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "beam.smp":
                continue
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"rabbit" in arguments and b"boot" in arguments:
            return int(entry.name)
    return None


def describe_log(counts: Counter[str], limit: int = 4, who: str = "coordinator") -> str | None:
    if not counts:
        return None
    parts = [f"{event} x{n}" for event, n in counts.most_common(limit)]
    more = len(counts) - limit
    return f"{who} logged: " + ", ".join(parts) + (f" (+{more} kinds)" if more > 0 else "")


def log_summary(lines: Sequence[str]) -> Counter[str]:
    """Warnings and errors in a JSON log, counted by event (non-JSON lines as `raw output`)."""
    counts: Counter[str] = Counter()
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            counts["raw output (traceback?)"] += 1
            continue
        if isinstance(record, dict) and record.get("level") in ("warning", "error", "critical"):
            counts[f"{record['level']} {record.get('event', '?')}"] += 1
    return counts


# ---- a real node agent process ------------------------------------------------------------
class Agent(VespidChild):
    """`vespid node --config FILE`, the project's own node agent, as docs/examples and
    README start it: a TOML file with its name, work folder and capabilities, its output
    (JSON log lines, at its default level) in a log file. Tasks it runs are its children."""

    what = "node agent"

    def __init__(self, url: str, workdir: Path, name: str,
                 capabilities: dict[str, int | float | bool],
                 settings: dict[str, str] | None = None) -> None:
        self.url = url
        self.name = name
        self.settings = settings or {}  # more of its TOML: name -> a string value
        self.home = workdir / name
        self.work_dir = self.home / "work"
        self.capabilities = capabilities
        super().__init__(self.home / "agent.log")

    def config_text(self) -> str:
        lines = [f'name = "{self.name}"', f'work_dir = "{self.work_dir}"',
                 *(f'{key} = "{value}"' for key, value in self.settings.items()),
                 "[capabilities]"]
        lines += [f"{key} = {str(value).lower() if isinstance(value, bool) else value}"
                  for key, value in self.capabilities.items()]
        return "\n".join(lines) + "\n"

    def environment(self) -> dict[str, str]:
        """What the agent runs with (and so what its tasks inherit)."""
        return clean_environment(self.url)

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        config = self.home / "node.toml"
        config.write_text(self.config_text())
        self.launch(["node", "--config", str(config)], self.home, self.environment())

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM drains it (it finishes what runs, then exits); SIGKILL after `timeout`."""
        super().stop(timeout)

    def children_cpu_seconds(self) -> float | None:
        """CPU of the task processes it has reaped so far (cutime + cstime)."""
        return children_cpu_seconds(self.pid)


@dataclass
class Farm:
    """A private vhost with a started coordinator and a client peer on it."""

    url: str
    workdir: Path
    coordinator: Coordinator
    peer: Peer


def vespid_farm(stack: contextlib.ExitStack, vhost_prefix: str) -> Farm:
    """Made inside `stack`, which stops and deletes all of it in the right order."""
    url = stack.enter_context(private_vhost(vhost_prefix))
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=vhost_prefix + "-")))
    coordinator = Coordinator(url, workdir)
    stack.callback(coordinator.stop)
    coordinator.start()
    peer = Peer(url)
    stack.callback(peer.close)
    return Farm(url, workdir, coordinator, peer)


def wind_down(sim: ChildProcess, coordinator: Coordinator, notes: list[str]) -> None:
    """Stop the simulator and the coordinator, noting the warnings and errors it logged."""
    if sim.process.pid:
        sim.stop()
    coordinator.stop()
    note = describe_log(coordinator.log_summary())
    if note:
        notes.append(note)


# ---- a raw AMQP peer (client side) --------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    body: dict[str, Any]
    sent: float
    received: float

    @property
    def latency(self) -> float:
        return self.received - self.sent


class Peer:
    """A client that speaks WIRE.md with raw pika: publishes, requests, queue depths."""

    def __init__(self, url: str, name: str = "vespid-bench-client") -> None:
        self.connection = pika.BlockingConnection(connection_parameters(url, name))
        self.channel = self.connection.channel()
        self.channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)
        self._probe: Any = None
        self._sent: dict[str, float] = {}
        self._replies: dict[str, Reply] = {}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.connection.is_open:
                self.connection.close()

    def _on_reply(self, _ch: Any, _method: Any, props: Any, body: bytes) -> None:
        sent = self._sent.pop(props.correlation_id, None)
        if sent is not None:
            self._replies[props.correlation_id] = Reply(json.loads(body), sent,
                                                        time.monotonic())

    def pump(self, seconds: float) -> None:
        self.connection.process_data_events(time_limit=max(0.0, seconds))

    def publish(self, body: bytes, key: str = COORDINATOR_KEY, exchange: str = EXCHANGE) -> None:
        self.channel.basic_publish(exchange, key, body, JSON_PROPS)

    def publish_many(self, bodies: Sequence[bytes], key: str = COORDINATOR_KEY,
                     exchange: str = EXCHANGE) -> tuple[float, float]:
        """Publish as fast as pika can; returns (first, last) monotonic publish times."""
        first = time.monotonic()
        for body in bodies:
            self.channel.basic_publish(exchange, key, body, JSON_PROPS)
        self.pump(0)
        return first, time.monotonic()

    def ask(self, message: dict[str, Any]) -> str:
        """Send a request with direct reply-to; returns its correlation id."""
        correlation_id = uuid.uuid4().hex
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                     reply_to=DIRECT_REPLY_TO, correlation_id=correlation_id)
        self._sent[correlation_id] = time.monotonic()
        self.channel.basic_publish(EXCHANGE, COORDINATOR_KEY, json.dumps(message).encode(),
                                   props)
        return correlation_id

    def take_reply(self, correlation_id: str) -> Reply | None:
        return self._replies.pop(correlation_id, None)

    def forget(self, correlation_id: str) -> None:
        self._sent.pop(correlation_id, None)
        self._replies.pop(correlation_id, None)

    def request(self, message: dict[str, Any], deadline: Deadline) -> Reply | None:
        """One request and its reply, or None when the deadline passes first."""
        correlation_id = self.ask(message)
        while not deadline.expired():
            self.pump(min(0.05, deadline.remaining()))
            reply = self.take_reply(correlation_id)
            if reply is not None:
                return reply
        self.forget(correlation_id)
        return None

    def queue_depth(self, queue: str) -> tuple[int, int] | None:
        """(ready messages, consumers) as the broker sees them; None if it does not exist."""
        if self._probe is None or not self._probe.is_open:
            self._probe = self.connection.channel()
        try:
            ok = self._probe.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            self._probe = None
            return None
        return ok.method.message_count, ok.method.consumer_count


def wait_for_total(peer: Peer, status: str, total: int, deadline: Deadline,
                   interval: float = 0.25) -> Reply | None:
    """Poll task-list until it counts `total` tasks of that status; the reply that did."""
    ask = {"command": "task-list", "status": status, "limit": 1}
    while not deadline.expired():
        reply = peer.request(ask, deadline.within(60))
        if reply is not None and int(reply.body.get("total", -1)) >= total:
            return reply
        peer.pump(min(interval, deadline.remaining()))
    return None


def count_status(peer: Peer, status: str, deadline: Deadline) -> int | None:
    reply = peer.request({"command": "task-list", "status": status, "limit": 1}, deadline)
    return None if reply is None else int(reply.body.get("total", -1))


# ---- the node simulator (a child process) -------------------------------------------------
@dataclass(frozen=True)
class NodeSpec:
    name: str
    capabilities: dict[str, Any]
    repositories: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class SimSpec:
    url: str
    nodes: list[NodeSpec]
    expect: int  # the time the expect-th distinct task-run arrives is recorded
    heartbeat: float = 4.0  # seconds between one node's node-sets (the contract: <= 5)
    complete_delay: float = 0.0  # seconds between a task-run and its task-complete
    record_runs: bool = False  # keep each task's first task-run time; sent as "run-times"


@dataclass
class SimStats:
    declare_seconds: float = 0.0
    joined_at: float | None = None
    runs: int = 0
    distinct: int = 0
    duplicates: int = 0
    kills: int = 0
    first_run: float | None = None
    expected_run: float | None = None  # when the expect-th distinct task-run arrived
    last_run: float | None = None
    completes_sent: int = 0
    node_sets_sent: int = 0
    max_heartbeat_gap: float = 0.0
    cpu_seconds: float | None = None


class Simulator:
    """Plays many raw nodes over one connection: queues, node-sets, task-completes."""

    def __init__(self, spec: SimSpec, pipe: Connection) -> None:
        self.spec = spec
        self.pipe = pipe
        self.stats = SimStats()
        self.connection = pika.BlockingConnection(connection_parameters(spec.url,
                                                                        "vespid-bench-nodes"))
        self.channel = self.connection.channel()
        self.by_tag: dict[str, NodeSpec] = {}
        self.running: dict[str, dict[str, int]] = {n.name: {} for n in spec.nodes}
        self.seen: set[str] = set()
        self.due_completes: list[tuple[float, str, str, int]] = []
        self.beats: deque[tuple[float, NodeSpec]] = deque()
        self.last_beat: dict[str, float] = {}
        self.run_times: dict[str, float] = {}  # task -> first task-run (spec.record_runs)
        self.stopping = False

    def declare(self) -> None:
        started = time.monotonic()
        self.channel.exchange_declare(EXCHANGE, "topic", durable=True)
        for node in self.spec.nodes:
            queue = f"vespid.node.{node.name}"
            self.channel.queue_declare(queue, durable=True, arguments=NODE_QUEUE_ARGS)
            self.channel.queue_bind(queue, EXCHANGE, f"node.{node.name}")
            tag = self.channel.basic_consume(queue, self._on_message, auto_ack=True)
            self.by_tag[tag] = node
        self.stats.declare_seconds = time.monotonic() - started

    def join(self) -> None:
        """Every node sends its first node-set; then each one every `heartbeat` seconds."""
        now = time.monotonic()
        count = len(self.spec.nodes)
        for index, node in enumerate(self.spec.nodes):
            self._node_set(node, now)
            self.beats.append((now + self.spec.heartbeat * (index + 1) / count, node))
        self.stats.joined_at = now

    def _node_set(self, node: NodeSpec, now: float) -> None:
        body = {"command": "node-set", "name": node.name, "capabilities": node.capabilities,
                "repositories": node.repositories,
                "activetasks": {name: {"attempt": attempt}
                                for name, attempt in self.running[node.name].items()}}
        self.channel.basic_publish(EXCHANGE, NODE_CHANNEL_KEY, json.dumps(body).encode(),
                                   JSON_PROPS)
        previous = self.last_beat.get(node.name)
        if previous is not None:
            self.stats.max_heartbeat_gap = max(self.stats.max_heartbeat_gap, now - previous)
        self.last_beat[node.name] = now
        self.stats.node_sets_sent += 1

    def _on_message(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        now = time.monotonic()
        node = self.by_tag[method.consumer_tag]
        message = json.loads(body)
        if message.get("command") == "task-run":
            self._on_run(node, message, now)
        elif message.get("command") == "task-kill":
            self._on_kill(node, message)

    def _on_run(self, node: NodeSpec, message: dict[str, Any], now: float) -> None:
        stats, name = self.stats, str(message["name"])
        stats.runs += 1
        stats.last_run = now
        if stats.first_run is None:
            stats.first_run = now
        if name in self.seen:
            stats.duplicates += 1
        else:
            self.seen.add(name)
            stats.distinct += 1
            if self.spec.record_runs:
                self.run_times[name] = now
            if stats.distinct == self.spec.expect:
                stats.expected_run = now
        attempt = int(message.get("attempt") or 1)
        if self.spec.complete_delay <= 0:
            self._complete(node.name, name, attempt, "ok")
            return
        self.running[node.name][name] = attempt
        heapq.heappush(self.due_completes, (now + self.spec.complete_delay, node.name, name,
                                            attempt))

    def _on_kill(self, node: NodeSpec, message: dict[str, Any]) -> None:
        self.stats.kills += 1
        name = str(message.get("name"))
        attempt = self.running[node.name].get(name)
        if attempt is not None:
            self._complete(node.name, name, attempt, "terminated")

    def _complete(self, node: str, name: str, attempt: int, success: str) -> None:
        self.running[node].pop(name, None)
        body = {"command": "task-complete", "name": name, "node": node, "success": success,
                "attempt": attempt}
        self.channel.basic_publish(EXCHANGE, NODE_CHANNEL_KEY, json.dumps(body).encode(),
                                   JSON_PROPS)
        self.stats.completes_sent += 1

    def _due_work(self, now: float) -> None:
        while self.due_completes and self.due_completes[0][0] <= now:
            _due, node, name, attempt = heapq.heappop(self.due_completes)
            if name in self.running[node]:
                self._complete(node, name, attempt, "ok")
        while self.beats and self.beats[0][0] <= now:
            _due, node_spec = self.beats.popleft()
            self._node_set(node_spec, now)
            self.beats.append((now + self.spec.heartbeat, node_spec))

    def _commands(self) -> None:
        while self.pipe.poll():
            command = self.pipe.recv()
            if command == "join":
                self.join()
                self.pipe.send(("joined", self.stats.joined_at))
            elif command == "stop":
                self.stopping = True

    def run(self) -> None:
        self.declare()
        self.pipe.send(("declared", self.stats.declare_seconds))
        next_report = 0.0
        while not self.stopping:
            self.connection.process_data_events(time_limit=0.02)
            now = time.monotonic()
            self._due_work(now)
            self._commands()
            if now >= next_report:
                self.pipe.send(("progress", self.snapshot()))
                next_report = now + 0.25
        if self.spec.record_runs:  # before "final", which the parent waits for
            self.pipe.send(("run-times", self.run_times))
        self.pipe.send(("final", self.snapshot()))
        with contextlib.suppress(Exception):
            self.connection.close()

    def snapshot(self) -> SimStats:
        self.stats.cpu_seconds = process_cpu_seconds(os.getpid())
        return SimStats(**self.stats.__dict__)


def simulator_main(spec: SimSpec, pipe: Connection) -> None:
    """Entry point of the simulator process."""
    child_setup()
    try:
        Simulator(spec, pipe).run()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        with contextlib.suppress(Exception):
            pipe.send(("error", f"{exc!r}: {traceback.format_exc(limit=3)[-600:]}"))
        sys.exit(1)


class SelectChild:
    """A helper process's pika SelectConnection with one channel, reporting to the parent
    on `pipe`: a connection that fails to open or closes sends ("final", why) and stops the
    loop. A subclass takes the channel in `_on_channel` and starts the loop in `run`."""

    def __init__(self, url: str, name: str, pipe: Connection) -> None:
        self.pipe = pipe
        self.channel: Any = None
        self.connection = pika.SelectConnection(
            connection_parameters(url, name), on_open_callback=self._on_open,
            on_open_error_callback=self._on_error, on_close_callback=self._on_error)

    def _on_error(self, _connection: Any, error: Any) -> None:
        with contextlib.suppress(Exception):
            self.pipe.send(("final", repr(error)))
        self.connection.ioloop.stop()

    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        raise NotImplementedError


class ChildProcess:
    """A helper process on a pipe: messages (kind, payload) in, commands out; bounded waits."""

    def __init__(self, target: Any, args: tuple[Any, ...], name: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, child_end = context.Pipe()
        self.name = name
        self.process = context.Process(target=target, args=(*args, child_end), name=name,
                                       daemon=True)
        self.latest: dict[str, Any] = {}

    def start(self) -> None:
        self.process.start()

    def poll(self, timeout: float = 0.0) -> None:
        """Take every message waiting (waiting up to `timeout` for the first)."""
        wait = timeout
        while self._readable(wait):
            kind, payload = self.pipe.recv()
            if kind == "error":
                raise BenchError(f"{self.name} failed: {payload}")
            self.latest[kind] = payload
            wait = 0.0
        if not self.process.is_alive() and "final" not in self.latest:
            raise BenchError(f"{self.name} exited with code {self.process.exitcode}")

    def _readable(self, timeout: float) -> bool:
        try:
            return self.pipe.poll(timeout)
        except (EOFError, OSError):
            return False

    def wait_for(self, kind: str, deadline: Deadline) -> Any:
        while kind not in self.latest:
            if deadline.expired():
                raise BenchError(f"{self.name} sent no {kind!r} within the deadline")
            self.poll(min(0.1, deadline.remaining()))
        return self.latest[kind]

    def send(self, command: str) -> None:
        self.pipe.send(command)

    def stop(self, timeout: float = 10.0) -> Any:
        """Ask it to stop, take its last report if it gives one; then make sure it is gone."""
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                self.send("stop")
                self.wait_for("final", Deadline.after(timeout))
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        return self.latest.get("final")


# ---- task bodies and the report -----------------------------------------------------------
def task_create(name: str, requirements: dict[str, Any], **extra: Any) -> bytes:
    body = {"command": "task-create", "name": name, "executable_pyscript": "pass",
            "requirements": requirements, **extra}
    return json.dumps(body, separators=(",", ":")).encode()


def rate(count: int, seconds: float | None) -> float | None:
    if seconds is None or seconds <= 0 or count <= 0:
        return None
    return count / seconds


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _nproc() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["nproc"], capture_output=True, text=True, timeout=10,
                              check=True)
        return done.stdout.strip()
    return str(os.cpu_count())


def _rabbitmq_version() -> str:
    try:
        return rabbitmqctl(["version"], timeout=60).splitlines()[-1]
    except (BenchError, subprocess.TimeoutExpired, IndexError) as exc:
        return f"unknown ({exc})"


def machine_lines() -> list[str]:
    return [
        f"- nproc: {_nproc()}",
        f"- CPU: {_cpu_model()}",
        f"- RabbitMQ: {_rabbitmq_version()}",
        f"- Python: {platform.python_version()} ({platform.python_implementation()})",
    ]


def command_line() -> str:
    """The command as typed from the repository root, e.g. `.venv/bin/python -m bench.x`."""
    executable = sys.executable
    with contextlib.suppress(ValueError):
        relative = os.path.relpath(executable)
        if not relative.startswith(".."):
            executable = relative
    module = (sys.modules["__main__"].__spec__.name if sys.modules["__main__"].__spec__
              else sys.argv[0])
    return shlex.join([executable, "-m", module, *sys.argv[1:]])


def start_bench() -> None:
    """What every bench's main does first: progress to stderr, clean stops on signals."""
    setup_logging()
    install_signal_handlers()


def run_bench(title: str, measure: Callable[[], None],
              sections: Callable[[], Sequence[str]]) -> int:
    """Measure, then print the report; interrupted (Ctrl-C, SIGTERM), print what was
    measured so far under a title that says so. The exit status for main()."""
    try:
        measure()
    except KeyboardInterrupt:
        write_report(f"{title} (interrupted)", sections())
        return 130
    write_report(title, sections())
    return 0


def size_options(parser: argparse.ArgumentParser, quick: int, full: int, what: str,
                 cap_help: str, cap_default: float | None = None) -> None:
    """--quick, --tasks and --cap-minutes, as every bench names them."""
    parser.add_argument("--quick", action="store_true",
                        help=f"{quick:,} {what} instead of {full:,}")
    parser.add_argument("--tasks", type=int, help=f"{what} (overrides --quick)")
    parser.add_argument("--cap-minutes", type=float, default=cap_default, help=cap_help)


def bench_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"python -m {prog}",
                                   description=doc.splitlines()[0] if doc else None)


def write_report(title: str, sections: Sequence[str]) -> None:
    header = [f"# {title}", "", f"Command: `{command_line()}` (run from the repository root)",
              f"Date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", "", "Machine:",
              *machine_lines()]
    sys.stdout.write("\n".join(header) + "\n\n" + "\n\n".join(sections) + "\n")
    sys.stdout.flush()
