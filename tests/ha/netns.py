"""A host of its own on this machine for a process under test: a network namespace whose
only link is a veth pair to the machine's own namespace, where the brokers and PostgreSQL
run. Taking that link down is a real network partition: the process keeps running, its
sockets stay open, and nothing it sends arrives until the link comes back.

The services listen on 127.0.0.1, which the namespace cannot reach; socat, on the machine's
end of the link, forwards each port to them (PostgreSQL's trust login from 127.0.0.1 and
RabbitMQ's loopback-only guest keep working, since socat connects from there).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field


class NetnsUnavailable(Exception):
    """This machine cannot make namespaces (not root, no iproute2, no socat)."""


@dataclass
class IsolatedHost:
    namespace: str
    host_link: str  # the machine's end of the veth pair
    host_address: str  # where the proxies listen, as the namespace sees the machine
    address: str  # the namespace's own address
    proxies: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def wrap(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.namespace]

    def forward(self, ports: Sequence[int], target: str = "127.0.0.1") -> None:
        """Make each port of `target` reachable from the namespace at host_address."""
        for port in ports:
            proxy = subprocess.Popen(
                ["socat", f"TCP-LISTEN:{port},bind={self.host_address},reuseaddr,fork",
                 f"TCP:{target}:{port}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # its forked children share its process group
            self.proxies.append(proxy)
            _await_listening(self.host_address, port, proxy)

    def cut(self) -> None:
        """Take the link down at the machine's end: the namespace loses its carrier and
        every packet between the two is dropped."""
        _ip("link", "set", self.host_link, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_link, "up")

    def close(self) -> None:
        for proxy in self.proxies:
            with suppress(ProcessLookupError):
                os.killpg(proxy.pid, signal.SIGKILL)  # socat and the children it forked
            proxy.wait(timeout=10)
        # Deleting the namespace deletes its end of the pair, and with it the other end.
        subprocess.run(["ip", "netns", "delete", self.namespace], capture_output=True,
                       timeout=30)
        subprocess.run(["ip", "link", "delete", self.host_link], capture_output=True,
                       timeout=30)


def check_available() -> None:
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    for tool in ("ip", "socat"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"{tool} is not on PATH (Debian: apt-get install "
                                   f"{'iproute2' if tool == 'ip' else tool})")


@contextmanager
def isolated_host() -> Iterator[IsolatedHost]:
    """A namespace linked to this machine's namespace by one veth pair, on a /30 of
    10.231.0.0/16 that no interface here uses yet; deleted afterwards."""
    check_available()
    token = uuid.uuid4().hex[:6]
    subnet = _free_subnet()
    host = IsolatedHost(f"vespid-{token}", f"vsp{token}h", f"{subnet}.1", f"{subnet}.2")
    inner = f"vsp{token}n"
    try:
        _ip("netns", "add", host.namespace)
        _ip("link", "add", host.host_link, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", host.namespace)
        _ip("addr", "add", f"{host.host_address}/30", "dev", host.host_link)
        _ip("link", "set", host.host_link, "up")
        _ip("-n", host.namespace, "addr", "add", f"{host.address}/30", "dev", inner)
        _ip("-n", host.namespace, "link", "set", inner, "up")
        _ip("-n", host.namespace, "link", "set", "lo", "up")
        yield host
    finally:
        host.close()


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


def _free_subnet() -> str:
    used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True,
                          timeout=30).stdout
    for _ in range(100):
        candidate = f"10.231.{random.randrange(256)}"
        if f" {candidate}." not in used:
            return candidate
    raise NetnsUnavailable("no free 10.231.x.0/30 subnet for the namespace's link")


def _await_listening(address: str, port: int, proxy: subprocess.Popen[bytes],
                     timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy.poll() is not None:
            raise NetnsUnavailable(f"socat for port {port} exited with {proxy.returncode} "
                                   f"(is {address}:{port} taken?)")
        with socket.socket() as probe:
            if probe.connect_ex((address, port)) == 0:
                return
        time.sleep(0.05)
    raise NetnsUnavailable(f"socat does not listen on {address}:{port} after {timeout} s")
