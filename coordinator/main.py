"""`vespid coordinator`: load settings, print them, run the service."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from vespid.coordinator.settings import CoordinatorSettings
from vespid.shared import logs, topology
from vespid.shared.errors import ConfigError, VespidError
from vespid.shared.protocol import StateCheck, StateCheckResponse, encode, parse_body
from vespid.shared.text import count
from vespid.shared.transport import (
    close_quietly,
    connect,
    consumers,
    guarded,
    properties,
    redact,
    user_of,
)

APP_ID = "vespid-coordinator-check"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--state",
                        help="where the state is kept: a SQLite file (default "
                             "./vespid-state.sqlite3) or postgresql://user@host/db, on which "
                             "several coordinators run, one active and the others standing "
                             "by (env VESPID_STATE)")
    parser.add_argument("--amqp-url", help="broker URL (env VESPID_AMQP_URL)")
    parser.add_argument("--heartbeat-interval", type=float,
                        help="seconds between node heartbeats (default 5)")
    parser.add_argument("--missed-heartbeats", type=int,
                        help="a node silent this many intervals is lost (default 3)")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics on this port (env VESPID_METRICS_PORT)")
    parser.add_argument("--check", action="store_true",
                        help="verify the running coordinator's state (resources held equal "
                             "running tasks' allocations, repository holds match live tasks) "
                             "and exit 0 if consistent; with no coordinator running, check "
                             "the state file instead")


def run(args: argparse.Namespace) -> int:
    settings = CoordinatorSettings.load(
        args.config, state=args.state, amqp_url=args.amqp_url,
        heartbeat_interval=args.heartbeat_interval, missed_heartbeats=args.missed_heartbeats,
        metrics_port=args.metrics_port)
    logs.configure(settings.log_level, settings.json_logs)
    if args.check:
        return check(settings)
    log = logs.get_logger("vespid.coordinator")
    log.info("settings", **settings.redacted())
    from vespid.coordinator.service import CoordinatorService

    return CoordinatorService(settings).run()


def check(settings: CoordinatorSettings) -> int:
    answer = _ask_running(settings)
    where = "the running coordinator"
    if answer is None:
        report = _check_file(settings)
        kept = (f"file {settings.state_file}" if settings.state_file is not None
                else f"at {redact(str(settings.state))}")
        where = f"the state {kept} (no coordinator answered)"
    elif answer.get("command") == "error":  # refused (forbidden, say): that is the answer
        raise ConfigError(f"the coordinator refused the check: {answer.get('message')}")
    else:
        report = StateCheckResponse.model_validate(answer)
    sys.stdout.write(f"checked {where}: {count(report.tasks, 'task')}, "
                     f"{count(report.nodes, 'node')}, {report.waiting} waiting\n")
    sys.stdout.write("consistent\n" if report.ok else
                     "".join(f"PROBLEM: {p}\n" for p in report.problems))
    return 0 if report.ok else 1


def _ask_running(settings: CoordinatorSettings, wait: float = 5.0
                 ) -> dict[str, Any] | None:
    """The running coordinator's own check of its state in memory (what drifts there is
    what matters), or None when none runs or answers. The coordinator is asked as any
    client would ask it, with the broker and the models alone: not through the client."""
    try:
        connection = connect(settings.broker_parameters(APP_ID), give_up_after=wait,
                             quiet=True)
    except VespidError:
        return None
    try:
        found = consumers(connection, topology.COORDINATOR_QUEUE)
        if found is None or found[0] == 0:
            return None
        return _request_check(connection, settings, wait)
    except VespidError:
        return None
    finally:
        close_quietly(connection)


def _request_check(connection: Any, settings: CoordinatorSettings, wait: float
                   ) -> dict[str, Any] | None:
    answers: list[bytes] = []
    channel = guarded(connection.channel)
    guarded(lambda: channel.basic_consume(topology.DIRECT_REPLY_TO,
                                          lambda _c, _m, _p, body: answers.append(body),
                                          auto_ack=True))
    props = properties("state-check", app_id=APP_ID, persistent=False,
                       reply_to=topology.DIRECT_REPLY_TO, correlation_id="check",
                       user_id=user_of(settings.amqp_url))
    props.expiration = str(int(wait * 1000))  # never acted on after we stopped waiting
    guarded(lambda: channel.basic_publish(topology.EXCHANGE, topology.COORDINATOR_KEY,
                                          encode(StateCheck(command="state-check")), props))
    deadline = time.monotonic() + wait
    while not answers and time.monotonic() < deadline:
        guarded(lambda: connection.process_data_events(time_limit=0.2))
    return parse_body(answers[0]) if answers else None


def _check_file(settings: CoordinatorSettings) -> StateCheckResponse:
    from vespid.coordinator.check import check_state
    from vespid.coordinator.store import open_store

    if settings.state_file is not None and not settings.state_file.exists():
        raise ConfigError(f"state file {settings.state} does not exist")
    store = open_store(settings.state)
    try:
        state = store.load_state()
    finally:
        store.close()
    problems = check_state(state)
    return StateCheckResponse(command="state-check-response", ok=not problems,
                              problems=problems, tasks=len(state.tasks),
                              nodes=len(state.nodes), waiting=len(state.waiting_shape))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="vespid coordinator")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
