"""`vespid coordinator`: load settings, print them, run the service."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vespid.coordinator.settings import CoordinatorSettings
from vespid.shared import logs


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


def run(args: argparse.Namespace) -> int:
    settings = CoordinatorSettings.load(
        args.config, state=args.state, amqp_url=args.amqp_url,
        heartbeat_interval=args.heartbeat_interval, missed_heartbeats=args.missed_heartbeats)
    logs.configure(settings.log_level, settings.json_logs)
    log = logs.get_logger("vespid.coordinator")
    log.info("settings", **settings.redacted())
    from vespid.coordinator.service import CoordinatorService

    CoordinatorService(settings).run()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="vespid coordinator")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
