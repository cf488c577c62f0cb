"""A large file to a node and back through the broker (issue 14, target 7: resources and
results at 50 MB/s or more each way, memory flat: never a whole file in memory).

On a private vhost: a coordinator (`vespid coordinator`), one real node agent (`vespid node
--config`, 1 core) and a client process that uses the client library
(vespid.client.golem.GolemClient) in a process of its own, so that its memory is its own.
One Python-type Golem-style task takes a file of --mb MB (2^20 bytes, random content) as
its resource; its script stamps its first line, writes a result of the same size (other
random bytes) under results/ and stamps its last line. The steps, in order:

1. upload: `GolemClient.create_task` uploads the resource (blob-chunk messages of 256 KiB,
   each publish confirmed) and sends CreateTask. Timed from the call to the file complete
   in the coordinator's store (polled every 10 ms).
2. to the node: the coordinator streams the chunks to the node it placed the task on,
   then the task-run; the agent checks the file, keeps it in its cache, copies it into the
   task's folder and starts the task. Timed from the CreateTask reply to the script's first
   line; also to the file complete in the node's cache.
3. result back: the agent collects the result and sends it before its task-complete.
   Timed from the script's last line to the TaskResults event at the client.
4. download: `GolemTask.download` (blob-get, one 256 KiB chunk a request). Timed by the
   client, call to return.
5. download, streamed: the same blob-gets sent by raw pika from the same client process,
   each chunk written to disk and hashed as it arrives (what the protocol allows without
   holding the file), with 1 request in flight and then with --window.

VmRSS of the coordinator, the agent, the client and RabbitMQ is sampled every 20 ms; each
step's peak is shown against the process's resident memory before step 1 (the client
connected, everything idle). The last row is VmHWM, reset before step 1: the exact peak.
`--profile` adds one run, not counted, with py-spy on the processes that do each step.

    .venv/bin/python -m bench.files [--mb 256] [--quick] [--window 8] [--profile]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.common import (
    Agent,
    BenchError,
    ChildProcess,
    Coordinator,
    Deadline,
    Peer,
    bench_parser,
    broker_pid,
    child_setup,
    describe_log,
    fmt,
    log,
    markdown_table,
    private_vhost,
    run_bench,
    start_bench,
)
from bench.probes import (
    RssSampler,
    memory_kb,
    profile_tables,
    py_spy,
    read_profile,
    reset_peak,
    spying,
)
from bench.throughput import wait_for_nodes

FULL_MB, QUICK_MB = 256, 32
MIB = 1 << 20
TARGET_MB_S = 50.0
WINDOW = 8
POLL = 0.01
DEFAULT_MAX_FILE_BYTES = 256 * MIB  # the coordinator's own default (max_file_bytes)
# Run by the agent's Python executor (exec, in the task's folder). START and END are the
# bench's stamp files: written whole, then renamed, so a reader never sees half of one.
SCRIPT = """\
import os, time
def stamp(path):
    with open(path + '.tmp', 'w') as out:
        out.write(repr(time.monotonic()))
    os.replace(path + '.tmp', path)
stamp({start!r})
left = os.path.getsize('input.bin')
with open('results/result.bin', 'wb') as out:
    while left > 0:
        out.write(os.urandom(min(left, 1 << 20)))
        left -= 1 << 20
stamp({end!r})
"""


# ---- the client process -------------------------------------------------------------------
class ClientSide:
    """Runs in its own process: the client library, and raw blob-gets beside it."""

    def __init__(self, url: str, pipe: Connection) -> None:
        from vespid.client.golem import GolemClient

        self.url, self.pipe = url, pipe
        self.golem = GolemClient(url, timeout=120)
        self.task: Any = None

    def serve(self) -> None:
        while True:
            message = self.pipe.recv()
            if message == "stop":  # ChildProcess.stop's word
                self.pipe.send(("final", None))
                self.golem.close()
                return
            command, *args = message
            handler: Callable[..., Any] = getattr(self, f"do_{command}")
            self.pipe.send((command, handler(*args)))

    def do_hello(self) -> None:
        self.golem.list_golem_tasks()  # connects, and loads what a request needs

    def do_create(self, spec: dict[str, Any]) -> tuple[float, float]:
        began = time.monotonic()
        self.task = self.golem.create_task(spec)
        return began, time.monotonic()

    def do_wait(self, timeout: float) -> tuple[float, list[dict[str, Any]]]:
        results = self.task.wait(timeout=timeout)
        return time.monotonic(), list(results["files"])

    def do_download(self, folder: str) -> tuple[float, float]:
        began = time.monotonic()
        self.task.download(folder)  # checks each file's sha256 itself
        return began, time.monotonic()

    def do_stream(self, sha: str, target: str, window: int) -> tuple[float, float, bool]:
        peer = Peer(self.url, "vespid-bench-files-stream")
        try:
            began = time.monotonic()
            digest = stream_download(peer, sha, Path(target), window)
            return began, time.monotonic(), digest == sha
        finally:
            peer.close()


def stream_download(peer: Peer, sha: str, target: Path, window: int) -> str:
    """blob-get chunk by chunk, up to `window` requests in flight, each chunk written and
    hashed in order as it arrives; returns the digest of what was written."""
    digest = hashlib.sha256()
    asked: dict[int, str] = {}  # chunk index -> correlation id
    arrived: dict[int, bytes] = {}
    count, next_ask, next_write = 1, 0, 0
    deadline = Deadline.after(600)
    with target.open("wb") as out:
        while next_write < count:
            while next_ask < count and len(asked) + len(arrived) < window:
                asked[next_ask] = peer.ask({"command": "blob-get", "sha256": sha,
                                            "index": next_ask})
                next_ask += 1
            if deadline.expired():
                raise BenchError("blob-get: no reply within 600 s")
            peer.pump(0.05)
            for index, correlation_id in list(asked.items()):
                reply = peer.take_reply(correlation_id)
                if reply is None:
                    continue
                del asked[index]
                if reply.body.get("command") != "blob-chunk":
                    raise BenchError(f"blob-get refused: {reply.body}")
                count = int(reply.body["count"])
                arrived[index] = base64.b64decode(reply.body["data"])
            while next_write in arrived:
                part = arrived.pop(next_write)
                out.write(part)
                digest.update(part)
                next_write += 1
    return digest.hexdigest()


def client_main(url: str, pipe: Connection) -> None:
    child_setup()
    try:
        ClientSide(url, pipe).serve()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        with contextlib.suppress(Exception):
            pipe.send(("error", f"{exc!r}: {traceback.format_exc(limit=4)[-800:]}"))
        sys.exit(1)


# ---- one run ------------------------------------------------------------------------------
@dataclass
class Step:
    name: str
    start: float | None = None
    end: float | None = None
    note: str = ""
    extra: bool = False  # shown for comparison, not one of the target's paths

    @property
    def seconds(self) -> float | None:
        return None if self.start is None or self.end is None else self.end - self.start


@dataclass
class Result:
    size: int
    steps: list[Step] = field(default_factory=list)
    baseline_kb: dict[str, int] = field(default_factory=dict)
    peaks_kb: dict[str, dict[str, int]] = field(default_factory=dict)  # step -> name -> kB
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # step -> name -> share
    hwm_kb: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)

    def step(self, name: str, extra: bool = False) -> Step:
        found = Step(name, extra=extra)
        self.steps.append(found)
        return found


@dataclass
class Setup:
    """What one run has going: the processes, the files and where to look for stamps."""

    coordinator: Coordinator
    agent: Agent
    client: ChildProcess
    folder: Path
    source: Path
    source_sha: str
    profile_dir: Path | None = None

    @property
    def pids(self) -> dict[str, int | None]:
        return {"coordinator": self.coordinator.pid, "agent": self.agent.pid,
                "client": self.client.process.pid, "RabbitMQ": broker_pid()}

    def stamp(self, name: str) -> float | None:
        path = self.folder / name
        return float(path.read_text()) if path.exists() else None

    def check_alive(self) -> None:
        self.coordinator.check_alive()
        self.agent.check_alive()


def make_source(path: Path, size: int) -> str:
    """Random bytes, written 1 MB at a time; returns their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left > 0:
            block = os.urandom(min(left, MIB))
            out.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def call(setup: Setup, command: tuple[Any, ...], deadline: Deadline,
         watch: Callable[[], None] | None = None) -> Any:
    """Send the client a command and wait for its answer, checking the others meanwhile."""
    kind = command[0]
    setup.client.latest.pop(kind, None)
    setup.client.send(command)  # type: ignore[arg-type]
    while kind not in setup.client.latest:
        if deadline.expired():
            raise BenchError(f"the client did not finish {kind!r} within the deadline")
        setup.client.poll(POLL)
        setup.check_alive()
        if watch is not None:
            watch()
    return setup.client.latest[kind]


@contextlib.contextmanager
def profiled(setup: Setup, result: Result, title: str, who: list[str]) -> Iterator[None]:
    """With --profile: py-spy on the processes `who` for the step."""
    if setup.profile_dir is None:
        yield
        return
    folder = setup.profile_dir / title.replace(" ", "-")
    folder.mkdir(parents=True, exist_ok=True)
    with spying({name: setup.pids[name] for name in who}, folder) as outputs:
        yield
    for name, path in outputs.items():
        result.profiles.append(profile_tables(f"{title} — {name} (py-spy, CPU time)",
                                              read_profile(path), top=10))


def step_upload(setup: Setup, result: Result, deadline: Deadline) -> float:
    """create_task: the upload, then CreateTask. Returns when the reply came."""
    upload = result.step("upload (client library, create_task)")
    stored = setup.coordinator.workdir / "vespid-blobs" / setup.source_sha
    script = SCRIPT.format(start=str(setup.folder / "start"), end=str(setup.folder / "end"))
    spec = {"type": "Python", "subtasks_count": 1, "timeout": "00:30:00",
            "subtask_timeout": "00:30:00", "resources": [str(setup.source)],
            "resources_mapped": {str(setup.source): "input.bin"},
            "options": {"script": script}}

    def watch() -> None:
        if upload.end is None and stored.exists():
            upload.end = time.monotonic()

    with profiled(setup, result, "upload", ["client", "coordinator"]):
        began, replied = call(setup, ("create", spec), deadline, watch)
    upload.start = began
    if upload.end is None:
        upload.end = time.monotonic() if stored.exists() else None
        upload.note = "file seen in the coordinator's store after the reply"
    return float(replied)


def step_to_node(setup: Setup, result: Result, replied: float,
                 deadline: Deadline) -> list[dict[str, Any]]:
    """The file to the node, the task, its result back: all inside the client's wait."""
    cached = setup.agent.work_dir / "blobs" / setup.source_sha
    to_cache = result.step("to the node: CreateTask reply → file in the node's cache")
    to_node = result.step("to the node: CreateTask reply → the task's first line")
    back = result.step("result back: the task's last line → TaskResults at the client")
    to_cache.start = to_node.start = replied

    def watch() -> None:
        now = time.monotonic()
        if to_cache.end is None and cached.exists():
            to_cache.end = now
        if to_node.end is None:
            to_node.end = setup.stamp("start")
        if back.start is None:
            back.start = setup.stamp("end")

    with profiled(setup, result, "to the node and back", ["coordinator", "agent"]):
        finished, files = call(setup, ("wait", deadline.remaining()), deadline, watch)
    watch()
    back.end = finished
    if not files:
        raise BenchError("the task reported no result file")
    return list(files)


def step_downloads(setup: Setup, result: Result, sha: str, window: int,
                   deadline: Deadline) -> None:
    out = setup.folder / "out"
    library = result.step("download (client library, GolemTask.download)")
    with profiled(setup, result, "download", ["client", "coordinator"]):
        library.start, library.end = call(setup, ("download", str(out)), deadline)
    for file in out.rglob("*"):
        if file.is_file():
            file.unlink()  # the disk is not what we measure; leave room for the next
    for in_flight in sorted({1, window}):
        streamed = result.step(f"download streamed (raw blob-get, {in_flight} in flight)",
                               extra=True)
        with profiled(setup, result, f"streamed download x{in_flight}",
                      ["client", "coordinator"]):
            began, ended, ok = call(setup, ("stream", sha, str(setup.folder / "streamed"),
                                            in_flight), deadline)
        streamed.start, streamed.end = began, ended
        if not ok:
            streamed.note = "the streamed file did not match its sha256"
        (setup.folder / "streamed").unlink(missing_ok=True)


def measure(setup: Setup, result: Result, window: int, deadline: Deadline) -> None:
    call(setup, ("hello",), deadline.within(60))
    for name, pid in setup.pids.items():
        found = memory_kb(pid)
        if found is not None:
            result.baseline_kb[name] = found[0]
        if not reset_peak(pid):
            result.notes.append(f"could not reset VmHWM of {name}: its peak is since start")
    with RssSampler(setup.pids) as sampler:
        replied = step_upload(setup, result, deadline)
        files = step_to_node(setup, result, replied, deadline)
        step_downloads(setup, result, str(files[0]["sha256"]), window, deadline)
    for name, pid in setup.pids.items():
        found = memory_kb(pid)
        if found is not None:
            result.hwm_kb[name] = found[1]
    for step in result.steps:
        if step.start is not None and step.end is not None:
            result.peaks_kb[step.name] = {
                name: peak for name in setup.pids
                if (peak := sampler.peak(name, step.start, step.end)) is not None}
            result.cpu[step.name] = {
                name: share for name in setup.pids
                if (share := sampler.cpu_share(name, step.start, step.end)) is not None}


def run(size: int, window: int, deadline: Deadline, profile: bool = False) -> Result:
    result = Result(size)
    with ExitStack() as stack:
        url = stack.enter_context(private_vhost("vespid-bench-files"))
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vespid-bench-f-")))
        source = folder / "resource.bin"
        log.info("writing a %d MB file", size // MIB)
        sha = make_source(source, size)
        coordinator = Coordinator(url, folder / "coordinator", env={
            "VESPID_MAX_FILE_BYTES": str(max(DEFAULT_MAX_FILE_BYTES, size))})
        coordinator.workdir.mkdir()
        stack.callback(coordinator.stop)
        coordinator.start()
        peer = Peer(url)
        stack.callback(peer.close)
        agent = Agent(url, folder, f"bench-f-{uuid.uuid4().hex[:8]}",
                      {"cores": 1, "memory": 4000})
        client = ChildProcess(client_main, (url,), "client")
        setup = Setup(coordinator, agent, client, folder, source, sha,
                      folder / "profiles" if profile else None)
        try:
            coordinator.wait_ready(peer, deadline.within(90))
            stack.callback(agent.stop)
            agent.start()
            wait_for_nodes(peer, 1, deadline.within(60))
            client.start()
            stack.callback(client.stop)
            log.info("coordinator, agent %s and client up; moving the file", agent.name)
            measure(setup, result, window, deadline)
        except BenchError as exc:
            result.notes.append(str(exc))
        finally:
            client.stop()
            agent.stop()
            for who, counts in (("agent", agent.log_summary()),
                                ("coordinator", coordinator.log_summary())):
                note = describe_log(counts, who=who)
                if note:
                    result.notes.append(note)
    return result


# ---- report -------------------------------------------------------------------------------
PROCESSES = ["coordinator", "agent", "client", "RabbitMQ"]


def mb(kb: int | None) -> str:
    return "—" if kb is None else f"{kb / 1024:+,.0f}"


def rows(result: Result) -> list[list[str]]:
    table = []
    for step in result.steps:
        speed = None if not step.seconds else result.size / MIB / step.seconds
        peaks = result.peaks_kb.get(step.name, {})
        cells = [mb(None if name not in peaks or name not in result.baseline_kb
                    else peaks[name] - result.baseline_kb[name]) for name in PROCESSES]
        table.append([step.name, fmt(step.seconds, 2), fmt(speed), *cells, step.note])
    hwm = [mb(None if name not in result.hwm_kb or name not in result.baseline_kb
              else result.hwm_kb[name] - result.baseline_kb[name]) for name in PROCESSES]
    table.append(["whole run: VmHWM (exact peak) - baseline", "", "", *hwm, ""])
    table.append(["baseline: VmRSS before step 1, MB", "", "",
                  *[fmt(result.baseline_kb[n] / 1024) if n in result.baseline_kb else "—"
                    for n in PROCESSES], ""])
    return table


HEADERS = ["step", "seconds", "MB/s", *(f"{name} peak RSS - baseline, MB" for name in PROCESSES),
           "notes"]


def speed_of(result: Result, prefix: str) -> float | None:
    step = next((s for s in result.steps if s.name.startswith(prefix)), None)
    return None if step is None or not step.seconds else result.size / MIB / step.seconds


def worst_growth(result: Result, name: str) -> tuple[int, str] | None:
    """The highest sampled peak over baseline (kB) of one process in the target's steps."""
    if name not in result.baseline_kb:
        return None
    found = [(peaks[name] - result.baseline_kb[name], step.name) for step in result.steps
             if not step.extra and name in (peaks := result.peaks_kb.get(step.name, {}))]
    return max(found) if found else None


def verdict(result: Result) -> list[str]:
    lines = []
    for label, prefix, named in (
            ("to a node (resource)", "to the node: CreateTask reply → the task", True),
            ("from the node to the coordinator (result)", "result back", False),
            ("through blob-get (result, client library)", "download (client", True)):
        speed = speed_of(result, prefix)
        met = "—" if speed is None else ("met" if speed >= TARGET_MB_S else "**not met**")
        target = f"target ≥ {TARGET_MB_S:.0f}: {met}" if named else \
            "not named by the target; shown because every result takes this way first"
        lines.append(f"- {label}: {fmt(speed)} MB/s ({target})")
    limit = result.size / 1024 / 4
    for name in ("coordinator", "agent", "client"):
        worst = worst_growth(result, name)
        if worst is None:
            continue
        growth, step = worst
        met = "flat" if growth <= limit else "**not flat**"
        lines.append(f"- memory of the {name}: at most {growth / 1024:+,.0f} MB over its "
                     f"baseline, in {step}: {met} (flat: under a quarter of the file, "
                     f"{limit / 1024:,.0f} MB)")
    return lines


def cpu_rows(result: Result) -> list[list[str]]:
    rows_ = []
    for step in result.steps:
        shares = result.cpu.get(step.name, {})
        cells = [f"{100 * shares[n]:.0f}%" if n in shares else "—" for n in PROCESSES]
        total = sum(shares.values())
        rows_.append([step.name, *cells, f"{100 * total:.0f}%" if shares else "—"])
    return rows_


CPU_HEADERS = ["step", *PROCESSES, "together (2 cores = 200%)"]


HOW_TO_READ = (
    "How to read it: MB = 2^20 bytes; *MB/s* = the file's size / the step's seconds. Every "
    "step moves the whole file once, as base64 inside JSON (4/3 of its size on the wire), "
    "through quorum queues or direct reply-to. *Upload* ends when the coordinator's store "
    "holds the checked file; CreateTask follows it. *To the node* starts at the CreateTask "
    "reply (the coordinator decided the placement and began streaming in the same batch) and "
    "ends at the task script's first line, so it also holds the agent's assembly and check of "
    "the file, its copy into the task's folder and the start of the task's interpreter; the "
    "row before it ends when the file is complete in the node's cache. *Result back* holds "
    "the agent collecting the result into its cache and sending it, the coordinator storing "
    "and placing it, and the TaskResults event. Peak RSS is the highest VmRSS sampled every "
    "20 ms during the step, minus the process's VmRSS before step 1; *whole run* uses "
    "VmHWM, reset before step 1, which misses nothing. The client is one process for "
    "every step (the library, then raw pika for the streamed downloads). RabbitMQ is shown "
    "for what the broker holds meanwhile; it is not part of the target. *Flat* memory: no "
    "process grows, in the target's steps (not the streamed downloads, which are shown for "
    "comparison), by a quarter of the file or more; a process that holds the whole file "
    "grows by the file at least. The CPU table says who was busy: near 200 % together, the "
    "two cores were the limit; one process near 100 %, that process.")


def report_sections(result: Result, profiled_run: Result | None) -> list[str]:
    sections = [f"File: {result.size / MIB:,.0f} MB.", markdown_table(HEADERS, rows(result)),
                "Issue 14, target 7:", "\n".join(verdict(result)),
                "CPU during each step (share of one core, from the same 20 ms samples):",
                markdown_table(CPU_HEADERS, cpu_rows(result))]
    if result.notes:
        sections.append("Notes: " + "; ".join(result.notes))
    sections.append(HOW_TO_READ)
    if profiled_run is not None:
        sections.append("Profile: one more run, not counted above, under py-spy (each step "
                        "profiled on the processes that do it; the profiler attaches for "
                        "0.7 s before each step). Its figures:")
        sections.append(markdown_table(HEADERS, rows(profiled_run)))
        sections += profiled_run.profiles
    return sections


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench.files", __doc__)
    parser.add_argument("--mb", type=int, default=None,
                        help=f"file size in MB of 2^20 bytes (default {FULL_MB}, at most 1024)")
    parser.add_argument("--quick", action="store_true", help=f"--mb {QUICK_MB}")
    parser.add_argument("--window", type=int, default=WINDOW,
                        help=f"blob-gets in flight for the second streamed download "
                             f"(default {WINDOW})")
    parser.add_argument("--profile", action="store_true",
                        help="one more run under py-spy, not counted")
    parser.add_argument("--cap-minutes", type=float, default=None,
                        help="wall-clock cap for each run (default 10, --quick 3)")
    args = parser.parse_args(argv)
    if args.mb is not None and not 1 <= args.mb <= 1024:
        parser.error("--mb must be from 1 to 1024 (the node's file store takes 1 GiB at most)")
    return args


def main(argv: list[str] | None = None) -> int:
    start_bench()
    args = parse_args(argv)
    size = (args.mb or (QUICK_MB if args.quick else FULL_MB)) * MIB
    cap = 60 * (args.cap_minutes or (3 if args.quick else 10))
    if args.profile and py_spy() is None:
        sys.stderr.write("bench: --profile needs py-spy (.venv/bin/pip install py-spy)\n")
        return 2
    title = "Vespid files: a resource to a node and a result back"
    result: Result | None = None
    profiled_run: Result | None = None

    def measure() -> None:
        nonlocal result, profiled_run
        result = run(size, max(1, args.window), Deadline.after(cap))
        if args.profile:
            log.info("profile: one more run under py-spy")
            profiled_run = run(size, max(1, args.window), Deadline.after(cap), profile=True)

    return run_bench(title, measure, lambda: [] if result is None else
                     report_sections(result, profiled_run))


if __name__ == "__main__":
    sys.exit(main())
