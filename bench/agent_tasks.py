"""Trivial tasks on a real node agent against bare interpreter starts (issue 14, target 6:
task starts per second at least 80 % of what the machine does with `python -c pass` at the
same parallelism).

- Baseline: this process runs `python -c pass` N times, P at a time (a pool of Popen, each
  reaped the moment it exits through its pidfd), with what the agent gives a task: the
  agent's own interpreter (`sys.executable` of this venv, which `vespid node` runs under),
  no flags, the agent's environment plus the variables it adds for a task (VESPID_TASK,
  VESPID_AMQP_URL, VESPID_CORES, VESPID_NODE, VESPID_ATTEMPT, PYTHONUNBUFFERED=1).
- Launch line: the same pool running exactly the command the agent spawns for a task when it
  does not fork it (`launch = "spawn"`, or an environment that changes how an interpreter
  starts): `python <script>` (node_agent/supervisor.py; the script file holds `pass`), in a
  new session, output appended to a log file, with no code between fork and exec (the agent
  spawns from inside the task's cgroup v1 cell, so Python can vfork); without the agent and
  without a cgroup. It says what a new interpreter a task costs.
- Vespid: a coordinator (`vespid coordinator`) and one real node agent (`vespid node
  --config`, cores = P, default `launch = "fork"`: each task a fork of the agent's fork
  server, node_agent/forkserver.py, so no interpreter starts a task) on a private vhost; N
  task-creates with `executable_pyscript: "pass"` and requirements {"cores": 1, "memory":
  100} published at once (raw pika, bodies built before the clock starts); measured from
  the first publish to the N-th `task.completed` event (exchange vespid.events), each
  stamped as it arrives.

Each configuration is warmed up with 2 x P tasks first (not timed). The configurations take
turns, round after round, every other round in reverse order, so drift in the machine's
load falls on all of them. `--profile` adds one Vespid run (not counted) with py-spy on the
agent (wall-clock, waiting included) and on the coordinator (CPU).

    .venv/bin/python -m bench.agent_tasks [--quick] [--tasks N] [--parallel P] [--rounds R]
                                          [--launch fork|spawn] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    Agent,
    BenchError,
    Coordinator,
    Deadline,
    Peer,
    base_url,
    bench_parser,
    broker_pid,
    children_cpu_seconds,
    describe_log,
    fmt,
    log,
    markdown_table,
    process_cpu_seconds,
    rate,
    run_bench,
    size_options,
    start_bench,
    task_create,
    vespid_farm,
)
from bench.probes import profile_tables, py_spy, read_profile, spying
from bench.throughput import wait_for_nodes

FULL_TASKS, QUICK_TASKS = 600, 200
ROUNDS = 2
TARGET = 0.80
STALL = 60.0
EVENTS_EXCHANGE = "vespid.events"
REQUIREMENTS = {"cores": 1, "memory": 100}
CONFIGS = ("baseline", "launch", "vespid")
LABELS = {"baseline": "baseline: `python -c pass`",
          "launch": "launch line: the agent's command, no agent",
          "vespid": "Vespid: coordinator + real node agent"}


@dataclass
class Run:
    config: str
    round: int
    tasks: int
    parallel: int
    launch: str = "fork"  # the agent's `launch` setting (Vespid runs)
    seconds: float | None = None
    done: int = 0
    failed: int = 0
    lifetimes: list[float] = field(default_factory=list)  # spawned → reaped, each task (s)
    spawns: list[float] = field(default_factory=list)  # how long Popen() took, each task (s)
    task_cpu: float | None = None  # CPU seconds of the task processes
    cpu: dict[str, float] = field(default_factory=dict)  # other processes' CPU seconds
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        return rate(self.done, self.seconds) if self.done >= self.tasks else None

    @property
    def slot_gap(self) -> float | None:
        """Seconds a slot held no running task, a task: P x wall - the sum of the process
        lifetimes, over N. Spawning, reaping and (for Vespid) the round trip to the
        coordinator for the next task-run fall here."""
        if not self.lifetimes or not self.seconds:
            return None
        return (self.parallel * self.seconds - sum(self.lifetimes)) / len(self.lifetimes)


# ---- the pool: baseline and launch line ---------------------------------------------------
def task_environment() -> dict[str, str]:
    """What a task process of the agent gets: the agent's environment (this one without
    VESPID_* settings, plus the broker URL and its log format) and the task's variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VESPID_")}
    env.update(VESPID_AMQP_URL=base_url(), VESPID_LOG_FORMAT="json",
               VESPID_TASK=f"bench-{uuid.uuid4().hex[:8]}", VESPID_CORES="1",
               VESPID_NODE="bench", VESPID_ATTEMPT="1", PYTHONUNBUFFERED="1")
    return env


@dataclass(frozen=True)
class Launch:
    command: list[str]
    env: dict[str, str]
    cwd: Path
    output: Path | None = None  # appended to, as the agent appends to the attempt's log
    agent_like: bool = False  # a new session, as the agent gives a task


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def spawn(launch: Launch) -> subprocess.Popen[bytes]:
    if launch.output is None:
        return subprocess.Popen(launch.command, cwd=launch.cwd, env=launch.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    with launch.output.open("ab") as handle:
        return subprocess.Popen(launch.command, cwd=launch.cwd, env=launch.env,
                                stdin=subprocess.DEVNULL, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=launch.agent_like)


def run_pool(run: Run, launch: Launch, deadline: Deadline) -> None:
    """N processes, P at a time; each reaped when its pidfd says it exited."""
    running: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    started = 0
    before, first = children_cpu(), time.monotonic()
    try:
        while run.done + run.failed < run.tasks:
            while started < run.tasks and len(running) < run.parallel:
                asked = time.monotonic()
                process = spawn(launch)
                spawned = time.monotonic()
                run.spawns.append(spawned - asked)
                running[os.pidfd_open(process.pid)] = (process, spawned)
                started += 1
            ready, _, _ = select.select(list(running), [], [],
                                        min(STALL, deadline.remaining()))
            if not ready:
                run.notes.append("deadline reached" if deadline.expired()
                                 else f"stalled: no process ended for {STALL:.0f} s")
                break
            for fd in ready:
                process, spawned = running.pop(fd)
                os.close(fd)
                code = process.wait(timeout=10)
                run.lifetimes.append(time.monotonic() - spawned)
                if code == 0:
                    run.done += 1
                else:
                    run.failed += 1
        run.seconds = time.monotonic() - first
        run.task_cpu = children_cpu() - before
    finally:
        for fd, (process, _spawned) in running.items():
            process.kill()
            process.wait(timeout=10)
            os.close(fd)
    if run.failed:
        run.notes.append(f"{run.failed} processes exited non-zero")


def run_local(config: str, run: Run, deadline: Deadline) -> None:
    with tempfile.TemporaryDirectory(prefix="vespid-bench-at-") as folder:
        cwd = Path(folder)
        if config == "baseline":
            launch = Launch([sys.executable, "-c", "pass"], task_environment(), cwd)
        else:
            script = cwd / "task.py"
            script.write_text("pass\n")
            launch = Launch([sys.executable, str(script)],
                            task_environment(), cwd, cwd / "attempt-1.log", agent_like=True)
        run_pool(Run(config, 0, 2 * run.parallel, run.parallel), launch, deadline)  # warm-up
        run_pool(run, launch, deadline)


# ---- Vespid: a coordinator and a real node agent ------------------------------------------
class Completions:
    """`task.completed` events from vespid.events, each stamped when it arrives."""

    def __init__(self, peer: Peer) -> None:
        channel = peer.channel
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(queue, EVENTS_EXCHANGE, "task.completed.#")
        channel.basic_consume(queue, self._on_event, auto_ack=True)
        self.peer = peer
        self.done: dict[str, tuple[float, str | None]] = {}

    def _on_event(self, _ch: Any, _method: Any, _props: Any, body: bytes) -> None:
        info = json.loads(body)
        self.done.setdefault(str(info.get("name")), (time.monotonic(), info.get("success")))

    def wait(self, names: list[str], deadline: Deadline, check: Callable[[], None]) -> str | None:
        """Until every name completed; None, or why it stopped waiting."""
        wanted = set(names)
        last_count, last_progress = -1, time.monotonic()
        while not wanted <= self.done.keys():
            if deadline.expired():
                return "deadline reached before every task completed"
            count = len(wanted & self.done.keys())
            if count > last_count:
                last_count, last_progress = count, time.monotonic()
            elif time.monotonic() - last_progress > STALL:
                return f"stalled: no task completed for {STALL:.0f} s"
            check()
            self.peer.pump(min(0.05, deadline.remaining()))
        return None


def submit(peer: Peer, names: list[str]) -> float:
    """Publish the task-creates at once; returns when the first went out."""
    bodies = [task_create(name, REQUIREMENTS) for name in names]
    first, _last = peer.publish_many(bodies)
    return first


def record_completions(run: Run, names: list[str], completions: Completions,
                       first: float) -> None:
    outcomes = [completions.done[n] for n in names if n in completions.done]
    run.done = sum(1 for _stamp, success in outcomes if success == "ok")
    run.failed = len(outcomes) - run.done
    if outcomes and len(outcomes) == len(names):
        run.seconds = max(stamp for stamp, _success in outcomes) - first
    if run.failed:
        run.notes.append(f"{run.failed} tasks did not end ok")


def record_agent(run: Run, agent: Agent, names: list[str]) -> None:
    """Each task's process lifetime as the agent logged it (spawned → reaped)."""
    wanted = set(names)
    run.lifetimes = [float(r["seconds"]) for r in agent.log_records("task_process_exited")
                     if r.get("task") in wanted and r.get("seconds") is not None]
    for record in agent.log_records("task_containment")[:1]:
        run.notes.append(f"the agent contains tasks by {record.get('kind')}")


def fork_server_pid(agent: int | None) -> int | None:
    """The agent's fork server (node_agent/forkserver.py), its child, if it runs one."""
    try:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        with contextlib.suppress(OSError):
            if b"forkserver.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    return None


def cpu_snapshot(pids: dict[str, int | None], agent: Agent) -> dict[str, float]:
    found = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
    found["tasks"] = agent.children_cpu_seconds()
    server = fork_server_pid(agent.pid)
    if server is not None and found["tasks"] is not None:  # its forks, and its own forking
        found["tasks"] += (process_cpu_seconds(server) or 0.0) + \
            (children_cpu_seconds(server) or 0.0)
    return {name: value for name, value in found.items() if value is not None}


def measure_vespid(run: Run, peer: Peer, agent: Agent, coordinator: Coordinator,
                   deadline: Deadline) -> None:
    completions = Completions(peer)

    def check() -> None:
        coordinator.check_alive()
        agent.check_alive()

    warm = [f"at-warm-{i:04d}" for i in range(2 * run.parallel)]
    submit(peer, warm)
    why = completions.wait(warm, deadline.within(120), check)
    if why is not None:
        raise BenchError(f"warm-up: {why}")
    names = [f"at-r{run.round}-{i:06d}" for i in range(run.tasks)]
    pids = {"agent": agent.pid, "coordinator": coordinator.pid, "RabbitMQ": broker_pid()}
    before = cpu_snapshot(pids, agent)
    first = submit(peer, names)
    why = completions.wait(names, deadline, check)
    after = cpu_snapshot(pids, agent)
    if why is not None:
        run.notes.append(why)
    record_completions(run, names, completions, first)
    run.task_cpu = after.get("tasks", 0.0) - before.get("tasks", 0.0) if "tasks" in after \
        else None
    run.cpu = {name: after[name] - before[name] for name in pids if name in after
               and name in before}


def run_vespid(run: Run, deadline: Deadline,
               during: Callable[[Agent, Coordinator], Any] | None = None) -> None:
    """One coordinator and one real agent on a private vhost; `during` wraps the measured
    part (a profiler)."""
    with ExitStack() as stack:
        farm = vespid_farm(stack, "vespid-bench-at")
        url, workdir, coordinator, peer = farm.url, farm.workdir, farm.coordinator, farm.peer
        agent = Agent(url, workdir, f"bench-at-{uuid.uuid4().hex[:8]}",
                      {"cores": run.parallel, "memory": max(4000, 200 * run.parallel)},
                      {"launch": run.launch})
        try:
            coordinator.wait_ready(peer, deadline.within(90))
            stack.callback(agent.stop)
            agent.start()
            wait_for_nodes(peer, 1, deadline.within(60))
            log.info("vespid: agent %s up with %d cores; %d tasks", agent.name, run.parallel,
                     run.tasks)
            with ExitStack() as profiling:
                if during is not None:
                    profiling.enter_context(during(agent, coordinator))
                measure_vespid(run, peer, agent, coordinator, deadline)
        except BenchError as exc:
            run.notes.append(str(exc))
        finally:
            agent.stop()
            record_agent(run, agent, [f"at-r{run.round}-{i:06d}" for i in range(run.tasks)])
            for who, counts in (("agent", agent.log_summary()),
                                ("coordinator", coordinator.log_summary())):
                note = describe_log(counts, who=who)
                if note:
                    run.notes.append(note)


# ---- the plan, the profile and the report -------------------------------------------------
def plan(rounds: int) -> list[tuple[int, str]]:
    order: list[tuple[int, str]] = []
    for number in range(1, rounds + 1):
        turn = CONFIGS if number % 2 else tuple(reversed(CONFIGS))
        order += [(number, config) for config in turn]
    return order


def run_one(number: int, config: str, tasks: int, parallel: int, cap: float,
            launch: str = "fork") -> Run:
    run = Run(config, number, tasks, parallel, launch)
    log.info("round %d: %s, %d tasks, %d at a time", number, config, tasks, parallel)
    deadline = Deadline.after(cap)
    if config == "vespid":
        run_vespid(run, deadline)
    else:
        run_local(config, run, deadline)
    log.info("round %d: %s: %s tasks/s", number, config, fmt(run.rate))
    return run


def run_profile(tasks: int, parallel: int, cap: float) -> tuple[Run, str]:
    with tempfile.TemporaryDirectory(prefix="vespid-bench-spy-") as folder:
        outputs: dict[str, Path] = {}

        def during(agent: Agent, coordinator: Coordinator) -> Any:
            spy = spying({"agent": agent.pid, "coordinator": coordinator.pid}, Path(folder),
                         idle=frozenset({"agent"}))
            outputs.update({"agent": Path(folder) / "agent.txt",
                            "coordinator": Path(folder) / "coordinator.txt"})
            return spy

        run = Run("vespid", 0, tasks, parallel)
        run_vespid(run, Deadline.after(cap), during)
        tables = [
            profile_tables("The node agent (py-spy --idle: wall-clock time, waiting included)",
                           read_profile(outputs.get("agent", Path(folder) / "none"))),
            profile_tables("The coordinator (py-spy, CPU time only)",
                           read_profile(outputs.get("coordinator", Path(folder) / "none")))]
    return run, "\n\n".join(tables)


def ms(seconds: float | None, per: int = 1) -> str:
    return "—" if seconds is None or per <= 0 else f"{1000 * seconds / per:.1f}"


def lifetime_cell(run: Run) -> str:
    if not run.lifetimes:
        return "—"
    ordered = sorted(run.lifetimes)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"{1000 * statistics.median(ordered):.1f} / {1000 * p90:.1f}"


def row(run: Run) -> list[str]:
    finished = run.done + run.failed
    rate_cell = fmt(run.rate) if run.rate else \
        f"— (partial: {run.done:,}/{run.tasks:,})"
    other = ", ".join(f"{name} {ms(seconds, finished)}" for name, seconds in run.cpu.items())
    shares = ", ".join(f"{name} {100 * seconds / run.seconds:.0f}%"
                       for name, seconds in run.cpu.items()) if run.seconds else ""
    notes = ([f"CPU ms a task: {other}; CPU share: {shares}"] if other else []) + run.notes
    if run.spawns:
        notes.insert(0, f"Popen() took {1000 * statistics.median(run.spawns):.1f} ms "
                        "(median)")
    return [str(run.round), LABELS[run.config], f"{run.tasks:,}", str(run.parallel),
            fmt(run.seconds, 2), rate_cell, lifetime_cell(run), ms(run.slot_gap),
            ms(run.task_cpu, finished), "; ".join(notes)]


HEADERS = ["round", "configuration", "tasks", "P", "seconds", "tasks/s",
           "process lifetime ms (median / p90)", "slot empty ms a task", "task CPU ms a task",
           "notes"]


def verdicts(runs: list[Run]) -> list[str]:
    lines = []
    for number in sorted({r.round for r in runs}):
        by = {r.config: r for r in runs if r.round == number}
        base, launch, vespid = by.get("baseline"), by.get("launch"), by.get("vespid")
        if base is None or vespid is None or not base.rate or not vespid.rate:
            lines.append(f"- Round {number}: no ratio (a configuration did not finish).")
            continue
        ratio = vespid.rate / base.rate
        met = "met" if ratio >= TARGET else "**not met**"
        against_launch = (f"; against the launch line alone {vespid.rate / launch.rate:.2f}"
                          if launch is not None and launch.rate else "")
        lines.append(f"- Round {number}: Vespid {fmt(vespid.rate)} tasks/s, baseline "
                     f"{fmt(base.rate)} tasks/s: ratio **{ratio:.2f}** (target "
                     f"≥ {TARGET:.2f}: {met}){against_launch}.")
    return lines


HOW_TO_READ = (
    "How to read it: *tasks/s* = N / (first task started or published → N-th task done). "
    "Baseline and launch line: done is this process reaping the N-th child (through its "
    "pidfd, so without delay). Vespid: done is the arrival of the N-th `task.completed` "
    "event, so it includes the task-complete's way back through the broker and the "
    "coordinator. *Process lifetime* is from the spawn returning to the child being reaped "
    "(for Vespid as the agent logs it, `task_process_exited` `seconds`): in the agent it "
    "also holds the time an exited task waits to be noticed. *Slot empty* is the time a "
    "slot held no task process, a task: (P x wall time - the sum of the lifetimes) / N; it "
    "holds the spawn (for the pool rows the notes give how long Popen() took) and, for "
    "Vespid, the way from the agent's task-complete through the coordinator to the next "
    "task-run. tasks/s = P / (mean lifetime + slot empty). *Task CPU* is the CPU of the "
    "task processes themselves (children reaped, cutime + cstime of the agent for "
    "Vespid, plus the CPU of its fork server and of the forks it reaped, with `launch = "
    "fork`); the notes give the CPU of the agent, the coordinator and RabbitMQ a task, and "
    "their shares of one core over the timed part. Everything shares the machine's cores, "
    "as it would on a build machine that runs its agent.")


def report_sections(runs: list[Run], profile: tuple[Run, str] | None) -> list[str]:
    launches = sorted({r.launch for r in runs if r.config == "vespid"})
    sections = [f"The agent's `launch`: {', '.join(launches) or '-'}.",
                markdown_table(HEADERS, [row(r) for r in runs]),
                "Vespid / baseline, round by round (issue 14, target 6):",
                "\n".join(verdicts(runs)), HOW_TO_READ]
    if profile is not None:
        run, tables = profile
        sections.append(f"Profile: one more Vespid run, not counted above, under py-spy; it "
                        f"made {fmt(run.rate)} tasks/s "
                        f"(process lifetime {lifetime_cell(run)} ms).")
        sections.append(tables)
    return sections


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser("bench.agent_tasks", __doc__)
    size_options(parser, QUICK_TASKS, FULL_TASKS, "tasks (N)",
                 "wall-clock cap for each run (default 5, --quick 2)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="P, tasks at a time (default: the cores this process may use)")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help=f"rounds of baseline, launch line and Vespid (default {ROUNDS})")
    parser.add_argument("--launch", choices=("fork", "spawn"), default="fork",
                        help="the agent's launch setting: fork (its default: tasks are forks "
                             "of its fork server) or spawn (a new interpreter a task)")
    parser.add_argument("--profile", action="store_true",
                        help="one more Vespid run under py-spy (agent and coordinator)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    start_bench()
    args = parse_args(argv)
    tasks = args.tasks or (QUICK_TASKS if args.quick else FULL_TASKS)
    parallel = args.parallel or len(os.sched_getaffinity(0))
    cap = 60 * (args.cap_minutes or (2 if args.quick else 5))
    if args.profile and py_spy() is None:
        parser_error = "--profile needs py-spy (.venv/bin/pip install py-spy)"
        sys.stderr.write(f"bench: {parser_error}\n")
        return 2
    runs: list[Run] = []
    profile: tuple[Run, str] | None = None
    title = "Vespid node agent: trivial tasks against bare interpreter starts"

    def measure() -> None:
        nonlocal profile
        for number, config in plan(args.rounds):
            runs.append(run_one(number, config, tasks, parallel, cap, args.launch))
        if args.profile:
            log.info("profile: one more Vespid run under py-spy")
            profile = run_profile(tasks, parallel, cap)

    return run_bench(title, measure, lambda: report_sections(runs, profile))


if __name__ == "__main__":
    sys.exit(main())
