"""What the models of both dialects share: how a refused field reads.

shared/protocol.py (messages named by `command`) and shared/golem.py (the Golem-style dialect,
named by `type`) both build on this module and never import each other.
"""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation_error(kind: str, exc: ValidationError) -> str:
    """One readable sentence per problem, e.g. `task-create: requirements.memory: ...`."""
    parts = []
    for error in exc.errors(include_url=False)[:5]:
        location = ".".join(str(x) for x in error["loc"] if x != kind)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "is not a field of this command (check the spelling)"
        parts.append(f"{location}: {message}" if location else message)
    more = exc.error_count() - len(parts)
    suffix = f" (and {more} more problems)" if more > 0 else ""
    return f"{kind}: " + "; ".join(parts) + suffix
