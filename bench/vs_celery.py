"""Vespid against Celery 5 on the same broker, in one run: no-op tasks per second.

Celery: a real `celery -A bench.celery_app worker` (pools solo, threads and prefork, prefetch
multiplier 64, no gossip, mingle or heartbeat, no result backend) on a private vhost of the
local RabbitMQ, fed N no-op task messages. Measured from the first publish to the N-th
execution, which the task stamps itself (bench/celery_app.py).

Vespid: the full lifecycle as bench.throughput runs it (task-create → decision → task-run at
a raw-protocol node → task-complete → complete), with 1 and with 10 simulated nodes, the same
N. Measured from the first publish until task-list counts N tasks complete.

The contract's floor (bench/floor.py): the same simulated nodes behind a raw-pika stand-in
that does only what WIRE.md makes every coordinator do for a task; about the most any
coordinator of this contract could reach here with pika.

The configurations take turns, round after round (every other round in reverse order), so
that the machine's drift falls on all of them; the report gives each one's median.

    .venv/bin/python -m bench.vs_celery [--tasks N] [--quick] [--rounds R] [--no-profile]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
from kombu.serialization import dumps

from bench import celery_app, common, floor, throughput
from bench.common import (
    BenchError,
    Coordinator,
    Deadline,
    Peer,
    Usage,
    fmt,
    log,
    rate,
    recording,
)
from bench.throughput import Pipeline

FULL_TASKS, QUICK_TASKS = 10_000, 2_000
ROUNDS = 2
TARGET = 1.2
PREFETCH_MULTIPLIER = 64
STALL = 60.0
REPO = Path(__file__).resolve().parent.parent


# ---- where the CPU went --------------------------------------------------------------------
def usage_note(usage: dict[str, Usage]) -> str | None:
    """`CPU (waiting for a CPU) from the first publish to the end: coordinator 57% (40%), …`."""
    parts = [f"{name} {u.text()}" for name, u in usage.items() if u.wall > 0]
    return ("CPU (runnable, waiting for a CPU) from the first publish to all done: "
            + ", ".join(parts)) if parts else None


# ---- Celery -------------------------------------------------------------------------------
def raw_messages(url: str, count: int) -> list[tuple[bytes, pika.BasicProperties]]:
    """N task messages as `noop.apply_async()` sends them (Celery's own builder and
    serializer, a fresh id each), ready to go out through pika like Vespid's task-creates."""
    app = celery_app.make_app(url)
    messages = []
    for _ in range(count):
        task_id = str(uuid.uuid4())
        headers, properties, body, _sent = app.amqp.as_task_v2(
            task_id, celery_app.NOOP, ignore_result=True, root_id=task_id,
            origin="vespid-bench")
        content_type, encoding, data = dumps(body, serializer="json")
        payload = data.encode() if isinstance(data, str) else data
        messages.append((payload, pika.BasicProperties(
            content_type=content_type, content_encoding=encoding, delivery_mode=2, priority=0,
            headers=headers, **properties)))
    return messages


def publish_raw(peer: Peer, messages: list[tuple[bytes, pika.BasicProperties]]) -> None:
    for body, props in messages:
        peer.channel.basic_publish("", celery_app.QUEUE, body, props)
    peer.pump(0)


def publish_client(url: str, count: int) -> None:
    """What a Celery user writes: apply_async in a loop on one producer from the pool."""
    app = celery_app.make_app(url)
    task = app.tasks[celery_app.NOOP]
    try:
        with app.producer_or_acquire() as producer:
            for _ in range(count):
                task.apply_async(producer=producer)
    finally:
        app.close()


class CeleryWorker:
    """`celery worker` in its own session, its output in a log file; stopped by group."""

    def __init__(self, url: str, workdir: Path, pool: list[str]) -> None:
        self.url = url
        self.counts = workdir / "counts"
        self.counts.mkdir()
        self.log_path = workdir / "worker.log"
        self.command = [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker",
                        *pool, "--prefetch-multiplier", str(PREFETCH_MULTIPLIER),
                        "--without-gossip", "--without-mingle", "--without-heartbeat",
                        "-Q", celery_app.QUEUE, "--loglevel", "warning"]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, celery_app.URL_ENV: self.url,
               celery_app.COUNTS_ENV: str(self.counts), "PYTHONPATH": os.pathsep.join(paths)}
        with self.log_path.open("ab") as handle:
            self.process = subprocess.Popen(
                self.command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=handle,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=common.die_with_parent)

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(f"the Celery worker exited with code {self.process.returncode}: "
                             f"{self.log_tail()}")

    def wait_ready(self, peer: Peer, deadline: Deadline) -> None:
        """Until its queue exists with a consumer on it."""
        while not deadline.expired():
            self.check_alive()
            depth = peer.queue_depth(celery_app.QUEUE)
            if depth is not None and depth[1] >= 1:
                return
            peer.pump(0.1)
        raise BenchError(f"the Celery worker did not consume within the deadline: "
                         f"{self.log_tail()}")

    def pids(self) -> dict[str, int | None]:
        """The worker and its pool processes (prefork), for the CPU notes."""
        if self.process is None:
            return {}
        found: dict[str, int | None] = {"worker": self.process.pid}
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with contextlib.suppress(OSError):
            for index, pid in enumerate(children.read_text().split(), start=1):
                found[f"pool process {index}"] = int(pid)
        return found

    def stop(self) -> None:
        """Warm shutdown (SIGTERM) for 15 s, then SIGKILL to its whole process group."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log.warning("the Celery worker ignored SIGTERM for 15 s; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 3) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return " | ".join(line.strip() for line in text.splitlines()[-lines:])[:600] or \
            "(no output)"

    def log_summary(self) -> str | None:
        """What it logged at warning or above (`[stamp: LEVEL/process] …`) and tracebacks;
        its banner and the warning about running as root are left out."""
        if not self.log_path.exists():
            return None
        counts: Counter[str] = Counter()
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("[") and ": " in line and "/" in line:
                counts[line.split(": ", 1)[1].split("/", 1)[0]] += 1
            elif line.startswith("Traceback"):
                counts["traceback"] += 1
        parts = [f"{level} x{n}" for level, n in counts.most_common(4)]
        return ("worker logged: " + ", ".join(parts)) if parts else None


def consumer_prefetch(url: str) -> str:
    """The prefetch window the broker holds for the worker's consuming channel(s), for the
    notes (Celery sets it per channel: global QoS)."""
    vhost = unquote(urlsplit(url).path.lstrip("/"))
    try:
        listing = common.rabbitmqctl(
            ["list_channels", "--no-table-headers", "vhost", "consumer_count",
             "prefetch_count", "global_prefetch_count"], timeout=60)
    except (BenchError, subprocess.TimeoutExpired) as exc:
        return f"prefetch unknown ({exc})"
    found = [f"{fields[2]}/{fields[3]}" for fields in map(str.split, listing.splitlines())
             if len(fields) == 4 and fields[0] == vhost and fields[1] != "0"
             and fields[2:] != ["0", "0"]]  # not the publisher's reply-to consumer
    return "prefetch per consumer/channel " + (", ".join(found) or "?")


def wait_for_executions(worker: CeleryWorker, count: int, result: Pipeline, first: float,
                        deadline: Deadline) -> None:
    """Until the worker's processes have counted N executions, a stall, or the deadline."""
    done, latest = 0, None
    last_progress, last_done = time.monotonic(), -1
    while not deadline.expired():
        done, latest = celery_app.read_counts(worker.counts)
        if done >= count:
            time.sleep(0.05)  # let a slot caught mid-write settle, then read the final stamp
            done, latest = celery_app.read_counts(worker.counts)
            break
        if done > last_done:
            last_progress, last_done = time.monotonic(), done
        elif time.monotonic() - last_progress > STALL:
            result.notes.append(f"stalled: nothing new for {STALL:.0f} s")
            break
        worker.check_alive()
        time.sleep(0.02)
    else:
        result.notes.append("deadline reached before the last execution")
    result.runs = result.completes = done
    end = None if latest is None else latest - first
    result.to_last_run = result.to_all_complete = end


def run_celery(label: str, pool: list[str], client: bool, count: int, deadline: Deadline,
               usage: dict[str, Usage]) -> Pipeline:
    result = Pipeline(label, count)
    with ExitStack() as stack:
        url = stack.enter_context(common.private_vhost("vespid-bench-celery"))
        workdir = Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="vespid-bench-celery-")))
        worker = CeleryWorker(url, workdir, pool)
        stack.callback(worker.stop)
        peer = Peer(url, "vespid-bench-celery-publisher")
        stack.callback(peer.close)
        try:
            messages = [] if client else raw_messages(url, count)
            worker.start()
            worker.wait_ready(peer, deadline.within(90))
            result.notes.append(consumer_prefetch(url))
            log.info("celery: %s up; publishing %d tasks", label, count)
            pids = {**worker.pids(), "RabbitMQ": common.broker_pid(), "publisher": os.getpid()}
            with recording(pids, usage):
                first = time.monotonic()
                if client:
                    publish_client(url, count)
                else:
                    publish_raw(peer, messages)
                result.publish_seconds = time.monotonic() - first
                wait_for_executions(worker, count, result, first, deadline)
        except BenchError as exc:
            result.notes.append(str(exc))
        finally:
            worker.stop()
            note = worker.log_summary()
            if note:
                result.notes.append(note)
    return result


# ---- Vespid -------------------------------------------------------------------------------
def run_vespid(nodes: int, count: int, deadline: Deadline, usage: dict[str, Usage],
               during: Callable[[Coordinator], contextlib.AbstractContextManager[Any]]
               | None = None) -> Pipeline:
    """bench.throughput's Vespid pipeline with `nodes` simulated nodes; `during` wraps the
    measured part, given the coordinator."""

    def measured(peer: Peer, sim: Any, coordinator: Coordinator, *rest: Any) -> None:
        pids = {"coordinator": coordinator.pid, "simulator": sim.process.pid,
                "RabbitMQ": common.broker_pid()}
        with recording(pids, usage), during(coordinator) if during else contextlib.nullcontext():
            throughput.measure_vespid(peer, sim, coordinator, *rest)

    return throughput.run_vespid(count, deadline, nodes=nodes, measure=measured)


def run_floor(nodes: int, count: int, deadline: Deadline, usage: dict[str, Usage],
              events: bool = True) -> Pipeline:
    """bench.floor: the contract's messages alone, a raw-pika stand-in for the coordinator."""

    def measured(pids: dict[str, int | None]) -> contextlib.AbstractContextManager[None]:
        return recording({**pids, "RabbitMQ": common.broker_pid()}, usage)

    return floor.run_floor(nodes, count, deadline, measured, events)


# ---- the profile of one extra Vespid run --------------------------------------------------
def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def profiled(coordinator: Coordinator, output: Path) -> Iterator[None]:
    """py-spy records the coordinator (non-blocking sampling, idle time left out)."""
    tool = py_spy()
    if tool is None or coordinator.pid is None:
        raise BenchError("py-spy is not installed (pip install py-spy)")
    spy = subprocess.Popen(
        [tool, "record", "--pid", str(coordinator.pid), "--format", "raw", "--nonblocking",
         "--rate", "100", "--output", str(output)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        time.sleep(0.5)  # it attaches before the first publish
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # it writes its output on SIGINT
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(timeout=10)


@dataclass
class Profile:
    samples: int
    own: Counter[str]  # samples with the function on top of the stack
    inclusive: Counter[str]  # samples with the function anywhere on the stack
    result: Pipeline

    def own_by_file(self) -> list[tuple[str, int]]:
        files: Counter[str] = Counter()
        for name, count in self.own.items():
            files[name.rsplit(" (", 1)[-1].rstrip(")")] += count
        return files.most_common(10)

    def project_inclusive(self, top: int) -> list[tuple[str, int]]:
        """The coordinator's own functions by total time, less the loop every sample is in."""
        return [(name, count) for name, count in self.inclusive.most_common()
                if ("(coordinator/" in name or "(shared/" in name)
                and count < 0.9 * self.samples][:top]


def frame_name(frame: str) -> str:
    """`handle (/…/coordinator/processor.py:120)` → `handle (coordinator/processor.py)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/lib/python3.11/", "/lib/python3/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if path.startswith(str(REPO) + os.sep):
        path = os.path.relpath(path, REPO)
    return f"{name} ({path})"


def read_profile(path: Path, result: Pipeline) -> Profile:
    """py-spy's raw output: one line a distinct stack, `frame;frame;… count`."""
    profile = Profile(0, Counter(), Counter(), result)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        frames = [frame_name(f) for f in stack.split(";") if " (" in f]
        if not frames or not number.isdigit():
            continue
        count = int(number)
        profile.samples += count
        profile.own[frames[-1]] += count
        for name in set(frames):
            profile.inclusive[name] += count
    return profile


def run_profile(count: int, deadline: Deadline) -> Profile | str:
    with tempfile.TemporaryDirectory(prefix="vespid-bench-spy-") as folder:
        output = Path(folder) / "coordinator.txt"
        result = run_vespid(1, count, deadline, {}, lambda c: profiled(c, output))
        if not output.exists() or not output.stat().st_size:
            return "; ".join(result.notes) or "py-spy wrote no profile"
        return read_profile(output, result)


# ---- the plan and the report --------------------------------------------------------------
@dataclass
class Run:
    round: int
    result: Pipeline
    usage: dict[str, Usage] = field(default_factory=dict)

    def system_cpu_ms(self) -> float | None:
        """CPU a task of the system's own processes: Celery's worker with its pool processes,
        Vespid's coordinator (the simulated nodes and the publishers are the benchmark's)."""
        used = [u.cpu for name, u in self.usage.items()
                if name.startswith(("worker", "pool process", "coordinator"))]
        return 1000 * sum(used) / self.result.messages if used else None

    def broker_cpu_ms(self) -> float | None:
        broker = self.usage.get("RabbitMQ")
        return None if broker is None else 1000 * broker.cpu / self.result.messages


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    run: Callable[[int, Deadline, dict[str, Usage]], Pipeline]
    celery_pool: bool = False  # a candidate for "Celery's best"
    default: bool = True  # in every run; otherwise only when --only names it

    def __call__(self, number: int, count: int, deadline: Deadline) -> Run:
        run = Run(number, Pipeline(self.label, count))
        run.result = self.run(count, deadline, run.usage)
        run.result.name = self.label
        run.result.notes = [n for n in run.result.notes  # bench.throughput's, ours is below
                            if not n.startswith("CPU until the last task-run")]
        note = usage_note(run.usage)
        if note:
            run.result.notes.append(note)
        return run


def celery_config(key: str, label: str, pool: list[str], client: bool = False) -> Config:
    return Config(key, label, lambda n, d, u: run_celery(label, pool, client, n, d, u),
                  celery_pool=not client)


CONFIGS = [
    celery_config("solo", "Celery solo", ["--pool", "solo"]),
    Config("v1", "Vespid, 1 node", lambda n, d, u: run_vespid(1, n, d, u)),
    celery_config("threads", "Celery threads x8", ["--pool", "threads", "--concurrency", "8"]),
    Config("v10", "Vespid, 10 nodes", lambda n, d, u: run_vespid(10, n, d, u)),
    celery_config("prefork", "Celery prefork x2", ["--pool", "prefork", "--concurrency", "2"]),
    celery_config("client", "Celery solo, apply_async publisher", ["--pool", "solo"],
                  client=True),
    Config("f1", "Contract floor, 1 node", lambda n, d, u: run_floor(1, n, d, u)),
    Config("f10", "Contract floor, 10 nodes", lambda n, d, u: run_floor(10, n, d, u)),
    Config("f1n", "Contract floor without events, 1 node",
           lambda n, d, u: run_floor(1, n, d, u, events=False), default=False),
]


def done_rate(result: Pipeline) -> float | None:
    """Tasks done per second; None unless all N were done."""
    if (result.completes or 0) < result.messages:
        return None
    return rate(result.messages, result.to_all_complete)


def start_rate(result: Pipeline) -> float | None:
    """Vespid: tasks per second to the N-th task-run (the lower bound of its time)."""
    return result.run_rate


def median(values: list[float | None]) -> float | None:
    """The median, or None when any value is missing (a run that did not finish)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present and len(present) == len(values) else None


@dataclass
class Summary:
    config: Config
    runs: list[Run]

    @property
    def rate(self) -> float | None:
        return median([done_rate(r.result) for r in self.runs])

    @property
    def start_rate(self) -> float | None:
        return median([start_rate(r.result) for r in self.runs])

    @property
    def system_cpu_ms(self) -> float | None:
        return median([r.system_cpu_ms() for r in self.runs])

    @property
    def broker_cpu_ms(self) -> float | None:
        return median([r.broker_cpu_ms() for r in self.runs])

    def row(self) -> list[str]:
        results = [r.result for r in self.runs]
        return [self.config.label, ", ".join(fmt(done_rate(r)) for r in results),
                f"**{fmt(self.rate)}**", fmt(median([r.to_all_complete for r in results]), 2),
                fmt(median([r.publish_seconds for r in results]), 2),
                fmt(self.system_cpu_ms, 2), fmt(self.broker_cpu_ms, 2)]


def summarize(runs: list[Run]) -> dict[str, Summary]:
    by_key: dict[str, Summary] = {}
    for config in CONFIGS:
        mine = [r for r in runs if r.result.name == config.label]
        if mine:
            by_key[config.key] = Summary(config, mine)
    return by_key


def verdict_lines(summaries: dict[str, Summary]) -> list[str]:
    pools = [s for s in summaries.values() if s.config.celery_pool and s.rate is not None]
    best = max(pools, key=lambda s: s.rate or 0.0, default=None)
    prefork = summaries.get("prefork")
    lines = []
    if best is None:
        return ["No Celery pool finished all its runs: no ratio (see the runs' notes)."]
    lines.append(f"Celery's best pool here: **{best.config.label}**, {fmt(best.rate)} tasks/s "
                 f"(median).")
    for key in ("v1", "v10"):
        vespid = summaries.get(key)
        if vespid is None:
            continue
        if vespid.rate is None:
            lines.append(f"- {vespid.config.label}: did not finish every run; no ratio.")
            continue
        ratio = vespid.rate / (best.rate or 1.0)
        met = "MET" if ratio >= TARGET else "NOT MET"
        line = (f"- {vespid.config.label}: {fmt(vespid.rate)} tasks/s = **{ratio:.2f} x** "
                f"Celery's best; target ≥ {TARGET} x: **{met}**")
        if prefork is not None and prefork.rate:
            line += f"; {vespid.rate / prefork.rate:.2f} x Celery prefork"
        if vespid.start_rate:
            line += (f" (counted to the N-th task-run instead of N complete: "
                     f"{vespid.start_rate / (best.rate or 1.0):.2f} x best)")
        lines.append(line)
    lines += floor_lines(summaries, best)
    cpu = cpu_lines(best, [s for k, s in summaries.items() if k in ("v1", "v10", "f1", "f10")])
    return [*lines, "", *cpu] if cpu else lines


def floor_lines(summaries: dict[str, Summary], best: Summary) -> list[str]:
    """How far the contract alone lets any coordinator go, and how much of it Vespid gets."""
    lines = []
    for floor_key, vespid_key in (("f1", "v1"), ("f10", "v10")):
        bound, vespid = summaries.get(floor_key), summaries.get(vespid_key)
        if bound is None or not bound.rate:
            continue
        ratio = bound.rate / (best.rate or 1.0)
        line = (f"- {bound.config.label}: {fmt(bound.rate)} tasks/s = **{ratio:.2f} x** "
                "Celery's best: about the most a coordinator of this contract could do here "
                "with pika")
        if vespid is not None and vespid.rate:
            line += f"; Vespid reaches **{vespid.rate / bound.rate:.2f}** of it"
        lines.append(line)
    return lines


def cpu_lines(best: Summary, vespid: list[Summary]) -> list[str]:
    """The CPU a task each side spent, which the machine's other load moves less."""
    worker, broker = best.system_cpu_ms, best.broker_cpu_ms
    if not worker or not broker:
        return []
    lines = [f"CPU a task, medians: {best.config.label} worker {fmt(worker, 2)} ms, its "
             f"RabbitMQ {fmt(broker, 2)} ms."]
    for summary in vespid:
        own, theirs = summary.system_cpu_ms, summary.broker_cpu_ms
        if own and theirs:
            lines.append(f"- {summary.config.label}: coordinator {fmt(own, 2)} ms "
                         f"({own / worker:.1f} x the worker's), RabbitMQ {fmt(theirs, 2)} ms "
                         f"({theirs / broker:.1f} x)")
    lines.append("")
    lines.append(f"With the same share of the machine as the worker, {TARGET} x its rate "
                 f"leaves the coordinator {fmt(worker / TARGET, 2)} ms a task, and RabbitMQ "
                 f"{fmt(broker / TARGET, 2)} ms a task for all of Vespid's messages.")
    return lines


SUMMARY_HEADERS = ["configuration", "tasks/s, each round", "median tasks/s",
                   "median 1st publish → all done (s)", "median publish (s)",
                   "CPU ms a task: worker or coordinator", "CPU ms a task: RabbitMQ"]
RUN_HEADERS = ["#", "round", "configuration", "publish (s)", "publish rate (msg/s)",
               "1st publish → all done (s)", "tasks/s", "Vespid: → N-th task-run (s)",
               "notes"]


def report_sections(runs: list[Run], count: int, profile: Profile | str | None) -> list[str]:
    summaries = summarize(runs)
    rounds = max((r.round for r in runs), default=0)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    sections = [f"N = {count:,} no-op tasks per run, {rounds} round(s), the configurations "
                "in turn (every other round in reverse order). Load average at the end "
                f"(1, 5, 15 min): {load} on {os.cpu_count()} CPUs.",
                common.markdown_table(SUMMARY_HEADERS, [s.row() for s in summaries.values()]),
                "\n".join(verdict_lines(summaries)), "Every run, in the order it ran:",
                common.markdown_table(RUN_HEADERS, [run_row(index, run) for index, run
                                                    in enumerate(runs, start=1)])]
    if profile is not None:
        sections.append(profile_section(profile))
    sections.append(HOW_TO_READ)
    return sections


def run_row(index: int, run: Run) -> list[str]:
    result = run.result
    vespid = result.name.startswith("Vespid")
    done = done_rate(result)
    shown = fmt(done) if done else (f"— (partial: {result.completes or 0:,}/"
                                     f"{result.messages:,})")
    return [str(index), str(run.round), result.name, fmt(result.publish_seconds, 2),
            fmt(rate(result.messages, result.publish_seconds)),
            fmt(result.to_all_complete, 2), shown,
            fmt(result.to_last_run, 2) if vespid else "", "; ".join(result.notes)]


def profile_section(profile: Profile | str) -> str:
    if isinstance(profile, str):
        return f"Profile of the coordinator: not taken ({profile})."
    run = profile.result
    head = (f"Profile of the coordinator (py-spy, 100 samples/s, idle time left out) during "
            f"one extra Vespid 1-node run, not counted above: {profile.samples:,} samples; "
            f"that run made {fmt(done_rate(run))} tasks/s under the profiler.")

    def table(title: str, entries: list[tuple[str, int]]) -> str:
        return common.markdown_table(
            [title, "samples", "share"],
            [[f"`{name}`", f"{n:,}", f"{100 * n / profile.samples:.1f}%"]
             for name, n in entries])

    return "\n\n".join([
        head, "Top 15 functions by own time (on top of the stack):",
        table("function (file)", profile.own.most_common(15)),
        "Own time by file, top 10:", table("file", profile.own_by_file()),
        "The coordinator's functions by total time (anywhere on the stack; the event loop "
        "and the outer frames every sample passes through left out), top 15:",
        table("function (file)", profile.project_inclusive(15))])


HOW_TO_READ = (
    "How to read it: *tasks/s* = N / (first message published → all N done). Celery: done "
    "is the N-th execution of the no-op task, stamped by the task itself in the worker (it "
    "counts executions in a per-process shared-memory slot, about a microsecond a task; "
    "there is no result backend), read by the benchmark. Vespid: done is the reply of the "
    "first task-list that counts N tasks complete, asked as soon as the simulator has seen "
    "the N-th task-run, so it includes every task-complete's trip back and errs against "
    "Vespid by up to about 0.3 s (the simulator reports every 0.25 s); *→ N-th task-run* is "
    "the bound on the other side. Both publishers are raw pika on one connection, without "
    "confirms, with the bodies built before the clock starts (Celery's by its own "
    "`app.amqp.as_task_v2` and kombu's JSON serializer, a fresh task id each). The last "
    "Celery row publishes the way a Celery user does instead, `task.apply_async(producer=…)` "
    "in a loop on one pooled producer, with the clock running: it shows what the Celery "
    "client costs and is not a candidate for Celery's best. Celery uses what it declares "
    "by default: one durable classic queue, persistent messages, one message a task, acked "
    "by the worker before it runs the task. Vespid moves three persistent messages through "
    "quorum queues for each task (task-create, task-run with publisher confirms, "
    "task-complete), keeps its state in SQLite and publishes task events. Each run has its "
    "own vhost and its own worker or coordinator; the simulated nodes have 64 cores each "
    "and answer each task-run with a task-complete at once. The machine is shared: compare "
    "the ratios of one run, not figures across runs. The notes give each process's CPU "
    "share (100 % = one core) from the first publish until all N were done, and in "
    "brackets the share of that time it was ready to run but waiting for a CPU (Linux "
    "schedstat): on-CPU plus waiting near 100 % means that process was CPU-bound and "
    "would have gone faster on a free core. *CPU ms a task* divides the CPU time of the "
    "system's own processes (Celery's worker with its pool processes; Vespid's "
    "coordinator, not the simulated nodes) and of RabbitMQ by N: it depends less on the "
    "other load than the rates do.")


def plan(rounds: int, only: list[str] | None) -> list[tuple[int, Config]]:
    chosen = [c for c in CONFIGS if c.key in only] if only else [c for c in CONFIGS
                                                                  if c.default]
    order: list[tuple[int, Config]] = []
    for number in range(1, rounds + 1):
        turn = chosen if number % 2 else list(reversed(chosen))
        order += [(number, config) for config in turn]
    return order


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.bench_parser("bench.vs_celery", __doc__)
    parser.add_argument("--tasks", type=int, help=f"N, the tasks of each run "
                        f"(default {FULL_TASKS:,}; --quick {QUICK_TASKS:,})")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"times each configuration runs (default {ROUNDS})")
    parser.add_argument("--quick", action="store_true", help="fewer tasks, shorter caps")
    parser.add_argument("--only", nargs="+", choices=[c.key for c in CONFIGS],
                        help="run only these configurations (f1n, the contract floor "
                        "without its events, runs only when named)")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the extra Vespid run profiled with py-spy")
    parser.add_argument("--cap-minutes", type=float,
                        help="wall-clock cap for each run (default 5, --quick 2)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.start_bench()
    count = args.tasks or (QUICK_TASKS if args.quick else FULL_TASKS)
    cap = 60 * (args.cap_minutes or (2 if args.quick else 5))
    runs: list[Run] = []
    profile: Profile | str | None = None
    title = "Vespid vs Celery: no-op tasks per second on one broker"

    def measure() -> None:
        nonlocal profile
        for number, config in plan(max(1, args.rounds), args.only):
            log.info("round %d: %s, %d tasks", number, config.label, count)
            runs.append(config(number, count, Deadline.after(cap)))
            log.info("  %s tasks/s", fmt(done_rate(runs[-1].result)))
        if not args.no_profile:
            log.info("profile: one more Vespid 1-node run with py-spy on the coordinator")
            profile = run_profile(count, Deadline.after(cap)) if py_spy() else \
                "py-spy is not installed"

    return common.run_bench(title, measure, lambda: report_sections(runs, count, profile))


if __name__ == "__main__":
    sys.exit(main())
