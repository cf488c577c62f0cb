"""Removing what finished tasks leave on a node: scratch folder, script copy, local logs.

A task's files stay while any attempt of it runs or still streams its log. After that they
stay `retain_after_shipped` seconds once the log reached the log server's queue; on a farm
with no log server the local log is the only copy, so an attempt that ended ok is kept
`retain_unshipped_ok` seconds (default: removed at once) and any other
`retain_unshipped_failed` seconds (default: a week), for someone to read.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Protocol

from vespid.node_agent.logstream import read_record


class RetentionSettings(Protocol):
    @property
    def work_dir(self) -> Path: ...
    @property
    def log_dir(self) -> Path: ...
    @property
    def retain_after_shipped(self) -> float: ...
    @property
    def retain_unshipped_ok(self) -> float: ...
    @property
    def retain_unshipped_failed(self) -> float: ...


def clean(settings: RetentionSettings, active: set[tuple[str, int]], now: float,
          only: str | None = None) -> list[str]:
    """Remove the files of every finished task (or of task `only`) whose time is up;
    returns their names."""
    if not settings.log_dir.is_dir():
        return []
    busy = {task for task, _attempt in active}
    removed = []
    folders = [settings.log_dir / only] if only is not None else settings.log_dir.iterdir()
    for task_dir in sorted(p for p in folders if p.is_dir()):
        logs = sorted(task_dir.glob("attempt-*.log"))
        if task_dir.name in busy or not logs:
            continue
        if all(_due(log, settings, now) for log in logs):
            _remove(settings.work_dir, task_dir)
            removed.append(task_dir.name)
    return removed


def _due(log: Path, settings: RetentionSettings, now: float) -> bool:
    record: dict[str, Any] = read_record(log)
    if record.get("shipped"):
        return now >= float(record["shipped"]) + settings.retain_after_shipped
    if record.get("logserver") is False:  # streamed to nobody: this file is the only copy
        ended = float(record.get("ended") or log.stat().st_mtime)
        keep = settings.retain_unshipped_ok if record.get("success") == "ok" \
            else settings.retain_unshipped_failed
        return now >= ended + keep
    return False  # not yet shipped: the log server still needs it


def _remove(work_dir: Path, task_dir: Path) -> None:
    task = task_dir.name
    shutil.rmtree(work_dir / "scratch" / task, ignore_errors=True)
    (work_dir / "scripts" / f"{task}.py").unlink(missing_ok=True)
    shutil.rmtree(task_dir, ignore_errors=True)
