"""What a process does while it starts, before it serves: imports and set-up."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Imports make a few hundred thousand objects that live as long as the process (modules,
    classes, pydantic's validators) and hardly any garbage, yet the cyclic collector walked
    them again and again while they were made (130 collections before the coordinator
    answered anything: 4% of its instructions, more of its time, as the walks miss the
    cache). So it waits, and what was made is then frozen out of its sight (as the
    coordinator's loaded state is), so no later collection walks it either.

    What became garbage inside the block and is cyclic (the CLI's parser, 2,200 objects,
    about 0.7 MB) is frozen with the rest and kept for the process's life: a fixed amount,
    where collecting it first would cost every start 25-30 ms."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.freeze()
