"""Signing manifests and checking k-of-n signatures.

Workflow: the coordinator encodes a :class:`~compress.manifest.Manifest` to its
canonical bytes and calls :func:`sign_manifest` with one or more
:class:`~compress.keys.SigningKey`; more operators can add their signatures later with
:func:`add_signature` (a 2-of-3 policy needs two of them). The result, a
:class:`SignedManifest`, travels as one blob (:meth:`SignedManifest.to_bytes`): inside
the artifact file, and on its own in a deploy command so that an agent can refuse a
model before downloading a byte of it.

Each signature is Ed25519 over ``SIGNATURE_CONTEXT + manifest_bytes``: the context
(domain separation) keeps a manifest signature from ever being valid for any other
message signed by the same key. :func:`verify_signatures` counts distinct trusted keys
whose signature verifies and compares with the threshold of a :class:`TrustedKeys` set.
It is pure: bytes and keys in, a parsed manifest or a typed error out.

Blob layout (all integers big-endian)::

    b"FSM1" | u32 manifest length | manifest bytes | u32 sigs length | sigs JSON

``sigs JSON`` is canonical: ``{"signatures":[{"keyid":"<hex>","sig":"<hex>"}, ...]}``
sorted by key id.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from compress.errors import (
    BadSignatureError,
    ManifestError,
    NotAnArtifactError,
    ThresholdError,
    UnknownKeyError,
)
from compress.keys import PublicKey, SigningKey
from compress.manifest import MAX_MANIFEST_BYTES, Manifest
from compress.strictjson import FieldReader, canonical_bytes, loads_strict

SIGNATURE_CONTEXT = b"fedge/v1 manifest signature\x00"
BLOB_MAGIC = b"FSM1"
MAX_SIGNATURES = 16
MAX_SIGNATURES_BYTES = 8 * 1024
_U32 = struct.Struct(">I")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
MAX_BLOB_BYTES = len(BLOB_MAGIC) + 2 * _U32.size + MAX_MANIFEST_BYTES + MAX_SIGNATURES_BYTES


@dataclass(frozen=True)
class Signature:
    """One Ed25519 signature and the id of the key that claims to have made it."""

    key_id: str
    value: bytes


@dataclass(frozen=True)
class SignedManifest:
    """Canonical manifest bytes and their signatures, as received or as produced."""

    manifest_bytes: bytes
    signatures: tuple[Signature, ...]

    def __post_init__(self) -> None:
        # One order, so equal signature sets compare (and encode) equal.
        ordered = tuple(sorted(self.signatures, key=lambda s: (s.key_id, s.value)))
        object.__setattr__(self, "signatures", ordered)

    @cached_property
    def manifest(self) -> Manifest:
        """The parsed manifest. Parsing is not trust: call :func:`verify_signatures`.

        Raises:
            ManifestError: the bytes are not a valid canonical manifest.
        """
        return Manifest.from_bytes(self.manifest_bytes)

    def signatures_bytes(self) -> bytes:
        """The canonical JSON list of signatures."""
        return canonical_bytes(
            {"signatures": [{"keyid": s.key_id, "sig": s.value.hex()} for s in self.signatures]}
        )

    def to_bytes(self) -> bytes:
        """The blob that travels in artifacts and deploy commands."""
        sigs = self.signatures_bytes()
        return b"".join(
            (BLOB_MAGIC, _U32.pack(len(self.manifest_bytes)), self.manifest_bytes,
             _U32.pack(len(sigs)), sigs)
        )  # fmt: skip

    @classmethod
    def from_bytes(cls, blob: bytes) -> SignedManifest:
        """Split a blob into manifest bytes and signatures, strictly.

        The manifest bytes are not parsed here; signatures are checked over them first.

        Raises:
            NotAnArtifactError: wrong magic, truncated, lengths over limits, or trailing
                bytes.
            ManifestError: the signatures JSON is malformed.
        """
        view = memoryview(blob)
        if bytes(view[: len(BLOB_MAGIC)]) != BLOB_MAGIC:
            raise NotAnArtifactError("not a signed fedge manifest (bad magic)")
        manifest_len, offset = _read_length(view, len(BLOB_MAGIC), MAX_MANIFEST_BYTES, "manifest")
        manifest_bytes = bytes(view[offset : offset + manifest_len])
        if len(manifest_bytes) != manifest_len:
            raise NotAnArtifactError("signed manifest is truncated")
        sigs_len, offset = _read_length(
            view, offset + manifest_len, MAX_SIGNATURES_BYTES, "signature list"
        )
        if len(view) != offset + sigs_len:
            raise NotAnArtifactError(
                f"signed manifest is {len(view)} bytes, header says {offset + sigs_len}"
            )
        return cls(manifest_bytes, parse_signatures(bytes(view[offset:])))


def _read_length(view: memoryview, offset: int, limit: int, what: str) -> tuple[int, int]:
    """Read a u32 length at ``offset``; return it and the offset after it."""
    end = offset + _U32.size
    if len(view) < end:
        raise NotAnArtifactError(f"truncated before the {what} length")
    (length,) = _U32.unpack(view[offset:end])
    if length > limit:
        raise NotAnArtifactError(f"{what} length {length} is over the limit {limit}")
    return length, end


def parse_signatures(data: bytes) -> tuple[Signature, ...]:
    """Parse the canonical signatures JSON.

    Raises:
        ManifestError: malformed JSON or fields, too many signatures, not canonical.
    """
    if len(data) > MAX_SIGNATURES_BYTES:
        raise ManifestError(f"signature list is over {MAX_SIGNATURES_BYTES} bytes")
    obj = loads_strict(data, ManifestError, what="signature list", max_depth=3)
    r = FieldReader(obj, ManifestError, "signatures")
    items = r.items("signatures", max_len=MAX_SIGNATURES)
    sigs = []
    for i, item in enumerate(items):
        entry = r.wrap(f"signatures[{i}]", item)
        key_id = entry.text("keyid", max_len=64, pattern=_HEX64)
        value = bytes.fromhex(entry.text("sig", max_len=128, pattern=_HEX128))
        sigs.append(Signature(key_id, value))
    signed = SignedManifest(b"", tuple(sigs))
    if signed.signatures_bytes() != data:
        raise ManifestError("signature list is not in canonical form")
    return tuple(sigs)


def _signed_message(manifest_bytes: bytes) -> bytes:
    return SIGNATURE_CONTEXT + manifest_bytes


def sign_manifest(manifest: Manifest, keys: Sequence[SigningKey]) -> SignedManifest:
    """Sign a manifest's canonical bytes with each of ``keys``.

    Raises:
        ManifestError: no keys given.
    """
    if not keys:
        raise ManifestError("at least one signing key is needed")
    signed = SignedManifest(manifest.to_bytes(), ())
    for key in keys:
        signed = add_signature(signed, key)
    return signed


def add_signature(signed: SignedManifest, key: SigningKey) -> SignedManifest:
    """Return ``signed`` with ``key``'s signature added (replacing an older one by it)."""
    value = key.sign(_signed_message(signed.manifest_bytes))
    others = tuple(s for s in signed.signatures if s.key_id != key.key_id)
    if len(others) >= MAX_SIGNATURES:
        raise ManifestError(f"a manifest carries at most {MAX_SIGNATURES} signatures")
    return SignedManifest(signed.manifest_bytes, (*others, Signature(key.key_id, value)))


@dataclass(frozen=True)
class TrustedKeys:
    """A set of trusted public keys and how many of them must sign (k of n)."""

    keys: tuple[PublicKey, ...]
    threshold: int = 1

    def __post_init__(self) -> None:
        ids = [k.key_id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise ManifestError("trusted keys contain the same key twice")
        if not 1 <= self.threshold <= len(self.keys):
            raise ManifestError(
                f"threshold {self.threshold} must be between 1 and the number of "
                f"trusted keys ({len(self.keys)})"
            )

    @classmethod
    def of(cls, keys: Iterable[PublicKey], threshold: int = 1) -> TrustedKeys:
        """Build from any iterable of keys."""
        return cls(tuple(keys), threshold)

    def by_id(self) -> dict[str, PublicKey]:
        """Keys indexed by key id."""
        return {k.key_id: k for k in self.keys}


def verify_signatures(signed: SignedManifest, trusted: TrustedKeys) -> Manifest:
    """Check that at least ``threshold`` distinct trusted keys signed the manifest.

    Signatures by keys that are not trusted are ignored. Only after enough signatures
    verify are the manifest bytes parsed.

    Returns:
        The parsed manifest.

    Raises:
        BadSignatureError: a trusted key's signature does not verify and the threshold
            is not met without it (tampered manifest or signature).
        UnknownKeyError: no signature claims a trusted key.
        ThresholdError: fewer distinct trusted keys verified than the threshold.
        ManifestError: enough signatures verify but the manifest bytes are invalid.
    """
    by_id = trusted.by_id()
    message = _signed_message(signed.manifest_bytes)
    valid: set[str] = set()
    invalid: set[str] = set()
    for sig in signed.signatures:
        key = by_id.get(sig.key_id)
        if key is None:
            continue
        if key.verify(sig.value, message):
            valid.add(sig.key_id)
        else:
            invalid.add(sig.key_id)
    if len(valid) < trusted.threshold:
        if invalid - valid:
            raise BadSignatureError(
                f"signature by trusted key {sorted(invalid - valid)[0][:16]} does not verify"
                " (the manifest or its signature was altered)"
            )
        if not valid:
            claimed = ", ".join(s.key_id[:16] for s in signed.signatures) or "none"
            raise UnknownKeyError(f"signed by no trusted key (signed by: {claimed})")
        raise ThresholdError(
            f"{len(valid)} trusted signature(s) verify, {trusted.threshold} required"
        )
    return signed.manifest
