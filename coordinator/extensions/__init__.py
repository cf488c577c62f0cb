"""The coordinator's extensions: each one concern beside the scheduler (see extension.py)."""

from __future__ import annotations

from vespid.coordinator.extension import Extension
from vespid.coordinator.settings import CoordinatorSettings


def default_extensions(settings: CoordinatorSettings) -> list[Extension]:
    """What every coordinator runs: file transfer, the Golem-style dialect over it, and the
    read-only views of time (timeline).
    Metrics are added by the service when a metrics port is set."""
    from vespid.coordinator.extensions.files import Files
    from vespid.coordinator.extensions.golem import Golem
    from vespid.coordinator.extensions.timeline import Timeline

    files = Files(settings)
    return [files, Golem(settings, files.store), Timeline(settings)]
