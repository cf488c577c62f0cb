"""Files a task needs and files it produced, on the node side of the broker.

Resources arrive as blob chunks before the task-run and are cached by digest, so a file
sent once serves every later subtask on this node. Results are kept here, by digest, until
the coordinator has them: the task-complete that lists them travels after their chunks.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vespid.shared.blobs import BlobStore
from vespid.shared.protocol import TaskRun

RESULTS_FOLDER = "results"


def place_resources(store: BlobStore, run: TaskRun, cwd: Path) -> None:
    for resource in run.resources:
        target = (cwd / resource["path"]).resolve()
        if cwd.resolve() not in target.parents:
            raise ValueError(f"resource destination {resource['path']!r} leaves the task folder")
        if not store.has(resource["sha256"]):
            raise ValueError(f"resource {resource['path']!r} never arrived on this node")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store.path(resource["sha256"]), target)


def collect_results(store: BlobStore, cwd: Path) -> list[dict[str, Any]]:
    folder = cwd / RESULTS_FOLDER
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        sha, size = store.put_file(path)  # streamed: a result may be bigger than memory
        found.append({"name": str(path.relative_to(folder)), "sha256": sha, "size": size})
    return found
