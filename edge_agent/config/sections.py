"""The typed values of the agent config's small tables: trust, telemetry, transfer, training.

Each is a frozen dataclass that checks its fields when constructed and raises
:class:`~edge_agent.config.values.FieldError` (a
:class:`~edge_agent.errors.ConfigError`) naming the dotted key, so a value that
exists is a usable one. Their defaults are those of the keys in
:data:`~edge_agent.config.agent_schema.AGENT_SCHEMA`. :func:`edge_agent.config.agent.build_config`
builds them from the ``[trust]``, ``[telemetry]``, ``[transfer]`` and ``[training]``
tables of the file; the agent's components receive them in their constructors (the
coordinator's service reuses :class:`TrustConfig`). All are importable from
:mod:`edge_agent.config.agent` too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompressError
from compress.fileio import read_bounded
from compress.keys import PublicKey, load_public_key
from compress.keyset import MAX_SIGNED_KEYSET_BYTES, SignedKeySet
from compress.signing import TrustedKeys
from edge_agent.config.agent_schema import AGENT_SCHEMA
from edge_agent.config.values import FieldError, kind_of, want_int, want_seconds
from edge_agent.errors import TopicError, UnknownModelError
from edge_agent.protocol.topics import validate_fleet_id
from edge_agent.training.model_spec import parse_model_spec

__all__ = [
    "MAX_WINDOW",
    "MIN_SPOOL_BYTES",
    "NO_TRUSTED_KEYS",
    "TelemetryConfig",
    "TrainingConfig",
    "TransferConfig",
    "TrustConfig",
    "default_torch_threads",
]

_default = AGENT_SCHEMA.default  # a field's default is its key's, declared once

MAX_WINDOW = 1024
"""Most chunks a transfer may request at once."""

MIN_SPOOL_BYTES = 4096
"""Smallest telemetry spool: below a few batches, every batch would be dropped."""

NO_TRUSTED_KEYS = (
    "no trusted keys: the agent installs only models signed by keys it trusts; "
    'pass --trust KEY.pub (repeatable) or set keys = ["/path/to/release.pub"] '
    "under [trust] in the config file"
)


@dataclass(frozen=True, slots=True)
class TrustConfig:
    """Which public keys the agent trusts, and how many must sign a model (k of n).

    Attributes:
        keys: Public key files (PEM, as written by ``fedge keys generate``).
        threshold: Signatures by distinct trusted keys a manifest needs.
        keyset: A signed key set file; when given it replaces ``keys`` and
            ``threshold`` (agents only).
        fleet: The device's fleet id; when given, installs need a fresh fleet
            statement naming the model (agents only).

    Raises:
        ConfigError: a wrong type, a file listed twice, or a threshold outside
            1..len(keys) (when keys are given; :class:`AgentConfig` refuses none).
    """

    keys: tuple[Path, ...] = _default("trust.keys")
    threshold: int = _default("trust.threshold")
    keyset: Path | None = None  # the schema's default too
    fleet: str | None = None

    def __post_init__(self) -> None:
        if self.keyset is not None and not isinstance(self.keyset, Path):
            raise FieldError("trust.keyset", "trust.keyset must be a Path")
        if self.fleet is not None:
            try:
                validate_fleet_id(self.fleet)
            except TopicError as exc:
                raise FieldError("trust.fleet", f"trust.fleet: {exc}") from exc
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

    def read_keyset(self) -> SignedKeySet:
        """Read and parse the provisioned key-set file (``trust.keyset``).

        Parsing is not trust: :mod:`edge_agent.ota.keyset_store` verifies it (and
        prefers a newer key set the device stored since).

        Raises:
            ConfigError: no key-set file is configured, or it is missing, unreadable,
                too large or not a signed key set; the message names the file.
        """
        if self.keyset is None:
            raise FieldError("trust.keyset", "no key-set file: set trust.keyset (--keyset)")
        try:
            data = read_bounded(
                self.keyset, max_bytes=MAX_SIGNED_KEYSET_BYTES, error=CompressError,
                what="key-set file",
            )  # fmt: skip
        except CompressError as exc:  # the message starts with the path
            raise FieldError("trust.keyset", f"trust.keyset: {exc}") from exc
        try:
            signed = SignedKeySet.from_bytes(data)
            _ = signed.keyset  # a file that is no key set at all fails now, not later
        except CompressError as exc:
            raise FieldError("trust.keyset", f"trust.keyset: {self.keyset}: {exc}") from exc
        return signed


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

    interval_s: float = _default("telemetry.interval_s")
    spool_max_bytes: int = _default("telemetry.spool_max_bytes")

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

    window: int = _default("transfer.window")
    stall_timeout_s: float = _default("transfer.stall_timeout_s")

    def __post_init__(self) -> None:
        want_int("transfer.window", self.window, low=1, high=MAX_WINDOW)
        object.__setattr__(
            self,
            "stall_timeout_s",
            want_seconds("transfer.stall_timeout_s", self.stall_timeout_s),
        )


def default_torch_threads() -> int:
    """PyTorch's training threads by default: the CPUs minus one (a core stays free
    for inference), at least 1."""
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    """Local data for federated rounds, the labelled-feedback buffer, and which
    PyTorch models the device may train.

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
        models: Model specs (``module.path:function``, or ``zoo:<name>``) the device
            owner allows besides the zoo and the ``fedge.models`` entry points;
            kept canonical (``zoo:x`` becomes ``edge_agent.training.zoo:x``),
            duplicates dropped, order kept.
        torch_threads: Threads PyTorch trains with (>= 1); None (the default)
            becomes :func:`default_torch_threads`.

    Raises:
        ConfigError: a wrong type, a value out of range, or a malformed model spec.
    """

    data: Path | None = None
    holdout_fraction: float = _default("training.holdout_fraction")
    feedback_max_examples: int = _default("training.feedback_max_examples")
    prediction_log: int = _default("training.prediction_log")
    models: tuple[str, ...] = _default("training.models")
    torch_threads: int | None = None

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
        object.__setattr__(self, "models", _check_models(self.models))
        threads = default_torch_threads() if self.torch_threads is None else self.torch_threads
        want_int("training.torch_threads", threads, low=1, high=1024)
        object.__setattr__(self, "torch_threads", threads)


def _check_models(models: object) -> tuple[str, ...]:
    """``training.models`` as canonical model specs (see :class:`TrainingConfig`)."""
    if not isinstance(models, tuple | list):
        raise FieldError(
            "training.models", f"training.models must be an array of strings, got {kind_of(models)}"
        )
    canonical: list[str] = []
    for text in models:
        if not isinstance(text, str):
            raise FieldError(
                "training.models", f"training.models must hold strings, got {kind_of(text)}"
            )
        try:
            canonical.append(str(parse_model_spec(text)))
        except UnknownModelError as exc:
            raise FieldError("training.models", f"training.models: {exc}") from None
    return tuple(dict.fromkeys(canonical))
