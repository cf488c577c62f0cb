"""The keeper: one small process per agent that ends every task if the agent dies.

A task runs as plain `python script`, born in its cell (supervisor.py); nothing inside it
watches for the agent's death. The keeper does, for all of them at once: the agent holds the
write end of a pipe whose read end is the keeper's stdin, so the agent's end, however it
comes (SIGKILL included), is an end of file here. The keeper then ends every cell under the
agent's own cgroup folder (containment.py's `end_all`), and every process group the agent
said it started where there is no cgroup ("+<pgid>" and "-<pgid>" lines), and exits.

It runs in its own session and ignores SIGINT, SIGTERM and SIGHUP, so a Ctrl-C or a service
manager's SIGTERM meant for the agent (which then drains) does not take it away while the
agent still runs tasks.

    python -m vespid.node_agent.keeper '<containment spec, JSON>'
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

from vespid.node_agent.containment import revive


def main(argv: list[str]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    containment = revive(json.loads(argv[0]))
    groups: set[int] = set()
    with os.fdopen(sys.stdin.fileno(), "rb", closefd=False) as pipe:
        for line in pipe:  # until the agent's end of the pipe is closed: it exited
            word = line.strip()
            if word[:1] == b"+":
                groups.add(int(word[1:]))
            elif word[:1] == b"-":
                groups.discard(int(word[1:]))
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    containment.end_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
