"""Every message the coordinator may receive, in either dialect, through one decoder.

The seed dialect names its messages by `command` (shared/protocol.py), the Golem-style one by
`type` (shared/golem.py); neither module knows the other, this one knows both.
"""

from __future__ import annotations

from typing import Any

from vespid.shared.golem import decode_golem
from vespid.shared.protocol import DEFAULT_MAX_BODY_BYTES, decode_command, parse_body


def decode(body: bytes, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Any:
    """Bytes to a message model; ProtocolError (code and sentence) on anything invalid."""
    data = parse_body(body, max_bytes)
    if data.get("command") is None and "type" in data:
        return decode_golem(data)
    return decode_command(data)
