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


def test_current_task_reads_vespid_task_from_the_environment() -> None:
    probe = "from vespid.client import current_task; print(current_task())"

    inside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={"VESPID_TASK": "build_1"}, check=True)
    outside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env={}, check=True)

    assert (inside.stdout.strip(), outside.stdout.strip()) == ("build_1", "None")
