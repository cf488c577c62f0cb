"""Finding a real broker for the tests, and giving each test its own vhost.

Order: VESPID_AMQP_URL (or localhost) when a broker answers there; else a testcontainers
RabbitMQ when Docker answers; else fail under CI and skip locally, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import pytest

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"


@dataclass
class Broker:
    url: str  # the base URL; its vhost is replaced per test
    run_ctl: Callable[[list[str]], None]

    def url_for(self, vhost: str) -> str:
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))

    @contextmanager
    def fresh_vhost(self) -> Iterator[str]:
        vhost = f"vespid-test-{uuid.uuid4().hex[:12]}"
        user = urlsplit(self.url).username or "guest"
        self.run_ctl(["add_vhost", vhost])
        self.run_ctl(["set_permissions", "-p", vhost, user, ".*", ".*", ".*"])
        try:
            yield self.url_for(vhost)
        finally:
            self.run_ctl(["delete_vhost", vhost])


def answers(url: str) -> bool:
    try:
        pika.BlockingConnection(pika.URLParameters(url + "?connection_attempts=1&socket_timeout=2")
                                ).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not here"
        return False


def _local_ctl(args: list[str]) -> None:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.fail("a broker answers but rabbitmqctl is not on PATH to create test vhosts")
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)


def _docker_answers() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    return subprocess.run([docker, "info"], capture_output=True, timeout=20).returncode == 0


@contextmanager
def find_broker() -> Iterator[Broker]:
    url = os.environ.get("VESPID_AMQP_URL", DEFAULT_URL)
    if answers(url):
        yield Broker(url, _local_ctl)
        return
    if _docker_answers():
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3.13") as container:
            base = (f"amqp://guest:guest@{container.get_container_host_ip()}:"
                    f"{container.get_exposed_port(5672)}/%2F")

            def ctl(args: list[str]) -> None:
                container.exec(["rabbitmqctl", "-q", *args])

            yield Broker(base, ctl)
        return
    reason = (f"no RabbitMQ answers at {url} and Docker is not available: start one with "
              "`rabbitmq-server -detached` or set VESPID_AMQP_URL")
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)
