"""A local three-node RabbitMQ cluster for the HA tests, made the way RabbitMQ documents a
local cluster: several `rabbitmq-server -detached` nodes on one machine, each with its own
node name, AMQP port, distribution port, data and log folders, sharing the Erlang cookie of
whoever runs the CLI tools, and nodes 2.. joined to node 1 with `rabbitmqctl join_cluster`.

Nothing here touches the machine's own broker (rabbit@localhost, 5672): every node reads
its own config and env file, not /etc/rabbitmq's, listens on 127.0.0.1 only and loads no
plugin (so no management listener on 15672).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

HOST = "127.0.0.1"
FIRST_PORT = 5681  # node i listens on FIRST_PORT + i - 1 when free, else further up
DIST_OFFSET = 20000  # its distribution port: 25681, ...
START_TIMEOUT = 90.0


class ClusterError(Exception):
    """The cluster could not be made; the message says what to look at."""


@dataclass
class Node:
    name: str  # the Erlang node name, hare1@localhost
    port: int  # AMQP
    dist_port: int
    home: Path

    @property
    def short(self) -> str:
        return self.name.split("@")[0]

    @property
    def pid_file(self) -> Path:
        return self.home / "pid"

    @property
    def log_file(self) -> Path:
        return self.home / "log" / f"{self.name}.log"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.home / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
        }

    def write_files(self) -> None:
        (self.home / "log").mkdir(parents=True, exist_ok=True)
        (self.home / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = {HOST}:{self.port}\n"
            "loopback_users.guest = true\n")
        # Read instead of /etc/rabbitmq/rabbitmq-env.conf, which names the machine's node.
        (self.home / "rabbitmq-env.conf").write_text(
            "ERL_EPMD_ADDRESS=127.0.0.1\n"
            'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n')
        (self.home / "enabled_plugins").write_text("[].\n")

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


class LocalCluster:
    """Three (or `size`) RabbitMQ nodes on this machine, clustered. `start()` makes it,
    `close()` stops every node and deletes their folders."""

    def __init__(self, size: int = 3, prefix: str = "hare",
                 keep_logs: Path | None = None) -> None:
        self.keep_logs = keep_logs  # where the nodes' logs are copied before deleting
        self.server = _tool("rabbitmq-server")
        self.ctl_tool = _tool("rabbitmqctl")
        self.base = Path(tempfile.mkdtemp(prefix="vespid-cluster-"))
        ports = _free_ports(size)
        self.nodes = [Node(f"{prefix}{i + 1}@localhost", port, port + DIST_OFFSET,
                           self.base / f"{prefix}{i + 1}")
                      for i, port in enumerate(ports)]

    # ---- making and unmaking -----------------------------------------------------------
    def start(self) -> None:
        for node in self.nodes:
            if self.ctl(node, "ping", check=False, timeout=30).returncode == 0:
                raise ClusterError(
                    f"a RabbitMQ node named {node.name} already runs (left over from an "
                    f"earlier run?): stop it with `rabbitmqctl -n {node.name} stop`")
        for node in self.nodes:
            node.write_files()
        _give_to_broker_user(self.base)
        for node in self.nodes:
            result = subprocess.run([self.server, "-detached"], env=node.env(),
                                    capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                raise ClusterError(f"`rabbitmq-server -detached` for {node.name} failed "
                                   f"({result.returncode}): {result.stdout}{result.stderr}")
        for node in self.nodes:
            self.await_running(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
            self.await_running(node)
        running = self.running_nodes()
        if sorted(running) != sorted(n.name for n in self.nodes):
            raise ClusterError(f"cluster_status shows {running} running, not all of "
                               f"{[n.name for n in self.nodes]}")

    def close(self) -> None:
        """Stop every node (halting the Erlang VM) and delete the folders; never raises."""
        for node in reversed(self.nodes):
            with suppress(subprocess.SubprocessError, OSError):
                self.ctl(node, "stop", str(node.pid_file), check=False, timeout=60)
            pid = node.pid()
            if pid is not None:
                with suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if self.keep_logs is not None:
            for node in self.nodes:
                with suppress(OSError):
                    shutil.copytree(node.home / "log", self.keep_logs / node.short,
                                    dirs_exist_ok=True)
        shutil.rmtree(self.base, ignore_errors=True)

    # ---- the CLI -----------------------------------------------------------------------
    def ctl(self, node: Node, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.ctl_tool, "-n", node.name, *args], env=node.env(),
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"`rabbitmqctl -n {node.name} {' '.join(args)}` failed "
                               f"({result.returncode}): {result.stdout}{result.stderr}"
                               f"{self._log_tail(node)}")
        return result

    def ctl_json(self, node: Node, *args: str) -> Any:
        return json.loads(self.ctl(node, *args, "--formatter", "json").stdout)

    def await_running(self, node: Node, timeout: float = START_TIMEOUT) -> None:
        """Until the rabbit application runs on the node (await_startup returns at once
        with an error while the VM is not up yet, so ask again until the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(1, int(deadline - time.monotonic()))
            result = self.ctl(node, "await_startup", "--timeout", str(left), check=False,
                              timeout=left + 30)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"RabbitMQ node {node.name} (port {node.port}) did not "
                                   f"start within {timeout:.0f} s: {result.stdout}"
                                   f"{result.stderr}{self._log_tail(node)}")
            time.sleep(0.5)

    def _log_tail(self, node: Node) -> str:
        try:
            tail = node.log_file.read_text(errors="replace")[-3000:]
        except OSError:
            return ""
        return f"\n--- {node.log_file} (end) ---\n{tail}"

    # ---- what the tests use ------------------------------------------------------------
    def node(self, short: str) -> Node:
        return next(n for n in self.nodes if n.short == short or n.name == short)

    def running_nodes(self, ask: Node | None = None) -> list[str]:
        status = self.ctl_json(ask or self.nodes[0], "cluster_status")
        return list(status["running_nodes"])

    def stop_app(self, node: Node) -> None:
        self.ctl(node, "stop_app")

    def start_app(self, node: Node) -> None:
        self.ctl(node, "start_app")
        self.await_running(node)

    def queue_members(self, vhost: str, ask: Node | None = None) -> dict[str, list[str]]:
        """Each queue of the vhost and the nodes its replicas live on (quorum queues)."""
        rows = self.ctl_json(ask or self.nodes[0], "list_queues", "-p", vhost,
                             "name", "type", "members")
        return {row["name"]: sorted(row["members"] or []) for row in rows}

    def url(self, vhost: str, order: Sequence[int] | None = None,
            user: str = "guest", password: str = "guest") -> str:
        """The comma-separated URL a Vespid process takes: the nodes in `order` (indexes
        into nodes), all of them in turn by default."""
        chosen = [self.nodes[i] for i in (order if order is not None
                                          else range(len(self.nodes)))]
        return ",".join(self.node_url(node, vhost, user, password) for node in chosen)

    @staticmethod
    def node_url(node: Node, vhost: str, user: str = "guest", password: str = "guest",
                 host: str = HOST) -> str:
        return f"amqp://{user}:{password}@{host}:{node.port}/{quote(vhost, safe='')}"

    @contextmanager
    def fresh_vhost(self, user: str = "guest") -> Iterator[str]:
        vhost = f"vespid-ha-{uuid.uuid4().hex[:12]}"
        ask = self.nodes[0]
        self.ctl(ask, "add_vhost", vhost)
        self.ctl(ask, "set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        try:
            yield vhost
        finally:
            # Any running node will do: a test may leave one stopped.
            for node in self.nodes:
                if self.ctl(node, "delete_vhost", vhost, check=False).returncode == 0:
                    break


@contextmanager
def local_cluster(size: int = 3, keep_logs: Path | None = None) -> Iterator[LocalCluster]:
    cluster = LocalCluster(size, keep_logs=keep_logs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ClusterError(f"{name} is not on PATH: the HA tests make a RabbitMQ cluster of "
                           "their own and need the RabbitMQ server installed")
    return found


def _free_ports(count: int) -> list[int]:
    """`count` consecutive AMQP ports from FIRST_PORT up whose distribution ports are free
    too."""
    for first in range(FIRST_PORT, FIRST_PORT + 200, count):
        ports = list(range(first, first + count))
        if all(_free(p) and _free(p + DIST_OFFSET) for p in ports):
            return ports
    raise ClusterError(f"no {count} free ports from {FIRST_PORT} up for the RabbitMQ nodes")


def _free(port: int) -> bool:
    for address in (HOST, "0.0.0.0"):
        with socket.socket() as probe:
            # As RabbitMQ binds: a port whose last connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError:
                return False
    return True


def _give_to_broker_user(folder: Path) -> None:
    """Debian's rabbitmq-server, started as root, runs the node as user rabbitmq (su): the
    node's folders must be that user's."""
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("rabbitmq")
    except KeyError:
        return
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)


def connected_nodes(cluster: LocalCluster, pid: int) -> set[str]:
    """The nodes of the cluster a process holds an established AMQP connection to (from
    the kernel's socket table, `ss`), by short name."""
    by_port = {node.port: node.short for node in cluster.nodes}
    result = subprocess.run(["ss", "-Htnp", "state", "established"], capture_output=True,
                            text=True, timeout=30, check=True)
    found: set[str] = set()
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) < 5 or f"pid={pid}," not in line:
            continue
        port = int(fields[3].rsplit(":", 1)[1])
        if port in by_port:
            found.add(by_port[port])
    return found
