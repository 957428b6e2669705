"""Typed configuration of ``fedge-agent run``, and how it is read from TOML and flags.

The agent's configuration is a tree of frozen dataclasses (:class:`AgentConfig` with a
:class:`BrokerConfig`, :class:`TrustConfig`, :class:`TelemetryConfig` and
:class:`TransferConfig`). Each validates itself when constructed and raises
:class:`~edge_agent.errors.ConfigError` with a one-line message naming the key, so an
``AgentConfig`` that exists is a usable one. The agent's components receive these
values in their constructors; only entry points read files and the environment
(DESIGN.md, "Config as typed values passed to constructors").

Workflow (what ``fedge-agent run`` does, see :mod:`edge_agent.cli`):

1. :func:`load_config_file` reads the TOML file (a regular file of at most
   :data:`MAX_CONFIG_BYTES`) into a dict; syntax errors name the file and the line.
2. :func:`build_config` merges the file with the command-line overrides (a flag beats
   the file, the file beats the default), rejects unknown keys with a "did you mean"
   hint, checks every type strictly (``true`` is not an integer, ``16.0`` is not a
   window size), reads ``broker.password_file`` and builds the :class:`AgentConfig`.
3. The entry point calls :meth:`TrustConfig.load` and :meth:`BrokerConfig.check_files`
   to fail early on unreadable key or certificate files, then starts the agent.

The per-value checks (types, ranges, paths, the password file) are the typed readers
of :mod:`edge_agent.config.values`, shared with the coordinator's service config.

The file layout (every key but ``device_id``, ``data_dir``, ``broker.url`` and at least
one ``trust.keys`` entry is optional; :data:`EXAMPLE_CONFIG` documents each one)::

    device_id = "pi-kitchen-01"
    data_dir = "/var/lib/fedge-agent"
    tags = ["arm64", "camera"]
    runtime = "onnxruntime"          # or "tflite"; omit for automatic
    # http = "127.0.0.1:8080"        # local inference endpoint (off when omitted)
    log_level = "info"

    [broker]
    url = "mqtts://broker.example.net:8883"
    username = "pi-kitchen-01"       # defaults to device_id
    password_file = "/etc/fedge-agent/password"
    ca_file = "/etc/fedge-agent/ca.pem"
    # cert_file = "..."  key_file = "..."   # client certificate (mutual TLS)

    [trust]
    keys = ["/etc/fedge-agent/keys/release.pub"]
    threshold = 1

    [telemetry]
    interval_s = 10
    spool_max_bytes = 1048576

    [transfer]
    window = 16
    stall_timeout_s = 5

    [training]
    data = "/var/lib/fedge-agent/training-data"
    holdout_fraction = 0.2

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
import difflib
import logging
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.fileio import open_regular, read_bounded
from compress.keys import PublicKey, load_public_key
from compress.manifest import TAG_RE
from compress.signing import TrustedKeys
from compress.trust import RUNTIME_FOR_FORMAT
from edge_agent.config.values import (
    MAX_PASSWORD_FILE_BYTES,
    FieldError,
    kind_of,
    read_password,
    to_array,
    to_path,
    want_int,
    want_optional_path,
    want_seconds,
    want_str,
)
from edge_agent.errors import AddressError, ConfigError, TopicError
from edge_agent.protocol.topics import validate_device_id
from edge_agent.transport.address import check_host, split_host_port

__all__ = [
    "DEFAULT_MQTTS_PORT",
    "DEFAULT_MQTT_PORT",
    "EXAMPLE_CONFIG",
    "LOG_LEVELS",
    "MAX_CONFIG_BYTES",
    "MAX_PASSWORD_FILE_BYTES",
    "RUNTIMES",
    "AgentConfig",
    "BrokerConfig",
    "TelemetryConfig",
    "TrainingConfig",
    "TransferConfig",
    "TrustConfig",
    "build_config",
    "load_config_file",
    "parse_broker_url",
]

logger = logging.getLogger(__name__)

DEFAULT_MQTT_PORT = 1883
"""Port of ``mqtt://`` URLs without one (plain TCP)."""

DEFAULT_MQTTS_PORT = 8883
"""Port of ``mqtts://`` URLs without one (TLS)."""

MAX_CONFIG_BYTES = 1024 * 1024
"""Largest config file :func:`load_config_file` reads."""

RUNTIMES: tuple[str, ...] = tuple(sorted(set(RUNTIME_FOR_FORMAT.values())))
"""Runtime names ``AgentConfig.runtime`` accepts (``onnxruntime``, ``tflite``)."""

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
"""Values ``AgentConfig.log_level`` accepts."""

MAX_WINDOW = 1024
"""Most chunks a transfer may request at once."""

NO_TRUSTED_KEYS = (
    "no trusted keys: the agent installs only models signed by keys it trusts; "
    'pass --trust KEY.pub (repeatable) or set keys = ["/path/to/release.pub"] '
    "under [trust] in the config file"
)


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


MIN_SPOOL_BYTES = 4096
"""Smallest telemetry spool: below a few batches, every batch would be dropped."""


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
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0

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
class TrustConfig:
    """Which public keys the agent trusts, and how many must sign a model (k of n).

    Attributes:
        keys: Public key files (PEM, as written by ``fedge keys generate``).
        threshold: Signatures by distinct trusted keys a manifest needs.

    Raises:
        ConfigError: a wrong type, a file listed twice, or a threshold outside
            1..len(keys) (when keys are given; :class:`AgentConfig` refuses none).
    """

    keys: tuple[Path, ...] = ()
    threshold: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.keys, tuple) or not all(isinstance(k, Path) for k in self.keys):
            raise FieldError("trust.keys", "trust.keys must be a tuple of Paths")
        seen: set[Path] = set()
        for path in self.keys:
            if path in seen:
                raise FieldError("trust.keys", f"trust.keys lists {path} twice")
            seen.add(path)
        want_int("trust.threshold", self.threshold, low=1)
        if self.keys and self.threshold > len(self.keys):
            raise FieldError(
                "trust.threshold",
                f"trust.threshold {self.threshold} is more than the "
                f"{len(self.keys)} trusted key(s)",
            )

    def load(self) -> TrustedKeys:
        """Read the key files.

        Returns:
            The trusted keys with the threshold.

        Raises:
            ConfigError: no keys, a key file is missing, unreadable or not an Ed25519
                public key, or two files hold the same key; the message names the file.
        """
        if not self.keys:
            raise FieldError("trust.keys", NO_TRUSTED_KEYS)
        loaded: dict[str, Path] = {}
        keys: list[PublicKey] = []
        for path in self.keys:
            try:
                key = load_public_key(path)
            except CompressError as exc:
                raise FieldError("trust.keys", f"trust.keys: {exc}") from exc
            if key.key_id in loaded:
                raise FieldError(
                    "trust.keys", f"trust.keys: {loaded[key.key_id]} and {path} hold the same key"
                )
            loaded[key.key_id] = path
            keys.append(key)
        try:
            return TrustedKeys.of(keys, self.threshold)
        except CompressError as exc:  # pragma: no cover - checked in __post_init__
            raise FieldError("trust.keys", f"trust: {exc}") from exc


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """How often the agent reports telemetry, and how much it keeps while offline.

    Attributes:
        interval_s: Seconds between telemetry batches (> 0).
        spool_max_bytes: Most bytes of unsent telemetry kept on disk while the broker
            is unreachable (> 0); the oldest records go first.

    Raises:
        ConfigError: a wrong type or a value out of range.
    """

    interval_s: float = 10.0
    spool_max_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "interval_s", want_seconds("telemetry.interval_s", self.interval_s)
        )
        want_int("telemetry.spool_max_bytes", self.spool_max_bytes, low=MIN_SPOOL_BYTES)


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """How the agent fetches a chunked model transfer.

    Attributes:
        window: Chunks requested at once, 1-1024.
        stall_timeout_s: Seconds without progress after which missing chunks are
            requested again (> 0).

    Raises:
        ConfigError: a wrong type or a value out of range.
    """

    window: int = 16
    stall_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        want_int("transfer.window", self.window, low=1, high=MAX_WINDOW)
        object.__setattr__(
            self,
            "stall_timeout_s",
            want_seconds("transfer.stall_timeout_s", self.stall_timeout_s),
        )


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    """Local data for federated rounds, and the labelled-feedback buffer.

    Attributes:
        data: Directory of ``.npz`` (arrays ``x``, ``y``) and ``.csv`` (label last)
            files to train on; None: only labelled feedback (the agent takes part
            in rounds once it has some).
        holdout_fraction: Share of the local examples kept out of training for
            evaluation rounds, in [0, 0.9].
        feedback_max_examples: Most labelled-feedback examples kept on disk (the
            oldest go first); 0 turns feedback off.
        prediction_log: Recent predictions whose inputs are remembered so that
            feedback can label them.

    Raises:
        ConfigError: a wrong type or a value out of range.
    """

    data: Path | None = None
    holdout_fraction: float = 0.2
    feedback_max_examples: int = 10_000
    prediction_log: int = 1024

    def __post_init__(self) -> None:
        if self.data is not None and not isinstance(self.data, Path):
            raise FieldError(
                "training.data", f"training.data must be a path, got {kind_of(self.data)}"
            )
        fraction = self.holdout_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not (0.0 <= fraction <= 0.9)
        ):
            raise FieldError(
                "training.holdout_fraction",
                f"training.holdout_fraction must be a number in [0, 0.9], got {fraction!r}",
            )
        object.__setattr__(self, "holdout_fraction", float(fraction))
        want_int("training.feedback_max_examples", self.feedback_max_examples, low=0)
        want_int("training.prediction_log", self.prediction_log, low=1, high=1_000_000)


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
            shape is checked here.
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
    tags: tuple[str, ...] = ()
    runtime: str | None = None
    http: str | None = None
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    log_level: str = "info"

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
        if not self.trust.keys:
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
        level = want_str("log_level", self.log_level).lower()
        if level not in LOG_LEVELS:
            raise FieldError(
                "log_level",
                f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level[:40]!r}",
            )
        object.__setattr__(self, "log_level", level)


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


def load_config_file(path: Path) -> dict[str, Any]:
    """Read an agent config file (TOML).

    Args:
        path: The file; a regular file of at most :data:`MAX_CONFIG_BYTES`.

    Returns:
        The parsed tables, unvalidated (hand them to :func:`build_config`).

    Raises:
        ConfigError: the file is missing, not a regular file, unreadable, too large,
            not UTF-8, or not valid TOML (the message names the file and the line).
    """
    path = Path(path)
    data = read_bounded(path, max_bytes=MAX_CONFIG_BYTES, error=ConfigError, what="config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message reads "Invalid value (at line 3, column 7)".
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


_TOP_KEYS = ("device_id", "data_dir", "tags", "runtime", "http", "log_level")
_SECTIONS: dict[str, tuple[str, ...]] = {
    "broker": (
        "url",
        "username",
        "password",
        "password_file",
        "ca_file",
        "cert_file",
        "key_file",
        "keepalive_s",
        "reconnect_min_s",
        "reconnect_max_s",
    ),
    "trust": ("keys", "threshold"),
    "telemetry": ("interval_s", "spool_max_bytes"),
    "transfer": ("window", "stall_timeout_s"),
    "training": ("data", "holdout_fraction", "feedback_max_examples", "prediction_log"),
}
_PATH_KEYS = frozenset(
    {
        "data_dir",
        "broker.password_file",
        "broker.ca_file",
        "broker.cert_file",
        "broker.key_file",
        "training.data",
    }
)
_PASSWORD_KEYS = ("broker.password", "broker.password_file")
_REQUIRED = ("device_id", "data_dir", "broker.url")


def _unknown_key_hint(section: str | None, key: str) -> str:
    if section is None:
        homes = [name for name, keys in _SECTIONS.items() if key in keys]
        if homes:
            return f" (did you mean {homes[0]}.{key}? put it under [{homes[0]}])"
        candidates: tuple[str, ...] = (*_TOP_KEYS, *_SECTIONS)
        prefix = ""
    else:
        if key in _TOP_KEYS:
            return f" ({key} is a top-level key: move it above the first [section] header)"
        candidates = _SECTIONS[section]
        prefix = f"{section}."
    close = difflib.get_close_matches(key, candidates, n=1)
    if close:
        return f" (did you mean {prefix}{close[0]}?)"
    return f" (known keys: {', '.join(prefix + c for c in candidates)})"


def _flatten(
    values: Mapping[str, Any], label: Mapping[str, str] | str, base: Path
) -> tuple[dict[str, Any], dict[str, str]]:
    """One source as ``{dotted key: value}`` with paths made absolute against ``base``.

    Returns:
        The values and, per key, the label that names where it came from.

    Raises:
        ConfigError: an unknown key, or a section that is not a table.
    """

    def label_of(key: str) -> str:
        return label if isinstance(label, str) else label.get(key, "override")

    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{label_of(key)}: [{key}] must be a table, got {kind_of(value)}")
            for sub, sub_value in value.items():
                if sub not in _SECTIONS[key]:
                    raise ConfigError(
                        f"{label_of(key)}: unknown key {key}.{sub}{_unknown_key_hint(key, sub)}"
                    )
                flat[f"{key}.{sub}"] = sub_value
        elif key in _TOP_KEYS:
            flat[key] = value
        else:
            raise ConfigError(f"{label_of(key)}: unknown key {key}{_unknown_key_hint(None, key)}")
    labels = {key: label_of(key) for key in flat}
    try:
        for key in list(flat):
            if key in _PATH_KEYS:
                flat[key] = to_path(key, flat[key], base)
            elif key == "trust.keys":
                flat[key] = tuple(
                    to_path(f"{key}[{i}]", item, base)
                    for i, item in enumerate(to_array(key, flat[key]))
                )
            elif key == "tags":
                flat[key] = tuple(to_array(key, flat[key]))
    except FieldError as exc:
        raise ConfigError(f"{labels[exc.key.partition('[')[0]]}: {exc}") from None
    return flat, labels


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
    flags = dict(override_labels or {})
    file_flat, origins = _flatten(file_values, file_label or "config file", Path(base_dir))
    over_flat, over_origins = _flatten(overrides, flags, Path.cwd())
    if any(key in over_flat for key in _PASSWORD_KEYS):
        for key in _PASSWORD_KEYS:
            file_flat.pop(key, None)
    merged = {**file_flat, **over_flat}
    origins.update(over_origins)

    def where(key: str) -> str:
        return f"{origins[key]}: " if key in origins else ""

    for key in _REQUIRED:
        if key not in merged:
            ways = [f"set {key} in {file_label}" if file_label else f"set {key} in a config file"]
            flag = flags.get(key)
            if flag:
                ways.append(f"pass {flag}")
            raise ConfigError(f"missing {key}: {' or '.join(ways)}")

    if all(key in merged for key in _PASSWORD_KEYS):
        raise ConfigError(
            f"{where('broker.password_file')}give broker.password or broker.password_file, not both"
        )
    password = merged.get("broker.password")
    if "broker.password_file" in merged:
        password = read_password(merged["broker.password_file"], where("broker.password_file"))

    try:
        host, port, tls = parse_broker_url(merged["broker.url"])
    except ConfigError as exc:
        raise ConfigError(f"{where('broker.url')}{exc}") from None

    def section(name: str) -> dict[str, Any]:
        return {
            key.partition(".")[2]: value
            for key, value in merged.items()
            if key.startswith(f"{name}.") and key not in (*_PASSWORD_KEYS, "broker.url")
        }

    try:
        config = AgentConfig(
            device_id=merged["device_id"],
            broker=BrokerConfig(host, port, tls, **{**section("broker"), "password": password}),
            data_dir=merged["data_dir"],
            trust=TrustConfig(**section("trust")),
            tags=merged.get("tags", ()),
            runtime=merged.get("runtime"),
            http=merged.get("http"),
            telemetry=TelemetryConfig(**section("telemetry")),
            transfer=TransferConfig(**section("transfer")),
            training=TrainingConfig(**section("training")),
            log_level=merged.get("log_level", "info"),
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


EXAMPLE_CONFIG = """\
# fedge-agent configuration (TOML). Run with: fedge-agent run --config agent.toml
# Command-line flags override these values. Relative paths are relative to this
# file's directory.

# This device's name: 1-64 of A-Z a-z 0-9 _ . - (starting with a letter or digit).
# It is also the MQTT username. Required.
device_id = "pi-kitchen-01"

# Where the agent keeps installed models, version counters and unsent telemetry.
# Required; created on first start.
data_dir = "/var/lib/fedge-agent"

# Hardware tags: a model that needs tags this device lacks is refused.
# Default: no tags.
# tags = ["arm64", "camera"]

# Preferred inference runtime: "onnxruntime" or "tflite". Default: automatic
# (whatever the model's format needs and is installed).
# runtime = "onnxruntime"

# Local inference endpoint, HOST:PORT. Default: off. Keep it on 127.0.0.1 unless
# other machines must reach it.
# http = "127.0.0.1:8080"

# Log level when no -v is given: debug, info, warning, error or critical.
# Default: "info".
log_level = "info"

[broker]
# The MQTT broker: mqtts://HOST[:PORT] (TLS, port 8883 by default) or
# mqtt://HOST[:PORT] (plain, port 1883 by default). Required.
url = "mqtts://broker.example.net:8883"

# MQTT username. Default: device_id (the broker's ACL expects exactly that).
# username = "pi-kitchen-01"

# File holding the MQTT password (surrounding whitespace is stripped). Default: the
# FEDGE_AGENT_PASSWORD environment variable, else no password. `password = "..."`
# works too but leaves the secret in this file.
# password_file = "/etc/fedge-agent/password"

# CA bundle that verifies the broker's certificate. Default: the system's CAs.
# ca_file = "/etc/fedge-agent/ca.pem"

# Client certificate and its key, for brokers that require mutual TLS.
# Default: none. key_file may be omitted when cert_file holds the key too.
# cert_file = "/etc/fedge-agent/client.pem"
# key_file = "/etc/fedge-agent/client.key"

# MQTT keepalive in seconds (1-65535). Default: 30.
keepalive_s = 30

# Reconnection backoff after a lost connection: first and longest delay, in seconds.
# Defaults: 1 and 60.
reconnect_min_s = 1
reconnect_max_s = 60

[trust]
# Public keys whose signatures this agent accepts on models (from the operator's
# `fedge keys generate`). At least one is required.
keys = ["/etc/fedge-agent/keys/release.pub"]

# How many distinct trusted keys must sign a model (1 to the number of keys).
# Default: 1.
threshold = 1

[telemetry]
# Seconds between telemetry reports. Default: 10.
interval_s = 10

# Most bytes of telemetry kept on disk while the broker is unreachable; the oldest
# goes first. Default: 1048576 (1 MiB).
spool_max_bytes = 1048576

[transfer]
# Model chunks requested at once (1-1024). Default: 16.
window = 16

# Seconds without progress before missing chunks are requested again. Default: 5.
stall_timeout_s = 5

[training]
# Local training data for federated rounds: a directory of .npz files (arrays x
# and y) and/or .csv files (numeric columns, the label last). Raw data never leaves
# the device; only encoded model updates do. Default: none (the agent takes part
# in rounds once labelled feedback arrives).
# data = "/var/lib/fedge-agent/training-data"

# Share of the local examples kept out of training for evaluation rounds.
# Default: 0.2.
holdout_fraction = 0.2

# Labelled feedback (POST /v1/feedback): most examples kept on disk, the oldest
# going first; 0 turns feedback off. Default: 10000.
feedback_max_examples = 10000

# Recent predictions whose inputs are remembered so feedback can label them.
# Default: 1024.
prediction_log = 1024
"""
"""A commented example config: every key, what it does and its default."""
