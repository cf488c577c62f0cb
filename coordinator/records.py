"""Stored records as JSON text: how the store writes them and how they are read back (by
the store at a load, and by a loaded complete task the first time it is asked about)."""

from __future__ import annotations

import json
from typing import Any

from pydantic_core import PydanticSerializationError, from_json, to_json


def dumps(value: Any) -> str:
    """A record as JSON text, as json.dumps writes it (NaN and Infinity as those words), by
    pydantic-core's encoder: 4 times as fast, and every batch writes a record for each task
    and node it changed. What it cannot write (a lone surrogate: a result file whose name
    is not UTF-8) json.dumps writes as an escape."""
    try:
        return to_json(value, inf_nan_mode="constants").decode()
    except PydanticSerializationError:
        return json.dumps(value)


def loads(text: str) -> Any:
    """A stored record, read by pydantic-core's parser (3 times as fast as json.loads; the
    strings it saw before are shared), or by json.loads where only it reads the text (the
    escape of a lone surrogate)."""
    try:
        return from_json(text)
    except ValueError:
        return json.loads(text)
