"""The `vespid` command: every subcommand in one table, on top of the client library.

Exit codes scripts can rely on: 0 success (a waited task and its tree ended ok or warning),
1 something in the waited tree ended error/fatal/terminated, 2 bad usage or settings,
3 broker or coordinator unreachable, 4 no such task, 5 timed out waiting, 141 the reader
of the output closed it early (as for any tool stopped by SIGPIPE).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vespid.shared.errors import (
    BrokerError,
    ConfigError,
    GolemTaskFailed,
    RemoteError,
    RequestTimeout,
    TaskNotFound,
    VespidError,
    WaitTimeout,
)
from vespid.shared.startup import collector_paused
from vespid.shared.text import amount

EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE, EXIT_BROKER, EXIT_NOT_FOUND, EXIT_TIMEOUT = range(6)
EXIT_CODES: list[tuple[type[VespidError], int]] = [
    (ConfigError, EXIT_USAGE), (TaskNotFound, EXIT_NOT_FOUND), (WaitTimeout, EXIT_TIMEOUT),
    (RequestTimeout, EXIT_BROKER), (BrokerError, EXIT_BROKER), (RemoteError, EXIT_USAGE),
    (GolemTaskFailed, EXIT_TASK_FAILED),
]


def out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _client(args: argparse.Namespace) -> Any:
    from vespid.client.api import Client

    return Client(args.amqp_url, timeout=args.request_timeout)


def _show(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    out(json.dumps(data, indent=2, sort_keys=True) if as_json else render(data))


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def render_info(info: dict[str, Any]) -> str:
    status = info.get("status") or "idle"
    lines = [f"{info['name']}  {status}" + (f" / {info['success']}" if info.get("success")
                                              else "")]
    for label, key in [("name", "name_pretty"), ("parent", "parent"), ("node", "node"),
                       ("log", "log"), ("message", "message"), ("attempt", "attempt")]:
        if info.get(key) not in (None, ""):
            lines.append(f"  {label:<10} {info[key]}")
    for label, key in [("created", "time-create"), ("started", "time-start"),
                       ("finished", "time-finish")]:
        lines.append(f"  {label:<10} {_when(info.get(key))}")
    if info.get("allocated"):
        lines.append(f"  {'allocated':<10} " + ", ".join(
            f"{k}={amount(v)}" for k, v in sorted(info["allocated"].items())))
    if info.get("requirements"):
        lines.append(f"  {'requires':<10} " + ", ".join(
            f"{k}={v}" for k, v in sorted(info["requirements"].items())))
    if info.get("tree_success") and info.get("children"):
        still = "" if info.get("tree_complete", True) else ", some still running"
        lines.append(f"  {'tree':<10} {info['tree_success']} (worst in its tree{still})")
    failures = info.get("tree_failures") or []
    if failures:
        total = info.get("tree_failures_total") or len(failures)
        lines.append(f"  {'failed':<10} {total} in its tree")
        lines += [f"    {f['name_pretty'] or f['name']}: {f['success']}"
                  + (f" ({f['message']})" if f.get("message") else "") + f"  {f['name']}"
                  for f in failures]
        if total > len(failures):
            lines.append(f"    … and {total - len(failures)} more")
    if info.get("holds"):
        lines.append(f"  {'holds':<10} " + ", ".join(
            f"{k}={v}" for k, v in sorted(info["holds"].items())))
    for reason in info.get("waiting_reason") or []:
        lines.append(f"  {'waiting':<10} {reason}")
    lines += render_attempts(info.get("attempts") or [])
    children = info.get("children") or []
    lines.append(f"  {'children':<10} {len(children)}")
    lines += [f"    {child}" for child in children]
    return "\n".join(lines)


def render_attempts(attempts: list[dict[str, Any]]) -> list[str]:
    """One line per start of the task: where, when, how it ended (lost, late reports)."""
    if not attempts:
        return []
    lines = [f"  {'attempts':<10} {len(attempts)}"]
    for a in attempts:
        ended = "running" if a.get("end") is None else (
            f"until {_when(a['end'])} ({_duration(a['end'] - a['start'])})")
        how = "" if a.get("end") is None else (
            ": LOST, " if a.get("lost") else ": ") + str(a.get("why") or "")
        late = f"; late reports: {', '.join(a['late'])}" if a.get("late") else ""
        lines.append(f"    #{a['attempt']} on {a['node']} from {_when(a['start'])} "
                     f"{ended}{how}{late}")
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def tree_verdict(task: dict[str, Any]) -> str:
    """What a row says of how it went: its own severity, or for a task with children the
    worst in its tree when that is worse (a root is only as good as its tree)."""
    own, tree = task.get("success"), task.get("tree_success")
    if task.get("children") and tree and tree != own:
        return f"{tree} (tree)" if own else f"{tree} so far"
    return own or "-"


def render_tasks(tasks: list[dict[str, Any]]) -> str:
    rows = [("NAME", "STATUS", "SUCCESS", "NODE", "CREATED")]
    rows += [(t["name"], t["status"] or "idle", tree_verdict(t), t["node"] or "-",
              _when(t["time-create"])) for t in tasks]
    return _table(rows) if tasks else "no tasks"


def render_tree(tasks: list[dict[str, Any]]) -> str:
    """Tasks as indented trees: newest tree first, children in the order they were made."""
    names = {t["name"] for t in tasks}
    kids: dict[str | None, list[dict[str, Any]]] = {}
    for task in sorted(tasks, key=lambda t: t["time-create"] or 0):
        parent = task["parent"] if task["parent"] in names else None
        kids.setdefault(parent, []).append(task)
    lines: list[str] = []

    def draw(task: dict[str, Any], prefix: str, last: bool, root: bool) -> None:
        joint = "" if root else ("└─ " if last else "├─ ")
        status = task["status"] or "idle"
        verdict = tree_verdict(task)
        verdict = "" if verdict == "-" else f" {verdict}"
        where = f" on {task['node']}" if task["node"] else ""
        label = task["name_pretty"] or task["name"]
        lines.append(f"{prefix}{joint}{label}  [{status}{verdict}{where}]  {task['name']}")
        children = kids.get(task["name"], [])
        inner = prefix + ("" if root else ("   " if last else "│  "))
        for i, child in enumerate(children):
            draw(child, inner, i == len(children) - 1, False)
        hidden = (task.get("children") or 0) - len(children)
        if hidden > 0:
            lines.append(f"{inner}   … {hidden} more not shown (vespid tasks --parent "
                         f"{task['name']})")

    for root in reversed(kids.get(None, [])):
        draw(root, "", True, True)
    return "\n".join(lines) if lines else "no tasks"


def render_nodes(nodes: list[dict[str, Any]]) -> str:
    rows = [("NODE", "STATE", "CORES FREE", "MEMORY FREE", "TASKS", "VERSION")]
    for n in nodes:
        state = "ok" if n["accepting"] else (
            "gone" if n.get("left") else "lost" if not n["alive"] else
            "draining" if n["draining"] else "refused")
        caps, free = n["capabilities"], n["free"]
        rows.append((n["name"], state,
                     f"{amount(free.get('cores', 0))}/{amount(caps.get('cores', 0))}",
                     f"{amount(free.get('memory', 0))}/{amount(caps.get('memory', 0))} MB",
                     str(len(n["activetasks"])), n["version"] or "-"))
    text = _table(rows) if nodes else "no nodes have registered"
    why = [f"  {n['name']}: {n['why_not_accepting']}" for n in nodes if n["why_not_accepting"]]
    return "\n".join([text, *why])


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    from vespid.client.tui import table

    return table(rows)


# ---- commands -----------------------------------------------------------------------------
def cmd_coordinator(args: argparse.Namespace) -> int:
    from vespid.coordinator.main import run

    return run(args)


def cmd_node(args: argparse.Namespace) -> int:
    from vespid.node_agent.main import run

    return run(args)


def cmd_submit(args: argparse.Namespace) -> int:
    script = Path(args.script)
    if not script.is_file():
        raise ConfigError(f"script {script} does not exist")
    requirements: dict[str, Any] = {"memory": args.memory, "cores": args.cores}
    if args.cores_max is not None:
        requirements["cores_max"] = args.cores_max
    for label in args.label:
        requirements[f"usage_{label}"] = True
    for label in args.require:
        requirements[f"usage_require_{label}"] = True
    environment = dict(_pair(p) for p in args.env)
    with _client(args) as client:
        task = client.create_task(args.name or script.stem, script.read_text(),
                                  requirements=requirements, environment=environment,
                                  priority=args.priority, timeout=args.task_timeout,
                                  retries=args.retries)
        if not args.wait:
            out(json.dumps({"name": task.name}) if args.json else task.name)
            return EXIT_OK
        state = task.wait(args.timeout, whole_tree=not args.root_only)
        return _outcome(state, args)


def _outcome(state: Any, args: argparse.Namespace) -> int:
    """Show a waited task and turn it into the exit code: the worst in its tree decides,
    or with --root-only the task alone."""
    _show(state.model_dump(by_alias=True), args.json, render_info)
    if args.root_only:
        return EXIT_OK if state.ok else EXIT_TASK_FAILED
    if state.tree_failed:
        failed = ", ".join(f["name_pretty"] or f["name"] for f in state.tree_failures[:5])
        total = state.tree_failures_total
        sys.stderr.write(f"vespid: {state.name} tree ended {state.tree_success}"
                         + (f": {total} failed ({failed}{', …' if total > 5 else ''})"
                            if total else "") + "\n")
        return EXIT_TASK_FAILED
    if "warning" in (state.success, state.tree_success):
        sys.stderr.write(f"vespid: {state.name} ended with warnings (exit 0); "
                         f"`vespid info {state.name}` shows them\n")
    return EXIT_OK


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--env takes KEY=VALUE, not {text!r}")
    return key, value


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        state = client.info(args.name)
    _show(state.model_dump(by_alias=True), args.json, render_info)
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.json:
            state = client.wait(args.name, args.timeout, whole_tree=not args.root_only)
        else:
            from vespid.client.tui import wait_tree

            state = wait_tree(client, args.name, args.timeout, whole_tree=not args.root_only)
    return _outcome(state, args)


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        state = client.info(args.name)
        if state.tree_done:
            out(f"{args.name} is already complete ({state.success}), and so is its tree: "
                "nothing to cancel")
            return EXIT_OK
        client.cancel(args.name)
    out(f"cancelled {args.name}" + (" and its descendants" if state.children else "")
        + (" (it had already completed itself)" if state.complete else ""))
    return EXIT_OK


def cmd_tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        tasks = client.tasks(status=args.status, parent=args.parent, limit=args.limit)
        if args.tree:
            tasks += _ancestors(client, tasks)
    _show(tasks, args.json, render_tree if args.tree else render_tasks)
    return EXIT_OK


def _ancestors(client: Any, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parents, grandparents, … of the listed tasks that the list left out, so every
    tree is drawn from its root."""
    known = {t["name"] for t in tasks}
    wanted = [t["parent"] for t in tasks if t["parent"] and t["parent"] not in known]
    found: list[dict[str, Any]] = []
    while wanted:
        name = wanted.pop()
        if name in known:
            continue
        info = client.info(name).model_dump(by_alias=True)
        info["children"] = len(info.get("children") or [])
        known.add(name)
        found.append(info)
        if info.get("parent") and info["parent"] not in known:
            wanted.append(info["parent"])
    return found


def cmd_explain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        state = client.info(args.name)
    reasons = state.model_extra.get("waiting_reason") if state.model_extra else None
    if args.json:
        out(json.dumps({"name": state.name, "status": state.status,
                        "waiting_reason": reasons}))
    elif state.status is not None:
        out(f"{state.name} is not waiting: it is {state.status}"
            + (f" on {state.node}" if state.node else ""))
    else:
        out(f"{state.name} waits because:")
        out("\n".join(f"  {reason}" for reason in reasons or ["(no reason known)"]))
    return EXIT_OK


def cmd_timeline(args: argparse.Namespace) -> int:
    from vespid.client import timeline

    target = Path(args.out)
    render = {".svg": timeline.render_svg, ".html": timeline.render_html,
              ".htm": timeline.render_html}.get(target.suffix.lower())
    if render is None:  # refused before asking the coordinator anything
        raise ConfigError(f"--out must name a .svg or .html file, not {target.name!r}")
    with _client(args) as client:
        tree = _tree_timeline(client, args.root)
    critical = timeline.critical_path(tree)
    try:
        target.write_bytes(render(tree, critical))
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}") from None
    attempts = sum(len(task.attempts) for task in tree.tasks)
    seconds = timeline.total_seconds(tree)
    if args.json:
        out(json.dumps({"out": str(target), "tasks": len(tree.tasks), "total": tree.total,
                        "attempts": attempts, "critical_path": critical, "seconds": seconds}))
    else:
        path = " → ".join(timeline.short_name(name) for name in critical)
        out(f"wrote {target}: {len(tree.tasks)} tasks, {attempts} attempts; "
            f"critical path: {path} ({seconds:.1f} s)")
    return EXIT_OK


def _tree_timeline(client: Any, root: str) -> Any:
    """The tree under `root`; an unknown root is TaskNotFound (exit 4), as for `info`."""
    try:
        tree = client.tree_timeline(root)
    except RemoteError as exc:
        if exc.code != "not_found":
            raise
        tree = None
    if tree is None or not tree.tasks:
        raise TaskNotFound(f"no task named {root!r}; `vespid tasks` lists them")
    return tree


def cmd_drain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.drain(args.node)
    out(f"{args.node} is draining: it takes no new work and its agent exits once its tasks "
        "finished")
    return EXIT_OK


def cmd_top(args: argparse.Namespace) -> int:
    from vespid.client.tui import top

    with _client(args) as client:
        top(client, render_nodes, render_tasks)
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    """A bash completion script for every command and option of this parser."""
    parser = build_parser()
    # argparse keeps its subcommands only in private fields; this reads, never changes them.
    group = parser._subparsers._group_actions[0]  # type: ignore[union-attr]
    commands: dict[str, argparse.ArgumentParser] = dict(group.choices)  # type: ignore[arg-type]
    cases = []
    for name, sub in commands.items():
        options = " ".join(o for a in sub._actions for o in a.option_strings)
        cases.append(f'        {name}) opts="{options}" ;;')
    out("_vespid() {\n    local cur=${COMP_WORDS[COMP_CWORD]} opts\n"
        "    if [ $COMP_CWORD -eq 1 ]; then\n"
        f'        COMPREPLY=($(compgen -W "{" ".join(commands)}" -- "$cur")); return\n'
        "    fi\n    case ${COMP_WORDS[1]} in\n" + "\n".join(cases) + "\n    esac\n"
        '    COMPREPLY=($(compgen -W "$opts" -- "$cur"))\n}\ncomplete -F _vespid vespid')
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    with _client(args) as client:
        nodes = client.nodes()
    _show(nodes, args.json, render_nodes)
    return EXIT_OK


# ---- parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from vespid.client.broker_setup import add_commands as broker_commands
    from vespid.client.golem_cli import add_commands as golem_commands
    from vespid.client.logs import add_commands as log_commands
    from vespid.coordinator.main import add_arguments as coordinator_arguments
    from vespid.node_agent.main import add_arguments as node_arguments
    from vespid.servers.dashboard import add_commands as dashboard_commands
    from vespid.servers.logserver import add_commands as log_server_commands

    parser = argparse.ArgumentParser(
        prog="vespid", description="Vespid: a distributed task system for build farms.",
        epilog="--amqp-url and --request-timeout may also come before COMMAND. "
               "Exit codes: 0 ok, 1 a waited task or its tree failed, 2 usage, "
               "3 broker/coordinator unreachable, 4 no such task, 5 wait timed out, 141 output"
               " closed by its reader (as `| head` does).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--amqp-url", help="broker URL (default env VESPID_AMQP_URL, else "
                                          "amqp://guest:guest@localhost:5672/%%2F)")
        p.add_argument("--request-timeout", type=float, default=30.0,
                       help="seconds to wait for the coordinator to answer (default 30)")
        p.add_argument("--json", action="store_true", help="print raw JSON for scripts")

    def command(name: str, handler: Callable[[argparse.Namespace], int], text: str,
                client: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(handler=handler)
        if client:
            client_options(p)
        return p

    coordinator_arguments(command("coordinator", cmd_coordinator,
                                  "run the coordinator (owns all scheduling state)", False))
    node_arguments(command("node", cmd_node, "run a node agent on this build machine", False))
    p = command("submit", cmd_submit, "submit a Python script as a task")
    p.add_argument("script", help="the Python file to run on a node")
    p.add_argument("--name", help="task name prefix (default: the script's name)")
    p.add_argument("--memory", type=float, default=0, help="MB of memory needed (default 0)")
    p.add_argument("--cores", type=float, default=1, help="cores needed (default 1)")
    p.add_argument("--cores-max", type=float, help="take up to this many free cores")
    p.add_argument("--label", action="append", default=[], help="carry label X (usage_X)")
    p.add_argument("--require", action="append", default=[],
                   help="run only on nodes labelled X (usage_require_X)")
    p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the task")
    p.add_argument("--task-timeout", type=float,
                   help="kill the task after N seconds of running (ends terminated)")
    p.add_argument("--retries", type=int, default=1,
                   help="restarts elsewhere if its node is lost under it (default 1)")
    p.add_argument("--wait", action="store_true",
                   help="wait for the task and all its descendants; exit 1 if any of them "
                        "ended error, fatal or terminated")
    p.add_argument("--timeout", type=float, help="with --wait: give up after N seconds")
    root_only_help = ("judge the task alone, not its tree: wait for it only and exit 0 "
                      "only if it ended ok (the meaning before trees counted)")
    p.add_argument("--root-only", action="store_true", help=root_only_help)
    p = command("info", cmd_info, "show a task's state, its attempts and its tree's failures")
    p.add_argument("name")
    p = command("wait", cmd_wait,
                "wait for a task and all its descendants to complete; exit 1 if any of them "
                "ended error, fatal or terminated (warnings are printed, exit 0)")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, help="give up after N seconds (exit 5)")
    p.add_argument("--root-only", action="store_true", help=root_only_help)
    p = command("cancel", cmd_cancel, "cancel a task and all its descendants")
    p.add_argument("name")
    p = command("tasks", cmd_tasks, "list tasks, newest first (with --tree: whole trees, "
                                    "newest tree first)")
    p.add_argument("--status", choices=["idle", "working", "complete"])
    p.add_argument("--parent", help="only children of this task")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.add_argument("--tree", action="store_true",
                   help="draw the listed tasks inside their trees, from each root (fetches "
                        "the ancestors the list left out); roots show their tree's worst")
    p = command("explain", cmd_explain, "say why an idle task is not running")
    p.add_argument("name")
    command("nodes", cmd_nodes, "list nodes with their capacity and state")
    command("top", cmd_top, "nodes and the newest tasks, live (Ctrl-C to leave)")
    p = command("completion", cmd_completion,
                "print bash completion: eval \"$(vespid completion)\"", False)
    p = command("timeline", cmd_timeline,
                "draw a task tree in time to an SVG or HTML file (a picture for CI results)")
    p.description = (
        "Draw the tree under ROOT as it ran, one row per task (children under their "
        "parent): a light bar for each wait before a start, a bar for each attempt from "
        "start to end coloured by outcome (running, ok, warning, error, fatal, terminated, "
        "lost, replaced), and a time axis in seconds from the tree's creation. The critical "
        "path (the chain of tasks that decided when the tree finished: from the root, "
        "always the child whose subtree ended last) is starred and outlined. Hovering a bar "
        "shows its node, how long it waited and why, and how long it ran. A tree still "
        "running is drawn as it is now.")
    p.add_argument("root", metavar="ROOT", help="the tree's root task")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="where to write the picture: FILE.svg, or FILE.html for a standalone "
                        "page (nothing fetched at view time)")
    p = command("drain", cmd_drain, "stop giving a node work; its agent exits when idle")
    p.add_argument("node")
    golem_commands(sub, client_options)
    broker_commands(sub)
    log_server_commands(sub)
    log_commands(sub, client_options)
    dashboard_commands(sub)
    return parser


SERVICES = ("coordinator", "node", "logserver", "dashboard")  # they set up their own logs


GLOBAL_OPTIONS = ("--amqp-url", "--request-timeout")  # also accepted before the command


def _options_after_command(argv: list[str]) -> list[str]:
    """`vespid --amqp-url X tasks` means `vespid tasks --amqp-url X`: every client command
    takes these, so people put them first as they would with git or docker."""
    front: list[str] = []
    moved: list[str] = []
    rest = list(argv)
    while rest and rest[0].startswith("-"):
        option = rest.pop(0)
        if option.split("=", 1)[0] not in GLOBAL_OPTIONS:
            front.append(option)
            continue
        moved.append(option)
        if "=" not in option and rest:
            moved.append(rest.pop(0))
    return front + rest[:1] + moved + rest[1:]


EXIT_PIPE_CLOSED = 128 + 13  # what a shell reports for a writer stopped by SIGPIPE


def main(argv: list[str] | None = None) -> int:
    """Run one command; a reader that closes the pipe early (`vespid tasks | head`) ends it
    quietly, as it would end any other Unix tool, instead of with a traceback."""
    try:
        try:
            return _run(argv)
        finally:  # also after --help's exit: the interpreter's own flush would fail unseen
            sys.stdout.flush()
    except BrokenPipeError:
        # stdout is gone: point it at /dev/null so the flush at exit has nowhere to fail
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE_CLOSED


def _run(argv: list[str] | None) -> int:
    with collector_paused():  # building the parser imports most of what any command runs
        from vespid.shared.writes import coalesce_writes  # imports pika: inside the pause

        coalesce_writes()  # this process's connections send what waits in one go
        args = build_parser().parse_args(_options_after_command(
            sys.argv[1:] if argv is None else argv))
    if args.command not in SERVICES:  # a command's own warnings: readable, on stderr
        from vespid.shared.logs import configure

        configure("warning", json_output=False)
    try:
        code: int = args.handler(args)
        return code
    except VespidError as exc:
        sys.stderr.write(f"vespid {args.command}: {exc}\n")
        return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), EXIT_USAGE)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
