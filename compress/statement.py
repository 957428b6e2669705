"""Fleet statements: which model versions a fleet should run now, signed and short-lived.

A manifest says what a model *is*; it stays valid for months. A
:class:`FleetStatement` says what a fleet should run *now*: for each model name the
current version and payload sha256 (:class:`Target`), the fleet id, a version that
grows with every statement, and an expiry a few hours away. Like TUF's timestamp and
targets roles, simply: a device with a fleet configured installs only what the fresh
statement names, so an old but unexpired manifest (another name, an older version)
cannot be replayed at it, and a device that stops receiving statements notices that
it is being held back (a freeze) instead of trusting its last view for ever.

Trust: a statement is signed with keys of the device's trusted key set
(:class:`compress.signing.TrustedKeys`), in its own signature context (no manifest or
key-set signature is ever valid for a statement, and vice versa). One distinct trusted
key's signature is enough, whatever the key set's threshold: the statement is signed
by an online key, often, and it can only *narrow* what installs, since the manifest
it names still needs the full threshold.

Workflow:

1. The coordinator builds a statement (``fedge fleet publish``, and its deploy and
   rollout paths), signs it with :func:`sign_statement` and publishes
   :meth:`SignedStatement.to_bytes` retained on the fleet's broadcast topic.
2. The agent verifies each one it receives with :func:`verify_statement`: a trusted
   signature, its own fleet id, not expired, and a version strictly above the last
   one it accepted (a replay of an older statement raises
   :class:`~compress.errors.ReplayedStatementError`). It keeps the last accepted one.
3. Before a deploy, the agent calls :func:`check_fresh` on the held statement and
   :func:`check_targeted` with the manifest: the manifest's name, version and
   sha256 must be exactly what the statement names.

Everything here is pure (bytes, keys and the current time in; values or typed errors
out). The encoding is canonical JSON, like key sets; :meth:`FleetStatement.from_bytes`
rejects any other spelling of the same content::

    {"expires":"2026-01-01T06:00:00Z","fleet":"plant-a","issued":"2026-01-01T00:00:00Z",
     "schema":1,"targets":{"digits":{"sha256":"<hex>","version":5}},"version":42}

Unknown top-level fields are kept in :attr:`FleetStatement.extra` and written back.
The fleet id rule is :func:`edge_agent.protocol.topics.validate_fleet_id`'s, re-stated
here because ``compress`` imports nothing from ``edge_agent``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

from compress.errors import (
    NotTargetedError,
    ReplayedStatementError,
    StaleStatementError,
    StatementError,
    WrongFleetError,
)
from compress.keys import SigningKey
from compress.lineage import NAME_RE, SHA256_RE
from compress.manifest import Manifest, format_time, read_time, require_aware, whole_seconds
from compress.signing import (
    DocumentKind,
    SignedDocument,
    TrustedKeys,
    sign_document,
    verify_threshold,
)
from compress.strictjson import FieldReader, JsonObject, decode_canonical, encode_canonical

STATEMENT_SCHEMA_VERSION = 1
#: At most this many model names in one statement.
MAX_TARGETS = 64
MAX_STATEMENT_BYTES = 16 * 1024
MAX_VERSION = 2**53
#: A fleet id: 1-48 of ``[A-Za-z0-9_.-]``, starting with a letter or digit (the rule of
#: ``edge_agent.protocol.topics.validate_fleet_id``, so ``fleet.<id>`` is a topic name).
FLEET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")

STATEMENT_KIND = DocumentKind(
    name="fleet statement",
    context=b"fedge/v1 fleet statement signature\x00",
    magic=b"FFS1",
    max_document_bytes=MAX_STATEMENT_BYTES,
    error=StatementError,
    framing_error=StatementError,
)
MAX_SIGNED_STATEMENT_BYTES = STATEMENT_KIND.max_blob_bytes

_KNOWN_FIELDS = frozenset({"schema", "fleet", "version", "issued", "expires", "targets"})


@dataclass(frozen=True)
class Target:
    """What a statement says one model name should be: its version and payload sha256."""

    version: int
    sha256: str

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise StatementError("target version must be an integer")
        if not 1 <= self.version <= MAX_VERSION:
            raise StatementError(f"target version {self.version} must be 1 to {MAX_VERSION}")
        if not isinstance(self.sha256, str) or not SHA256_RE.fullmatch(self.sha256):
            raise StatementError("target sha256 must be 64 lowercase hex digits")

    def to_dict(self) -> JsonObject:
        """JSON form."""
        return {"sha256": self.sha256, "version": self.version}


@dataclass(frozen=True)
class FleetStatement:
    """The versions a fleet should run now, with a version of its own and an expiry.

    Construction normalises (times to whole UTC seconds, targets sorted by name) and
    validates, so a ``FleetStatement`` always encodes to bytes :meth:`from_bytes`
    accepts.

    Raises:
        StatementError: on construction, any field out of range.
    """

    fleet: str
    version: int
    issued: datetime
    expires: datetime
    targets: Mapping[str, Target]
    extra: Mapping[str, Any] = field(default_factory=dict)
    schema: int = STATEMENT_SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "issued", whole_seconds(self.issued, StatementError, "fleet statement issued")
        )
        object.__setattr__(
            self, "expires", whole_seconds(self.expires, StatementError, "fleet statement expires")
        )
        object.__setattr__(self, "targets", dict(sorted(self.targets.items())))
        self._check()

    def _check(self) -> None:
        if not 1 <= self.schema <= STATEMENT_SCHEMA_VERSION:
            raise StatementError(
                f"fleet statement schema {self.schema} is not one this fedge understands "
                f"(1 to {STATEMENT_SCHEMA_VERSION})"
            )
        if not isinstance(self.fleet, str) or not FLEET_RE.fullmatch(self.fleet):
            raise StatementError(
                f"invalid fleet id {str(self.fleet)[:80]!r}: want 1-48 of [A-Za-z0-9_.-], "
                "starting with a letter or digit"
            )
        if not 1 <= self.version <= MAX_VERSION:
            raise StatementError(
                f"fleet statement version {self.version} must be 1 to {MAX_VERSION}"
            )
        if len(self.targets) > MAX_TARGETS:
            raise StatementError(
                f"a fleet statement names at most {MAX_TARGETS} models, got {len(self.targets)}"
            )
        for name, target in self.targets.items():
            if not isinstance(name, str) or not NAME_RE.fullmatch(name):
                raise StatementError(f"target name {str(name)[:80]!r} is not a model name")
            if not isinstance(target, Target):
                raise StatementError(f"target {name!r} must be a Target")
        if self.expires <= self.issued:
            raise StatementError("fleet statement expires before it was issued")
        clash = sorted(_KNOWN_FIELDS & set(self.extra))
        if clash:
            raise StatementError(f"extra fields shadow known ones: {', '.join(clash)}")
        size = len(self.to_bytes())
        if size > MAX_STATEMENT_BYTES:
            raise StatementError(f"fleet statement is {size} bytes, max is {MAX_STATEMENT_BYTES}")

    def describe(self) -> str:
        """One line for logs: ``fleet plant-a v42 (2 models, expires ...)``."""
        return (
            f"fleet {self.fleet} statement v{self.version} ({len(self.targets)} models, "
            f"expires {format_time(self.expires)})"
        )

    def to_dict(self) -> JsonObject:
        """JSON form (unknown fields from a newer writer included)."""
        obj: JsonObject = dict(self.extra)
        obj.update(
            {
                "schema": self.schema,
                "fleet": self.fleet,
                "version": self.version,
                "issued": format_time(self.issued),
                "expires": format_time(self.expires),
                "targets": {name: t.to_dict() for name, t in self.targets.items()},
            }
        )
        return obj

    def to_bytes(self) -> bytes:
        """The canonical encoding: the bytes that are signed.

        Raises:
            StatementError: ``extra`` holds something JSON cannot represent.
        """
        return encode_canonical(self.to_dict(), StatementError, what="fleet statement")

    @classmethod
    def from_bytes(cls, data: bytes) -> FleetStatement:
        """Parse canonical statement bytes, strictly.

        Raises:
            StatementError: too large, not JSON, schema violations, or not canonical.
        """
        return decode_canonical(
            data,
            StatementError,
            what="fleet statement",
            max_bytes=MAX_STATEMENT_BYTES,
            build=cls.from_dict,
            encode=FleetStatement.to_bytes,
            max_depth=4,
        )

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> FleetStatement:
        """Build a statement from its JSON form, checking every known field.

        Raises:
            StatementError: a missing or invalid field, or an unsupported schema.
        """
        r = FieldReader(obj, StatementError, "statement")

        def target(entries: FieldReader, name: str) -> Target:
            t = entries.req_obj(name)
            return Target(
                version=t.integer("version", lo=1, hi=MAX_VERSION),
                sha256=t.text("sha256", max_len=64, pattern=SHA256_RE),
            )

        return cls(
            schema=r.integer("schema", lo=1),
            fleet=r.text("fleet", max_len=48, pattern=FLEET_RE),
            version=r.integer("version", lo=1, hi=MAX_VERSION),
            issued=read_time(r, "issued"),
            expires=read_time(r, "expires"),
            targets=r.mapping("targets", target, max_len=MAX_TARGETS, key_pattern=NAME_RE),
            extra={k: v for k, v in obj.items() if k not in _KNOWN_FIELDS},
        )


class SignedStatement(SignedDocument):
    """Canonical statement bytes (:attr:`document`) and their signatures."""

    KIND = STATEMENT_KIND

    @cached_property
    def statement(self) -> FleetStatement:
        """The parsed statement. Parsing is not trust: use :func:`verify_statement`.

        Raises:
            StatementError: the bytes are not a valid canonical statement.
        """
        return FleetStatement.from_bytes(self.document)


def sign_statement(
    statement: FleetStatement, signing_keys: Sequence[SigningKey]
) -> SignedStatement:
    """Sign a statement's canonical bytes with each of ``signing_keys``.

    Raises:
        StatementError: no keys given.
    """
    return sign_document(SignedStatement, statement.to_bytes(), signing_keys)


def check_fresh(statement: FleetStatement, *, now: datetime) -> None:
    """Raise unless ``statement`` is still valid at ``now``.

    Raises:
        StaleStatementError: ``expires`` is not after ``now``.
        ValueError: ``now`` is naive (a caller's bug).
    """
    require_aware(now)
    if statement.expires <= now:
        raise StaleStatementError(
            f"{statement.describe()} expired at {format_time(statement.expires)}: the device "
            "is not being told what to run (a frozen or cut-off coordinator)"
        )


def check_authentic(signed: SignedStatement, trusted: TrustedKeys, *, fleet: str) -> FleetStatement:
    """Check that a trusted key signed the statement and that it is for ``fleet``; no more.

    A device re-reads the statement it kept on disk with this (an expired one still
    sets the version floor); a received one goes through :func:`verify_statement`.

    Raises:
        SignatureError: (a subclass) no trusted key's signature verifies.
        StatementError: a trusted key signed bytes that are not a valid statement.
        WrongFleetError: the statement is for another fleet.
    """
    verify_threshold(signed, TrustedKeys(trusted.keys, 1))
    statement = signed.statement  # parsed only once a trusted key vouches for the bytes
    if statement.fleet != fleet:
        raise WrongFleetError(
            f"{statement.describe()} is for fleet {statement.fleet!r}, this device is in {fleet!r}"
        )
    return statement


def verify_statement(
    signed: SignedStatement,
    trusted: TrustedKeys,
    *,
    fleet: str,
    now: datetime,
    last_version: int | None,
) -> FleetStatement:
    """Accept a fleet statement for ``fleet`` if a trusted key signed it and it is fresh.

    Args:
        signed: the statement as received.
        trusted: the device's trusted keys; ONE distinct trusted key's signature is
            enough, whatever ``trusted.threshold`` (see the module docstring).
        fleet: the device's fleet id.
        now: the current time (timezone-aware).
        last_version: the version of the last statement the device accepted, or
            None if it never accepted one.

    Returns:
        The statement, to hold in place of the previous one.

    Raises:
        SignatureError: (a subclass) no trusted key's signature verifies.
        StatementError: a trusted key signed bytes that are not a valid statement.
        WrongFleetError: the statement is for another fleet.
        ReplayedStatementError: its version is not above ``last_version``.
        StaleStatementError: it has expired.
        ValueError: ``now`` is naive.
    """
    require_aware(now)
    statement = check_authentic(signed, trusted, fleet=fleet)
    if last_version is not None and statement.version <= last_version:
        raise ReplayedStatementError(
            f"{statement.describe()} is not newer than the accepted v{last_version} "
            "(a replayed or reordered statement)"
        )
    check_fresh(statement, now=now)
    return statement


def check_targeted(statement: FleetStatement, manifest: Manifest) -> None:
    """Raise unless ``statement`` names exactly ``manifest``'s name, version and sha256.

    Freshness is the caller's business (:func:`check_fresh`).

    Raises:
        NotTargetedError: the name is absent, or its version or sha256 differ.
    """
    target = statement.targets.get(manifest.name)
    if target is None:
        raise NotTargetedError(
            f"{manifest.name} v{manifest.version} is not named by {statement.describe()}"
        )
    if (target.version, target.sha256) != (manifest.version, manifest.sha256):
        raise NotTargetedError(
            f"{manifest.name} v{manifest.version} (sha256 {manifest.sha256[:16]}) is not what "
            f"{statement.describe()} names: v{target.version} (sha256 {target.sha256[:16]})"
        )
