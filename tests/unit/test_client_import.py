"""A task script that imports the client but never uses it starts like a bare interpreter."""

from __future__ import annotations

import subprocess
import sys


def printed(probe: str, env: dict[str, str] | None = None) -> str:
    """What `probe` prints in a fresh interpreter: nothing this test run imported counts."""
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=env, check=True).stdout.strip()


def test_importing_vespid_client_loads_neither_pika_nor_pydantic() -> None:
    probe = ("import sys, vespid.client\n"
             "heavy = sorted(m for m in ('pika', 'pydantic', 'structlog', 'tenacity')"
             " if m in sys.modules)\n"
             "print(','.join(heavy))\n")

    assert printed(probe) == ""


def test_no_module_of_the_client_library_imports_the_servers_or_the_other_processes() -> None:
    """The servers (log server, dashboard) use the client library, never the other way round,
    and what client and node share lives in vespid.shared: a client or a task script never
    loads the code of another process. (Only `vespid.client.cli`'s parser reaches them,
    lazily, to offer `vespid coordinator`, `node`, `logserver` and `dashboard`.)"""
    probe = ("import importlib, pkgutil, sys, vespid.client\n"
             "for m in pkgutil.iter_modules(vespid.client.__path__, 'vespid.client.'):\n"
             "    importlib.import_module(m.name)\n"
             "others = ('vespid.servers', 'vespid.node_agent', 'vespid.coordinator')\n"
             "print(','.join(sorted(m for m in sys.modules if m.startswith(others))))\n")

    assert printed(probe) == ""


def test_the_coordinator_and_its_check_never_import_the_client_or_the_servers() -> None:
    """`vespid coordinator --check` asks the running coordinator with the broker and the
    shared models alone: the coordinator is a process of its own, not a client."""
    probe = ("import importlib, pkgutil, sys, vespid.coordinator, vespid.coordinator.extensions\n"
             "for package in (vespid.coordinator, vespid.coordinator.extensions):\n"
             "    for m in pkgutil.iter_modules(package.__path__, package.__name__ + '.'):\n"
             "        importlib.import_module(m.name)\n"
             "print(','.join(sorted(m for m in sys.modules\n"
             "                      if m.startswith(('vespid.client', 'vespid.servers')))))\n")

    assert printed(probe) == ""


def test_current_task_reads_vespid_task_from_the_environment() -> None:
    probe = "from vespid.client import current_task; print(current_task())"

    inside, outside = printed(probe, {"VESPID_TASK": "build_1"}), printed(probe, {})

    assert (inside, outside) == ("build_1", "None")
