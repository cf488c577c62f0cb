"""`vespid coordinator`: load settings, print them, run the service."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vespid.coordinator.settings import CoordinatorSettings
from vespid.shared import logs
from vespid.shared.errors import ConfigError
from vespid.shared.text import count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--state", type=Path,
                        help="SQLite state file (default ./vespid-state.sqlite3; env "
                             "VESPID_STATE)")
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

    CoordinatorService(settings).run()
    return 0


def check(settings: CoordinatorSettings) -> int:
    from vespid.client.api import Client
    from vespid.shared.errors import VespidError

    try:
        with Client(settings.amqp_url, timeout=5) as client:
            report = client.request({"command": "state-check"})
        where = "the running coordinator"
    except VespidError:
        report = _check_file(settings)
        where = f"the state file {settings.state} (no coordinator answered)"
    problems = report["problems"]
    sys.stdout.write(f"checked {where}: {count(report['tasks'], 'task')}, "
                     f"{count(report['nodes'], 'node')}, {report['waiting']} waiting\n")
    sys.stdout.write("consistent\n" if not problems else
                     "".join(f"PROBLEM: {p}\n" for p in problems))
    return 0 if not problems else 1


def _check_file(settings: CoordinatorSettings) -> dict[str, Any]:
    from vespid.coordinator.check import check_state
    from vespid.coordinator.store import Store

    if not settings.state.exists():
        raise ConfigError(f"state file {settings.state} does not exist")
    store = Store(settings.state)
    try:
        state = store.load_state()
    finally:
        store.close()
    problems = check_state(state)
    return {"problems": problems, "tasks": len(state.tasks), "nodes": len(state.nodes),
            "waiting": len(state.waiting_shape)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="vespid coordinator")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
