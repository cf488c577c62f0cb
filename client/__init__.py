"""The Vespid client library.

    from vespid.client import Client, current_task

    with Client() as vespid:
        task = vespid.create_task("build", script="print('hello')", requirements={"cores": 2})
        print(task.wait().success)

Importing this package is cheap: pika and pydantic load only when a client is first used, so
a task script that never talks to the coordinator starts as fast as a bare interpreter.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vespid.client.api import Client, TaskHandle, TaskState

__all__ = ["Client", "TaskHandle", "TaskState", "current_task"]


def current_task() -> str | None:
    """The name of the task this process runs as (VESPID_TASK), or None outside a task."""
    return os.environ.get("VESPID_TASK") or None


def __getattr__(name: str) -> Any:
    if name in ("Client", "TaskHandle", "TaskState"):
        from vespid.client import api

        return getattr(api, name)
    raise AttributeError(f"module 'vespid.client' has no attribute {name!r}")
