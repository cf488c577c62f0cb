"""What every process's settings model shares: AMQP URL and TLS files, logging, loading.

Each process has one frozen settings model, built from (highest first) command-line values,
`VESPID_*` environment variables, a TOML file, then defaults; it prints itself, secrets
redacted, at start.
"""

from __future__ import annotations

import contextvars
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from vespid.shared.errors import ConfigError
from vespid.shared.transport import DEFAULT_URL, broker_addresses, redact

_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "vespid_config_file", default=None
)
S = TypeVar("S", bound="ProcessSettings")


class ProcessSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VESPID_", frozen=True, extra="forbid")

    # One broker, or several nodes of one cluster separated by commas.
    amqp_url: str = DEFAULT_URL
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_file.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @classmethod
    def load(cls: type[S], config_file: Path | None = None, **overrides: Any) -> S:
        """Build the settings or raise ConfigError with a sentence that says what to fix."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if config_file is not None:
            _check_toml(config_file)
        token = _config_file.set(config_file)
        try:
            return cls(**given)
        except ValidationError as exc:
            where = f" in {config_file}" if config_file else ""
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"invalid settings{where}: {problems}") from None
        finally:
            _config_file.reset(token)

    def broker_parameters(self, name: str, heartbeat: int = 30) -> list[Any]:
        """One set of connection parameters per broker address (a cluster's nodes)."""
        return broker_addresses(
            self.amqp_url, name=name, heartbeat=heartbeat, ca_file=self.tls_ca_file,
            cert_file=self.tls_cert_file, key_file=self.tls_key_file,
        )

    def redacted(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["amqp_url"] = redact(self.amqp_url)
        return data

    @property
    def json_logs(self) -> bool | None:
        return {"auto": None, "json": True, "console": False}[self.log_format]


def _check_toml(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


class ClientSettings(ProcessSettings):
    """The settings of everything that talks to the farm as a client (the library, the CLI,
    the log server and the dashboard): the same sources and TLS files as every process."""


def client_settings(amqp_url: str | None = None) -> ClientSettings:
    return ClientSettings.load(amqp_url=amqp_url)
