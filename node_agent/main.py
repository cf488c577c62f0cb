"""`vespid node`: load the node's TOML config, print it, run the agent."""

from __future__ import annotations

import argparse
from pathlib import Path

from vespid.node_agent.settings import NodeSettings
from vespid.shared import logs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path,
                        help="TOML file: name, capabilities, repositories, amqp_url "
                             "(see docs/examples/node.server.toml)")
    parser.add_argument("--name", help="node name (default: the host name)")
    parser.add_argument("--amqp-url", help="broker URL (env VESPID_AMQP_URL)")
    parser.add_argument("--work-dir", type=Path,
                        help="scratch folders, scripts and task logs (default ./vespid-node)")


def run(args: argparse.Namespace) -> int:
    settings = NodeSettings.load(args.config, name=args.name, amqp_url=args.amqp_url,
                                 work_dir=args.work_dir)
    logs.configure(settings.log_level, settings.json_logs)
    logs.get_logger("vespid.node_agent").info("settings", **settings.redacted())
    from vespid.node_agent.agent import NodeAgent

    NodeAgent(settings).run()
    return 0
