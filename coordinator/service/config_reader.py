"""Reading ``fedge coordinator serve``'s configuration from a TOML file and flags.

The values are the typed dataclasses of :mod:`coordinator.service.config` (the rules
they check, and the workflow, are in its docstring). This module merges the sources
and builds them:

1. :func:`build_service_config` merges the file's values with the command-line
   overrides through :data:`~coordinator.service.config_schema.SERVICE_SCHEMA` (a
   flag beats the file, the file beats the default; unknown keys are refused with a
   hint), splits ``bind``, builds the broker (reading ``broker.password_file``, else
   the password the entry point passes from ``FEDGE_BROKER_PASSWORD``), the fleet and
   the enrollment settings, and the :class:`~coordinator.service.config.ServiceConfig`;
   every error is one line starting with the file or flag the value came from.
2. :func:`store_location` reads only ``db`` and ``artifact_dir``
   (``fedge coordinator token``).
3. :func:`example_service_config` is the commented example file, generated from the
   schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordinator.errors import ServiceConfigError
from coordinator.service.config import (
    ApiSettings,
    ServiceConfig,
    TelemetryStorage,
    as_service_error,
)
from coordinator.service.config_schema import SERVICE_SCHEMA
from coordinator.service.enrollment import EnrollmentSettings
from coordinator.service.fleet_config import FleetConfig, fleet_config
from edge_agent.config.agent import BrokerConfig, TrustConfig, parse_broker_url
from edge_agent.config.schema import Sources
from edge_agent.config.values import read_password, want_str
from edge_agent.errors import ConfigError
from edge_agent.transport.address import parse_bind

__all__ = ["build_service_config", "example_service_config", "store_location"]


def _merge(
    file_values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    base_dir: Path,
    file_label: str | None,
    override_labels: Mapping[str, str] | None,
) -> Sources:
    """The file's and the overrides' values checked against the schema and merged.

    Raises:
        ServiceConfigError: an unknown key (with a hint), a table that is not one, or
            a path that is not a non-empty string; the message starts with the file
            or the flag.
    """
    with as_service_error():
        return SERVICE_SCHEMA.merge(
            file_values,
            overrides,
            base_dir=base_dir,
            file_label=file_label,
            override_labels=override_labels,
        )


def _require(sources: Sources, key: str) -> Any:
    """The value of a required key (see :meth:`~edge_agent.config.schema.Sources.require`).

    Raises:
        ServiceConfigError: no source gave it; the message says how to.
    """
    with as_service_error():
        return sources.require(key)


def _bind(value: object) -> tuple[str, int]:
    """``HOST:PORT`` split.

    Raises:
        ServiceConfigError: not a string of that form.
    """
    try:
        return parse_bind(want_str("bind", value))
    except ConfigError as exc:
        raise ServiceConfigError(str(exc), key="bind") from None


def _broker(sources: Sources, password: str | None) -> BrokerConfig | None:
    """The broker to connect to, or None when no URL is given.

    Raises:
        ServiceConfigError: a bad URL, credential or TLS file setting, or an
            unreadable password file.
    """
    url = sources.get("broker.url")
    if url is None:
        return None
    try:
        host, port, tls = parse_broker_url(url)
    except ConfigError as exc:
        raise ServiceConfigError(str(exc), key="broker.url") from None
    if "broker.password_file" in sources:
        try:  # its message names broker.password_file and the file
            password = read_password(sources.get("broker.password_file"), "")
        except ConfigError as exc:
            raise ServiceConfigError(str(exc), key="broker.password_file") from None
    with as_service_error():
        return BrokerConfig(
            host,
            port,
            tls,
            username=sources.get("broker.username"),
            password=password,
            ca_file=sources.get("broker.ca_file"),
            cert_file=sources.get("broker.cert_file"),
            key_file=sources.get("broker.key_file"),
        )


def _enrollment(values: dict[str, Any], fleet: FleetConfig | None) -> EnrollmentSettings:
    """The ``[enrollment]`` table; its ``fleet`` defaults to ``[fleet] id``.

    Raises:
        ServiceConfigError: both are set and differ.
    """
    values = dict(values)
    if fleet is not None:
        given = values.get("fleet")
        if given is None:
            values["fleet"] = fleet.fleet
        elif given != fleet.fleet:
            raise ServiceConfigError(
                f"enrollment.fleet {given!r} differs from fleet.id {fleet.fleet!r}: devices "
                "enrolled into one fleet would refuse the statements of the other",
                key="enrollment.fleet",
            )
    return EnrollmentSettings(**values)


def build_service_config(
    file_values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    base_dir: Path,
    file_label: str | None = None,
    override_labels: Mapping[str, str] | None = None,
    password: str | None = None,
) -> ServiceConfig:
    """Merge a config file's values with overrides and build the :class:`ServiceConfig`.

    Both mappings have the file's layout (top-level keys and ``broker`` / ``trust`` /
    ``telemetry`` / ``api`` / ``rollouts`` tables). An override beats the file, the
    file beats the default; an override of ``broker.url`` or ``broker.embedded``
    replaces the file's choice of broker. Relative paths in ``file_values`` are
    resolved against ``base_dir``, those in ``overrides`` against the current working
    directory. Every value must have its TOML type exactly (a boolean is not an
    integer; an integer is fine where seconds are expected).
    ``broker.password_file`` is read here.

    Args:
        file_values: The config file's contents
            (:func:`~edge_agent.config.schema.load_config_file`), or ``{}``.
        overrides: Values from the command line.
        base_dir: Directory that relative paths in ``file_values`` are relative to.
        file_label: How to name the file in messages (its path); None without a file.
        override_labels: How to name each override in messages, by dotted key
            (``{"broker.url": "--broker"}``); unnamed ones are called "override".
        password: The broker password when no ``broker.password_file`` is given
            (the entry point reads :data:`PASSWORD_ENV`).

    Returns:
        The validated configuration (key and TLS files are not read yet).

    Raises:
        ServiceConfigError: an unknown key (with a "did you mean" hint), a missing
            ``db``, no broker or two, no trusted key, a value of the wrong type or out
            of range, or an unreadable password file. The message is one line that
            starts with the file or the flag the value came from.
    """
    sources = _merge(file_values, overrides, base_dir, file_label, override_labels)
    db = _require(sources, "db")
    try:
        bind_host, bind_port = _bind(sources.get("bind"))
        broker = _broker(sources, password)
        with as_service_error():
            fleet = fleet_config(sources.section("fleet"), db=db)
            return ServiceConfig(
                db=db,
                trust=TrustConfig(**sources.section("trust")),
                broker=broker,
                embedded_broker=sources.get("broker.embedded"),
                embedded_broker_port=sources.get("broker.embedded_port"),
                artifact_dir=sources.get("artifact_dir"),
                bind_host=bind_host,
                bind_port=bind_port,
                telemetry=TelemetryStorage(**sources.section("telemetry")),
                api=ApiSettings(**sources.section("api")),
                rollout_tick_s=sources.get("rollouts.tick_s"),
                rollout_min_failed_devices=sources.get("rollouts.min_failed_devices"),
                upload_budget_mib=sources.get("runs.upload_budget_mib"),
                upload_dir=sources.get("runs.upload_dir"),
                log_level=sources.get("log_level"),
                broker_session=sources.get("broker.session"),
                dev=sources.get("dev"),
                fleet=fleet,
                enrollment=_enrollment(sources.section("enrollment"), fleet),
            )
    except ServiceConfigError as exc:
        raise ServiceConfigError(f"{sources.where(exc.key)}{exc}", key=exc.key) from None


def store_location(
    file_values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    base_dir: Path,
    file_label: str | None = None,
    override_labels: Mapping[str, str] | None = None,
) -> tuple[Path, Path | None]:
    """Just the database and the artifact directory, for ``fedge coordinator token``.

    The sources are read as by :func:`build_service_config` (unknown keys are
    refused, relative paths resolved the same way), but nothing else is required:
    tokens can be made before the broker and the keys are set up.

    Returns:
        ``(db, artifact_dir)``; ``artifact_dir`` is None for the default.

    Raises:
        ServiceConfigError: an unknown key, a bad path, or no ``db``.
    """
    sources = _merge(file_values, overrides, base_dir, file_label, override_labels)
    db: Path = _require(sources, "db")
    artifact_dir: Path | None = sources.get("artifact_dir")
    return db, artifact_dir


def example_service_config() -> str:
    """The commented example config that ``fedge coordinator init`` writes (package data).

    Generated from :data:`~coordinator.service.config_schema.SERVICE_SCHEMA`: every
    key, what it does and its default; it parses to a valid :class:`ServiceConfig`.
    """
    return SERVICE_SCHEMA.example_text()
