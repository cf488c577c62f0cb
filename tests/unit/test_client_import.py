"""A task script that imports the client but never uses it starts like a bare interpreter."""

from __future__ import annotations

import subprocess
import sys


def test_importing_vespid_client_loads_neither_pika_nor_pydantic() -> None:
    probe = ("import sys, vespid.client\n"
             "heavy = sorted(m for m in ('pika', 'pydantic', 'structlog', 'tenacity')"
             " if m in sys.modules)\n"
             "print(','.join(heavy))\n")

    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)

    assert result.stdout.strip() == ""


def test_no_module_of_the_client_library_imports_the_servers() -> None:
    """The servers (log server, dashboard) use the client library, never the other way round:
    a client or a task script never loads their code. (Only `vespid.client.cli`'s parser
    reaches them, lazily, to offer `vespid logserver` and `vespid dashboard`.)"""
    probe = ("import importlib, pkgutil, sys, vespid.client\n"
             "for m in pkgutil.iter_modules(vespid.client.__path__, 'vespid.client.'):\n"
             "    importlib.import_module(m.name)\n"
             "print(','.join(sorted(m for m in sys.modules if m.startswith('vespid.servers'))))\n")

    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)

    assert result.stdout.strip() == ""


def test_current_task_reads_vespid_task_from_the_environment() -> None:
    probe = "from vespid.client import current_task; print(current_task())"

    inside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={"VESPID_TASK": "build_1"}, check=True)
    outside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env={}, check=True)

    assert (inside.stdout.strip(), outside.stdout.strip()) == ("build_1", "None")
