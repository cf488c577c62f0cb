"""`vespid golem submit` and `vespid golem status`: the Golem-style dialect from a shell."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vespid.shared.errors import ConfigError


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _client(args: argparse.Namespace) -> Any:
    from vespid.client.golem import GolemClient

    return GolemClient(args.amqp_url, timeout=args.request_timeout)


def _read_task(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON: {exc}") from None
    task = data.get("task", data) if isinstance(data, dict) else None
    if not isinstance(task, dict):
        raise ConfigError(f"{path} must hold a CreateTask message or its task object")
    return task


def cmd_submit(args: argparse.Namespace) -> int:
    from vespid.client.golem import VERIFIED

    task = _read_task(Path(args.task_file))
    with _client(args) as golem:
        handle = golem.create_task(task)
        _out(f"created {handle.task_id} ({task.get('type')}, "
             f"{handle.task['subtasks_count']} subtasks)")
        for event in handle.events(args.timeout):
            if event["type"] == "VerificationRequired":
                if not args.accept_all:
                    raise ConfigError("this task asks for external verification: pass "
                                      "--accept-all, or verify from your own program")
                handle.verify(event["subtask_id"], VERIFIED)
                _out(f"  accepted subtask {event['subtask_id']}")
        paths = handle.download(args.out)
        _out(f"results in {args.out}:")
        for path in paths:
            _out(f"  {path}")
        if task.get("type") == "Fractal":
            from vespid.shared import png

            image = png.stitch(sorted(paths, key=lambda p: p.name), Path(args.out) / "image.png")
            _out(f"stitched image: {image}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as golem:
        state = golem.state(args.task_id)
    if args.json:
        _out(json.dumps(state, indent=2))
        return 0
    _out(f"{state['task_id']}  {state['status']}  {state['subtasks_finished']}/"
         f"{state['subtasks_count']} finished" + (f"  ({state['reason']})"
                                                   if state.get("reason") else ""))
    for subtask in state["subtasks"]:
        _out(f"  part {subtask['index']}: {subtask['state']:<10} on {subtask['node'] or '-'}"
             f"  attempts {len(subtask['attempts'])}  {subtask['subtask_id']}")
    return 0


def add_commands(sub: Any, client_options: Any) -> None:
    golem = sub.add_parser("golem", help="the Golem-style dialect: subtasks, results, "
                                         "verification", description=__doc__)
    commands = golem.add_subparsers(dest="golem_command", required=True, metavar="COMMAND")
    submit = commands.add_parser("submit", help="create a task from a JSON file and follow it",
                                 description="Create a task from a CreateTask JSON file (or "
                                 "its task object), upload its resources, follow its events "
                                 "and download the results.")
    submit.add_argument("task_file", help="JSON: {\"type\": \"CreateTask\", \"task\": {...}}")
    submit.add_argument("--out", required=True, help="folder for the results")
    submit.add_argument("--timeout", type=float, help="give up after N seconds (exit 5)")
    submit.add_argument("--accept-all", action="store_true",
                        help="answer VERIFIED to every verification request")
    submit.set_defaults(handler=cmd_submit)
    client_options(submit)
    status = commands.add_parser("status", help="a task's state with every subtask's")
    status.add_argument("task_id")
    status.set_defaults(handler=cmd_status)
    client_options(status)
