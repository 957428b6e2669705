"""Typed configuration of ``fedge coordinator serve``, and how it is read from TOML and flags.

The service's configuration is a tree of frozen dataclasses: :class:`ServiceConfig`
with the agent's own :class:`~edge_agent.config.agent.BrokerConfig` and
:class:`~edge_agent.config.agent.TrustConfig` (the coordinator reaches the same broker and
trusts the same keys as the devices), a :class:`TelemetryStorage` and an
:class:`ApiSettings`. Each validates itself when constructed and raises
:class:`~coordinator.errors.ServiceConfigError` with a one-line message naming the
key, so a ``ServiceConfig`` that exists is one the service can run with. Only entry
points read files and the environment (DESIGN.md, "Config as typed values passed to
constructors").

Workflow (what ``fedge coordinator serve`` does, see :mod:`coordinator.cli.service`):

1. :func:`~edge_agent.config.schema.load_config_file` reads the TOML file into a dict
   (the same reader as the agent's: size limit, syntax errors with the line).
2. :func:`~coordinator.service.config_reader.build_service_config` merges it with
   the command-line overrides through the schema (a flag beats the file, the file
   beats the default; unknown keys are refused with a "did you mean" hint), checks
   every type strictly, reads
   ``broker.password_file`` and builds the :class:`ServiceConfig`. The password
   falls back to ``FEDGE_BROKER_PASSWORD``, which the entry point reads and passes in.
3. :func:`coordinator.service.main.run_service` loads the trusted keys, opens the
   store, starts the broker connection (or the embedded broker) and serves the API;
   :meth:`ServiceConfig.settings` and :meth:`ServiceConfig.api_config` give the
   service and the API their settings.

Reading the sources is :mod:`coordinator.service.config_reader`'s job.
``fedge coordinator token`` needs only the database:
:func:`~coordinator.service.config_reader.store_location` reads
``db`` and ``artifact_dir`` from the same sources without asking for the rest.

Every key of the file is declared once, in
:data:`~coordinator.service.config_schema.SERVICE_SCHEMA` (name, default, help, flag),
and read with the agent's schema machinery (:mod:`edge_agent.config.schema`). The
commented example file ``coordinator.example.toml`` (what ``fedge coordinator init``
writes, see :func:`~coordinator.service.config_reader.example_service_config`) is
generated from it. Only ``db``, a broker (``[broker]`` ``url``, or
``embedded = true`` with ``dev = true``) and at least one ``[trust]`` ``keys``
entry are required. The example names a broker URL: the embedded broker is
anonymous and has no ACL, so the service refuses it unless ``--dev``
(``dev = true``) says this is a trial on one machine.

Rules worth knowing:

* Relative paths in the file are relative to the file's own directory; relative
  paths given as flags are relative to the current working directory. Both end up
  absolute.
* A broker given as a flag (``--broker`` or ``--embedded-broker``) replaces the
  file's choice of broker, so ``--embedded-broker`` works with a file that names a
  URL. ``--trust`` replaces the file's key list; it does not extend it.
* The API binds to loopback by default. Any other address makes it reachable from
  the network; the service then logs a warning, and the API belongs behind a
  TLS-terminating reverse proxy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.delivery.fleet_statement import StatementSettings
from coordinator.errors import ServiceConfigError
from coordinator.link.hub import SESSION_NAME_RE, HubConfig
from coordinator.service.api.app import MIB, ApiConfig
from coordinator.service.api.auth_limits import AuthLimits
from coordinator.service.config_schema import (
    DEFAULT_BIND_HOST,
    DEFAULT_BIND_PORT,
    DEFAULT_EMBEDDED_BROKER_PORT,
    PASSWORD_ENV,
    SERVICE_SCHEMA,
)
from coordinator.service.enrollment import EnrollmentSettings
from coordinator.service.fleet_config import FleetConfig
from coordinator.service.service_settings import ServiceSettings
from edge_agent.config.agent import LOG_LEVELS, BrokerConfig, TrustConfig
from edge_agent.config.values import (
    FieldError,
    kind_of,
    want_int,
    want_seconds,
    want_str,
)
from edge_agent.errors import ConfigError
from edge_agent.protocol import COORDINATOR_SENDER
from edge_agent.serving.http_api import is_loopback
from edge_agent.transport.address import parse_bind

__all__ = [
    "DEFAULT_BIND_HOST",
    "DEFAULT_BIND_PORT",
    "DEFAULT_EMBEDDED_BROKER_PORT",
    "KNOWN_KEYS",
    "PASSWORD_ENV",
    "ApiSettings",
    "ServiceConfig",
    "TelemetryStorage",
    "as_service_error",
]

_default = SERVICE_SCHEMA.default  # a field's default is its key's, declared once

MAX_BODY_MIB = 1024
"""Largest ``api.max_body_mib`` accepted."""

MAX_ARTIFACT_MIB = 16 * 1024
"""Largest ``api.max_artifact_mib`` accepted (an upload is held in memory)."""

MAX_BUDGET_MIB = 64 * 1024
"""Largest ``runs.upload_budget_mib`` accepted."""

NO_TRUSTED_KEYS = (
    "no trusted keys: the coordinator stores only artifacts signed by keys it trusts; "
    'pass --trust KEY.pub (repeatable) or set keys = ["keys/signing.pub"] under [trust]'
)

NO_BROKER = (
    "no broker: pass --broker mqtt://HOST:PORT or --embedded-broker, or set url "
    "(or embedded = true) under [broker]"
)

EMBEDDED_NEEDS_DEV = (
    "the embedded broker accepts any client without a password and has no ACL "
    "(any process on this machine could act as a device or as the coordinator): "
    "configure a broker with credentials (--broker mqtts://HOST --password-file FILE, "
    "or url and password_file under [broker]), or pass --dev (dev = true) to try "
    "fedge on this machine"
)

TWO_BROKERS = (
    "both a broker URL and the embedded broker are set: choose one (--broker or "
    "--embedded-broker; url or embedded = true under [broker])"
)

KNOWN_KEYS: tuple[str, ...] = tuple(SERVICE_SCHEMA.keys)
"""Every key of the file as ``section.key`` (top-level keys without a section)."""


@contextmanager
def as_service_error() -> Iterator[None]:
    """Raise the agent config's errors (shared checks and classes) as ServiceConfigError."""
    try:
        yield
    except ConfigError as exc:
        key = exc.key if isinstance(exc, FieldError) else None
        raise ServiceConfigError(str(exc), key=key) from None


def _want_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ServiceConfigError(f"{key} must be true or false, got {kind_of(value)}", key=key)
    return value


def _want_limit(key: str, value: object) -> float:
    """A finite number >= 0 (0: no limit); an integer is fine, a boolean is not."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        shown = value if isinstance(value, int | float) else kind_of(value)
        raise ServiceConfigError(f"{key} must be a number >= 0 (0: no limit), got {shown}", key=key)
    return float(value)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class TelemetryStorage:
    """How device telemetry is written to the database and how long it is kept.

    Attributes:
        flush_s: Seconds between batched writes (> 0).
        retention_rows: Most rows kept, the oldest going first; 0 for no limit.
        retention_days: Days rows are kept; 0 for no limit.
        drift_windows: Windows of each device pooled into its drift score (>= 1).

    Raises:
        ServiceConfigError: a wrong type or a value out of range.
    """

    flush_s: float = _default("telemetry.flush_s")
    retention_rows: int = _default("telemetry.retention_rows")
    retention_days: float = _default("telemetry.retention_days")
    drift_windows: int = _default("telemetry.drift_windows")

    def __post_init__(self) -> None:
        with as_service_error():
            flush_s = want_seconds("telemetry.flush_s", self.flush_s)
            want_int("telemetry.retention_rows", self.retention_rows, low=0)
            want_int("telemetry.drift_windows", self.drift_windows, low=1)
        object.__setattr__(self, "flush_s", flush_s)
        days = _want_limit("telemetry.retention_days", self.retention_days)
        object.__setattr__(self, "retention_days", days)


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """Limits and switches of the HTTP API.

    Attributes:
        max_body_mib: Largest JSON request body, MiB (1 to :data:`MAX_BODY_MIB`).
        max_artifact_mib: Largest artifact upload, MiB (1 to :data:`MAX_ARTIFACT_MIB`).
        docs: Serve ``/docs``, ``/redoc`` and ``/openapi.json`` (without a token).
        access_log: Log every request at INFO (uvicorn's access log).
        auth_max_failures: Failed authentications per address within
            ``auth_window_s`` that start a cool-down (>= 1).
        auth_window_s: Seconds over which they are counted (> 0).
        auth_lockout_s: Seconds of the cool-down (> 0).

    Raises:
        ServiceConfigError: a wrong type or a value out of range.
    """

    max_body_mib: int = _default("api.max_body_mib")
    max_artifact_mib: int = _default("api.max_artifact_mib")
    docs: bool = _default("api.docs")
    access_log: bool = _default("api.access_log")
    auth_max_failures: int = _default("api.auth_max_failures")
    auth_window_s: float = _default("api.auth_window_s")
    auth_lockout_s: float = _default("api.auth_lockout_s")

    def __post_init__(self) -> None:
        with as_service_error():
            want_int("api.max_body_mib", self.max_body_mib, low=1, high=MAX_BODY_MIB)
            want_int("api.max_artifact_mib", self.max_artifact_mib, low=1, high=MAX_ARTIFACT_MIB)
            want_int("api.auth_max_failures", self.auth_max_failures, low=1)
            window = want_seconds("api.auth_window_s", self.auth_window_s)
            lockout = want_seconds("api.auth_lockout_s", self.auth_lockout_s)
        object.__setattr__(self, "auth_window_s", window)
        object.__setattr__(self, "auth_lockout_s", lockout)
        _want_bool("api.docs", self.docs)
        _want_bool("api.access_log", self.access_log)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Everything ``fedge coordinator serve`` needs, validated.

    Attributes:
        db: The SQLite database file (created on first start).
        trust: The keys uploads must be signed by; at least one.
        broker: The fleet's MQTT broker; its username defaults to ``coordinator``.
            None with ``embedded_broker``.
        embedded_broker: Run an MQTT broker (amqtt) inside the service instead, on
            ``127.0.0.1:embedded_broker_port``, without authentication.
        embedded_broker_port: The embedded broker's port, 1-65535.
        artifact_dir: Where uploaded artifact files are kept; None for
            ``artifacts/`` next to the database.
        bind_host: Address the API listens on (an IPv6 address without brackets).
        bind_port: The API's port, 1-65535.
        telemetry: How telemetry is stored and kept.
        api: The API's limits and switches.
        rollout_tick_s: Seconds between rollout engine ticks (> 0).
        rollout_min_failed_devices: Fewest failed devices that halt a stage, for
            rollouts that set none (>= 1).
        upload_budget_mib: Most MiB of uploads in flight per device during a run;
            0 for four times the largest update.
        upload_dir: Where uploads are spooled on disk during a run; None for
            ``uploads/`` next to the database.
        log_level: One of :data:`~edge_agent.config.agent.LOG_LEVELS` (lowercased).
        dev: Development mode: the embedded broker is refused without it.
        fleet: The fleet statement to keep (``[fleet]``), or None.
        broker_session: The MQTT client id of the service's persistent session
            with ``broker`` (see :class:`~coordinator.link.hub.HubConfig`);
            ``""`` for a clean session. Not used with the embedded broker, which
            stops with the service.
        enrollment: Enrolling devices with tokens (``[enrollment]``; off until set).

    Raises:
        ServiceConfigError: an invalid field, no trusted keys, not exactly one of
            ``broker`` and ``embedded_broker``, or the embedded broker without
            ``dev`` (the message says how to fix it).
    """

    db: Path
    trust: TrustConfig
    broker: BrokerConfig | None = None
    embedded_broker: bool = _default("broker.embedded")
    embedded_broker_port: int = _default("broker.embedded_port")
    artifact_dir: Path | None = None
    bind_host: str = DEFAULT_BIND_HOST
    bind_port: int = DEFAULT_BIND_PORT
    telemetry: TelemetryStorage = field(default_factory=TelemetryStorage)
    api: ApiSettings = field(default_factory=ApiSettings)
    rollout_tick_s: float = _default("rollouts.tick_s")
    rollout_min_failed_devices: int = _default("rollouts.min_failed_devices")
    upload_budget_mib: int = _default("runs.upload_budget_mib")
    upload_dir: Path | None = None
    log_level: str = _default("log_level")
    broker_session: str = _default("broker.session")
    dev: bool = _default("dev")
    fleet: FleetConfig | None = None
    enrollment: EnrollmentSettings = field(default_factory=EnrollmentSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.db, Path):
            raise ServiceConfigError(f"db must be a Path, got {kind_of(self.db)}", key="db")
        if self.artifact_dir is not None and not isinstance(self.artifact_dir, Path):
            raise ServiceConfigError(
                f"artifact_dir must be a Path, got {kind_of(self.artifact_dir)}", key="artifact_dir"
            )
        if self.upload_dir is not None and not isinstance(self.upload_dir, Path):
            raise ServiceConfigError(
                f"runs.upload_dir must be a Path, got {kind_of(self.upload_dir)}",
                key="runs.upload_dir",
            )
        for key, value, kind in (
            ("trust", self.trust, TrustConfig),
            ("telemetry", self.telemetry, TelemetryStorage),
            ("api", self.api, ApiSettings),
        ):
            if not isinstance(value, kind):
                raise ServiceConfigError(f"{key} must be a {kind.__name__}", key=key)
        if not self.trust.keys:
            raise ServiceConfigError(NO_TRUSTED_KEYS, key="trust.keys")
        self._check_broker()
        with as_service_error():
            want_int("bind", self.bind_port, low=1, high=65535)
            want_str("bind", self.bind_host)
            tick = want_seconds("rollouts.tick_s", self.rollout_tick_s)
            want_int("rollouts.min_failed_devices", self.rollout_min_failed_devices, low=1)
            want_int("runs.upload_budget_mib", self.upload_budget_mib, low=0, high=MAX_BUDGET_MIB)
            level = want_str("log_level", self.log_level).lower()
        try:
            parse_bind(self.bind)  # the host's form (a bracketed one is refused here)
        except ConfigError as exc:
            raise ServiceConfigError(f"bind: {exc}", key="bind") from None
        object.__setattr__(self, "rollout_tick_s", tick)
        if level not in LOG_LEVELS:
            raise ServiceConfigError(
                f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level[:40]!r}",
                key="log_level",
            )
        object.__setattr__(self, "log_level", level)
        session = self.broker_session
        if not isinstance(session, str):
            raise ServiceConfigError(
                f"broker.session must be a string, got {kind_of(session)}", key="broker.session"
            )
        if session and SESSION_NAME_RE.fullmatch(session) is None:
            raise ServiceConfigError(
                "broker.session must be 1-64 letters, digits, '.', '_' or '-' "
                f'(or "" for a clean session), got {session[:40]!r}',
                key="broker.session",
            )

    def coordinator_config(self, broker: BrokerConfig) -> HubConfig:
        """How the service's coordinator connects to ``broker`` (the one it runs on)."""
        persistent = self.broker is not None and self.broker_session
        return HubConfig(broker=broker, session=self.broker_session if persistent else None)

    def _check_broker(self) -> None:
        """Exactly one of ``broker`` and ``embedded_broker``; the username defaulted."""
        embedded = _want_bool("broker.embedded", self.embedded_broker)
        with as_service_error():
            want_int("broker.embedded_port", self.embedded_broker_port, low=1, high=65535)
        dev = _want_bool("dev", self.dev)
        if self.broker is None:
            if not embedded:
                raise ServiceConfigError(NO_BROKER)
            if not dev:
                raise ServiceConfigError(EMBEDDED_NEEDS_DEV, key="broker.embedded")
            return
        if not isinstance(self.broker, BrokerConfig):
            raise ServiceConfigError("broker must be a BrokerConfig or None", key="broker")
        if embedded:
            raise ServiceConfigError(TWO_BROKERS, key="broker.embedded")
        if self.broker.username is None:
            broker = dataclasses.replace(self.broker, username=COORDINATOR_SENDER)
            object.__setattr__(self, "broker", broker)

    @property
    def bind(self) -> str:
        """``HOST:PORT`` of the API (``[v6]:PORT`` for an IPv6 address)."""
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        return f"{host}:{self.bind_port}"

    @property
    def api_url(self) -> str:
        """``http://HOST:PORT``, the API's base URL as bound."""
        return f"http://{self.bind}"

    @property
    def bind_is_loopback(self) -> bool:
        """Whether only this machine can reach the API (``localhost`` or a loopback IP)."""
        return is_loopback(self.bind_host)

    @property
    def broker_url(self) -> str:
        """The broker the service connects to, for logs (never with credentials)."""
        if self.broker is not None:
            return self.broker.url
        return f"mqtt://127.0.0.1:{self.embedded_broker_port}"

    def settings(self, fleet: StatementSettings | None = None) -> ServiceSettings:
        """The :class:`~coordinator.service.fleet_service.FleetService` settings this
        implies, with ``fleet`` (:meth:`FleetConfig.load` of :attr:`fleet`)."""
        days = self.telemetry.retention_days
        return ServiceSettings(
            telemetry_flush_s=self.telemetry.flush_s,
            telemetry_max_rows=self.telemetry.retention_rows or None,
            telemetry_max_age_s=days * 86400.0 if days else None,
            drift_windows=self.telemetry.drift_windows,
            rollout_tick_s=self.rollout_tick_s,
            rollout_min_failed_devices=self.rollout_min_failed_devices,
            upload_budget_bytes=self.upload_budget_mib * MIB or None,
            upload_dir=self.upload_dir or self.db.parent / "uploads",
            fleet=fleet,
        )

    def api_config(self) -> ApiConfig:
        """The :class:`~coordinator.service.api.app.ApiConfig` this implies."""
        return ApiConfig(
            max_body_bytes=self.api.max_body_mib * MIB,
            max_artifact_bytes=self.api.max_artifact_mib * MIB,
            docs=self.api.docs,
            auth_limits=AuthLimits(
                max_failures=self.api.auth_max_failures,
                window_s=self.api.auth_window_s,
                lockout_s=self.api.auth_lockout_s,
            ),
        )
