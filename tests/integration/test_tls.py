"""amqps:// end to end, through a second local RabbitMQ node with a TLS listener."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import VespidProcess, base_env, cli, coordinator, node

pytestmark = pytest.mark.integration
NODE_NAME = "vespidtls@localhost"
TLS_PORT, TCP_PORT, DIST_PORT = 5674, 5675, 25675


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _certificates(folder: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / "ca.key"),
             "-out", str(folder / "ca.pem"), "-days", "2", "-subj", "/CN=vespid-test-ca")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / "server.key"),
             "-out", str(folder / "server.csr"), "-subj", "/CN=localhost")
    (folder / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(folder / "server.csr"), "-CA", str(folder / "ca.pem"),
             "-CAkey", str(folder / "ca.key"), "-CAcreateserial", "-out",
             str(folder / "server.pem"), "-days", "2", "-extfile", str(folder / "ext.cnf"))


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[tuple[str, Path]]:
    missing = [tool for tool in ("rabbitmq-server", "rabbitmqctl", "openssl")
               if shutil.which(tool) is None]
    if missing or _listening(TLS_PORT):
        pytest.skip(f"cannot start a TLS RabbitMQ node here: "
                    f"{'missing ' + ', '.join(missing) if missing else 'port 5674 is taken'}")
    # Not under pytest's tmp folders: those are private to root, and RabbitMQ runs as its
    # own user.
    folder = Path(tempfile.mkdtemp(prefix="vespid-tls-"))
    folder.chmod(0o755)
    _certificates(folder)
    (folder / "rabbitmq.conf").write_text(
        f"listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{TLS_PORT}\n"
        f"ssl_options.cacertfile = {folder}/ca.pem\nssl_options.certfile = {folder}/server.pem\n"
        f"ssl_options.keyfile = {folder}/server.key\nssl_options.verify = verify_none\n"
        "ssl_options.fail_if_no_peer_cert = false\n")
    (folder / "server.key").chmod(0o644)
    subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(folder)], capture_output=True)
    env = {**os.environ, "RABBITMQ_NODENAME": NODE_NAME, "RABBITMQ_NODE_PORT": str(TCP_PORT),
           "RABBITMQ_DIST_PORT": str(DIST_PORT),
           "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq"),
           "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
           "RABBITMQ_LOG_BASE": str(folder / "log"),
           "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins")}
    subprocess.run(["rabbitmq-server", "-detached"], env=env, capture_output=True, timeout=60)
    deadline = time.monotonic() + 60
    while not _listening(TLS_PORT):
        if time.monotonic() > deadline:
            pytest.skip("the TLS RabbitMQ node did not start within 60 s (see "
                        f"{folder}/log)")
        time.sleep(0.5)
    try:
        yield f"amqps://guest:guest@localhost:{TLS_PORT}/%2F", folder / "ca.pem"
    finally:
        subprocess.run(["rabbitmqctl", "-n", NODE_NAME, "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_task_runs_end_to_end_over_tls(tls_broker: tuple[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url, ca_file = tls_broker
    monkeypatch.setenv("VESPID_TLS_CA_FILE", str(ca_file))
    procs = [coordinator(url, tmp_path / "coord").start()]
    procs.append(node(url, tmp_path / "nodes", "tlsbox").start())
    central = tmp_path / "central"
    procs.append(VespidProcess(["logserver", "--dir", str(central)], tmp_path / "logserver.log",
                               base_env(url), tmp_path).start())
    script = tmp_path / "hello.py"
    script.write_text("from vespid.client import Client, current_task\n"
                      "with Client() as v:\n"
                      "    assert v.info(current_task()).node == 'tlsbox'\n"
                      "print('hello over TLS')\n")
    try:
        procs[0].wait_for_log("coordinator_consuming", timeout=30)
        procs[2].wait_for_log("logserver_started", timeout=30)
        result = cli(url, "submit", str(script), "--wait", "--timeout", "60", "--json")
        name = json.loads(result.stdout)["name"]
        deadline = time.monotonic() + 30
        while not (central / name / "attempt-1.log").exists():
            assert time.monotonic() < deadline, procs[2].log()[-2000:]
            time.sleep(0.1)
        logged = cli(url, "logs", name)  # the reader over amqps, as every client
        monkeypatch.delenv("VESPID_TLS_CA_FILE")
        refused = cli(url, "tasks")
    finally:
        for proc in procs:
            proc.stop()

    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["success"] == "ok"
    assert logged.stdout == "hello over TLS\n", logged.stderr
    assert refused.returncode == 3 and "does not verify" in refused.stderr

