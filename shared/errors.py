"""The one error hierarchy of Vespid.

Every error a caller can act on derives from `VespidError`. pika's exceptions never leave
the transport module: they are translated into `BrokerError` subclasses there.
"""

from __future__ import annotations


class VespidError(Exception):
    """Root of every error Vespid raises on purpose."""


class ConfigError(VespidError):
    """A settings file or value is wrong; the message says which and how to fix it."""


class BrokerError(VespidError):
    """Something went wrong talking to RabbitMQ."""


class BrokerUnavailable(BrokerError):
    """No broker answers at the configured URL."""


class BrokerRefused(BrokerUnavailable):
    """The broker cannot be used as configured (a certificate that does not verify):
    retrying cannot help, so even long-running processes stop."""


class PublishFailed(BrokerError):
    """The broker refused (nacked) or could not route a message we required to be stored."""


class StoreError(VespidError):
    """The coordinator's state store failed; the batch in hand was not committed."""


class StoreUnavailable(StoreError):
    """The state store cannot be reached (PostgreSQL down or cut off)."""


class Superseded(StoreError):
    """Another coordinator took over this state (a newer epoch): this one must stop at once,
    and nothing it decides from now on may reach anybody."""


class ProtocolError(VespidError):
    """A message does not follow the wire contract.

    `code` is the machine-readable error code of the contract's `error` reply; the message is
    a sentence a person can act on.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RemoteError(VespidError):
    """The coordinator answered a request with an `error` reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class RequestTimeout(VespidError):
    """The coordinator did not answer in time (is it running?)."""


class NobodyAnswers(RequestTimeout):
    """Nothing consumes the queue whose consumer would answer: found before waiting."""


class NoCoordinator(NobodyAnswers):
    """Nothing consumes the coordinator's queue on this vhost: no request can be answered."""


class TaskNotFound(VespidError):
    """The coordinator knows no task of that name."""


class WaitTimeout(VespidError):
    """A task did not complete within the time the caller was willing to wait."""


class GolemTaskFailed(VespidError):
    """A Golem-style task ended without results: failed, timed out or aborted."""

    def __init__(self, task_id: str, kind: str, reason: str | None) -> None:
        super().__init__(f"task {task_id}: {kind}" + (f": {reason}" if reason else ""))
        self.task_id, self.kind, self.reason = task_id, kind, reason


class GolemTaskTimedOut(GolemTaskFailed):
    """The task's timeout passed before every part had an accepted result."""


class GolemTaskAborted(GolemTaskFailed):
    """The requester aborted the task."""


class ForkServerUnavailable(VespidError):
    """The node agent's fork server cannot start a task (gone, stuck, or the request did not
    fit its channel): the agent spawns the task instead."""
