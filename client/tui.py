"""What people look at in a terminal: tables, `vespid top`, the progress of a waited tree.

rich draws them; piped into another program the same output stays plain text.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

SEVERITY_STYLE = {"ok": "green", "warning": "yellow", "error": "dark_orange", "fatal": "red",
                  "terminated": "magenta", "working": "cyan", "idle": "dim"}


def table(rows: Sequence[tuple[str, ...]]) -> str:
    """A header row and data rows as a table: coloured on a terminal, plain in a pipe."""
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for title in rows[0]:
        grid.add_column(title)
    for row in rows[1:]:
        grid.add_row(*(f"[{SEVERITY_STYLE[c]}]{c}[/]" if c in SEVERITY_STYLE else c
                       for c in row))
    buffer = io.StringIO()
    Console(file=buffer, width=200, force_terminal=sys.stdout.isatty(),
            no_color=not sys.stdout.isatty()).print(grid)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip("\n").splitlines())


def top(client: Any, render_nodes: Any, render_tasks: Any, interval: float = 1.0) -> None:
    """`vespid top`: nodes and the newest tasks, redrawn every second until Ctrl-C."""
    def frame() -> Group:
        nodes, tasks = client.nodes(), client.tasks(limit=25)
        working = sum(1 for t in tasks if t["status"] == "working")
        head = f"[bold]Vespid[/]  {len(nodes)} nodes · {working} of the newest 25 working · " \
               f"{time.strftime('%H:%M:%S')}"
        return Group(head, "", render_nodes(nodes), "", render_tasks(tasks))

    with Live(frame(), refresh_per_second=2, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(frame())
        except KeyboardInterrupt:
            return


def wait_tree(client: Any, root: str, timeout: float | None, whole_tree: bool = True) -> Any:
    """Wait for a task (and its tree), with a bar over the whole tree: n of m done,
    failures so far."""
    from vespid.shared.errors import WaitTimeout
    from vespid.shared.protocol import Severity

    deadline = None if timeout is None else time.monotonic() + timeout
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn())
    with Progress(*columns, transient=not sys.stderr.isatty(),
                  console=Console(file=sys.stderr)) as progress:
        bar = progress.add_task(root[:40], total=1, failed=0)
        while True:
            tree = _tree(client, root)
            done = [t for t in tree if t["status"] == "complete"]
            failed = sum(1 for t in done if Severity(t["success"]).failed)
            progress.update(bar, total=len(tree), completed=len(done), failed=failed)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise WaitTimeout(f"{root} not complete after {timeout:g} s")
            try:  # woken by the root's completion event, or each second to redraw the bar
                return client.wait(root, timeout=min(1.0, left) if left else 1.0,
                                   whole_tree=whole_tree)
            except WaitTimeout:
                continue


def _tree(client: Any, root: str) -> list[dict[str, Any]]:
    found, frontier = [client.info(root).model_dump(by_alias=True)], [root]
    while frontier:
        children = client.tasks(parent=frontier.pop(), limit=100_000)
        found += children
        frontier += [c["name"] for c in children if c["children"]]
    return found
