"""The Celery side of `bench.vs_celery`: one app, one no-op task, no result backend.

The worker is started as `celery -A bench.celery_app worker …` with its broker URL in
VESPID_BENCH_CELERY_URL. Without a result backend nothing tells the benchmark that a task
ran, so the task body does the least that can: it counts. Each worker process keeps, in a
16-byte file of its own under VESPID_BENCH_CELERY_COUNTS, the number of tasks it executed
and the monotonic time of the latest (a write into shared memory, no system call). The
benchmark adds the files up; CLOCK_MONOTONIC is system-wide, so the stamps compare with
its own.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from pathlib import Path

from celery import Celery

URL_ENV = "VESPID_BENCH_CELERY_URL"
COUNTS_ENV = "VESPID_BENCH_CELERY_COUNTS"
QUEUE = "bench.celery.noop"
NOOP = "bench.noop"
SLOT = struct.Struct("<qd")  # tasks executed, monotonic time of the latest



class _Counter:
    """Executions in this process, mirrored into its own mmap'd slot file."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the threads pool runs tasks concurrently
        self.pid = -1
        self.count = 0
        self.slot: mmap.mmap | None = None

    def _open(self) -> mmap.mmap | None:
        folder = os.environ.get(COUNTS_ENV)
        self.pid, self.count = os.getpid(), 0  # a forked child starts its own slot
        if not folder:
            return None
        path = Path(folder) / f"{self.pid}.slot"
        path.write_bytes(bytes(SLOT.size))
        with path.open("r+b") as handle:
            return mmap.mmap(handle.fileno(), SLOT.size)

    def tick(self) -> None:
        with self.lock:
            if self.pid != os.getpid():
                self.slot = self._open()
            self.count += 1
            if self.slot is not None:
                SLOT.pack_into(self.slot, 0, self.count, time.monotonic())


_counter = _Counter()


def noop() -> None:
    """The task: nothing but the count."""
    _counter.tick()


def make_app(url: str) -> Celery:
    """An app on that broker with the no-op task, no result backend, the default classic
    durable queue `QUEUE` (what a Celery user gets without configuring queues)."""
    celery = Celery("bench_celery", broker=url, set_as_current=False)
    celery.conf.update(
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    celery.task(name=NOOP)(noop)
    return celery


app = make_app(os.environ.get(URL_ENV, "amqp://guest:guest@localhost//"))


def read_counts(folder: Path) -> tuple[int, float | None]:
    """(tasks executed by all worker processes, monotonic time of the latest execution)."""
    total, latest = 0, None
    for path in folder.glob("*.slot"):
        try:
            count, stamp = SLOT.unpack(path.read_bytes()[: SLOT.size])
        except (OSError, struct.error):
            continue
        total += count
        if count and (latest is None or stamp > latest):
            latest = stamp
    return total, latest
