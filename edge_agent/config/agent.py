"""Typed configuration of ``fedge-agent run``, and how it is read from TOML and flags.

The agent's configuration is a tree of frozen dataclasses (:class:`AgentConfig` with a
:class:`BrokerConfig` and the small tables' :class:`TrustConfig`,
:class:`TelemetryConfig`, :class:`TransferConfig` and :class:`TrainingConfig`, which
live in :mod:`edge_agent.config.sections` and are importable from here). Each
validates itself when constructed and raises :class:`~edge_agent.errors.ConfigError`
with a one-line message naming the key, so an ``AgentConfig`` that exists is a
usable one. The agent's components receive these values in their constructors; only
entry points read files and the environment (DESIGN.md, "Config as typed values
passed to constructors").

Workflow (what ``fedge-agent run`` does, see :mod:`edge_agent.cli`):

1. :func:`load_config_file` reads the TOML file (a regular file of at most
   :data:`MAX_CONFIG_BYTES`) into a dict; syntax errors name the file and the line.
2. :func:`build_config` merges the file with the command-line overrides through the
   schema (a flag beats the file, the file beats the default; unknown keys are
   refused with a "did you mean" hint), checks every type strictly (``true`` is
   not an integer, ``16.0`` is not a window size), reads ``broker.password_file``
   and builds the :class:`AgentConfig`.
3. The entry point calls :meth:`TrustConfig.load` and :meth:`BrokerConfig.check_files`
   to fail early on unreadable key or certificate files, then starts the agent.

The per-value checks (types, ranges, paths, the password file) are the typed readers
of :mod:`edge_agent.config.values`, shared with the coordinator's service config.

Every key of the file is declared once, in
:data:`~edge_agent.config.agent_schema.AGENT_SCHEMA` (name, default, help, flag); the
commented example file ``agent.example.toml`` (what ``fedge-agent init`` writes, see
:func:`example_config`) is generated from it. Only ``device_id``, ``data_dir``,
``broker.url`` and at least one ``trust.keys`` entry are required.

Rules worth knowing:

* Relative paths in the file are relative to the file's own directory (so a config
  directory can be moved as a whole); relative paths given as flags are relative to
  the current working directory, as a shell user expects. Both end up absolute.
* A list given as a flag (``--trust``, ``--tag``) replaces the file's list; it does
  not extend it.
* The broker password comes from ``broker.password`` or ``broker.password_file``
  (read and stripped of surrounding whitespace), never both; a password source given
  as a flag replaces the file's. ``fedge-agent run`` falls back to the
  ``FEDGE_AGENT_PASSWORD`` environment variable when neither is given.
* The broker username defaults to the device id: the broker ACL
  (:data:`edge_agent.protocol.topics.MOSQUITTO_ACL`) keys each device's topics on it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.fileio import open_regular
from compress.manifest import TAG_RE
from compress.trust import RUNTIME_FOR_FORMAT
from edge_agent.config.agent_schema import AGENT_SCHEMA
from edge_agent.config.schema import MAX_CONFIG_BYTES, load_config_file
from edge_agent.config.sections import (
    MAX_WINDOW,
    MIN_SPOOL_BYTES,
    NO_TRUSTED_KEYS,
    TelemetryConfig,
    TrainingConfig,
    TransferConfig,
    TrustConfig,
)
from edge_agent.config.values import (
    MAX_PASSWORD_FILE_BYTES,
    FieldError,
    kind_of,
    read_password,
    want_int,
    want_optional_path,
    want_seconds,
    want_str,
    want_token,
)
from edge_agent.errors import AddressError, ConfigError, TopicError
from edge_agent.protocol.topics import validate_device_id
from edge_agent.transport.address import check_host, split_host_port

__all__ = [
    "DEFAULT_MQTTS_PORT",
    "DEFAULT_MQTT_PORT",
    "LOG_LEVELS",
    "MAX_CONFIG_BYTES",
    "MAX_PASSWORD_FILE_BYTES",
    "MAX_WINDOW",
    "MIN_SPOOL_BYTES",
    "NO_TRUSTED_KEYS",
    "RUNTIMES",
    "AgentConfig",
    "BrokerConfig",
    "TelemetryConfig",
    "TrainingConfig",
    "TransferConfig",
    "TrustConfig",
    "build_config",
    "example_config",
    "load_config_file",
    "parse_broker_url",
]

logger = logging.getLogger(__name__)

DEFAULT_MQTT_PORT = 1883
"""Port of ``mqtt://`` URLs without one (plain TCP)."""

DEFAULT_MQTTS_PORT = 8883
"""Port of ``mqtts://`` URLs without one (TLS)."""

RUNTIMES: tuple[str, ...] = tuple(sorted(set(RUNTIME_FOR_FORMAT.values())))
"""Runtime names ``AgentConfig.runtime`` accepts (``onnxruntime``, ``tflite``)."""

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
"""Values ``AgentConfig.log_level`` accepts."""


# --------------------------------------------------------------------------- checks


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """Parse a broker URL: ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]``.

    ``mqtt`` is plain TCP (default port 1883), ``mqtts`` is TLS (default port 8883).
    The host is a name, an IPv4 address or a bracketed IPv6 address (``[::1]``). A
    trailing ``/`` is tolerated; paths, queries, fragments and credentials are not
    (credentials go in ``username`` and ``password_file``, where they do not end up in
    logs).

    Args:
        url: The URL.

    Returns:
        ``(host, port, tls)``; an IPv6 host without its brackets.

    Raises:
        ConfigError: anything else, with the offending URL in the message.
    """
    if not isinstance(url, str):
        raise ConfigError(f"broker URL must be a string, got {kind_of(url)}")
    shown = repr(url[:200])
    usage = "want mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ConfigError(f"invalid broker URL {shown}: contains whitespace; {usage}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(f"invalid broker URL {shown}: {usage}")
    if scheme.lower() not in ("mqtt", "mqtts"):
        raise ConfigError(
            f"invalid broker URL {shown}: scheme {scheme[:20]!r} unsupported; {usage}"
        )
    if "@" in rest:
        raise ConfigError(
            f"invalid broker URL {shown}: credentials do not belong in the URL; "
            "use username and password_file"
        )
    netloc, _, path = rest.partition("/")
    if path or "?" in rest or "#" in rest:
        raise ConfigError(f"invalid broker URL {shown}: no path, query or fragment allowed")
    tls = scheme.lower() == "mqtts"
    try:
        host, port = split_host_port(
            netloc, default_port=DEFAULT_MQTTS_PORT if tls else DEFAULT_MQTT_PORT
        )
    except AddressError as exc:
        raise ConfigError(f"invalid broker URL {shown}: {exc}") from None
    return host, port, tls


def _check_http(value: object) -> str:
    text = want_str("http", value)
    try:
        split_host_port(text)
    except AddressError as exc:
        raise FieldError(
            "http", f"http must be HOST:PORT such as 127.0.0.1:8080, got {text[:80]!r}: {exc}"
        ) from None
    return text


# --------------------------------------------------------------------------- values


_default = AGENT_SCHEMA.default  # a field's default is its key's, declared once


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """How to reach and log in to the MQTT broker.

    Shared by the agent and the operator side (the coordinator imports it too).

    Attributes:
        host: Host name or address; an IPv6 address without brackets.
        port: TCP port, 1-65535.
        tls: Whether to connect with TLS (``mqtts://``).
        username: MQTT username; :class:`AgentConfig` fills in the device id when None.
        password: MQTT password, or None; never shown by ``repr`` or :attr:`url`.
        ca_file: CA bundle that verifies the broker (None: the system's CAs). TLS only.
        cert_file: Client certificate for mutual TLS (may hold the key too). TLS only.
        key_file: The client certificate's private key; needs ``cert_file``. TLS only.
        keepalive_s: MQTT keepalive, 1-65535 seconds.
        reconnect_min_s: First delay before reconnecting after a lost connection.
        reconnect_max_s: Longest delay between reconnection attempts (backoff cap).

    Raises:
        ConfigError: a field has the wrong type or value, or TLS files are given for a
            plain ``mqtt://`` connection.
    """

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = _default("broker.keepalive_s")
    reconnect_min_s: float = _default("broker.reconnect_min_s")
    reconnect_max_s: float = _default("broker.reconnect_max_s")

    def __post_init__(self) -> None:
        host = want_str("broker.host", self.host)
        try:
            check_host(host)
        except AddressError as exc:
            raise FieldError("broker.host", f"broker.host is invalid: {exc}") from None
        want_int("broker.port", self.port, low=1, high=65535)
        if not isinstance(self.tls, bool):
            raise FieldError("broker.tls", f"broker.tls must be a boolean, got {kind_of(self.tls)}")
        if self.username is not None:
            want_str("broker.username", self.username)
        if self.password is not None:
            want_str("broker.password", self.password, secret=True)
        for key in ("ca_file", "cert_file", "key_file"):
            path = want_optional_path(f"broker.{key}", getattr(self, key))
            if path is not None and not self.tls:
                raise FieldError(
                    f"broker.{key}",
                    f"broker.{key} is set but the broker URL is mqtt:// (no TLS); use mqtts://",
                )
        if self.key_file is not None and self.cert_file is None:
            raise FieldError("broker.key_file", "broker.key_file is set without broker.cert_file")
        want_int("broker.keepalive_s", self.keepalive_s, low=1, high=65535)
        low = want_seconds("broker.reconnect_min_s", self.reconnect_min_s)
        high = want_seconds("broker.reconnect_max_s", self.reconnect_max_s)
        if high < low:
            raise FieldError(
                "broker.reconnect_max_s",
                f"broker.reconnect_max_s ({high:g}) is less than broker.reconnect_min_s ({low:g})",
            )
        object.__setattr__(self, "reconnect_min_s", low)
        object.__setattr__(self, "reconnect_max_s", high)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> BrokerConfig:
        """Build from a broker URL (see :func:`parse_broker_url`) and credentials.

        Raises:
            ConfigError: the URL or a credential is invalid.
        """
        host, port, tls = parse_broker_url(url)
        return cls(
            host,
            port,
            tls,
            username=username,
            password=password,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )

    @property
    def url(self) -> str:
        """``mqtt[s]://host:port`` for display and logs; never includes credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def check_files(self) -> None:
        """Check that the TLS files are readable regular files (call at start-up).

        Raises:
            ConfigError: a file is missing, not a regular file, or unreadable; the
                message names the key and the file.
        """
        for key in ("ca_file", "cert_file", "key_file"):
            path: Path | None = getattr(self, key)
            if path is None:
                continue
            try:
                stream, _ = open_regular(path, error=ConfigError, what=key.replace("_", " "))
            except ConfigError as exc:
                raise ConfigError(f"broker.{key}: {exc}") from exc
            stream.close()


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything ``fedge-agent run`` needs, validated.

    Attributes:
        device_id: This device's id (the device id rule of
            :func:`~edge_agent.protocol.topics.validate_device_id`).
        broker: The MQTT broker; a missing username becomes ``device_id``.
        data_dir: Directory of the agent's state (installed models, counters, spool).
        trust: The trusted keys; at least one is required.
        tags: Hardware tags of this device (each matching
            :data:`compress.manifest.TAG_RE`), duplicates dropped, order kept.
        runtime: Preferred inference runtime (one of :data:`RUNTIMES`), None for
            automatic.
        http: ``HOST:PORT`` of the local inference endpoint, None for off. Only its
            shape is checked here (:func:`edge_agent.serving.http_access.http_config`
            applies the endpoint's own rules).
        http_token: The endpoint's bearer token (read from ``http_token_file``), or
            None; never shown by ``repr``.
        http_allowed_hosts: Host header names the endpoint answers to besides the
            loopback names and its bind address.
        http_socket: A Unix socket (mode 0600) the endpoint also serves on, or
            None; with ``http`` None it is the only listener.
        telemetry: Telemetry settings.
        transfer: Model transfer settings.
        training: Local data and labelled feedback for federated rounds.
        log_level: One of :data:`LOG_LEVELS` (lowercased).

    Raises:
        ConfigError: an invalid field, or no trusted keys (the message says how to add
            one).
    """

    device_id: str
    broker: BrokerConfig
    data_dir: Path
    trust: TrustConfig
    tags: tuple[str, ...] = _default("tags")
    runtime: str | None = None
    http: str | None = None
    http_token: str | None = field(default=None, repr=False)
    http_allowed_hosts: tuple[str, ...] = _default("http_allowed_hosts")
    http_socket: Path | None = None
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    log_level: str = _default("log_level")

    def __post_init__(self) -> None:
        try:
            validate_device_id(self.device_id)
        except TopicError as exc:
            raise FieldError("device_id", f"device_id: {exc}") from None
        for name, kind in (
            ("broker", BrokerConfig),
            ("trust", TrustConfig),
            ("telemetry", TelemetryConfig),
            ("transfer", TransferConfig),
            ("training", TrainingConfig),
        ):
            if not isinstance(getattr(self, name), kind):
                raise FieldError(name, f"{name} must be a {kind.__name__}")
        if self.broker.username is None:
            object.__setattr__(
                self, "broker", dataclasses.replace(self.broker, username=self.device_id)
            )
        if not isinstance(self.data_dir, Path):
            raise FieldError("data_dir", f"data_dir must be a Path, got {kind_of(self.data_dir)}")
        if not self.trust.keys and self.trust.keyset is None:
            raise FieldError("trust.keys", NO_TRUSTED_KEYS)
        object.__setattr__(self, "tags", _check_tags(self.tags))
        if self.runtime is not None and self.runtime not in RUNTIMES:
            shown = (
                repr(self.runtime[:40]) if isinstance(self.runtime, str) else kind_of(self.runtime)
            )
            raise FieldError(
                "runtime", f"runtime must be one of {', '.join(RUNTIMES)}, got {shown}"
            )
        if self.http is not None:
            _check_http(self.http)
        if self.http_token is not None:
            want_token("http_token_file", self.http_token)
        object.__setattr__(
            self, "http_allowed_hosts", _check_allowed_hosts(self.http_allowed_hosts)
        )
        if self.http_socket is not None and not isinstance(self.http_socket, Path):
            raise FieldError(
                "http_socket", f"http_socket must be a path, got {kind_of(self.http_socket)}"
            )
        level = want_str("log_level", self.log_level).lower()
        if level not in LOG_LEVELS:
            raise FieldError(
                "log_level",
                f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level[:40]!r}",
            )
        object.__setattr__(self, "log_level", level)


def _check_allowed_hosts(hosts: object) -> tuple[str, ...]:
    key = "http_allowed_hosts"
    if not isinstance(hosts, tuple | list):
        raise FieldError(key, f"{key} must be an array of strings, got {kind_of(hosts)}")
    for host in hosts:
        try:
            check_host(want_str(key, host))
        except AddressError as exc:
            raise FieldError(key, f"{key}: {exc}") from None
    return tuple(dict.fromkeys(hosts))


def _check_tags(tags: object) -> tuple[str, ...]:
    if not isinstance(tags, tuple | list):
        raise FieldError("tags", f"tags must be an array of strings, got {kind_of(tags)}")
    for tag in tags:
        if not isinstance(tag, str):
            raise FieldError("tags", f"tags must hold strings, got {kind_of(tag)}")
        if TAG_RE.fullmatch(tag) is None:
            raise FieldError(
                "tags",
                f"tags: invalid tag {tag[:80]!r}: want 1-64 of [A-Za-z0-9_.:=+-], "
                "starting with a letter or digit",
            )
    return tuple(dict.fromkeys(tags))


# --------------------------------------------------------------------------- reading


_PASSWORD_KEYS = ("broker.password", "broker.password_file")
_REQUIRED = ("device_id", "data_dir", "broker.url")


def build_config(
    file_values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    *,
    base_dir: Path,
    file_label: str | None = None,
    override_labels: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Merge a config file's values with overrides and build the :class:`AgentConfig`.

    Both mappings have the file's layout (top-level keys and ``broker`` / ``trust`` /
    ``telemetry`` / ``transfer`` tables). An override beats the file, the file beats
    the default. Relative paths in ``file_values`` are resolved against ``base_dir``
    (the config file's directory); relative paths in ``overrides`` against the
    current working directory. Paths may be ``str`` or ``os.PathLike``; every other
    value must have its TOML type exactly (a boolean is not an integer, a float is
    not an integer; an integer is fine where seconds are expected). An override of
    ``broker.password`` or ``broker.password_file`` replaces both of the file's; one
    source giving both is an error. ``broker.password_file`` is read here.

    Args:
        file_values: The config file's contents (:func:`load_config_file`), or ``{}``.
        overrides: Values from the command line and the environment.
        base_dir: Directory that relative paths in ``file_values`` are relative to.
        file_label: How to name the file in messages (its path), None when there is
            no file.
        override_labels: How to name each override in messages, by dotted key
            (``{"broker.url": "--broker"}``); unnamed ones are called "override".

    Returns:
        The validated configuration.

    Raises:
        ConfigError: an unknown key (with a "did you mean" hint), a missing required
            key, a value of the wrong type or out of range, or an unreadable or empty
            password file. The message is one line that starts with the file or the
            flag the value came from.
    """
    sources = AGENT_SCHEMA.merge(
        file_values,
        overrides,
        base_dir=base_dir,
        file_label=file_label,
        override_labels=override_labels,
    )
    for key in _REQUIRED:
        sources.require(key)
    where = sources.where
    if all(key in sources for key in _PASSWORD_KEYS):
        raise ConfigError(
            f"{where('broker.password_file')}give broker.password or broker.password_file, not both"
        )
    password = sources.get("broker.password")
    if "broker.password_file" in sources:
        password = read_password(sources.get("broker.password_file"), where("broker.password_file"))
    http_token = None
    if "http_token_file" in sources:
        http_token = read_password(
            sources.get("http_token_file"), where("http_token_file"), "http_token_file"
        )

    try:
        host, port, tls = parse_broker_url(sources.get("broker.url"))
    except ConfigError as exc:
        raise ConfigError(f"{where('broker.url')}{exc}") from None
    broker = sources.section("broker", skip=("url", "password", "password_file"))
    try:
        config = AgentConfig(
            device_id=sources.get("device_id"),
            broker=BrokerConfig(host, port, tls, **broker, password=password),
            data_dir=sources.get("data_dir"),
            trust=TrustConfig(**sources.section("trust")),
            tags=sources.get("tags"),
            runtime=sources.get("runtime"),
            http=sources.get("http"),
            http_token=http_token,
            http_allowed_hosts=sources.get("http_allowed_hosts"),
            http_socket=sources.get("http_socket"),
            telemetry=TelemetryConfig(**sources.section("telemetry")),
            transfer=TransferConfig(**sources.section("transfer")),
            training=TrainingConfig(**sources.section("training")),
            log_level=sources.get("log_level"),
        )
    except FieldError as exc:
        raise ConfigError(f"{where(exc.key)}{exc}") from None
    if config.broker.username != config.device_id:
        logger.warning(
            "broker username %r differs from device_id %r: the fedge broker ACL gives each "
            "device the topics of its username, so this device will see nothing",
            config.broker.username,
            config.device_id,
        )
    return config


def example_config() -> str:
    """The commented example config that ``fedge-agent init`` writes (package data).

    Generated from :data:`~edge_agent.config.agent_schema.AGENT_SCHEMA`: every key,
    what it does and its default.
    """
    return AGENT_SCHEMA.example_text()
