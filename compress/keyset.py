"""Key sets: which keys a device trusts, and how that trust rotates.

A :class:`KeySet` names the Ed25519 public keys that sign manifests and how many of
them must sign (k of n, :meth:`KeySet.trusted`). It has a version that starts at 1
and grows by exactly one per rotation, and it expires. Like python-tuf's root role, a
key set is itself a signed document (:class:`SignedKeySet`, see
:mod:`compress.signing`; its signatures use their own context, so no manifest
signature is ever valid for a key set and vice versa).

Workflow:

1. Provisioning. The operator runs ``fedge keys keyset-init`` (:func:`sign_keyset`):
   version 1 lists the keys and the threshold and is signed by a threshold of its own
   keys. A device is provisioned with that file and accepts it with
   :func:`verify_initial_keyset`. Self-signing proves only that the listed key
   holders can act together; the file itself must reach the device by a trusted
   path (the image, the installer).
2. Rotation. To add or remove a key (a lost or compromised one), or change the
   threshold, the operator builds version 2 (``fedge keys rotate``) and signs it with
   a threshold of the version-1 keys *and* a threshold of the version-2 keys (a key
   in both sets signs once and counts for both). A compromised key is removed this
   way: the remaining holders of the old set sign a new set without it, and from then
   on its signatures count for nothing.
3. Applying. A device holding version N accepts a new key set only through
   :func:`verify_rotation`: (a) at least ``current.threshold`` of the current keys
   signed it, (b) at least ``new.threshold`` of the new keys signed it (the new
   holders can sign), (c) its version is exactly N + 1 (a replayed or skipped version
   raises :class:`~compress.errors.RollbackError`), (d) it has not expired. A device
   that missed several rotations applies them in order with
   :func:`verify_rotation_chain`; as in python-tuf, only the last key set of the chain
   must be unexpired, so a device that was offline for long can still catch up.

Everything here is pure (bytes, key sets and the current time in; values or typed
errors out). Reading and writing key-set files is the caller's business; the bytes
to write are :meth:`SignedKeySet.to_bytes`, at most :data:`MAX_SIGNED_KEYSET_BYTES`.

Encoding: canonical JSON (sorted keys, compact, UTF-8), keys as the lowercase hex of
their raw 32 bytes sorted by key id, timestamps as in manifests::

    {"created":"2026-01-01T00:00:00Z","expires":"2027-01-01T00:00:00Z",
     "keys":["<hex>", ...],"schema":1,"threshold":2,"version":1}

:meth:`KeySet.from_bytes` rejects any other spelling of the same content. Unknown
fields are kept in :attr:`KeySet.extra` and written back unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

from compress.errors import (
    ExpiredError,
    KeySetError,
    RollbackError,
    SignatureError,
)
from compress.keys import PublicKey, SigningKey
from compress.manifest import format_time, read_time, require_aware, whole_seconds
from compress.signing import (
    DocumentKind,
    SignedDocument,
    TrustedKeys,
    add_signature,
    sign_document,
    verify_threshold,
)
from compress.strictjson import FieldReader, JsonObject, decode_canonical, encode_canonical

KEYSET_SCHEMA_VERSION = 1
#: At most this many keys, so that every rotation's signers (old and new, all
#: distinct at worst) fit in :data:`compress.signing.MAX_SIGNATURES`.
MAX_KEYSET_KEYS = 8
MAX_KEYSET_BYTES = 16 * 1024
MAX_VERSION = 2**53

KEYSET_KIND = DocumentKind(
    name="key set",
    context=b"fedge/v1 keyset signature\x00",
    magic=b"FKS1",
    max_document_bytes=MAX_KEYSET_BYTES,
    error=KeySetError,
    framing_error=KeySetError,
)
MAX_SIGNED_KEYSET_BYTES = KEYSET_KIND.max_blob_bytes

_HEX64 = re.compile(r"[0-9a-f]{64}")
_KNOWN_FIELDS = frozenset({"schema", "version", "keys", "threshold", "created", "expires"})


@dataclass(frozen=True)
class KeySet:
    """The trusted signing keys, their threshold, a version and a validity period.

    Construction normalises (keys sorted by key id, times to whole UTC seconds) and
    validates, so a ``KeySet`` always encodes to bytes that :meth:`from_bytes` accepts.

    Raises:
        KeySetError: on construction, any field out of range (see :meth:`from_dict`).
    """

    version: int
    keys: tuple[PublicKey, ...]
    threshold: int
    created: datetime
    expires: datetime
    extra: Mapping[str, Any] = field(default_factory=dict)
    schema: int = KEYSET_SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(sorted(self.keys, key=lambda k: k.key_id)))
        object.__setattr__(
            self, "created", whole_seconds(self.created, KeySetError, "key set created")
        )
        object.__setattr__(
            self, "expires", whole_seconds(self.expires, KeySetError, "key set expires")
        )
        self._check()

    def _check(self) -> None:
        if not 1 <= self.schema <= KEYSET_SCHEMA_VERSION:
            raise KeySetError(
                f"key set schema {self.schema} is not one this fedge understands "
                f"(1 to {KEYSET_SCHEMA_VERSION})"
            )
        if not 1 <= self.version <= MAX_VERSION:
            raise KeySetError(f"key set version {self.version} must be 1 to {MAX_VERSION}")
        if not 1 <= len(self.keys) <= MAX_KEYSET_KEYS:
            raise KeySetError(f"a key set holds 1 to {MAX_KEYSET_KEYS} keys, got {len(self.keys)}")
        ids = self.key_ids
        if len(set(ids)) != len(ids):
            raise KeySetError("a key set lists the same key twice")
        if not 1 <= self.threshold <= len(self.keys):
            raise KeySetError(
                f"threshold {self.threshold} must be between 1 and the number of keys "
                f"({len(self.keys)})"
            )
        if self.expires <= self.created:
            raise KeySetError("key set expires before it was created")
        clash = sorted(_KNOWN_FIELDS & set(self.extra))
        if clash:
            raise KeySetError(f"extra fields shadow known ones: {', '.join(clash)}")
        size = len(self.to_bytes())
        if size > MAX_KEYSET_BYTES:
            raise KeySetError(f"key set is {size} bytes, max is {MAX_KEYSET_BYTES}")

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The key ids, sorted."""
        return tuple(k.key_id for k in self.keys)

    def trusted(self) -> TrustedKeys:
        """The keys and threshold that manifests (and the next key set) must meet."""
        return TrustedKeys(self.keys, self.threshold)

    def to_dict(self) -> JsonObject:
        """JSON form (unknown fields from a newer writer included)."""
        obj: JsonObject = dict(self.extra)
        obj.update(
            {
                "schema": self.schema,
                "version": self.version,
                "keys": [k.raw.hex() for k in self.keys],
                "threshold": self.threshold,
                "created": format_time(self.created),
                "expires": format_time(self.expires),
            }
        )
        return obj

    def to_bytes(self) -> bytes:
        """The canonical encoding: the bytes that are signed.

        Raises:
            KeySetError: ``extra`` holds something JSON cannot represent.
        """
        return encode_canonical(self.to_dict(), KeySetError, what="key set")

    @classmethod
    def from_bytes(cls, data: bytes) -> KeySet:
        """Parse canonical key-set bytes, strictly.

        Raises:
            KeySetError: too large, not JSON, schema violations, or not canonical.
        """
        return decode_canonical(
            data,
            KeySetError,
            what="key set",
            max_bytes=MAX_KEYSET_BYTES,
            build=cls.from_dict,
            encode=KeySet.to_bytes,
        )

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> KeySet:
        """Build a key set from its JSON form, checking every known field.

        Raises:
            KeySetError: a missing or invalid field, a duplicate key, a threshold out of
                range, an unsupported schema, or expiry not after creation.
        """
        r = FieldReader(obj, KeySetError, "keyset")
        hex_keys = r.texts("keys", max_len=MAX_KEYSET_KEYS, max_item_len=64, pattern=_HEX64)
        return cls(
            schema=r.integer("schema", lo=1),
            version=r.integer("version", lo=1, hi=MAX_VERSION),
            keys=tuple(PublicKey(bytes.fromhex(h)) for h in hex_keys),
            threshold=r.integer("threshold", lo=1, hi=MAX_KEYSET_KEYS),
            created=read_time(r, "created"),
            expires=read_time(r, "expires"),
            extra={k: v for k, v in obj.items() if k not in _KNOWN_FIELDS},
        )


class SignedKeySet(SignedDocument):
    """Canonical key-set bytes (:attr:`document`) and their signatures: a key-set file."""

    KIND = KEYSET_KIND

    @cached_property
    def keyset(self) -> KeySet:
        """The parsed key set. Parsing is not trust: use the ``verify_*`` functions.

        Raises:
            KeySetError: the bytes are not a valid canonical key set.
        """
        return KeySet.from_bytes(self.document)


def sign_keyset(keyset: KeySet, signing_keys: Sequence[SigningKey]) -> SignedKeySet:
    """Sign a key set's canonical bytes with each of ``signing_keys``.

    Raises:
        KeySetError: no keys given.
    """
    return sign_document(SignedKeySet, keyset.to_bytes(), signing_keys)


def add_keyset_signature(signed: SignedKeySet, key: SigningKey) -> SignedKeySet:
    """Return ``signed`` with ``key``'s signature added (replacing an older one by it).

    Raises:
        KeySetError: the key set already carries the most signatures allowed.
    """
    return add_signature(signed, key)


def _require_threshold(signed: SignedKeySet, keyset: KeySet, whose: str) -> None:
    """:func:`verify_threshold` against ``keyset``, naming ``whose`` keys in errors."""
    try:
        verify_threshold(signed, keyset.trusted())
    except SignatureError as exc:
        raise type(exc)(f"not signed by {whose} (key set v{keyset.version}): {exc}") from exc


def check_not_expired(keyset: KeySet, *, now: datetime) -> None:
    """Raise unless ``keyset`` is still valid at ``now``.

    Raises:
        ExpiredError: ``expires`` is not after ``now``.
        ValueError: ``now`` is naive (a caller's bug, not a key set's).
    """
    require_aware(now)
    if keyset.expires <= now:
        raise ExpiredError(f"key set v{keyset.version} expired at {format_time(keyset.expires)}")


def verify_self_signed(signed: SignedKeySet) -> KeySet:
    """Check that a threshold of the key set's own keys signed it; nothing more.

    Every key set a device accepts passes this, so it is a sanity check for tools (the
    CLI reads the current key set with it before a rotation). It says nothing about
    whether to trust the key set: anybody can sign a key set of their own keys.

    Raises:
        KeySetError: the bytes are not a valid key set.
        SignatureError: (a subclass) fewer than ``threshold`` of its keys signed it.
    """
    keyset = signed.keyset  # the keys to check against are inside the document
    _require_threshold(signed, keyset, "its own keys")
    return keyset


def verify_initial_keyset(signed: SignedKeySet, *, now: datetime) -> KeySet:
    """Accept a self-signed version-1 key set, to provision a device from a file.

    The file must come from a trusted source; see the module docstring.

    Returns:
        The key set to store as the device's trusted keys.

    Raises:
        KeySetError: the bytes are not a valid key set, or its version is not 1.
        SignatureError: (a subclass) fewer than ``threshold`` of its keys signed it.
        ExpiredError: it has expired.
        ValueError: ``now`` is naive.
    """
    require_aware(now)
    keyset = verify_self_signed(signed)
    if keyset.version != 1:
        raise KeySetError(
            f"an initial key set must be version 1, this is v{keyset.version}: apply it as a "
            "rotation over the key set before it"
        )
    check_not_expired(keyset, now=now)
    return keyset


def _next_keyset(current: KeySet, signed: SignedKeySet) -> KeySet:
    """Rules (a) to (c) of a rotation: old threshold, new threshold, next version."""
    _require_threshold(signed, current, "the current keys")
    new = signed.keyset  # parsed only once the current keys vouch for the bytes
    _require_threshold(signed, new, "the new keys")
    if new.version <= current.version:
        raise RollbackError(
            f"key set v{new.version} is not newer than the trusted v{current.version} "
            "(a replayed key set)"
        )
    if new.version != current.version + 1:
        raise RollbackError(
            f"key set v{new.version} skips versions: the trusted key set is "
            f"v{current.version}, so the next must be v{current.version + 1}"
        )
    return new


def verify_rotation(current: KeySet, signed: SignedKeySet, *, now: datetime) -> KeySet:
    """Accept the next key set if the current and the new keys both vouch for it.

    Args:
        current: the key set the device trusts now (it may have expired).
        signed: the proposed next key set as received.
        now: the current time (timezone-aware).

    Returns:
        The new key set, to store in place of ``current``.

    Raises:
        SignatureError: (a subclass) fewer than ``current.threshold`` of the current
            keys, or fewer than ``new.threshold`` of the new keys, signed it.
        KeySetError: the current keys signed bytes that are not a valid key set.
        RollbackError: its version is not exactly ``current.version + 1``.
        ExpiredError: it has expired.
        ValueError: ``now`` is naive.
    """
    require_aware(now)
    new = _next_keyset(current, signed)
    check_not_expired(new, now=now)
    return new


def verify_rotation_chain(
    current: KeySet, chain: Sequence[SignedKeySet], *, now: datetime
) -> KeySet:
    """Apply several rotations in order; only the resulting key set must be unexpired.

    Each step obeys rules (a) to (c) of :func:`verify_rotation` against the key set
    the step before produced. Intermediate key sets may have expired since, as in
    python-tuf's root chain, so a device that missed rotations can catch up.

    Returns:
        The last key set of the chain (``current`` itself for an empty chain).

    Raises:
        SignatureError: (a subclass) a step is not signed by enough old or new keys.
        KeySetError: a step's bytes are not a valid key set.
        RollbackError: a step's version is not one above the step before.
        ExpiredError: the resulting key set has expired.
        ValueError: ``now`` is naive.
    """
    require_aware(now)
    keyset = current
    for signed in chain:
        keyset = _next_keyset(keyset, signed)
    check_not_expired(keyset, now=now)
    return keyset
