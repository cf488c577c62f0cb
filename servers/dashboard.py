"""`vespid dashboard --port 8080`: a web page that follows the farm live.

A separate process that is only a client: it learns everything over AMQP (node-list,
task-list, task-info, attempt-list, tree-timeline, farm-history, the log server), never from
the coordinator's files. The page gets a fresh snapshot every second through server-sent
events; its timeline, tree and charts ask /api/timeline, /api/tree and /api/history. The
charting library (vis-timeline) is package data served under /static/: build machines are
often offline, so nothing is fetched from the internet. Each HTTP thread has its own AMQP
connection: pika connections are not shared between threads.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from vespid.client.api import Client
from vespid.client.timeline import OUTCOME_COLOURS, critical_path, short_name, slot_lanes
from vespid.servers.settings import DashboardSettings
from vespid.shared import logs as logging_setup
from vespid.shared.errors import ProtocolError, RemoteError, VespidError
from vespid.shared.protocol import TimelineAttempt
from vespid.shared.settings import client_settings
from vespid.shared.transport import DEFAULT_URL, close_quietly

PAGE = resources.files("vespid.servers").joinpath("dashboard.html").read_bytes()
STATIC = resources.files("vespid.servers").joinpath("static")
# Only these kinds are served from STATIC: a request can't read the package's Python.
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".txt": "text/plain; charset=utf-8", ".md": "text/plain; charset=utf-8"}
TIMELINE_WINDOW = 15 * 60.0  # seconds the timeline shows when the page names no `since`


def _ink(fill: str) -> str:
    """Dark text on a light fill, white on a dark one (ITU-R BT.601 luma)."""
    red, green, blue = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return "#111" if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else "#fff"


# The bars take the colours of `vespid timeline`'s picture: one palette for both.
OUTCOME_CSS = "".join(
    f".vis-item.outcome-{outcome}{{background-color:{fill};border-color:{fill};"
    f"color:{_ink(fill)}}}\n" for outcome, fill in OUTCOME_COLOURS.items()).encode()
_local = threading.local()


def _client(url: str) -> Client:
    if getattr(_local, "client", None) is None:
        _local.client = Client(url, timeout=10)
    client: Client = _local.client
    return client


def _close_client() -> None:
    """Each request runs in a thread of its own: its connection ends with it, not later."""
    client = getattr(_local, "client", None)
    if client is not None:
        client.close()
        _local.client = None


def snapshot(url: str) -> dict[str, Any]:
    client = _client(url)
    tasks = client.tasks(limit=500)
    return {"nodes": client.nodes(), "tasks": tasks, "time": time.time()}


def node_lanes(nodes: list[dict[str, Any]], attempts: list[TimelineAttempt]
               ) -> list[dict[str, Any]]:
    """One lane per node, with the cores it offers (its slots); a node no longer listed that
    ran an attempt in the window still gets its lane, marked gone."""
    lanes = [{"name": n["name"], "cores": float(n["capabilities"].get("cores") or 0),
              "alive": n["alive"], "left": n["left"], "draining": n["draining"]}
             for n in nodes]
    listed = {lane["name"] for lane in lanes}
    for name in sorted({a.node for a in attempts} - listed):
        lanes.append({"name": name, "cores": 0.0, "alive": False, "left": True,
                      "draining": False})
    return lanes


def timeline(url: str, since: float, until: float | None) -> dict[str, Any]:
    """The attempts of a window, each with the core slot it ran in, and the nodes' lanes."""
    client = _client(url)
    listed = client.attempts(since, until)
    lanes = node_lanes(client.nodes(), listed.attempts)
    slots: dict[tuple[str, int], int] = {}
    for lane in lanes:  # each node's attempts in the core slots it granted
        slots |= slot_lanes([a for a in listed.attempts if a.node == lane["name"]], lane["cores"])
    attempts = [a.model_dump(mode="json", by_alias=True)
                | {"slot": slots[(a.task, a.attempt)], "label": short_name(a.task)}
                for a in listed.attempts]
    return {"now": listed.now, "since": listed.since, "until": until,
            "truncated": listed.truncated, "nodes": lanes, "attempts": attempts}


def tree(url: str, root: str) -> dict[str, Any]:
    """A tree's tasks and attempts in time, with the chain that decided when it finished."""
    reply = _client(url).tree_timeline(root)
    drawn = reply.model_dump(mode="json", by_alias=True)
    for task in drawn["tasks"]:  # labels as `vespid timeline` writes them
        task["label"] = short_name(task["name"])
        for attempt in task["attempts"]:
            attempt["label"] = task["label"]
    return drawn | {"critical": critical_path(reply)}


def history(url: str, since: float | None) -> dict[str, Any]:
    return _client(url).history(since).model_dump(mode="json", by_alias=True)


def static_file(path: str) -> tuple[bytes, str] | None:
    """A file of the package's static folder, or None for anything else (`..`, hidden
    files, kinds not listed)."""
    parts = [unquote(part) for part in path.split("/") if part]
    if not parts or any(p.startswith(".") or "\\" in p for p in parts):
        return None
    kind = STATIC_TYPES.get(Path(parts[-1]).suffix)
    target = STATIC.joinpath(*parts)
    if kind is None or not target.is_file():
        return None
    return target.read_bytes(), kind


def query_time(query: dict[str, list[str]], name: str) -> float | None:
    """A Unix time from the query string; absent or empty is None, anything else refused."""
    text = query.get(name, [""])[0]
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ProtocolError("bad-request", f"{name} must be Unix seconds, not {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ProtocolError("bad-request", f"{name} must be Unix seconds, not {text!r}")
    return value


def task_log(url: str, name: str, attempt: int | None) -> str:
    """The start of one attempt's log (the latest when `attempt` is None)."""
    from vespid.client.logs import LogReader

    try:
        reader = LogReader(client_settings(url), timeout=2)
        try:
            reply = reader.history(name, attempt, 0)
        finally:  # also when refused: one connection per log pane shown, not kept
            close_quietly(reader.connection)
        return reply.data if reply.known else "(no log kept for this attempt yet)"
    except (ProtocolError, RemoteError) as exc:  # not a task name, say
        return f"({exc.message})"
    except VespidError:
        return "(no log server answers: start `vespid logserver --dir DIR`)"


class Handler(BaseHTTPRequestHandler):
    url = DEFAULT_URL

    def log_message(self, format: str, *args: Any) -> None:
        return  # requests are not worth a log line each

    def _send(self, body: bytes, kind: str, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        try:
            self._route()
        except (ProtocolError, RemoteError) as exc:  # malformed, or refused (no such root)
            self._send(json.dumps({"error": exc.message}).encode(), "application/json", 400)
        except VespidError as exc:
            self._send(json.dumps({"error": str(exc)}).encode(), "application/json", 503)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            _close_client()

    def _json(self, value: Any) -> None:
        self._send(json.dumps(value).encode(), "application/json")

    def _route(self) -> None:
        path, query = self.path.split("?")[0], parse_qs(urlsplit(self.path).query)
        if path == "/":
            self._send(PAGE, "text/html; charset=utf-8")
        elif path == "/outcomes.css":
            self._send(OUTCOME_CSS, "text/css; charset=utf-8")
        elif path.startswith("/static/"):
            found = static_file(path.removeprefix("/static/"))
            if found is None:
                self._send(b"not found", "text/plain", 404)
            else:
                self._send(*found)
        elif path == "/api/snapshot":
            self._json(snapshot(self.url))
        elif path == "/api/timeline":
            since = query_time(query, "since")
            self._json(timeline(self.url, time.time() - TIMELINE_WINDOW if since is None
                                else since, query_time(query, "until")))
        elif path.startswith("/api/tree/"):
            self._json(tree(self.url, unquote(path.removeprefix("/api/tree/"))))
        elif path == "/api/history":
            self._json(history(self.url, query_time(query, "since")))
        elif path.startswith("/api/task/"):
            info = _client(self.url).info(unquote(path.removeprefix("/api/task/")))
            self._send(info.model_dump_json(by_alias=True).encode(), "application/json")
        elif path.startswith("/api/log/"):
            attempt = query.get("attempt", [""])[0]
            text = task_log(self.url, unquote(path.removeprefix("/api/log/")),
                            int(attempt) if attempt.isdigit() else None)
            self._send(text.encode(), "text/plain; charset=utf-8")
        elif path == "/events":
            self._events()
        else:
            self._send(b"not found", "text/plain", 404)

    def _events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        while True:
            data = json.dumps(snapshot(self.url))
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()
            time.sleep(1.0)


def cmd_dashboard(args: argparse.Namespace) -> int:
    settings = DashboardSettings.load(args.config, amqp_url=args.amqp_url,
                                      dashboard_host=args.host, dashboard_port=args.port)
    logging_setup.configure(settings.log_level, settings.json_logs)
    logging_setup.get_logger(__name__).info("settings", **settings.redacted())
    Handler.url = settings.amqp_url
    host, port = settings.dashboard_host, settings.dashboard_port
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    logging_setup.get_logger(__name__).info("dashboard_serving", host=host, port=port)
    server.serve_forever()
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("dashboard", help="serve a live web page of nodes, tasks and logs",
                       description=__doc__)
    p.add_argument("--port", type=int,
                   help="HTTP port (default 8080; env VESPID_DASHBOARD_PORT)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1, local only; env "
                                  "VESPID_DASHBOARD_HOST)")
    p.add_argument("--config", type=Path, help="TOML settings file")
    p.add_argument("--amqp-url", help="broker URL (env VESPID_AMQP_URL)")
    p.set_defaults(handler=cmd_dashboard)
