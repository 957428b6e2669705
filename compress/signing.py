"""Signed documents: k-of-n Ed25519 signatures over canonical bytes; signed manifests.

A signed document is canonical payload bytes plus signatures by key id. Two kinds
exist, each a :class:`DocumentKind` with its own signature context and blob magic:
manifests (here: :class:`SignedManifest`) and key sets
(:class:`compress.keyset.SignedKeySet`). Everything else is shared: the blob format,
its strict parsing, signing, and the threshold check.

Workflow for manifests: the coordinator encodes a :class:`~compress.manifest.Manifest`
to its canonical bytes and calls :func:`sign_manifest` with one or more
:class:`~compress.keys.SigningKey`; more operators can add their signatures later with
:func:`add_signature` (a 2-of-3 policy needs two of them). The result, a
:class:`SignedManifest`, travels as one blob (:meth:`SignedManifest.to_bytes`): inside
the artifact file, and on its own in a deploy command so that an agent can refuse a
model before downloading a byte of it.

Each signature is Ed25519 over ``kind.context + document_bytes``: the context (domain
separation) keeps a manifest signature (:data:`SIGNATURE_CONTEXT`) from ever being
valid for a key set or any other message signed by the same key, and vice versa.
:func:`verify_threshold` counts distinct trusted keys whose signature verifies and
compares with the threshold of a :class:`TrustedKeys` set; :func:`verify_signatures`
does that for a manifest and returns it parsed. Both are pure: bytes and keys in, a
value or a typed error out.

Blob layout (all integers big-endian)::

    magic (b"FSM1" for manifests) | u32 document length | document bytes
        | u32 sigs length | sigs JSON

``sigs JSON`` is canonical: ``{"signatures":[{"keyid":"<hex>","sig":"<hex>"}, ...]}``
sorted by key id.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Self, TypeVar

from compress.errors import (
    BadSignatureError,
    CompressError,
    ManifestError,
    NotAnArtifactError,
    ThresholdError,
    UnknownKeyError,
)
from compress.keys import PublicKey, SigningKey
from compress.manifest import MAX_MANIFEST_BYTES, Manifest
from compress.strictjson import FieldReader, JsonObject, canonical_bytes, decode_canonical

MAX_SIGNATURES = 16
MAX_SIGNATURES_BYTES = 8 * 1024
_U32 = struct.Struct(">I")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")


@dataclass(frozen=True)
class DocumentKind:
    """What sets one kind of signed document apart from the others.

    Attributes:
        name: what the document is called in messages (``"manifest"``).
        context: the prefix of every signed message (domain separation).
        magic: the first four bytes of the blob.
        max_document_bytes: the largest document a blob may carry.
        error: raised for a malformed signature list (and by the kind's own parser).
        framing_error: raised for bad magic, truncation, oversized lengths.
    """

    name: str
    context: bytes
    magic: bytes
    max_document_bytes: int
    error: type[CompressError]
    framing_error: type[CompressError]

    @property
    def max_blob_bytes(self) -> int:
        """The largest blob of this kind."""
        return len(self.magic) + 2 * _U32.size + self.max_document_bytes + MAX_SIGNATURES_BYTES


MANIFEST_KIND = DocumentKind(
    name="manifest",
    context=b"fedge/v1 manifest signature\x00",
    magic=b"FSM1",
    max_document_bytes=MAX_MANIFEST_BYTES,
    error=ManifestError,
    framing_error=NotAnArtifactError,
)
SIGNATURE_CONTEXT = MANIFEST_KIND.context
MAX_BLOB_BYTES = MANIFEST_KIND.max_blob_bytes


@dataclass(frozen=True)
class Signature:
    """One Ed25519 signature and the id of the key that claims to have made it."""

    key_id: str
    value: bytes


def _signature_order(signature: Signature) -> tuple[str, bytes]:
    return signature.key_id, signature.value


def _signatures_json(signatures: Iterable[Signature]) -> bytes:
    """The canonical signatures JSON: sorted by key id (then value)."""
    ordered = sorted(signatures, key=_signature_order)
    return canonical_bytes(
        {"signatures": [{"keyid": s.key_id, "sig": s.value.hex()} for s in ordered]}
    )


@dataclass(frozen=True)
class SignedDocument:
    """Canonical document bytes and their signatures, as received or as produced.

    Subclasses set :attr:`KIND`; this class holds everything that does not depend on
    what the document is.
    """

    KIND: ClassVar[DocumentKind]

    document: bytes
    signatures: tuple[Signature, ...]

    def __post_init__(self) -> None:
        # One order, so equal signature sets compare (and encode) equal.
        ordered = tuple(sorted(self.signatures, key=_signature_order))
        object.__setattr__(self, "signatures", ordered)

    def signed_message(self) -> bytes:
        """The bytes each signature is over: the kind's context, then the document."""
        return self.KIND.context + self.document

    def signatures_bytes(self) -> bytes:
        """The canonical JSON list of signatures."""
        return _signatures_json(self.signatures)

    def to_bytes(self) -> bytes:
        """The blob: magic, document and signatures, each length-prefixed."""
        sigs = self.signatures_bytes()
        return b"".join(
            (self.KIND.magic, _U32.pack(len(self.document)), self.document,
             _U32.pack(len(sigs)), sigs)
        )  # fmt: skip

    @classmethod
    def from_bytes(cls, blob: bytes) -> Self:
        """Split a blob into document bytes and signatures, strictly.

        The document bytes are not parsed here; signatures are checked over them first.

        Raises:
            CompressError: the kind's ``framing_error`` for wrong magic, truncation,
                lengths over limits or trailing bytes; its ``error`` for a malformed
                signatures JSON.
        """
        kind = cls.KIND
        fail = kind.framing_error
        view = memoryview(blob)
        if bytes(view[: len(kind.magic)]) != kind.magic:
            raise fail(f"not a signed fedge {kind.name} (bad magic)")
        doc_len, offset = _read_length(
            view, len(kind.magic), kind.max_document_bytes, kind.name, fail
        )
        document = bytes(view[offset : offset + doc_len])
        if len(document) != doc_len:
            raise fail(f"signed {kind.name} is truncated")
        sigs_len, offset = _read_length(
            view, offset + doc_len, MAX_SIGNATURES_BYTES, "signature list", fail
        )
        if len(view) != offset + sigs_len:
            raise fail(f"signed {kind.name} is {len(view)} bytes, header says {offset + sigs_len}")
        return cls(document, parse_signatures(bytes(view[offset:]), kind.error))


def _read_length(
    view: memoryview, offset: int, limit: int, what: str, fail: type[CompressError]
) -> tuple[int, int]:
    """Read a u32 length at ``offset``; return it and the offset after it."""
    end = offset + _U32.size
    if len(view) < end:
        raise fail(f"truncated before the {what} length")
    (length,) = _U32.unpack(view[offset:end])
    if length > limit:
        raise fail(f"{what} length {length} is over the limit {limit}")
    return length, end


def parse_signatures(
    data: bytes, error: type[CompressError] = ManifestError
) -> tuple[Signature, ...]:
    """Parse the canonical signatures JSON.

    Raises:
        CompressError: ``error`` (by default :class:`ManifestError`) for malformed JSON
            or fields, too many signatures, or a list not in canonical form.
    """

    def entry(r: FieldReader, key: str) -> Signature:
        fields = r.req_obj(key)
        return Signature(
            fields.text("keyid", max_len=64, pattern=_HEX64),
            bytes.fromhex(fields.text("sig", max_len=128, pattern=_HEX128)),
        )

    def build(obj: JsonObject) -> tuple[Signature, ...]:
        reader = FieldReader(obj, error, "signatures")
        return tuple(reader.each("signatures", entry, max_len=MAX_SIGNATURES))

    return decode_canonical(
        data,
        error,
        what="signature list",
        max_bytes=MAX_SIGNATURES_BYTES,
        build=build,
        encode=_signatures_json,
        max_depth=3,
    )


D = TypeVar("D", bound=SignedDocument)


def sign_document(cls: type[D], document: bytes, keys: Sequence[SigningKey]) -> D:
    """Sign canonical document bytes with each of ``keys``.

    Raises:
        CompressError: the kind's ``error`` when no keys are given.
    """
    if not keys:
        raise cls.KIND.error("at least one signing key is needed")
    signed = cls(document, ())
    for key in keys:
        signed = add_signature(signed, key)
    return signed


def add_signature(signed: D, key: SigningKey) -> D:
    """Return ``signed`` with ``key``'s signature added (replacing an older one by it).

    Raises:
        CompressError: the kind's ``error`` when the document already carries
            :data:`MAX_SIGNATURES` signatures by other keys.
    """
    value = key.sign(signed.signed_message())
    others = tuple(s for s in signed.signatures if s.key_id != key.key_id)
    if len(others) >= MAX_SIGNATURES:
        raise signed.KIND.error(f"a {signed.KIND.name} carries at most {MAX_SIGNATURES} signatures")
    return type(signed)(signed.document, (*others, Signature(key.key_id, value)))


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


def verify_threshold(signed: SignedDocument, trusted: TrustedKeys) -> None:
    """Check that at least ``threshold`` distinct trusted keys signed the document.

    Signatures by keys that are not trusted are ignored, and so is a bad signature
    when enough others verify. The document bytes are not parsed.

    Raises:
        BadSignatureError: a trusted key's signature does not verify and the threshold
            is not met without it (tampered document or signature).
        UnknownKeyError: no signature claims a trusted key.
        ThresholdError: fewer distinct trusted keys verified than the threshold.
    """
    by_id = trusted.by_id()
    message = signed.signed_message()
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
    if len(valid) >= trusted.threshold:
        return
    if invalid - valid:
        raise BadSignatureError(
            f"signature by trusted key {sorted(invalid - valid)[0][:16]} does not verify"
            f" (the {signed.KIND.name} or its signature was altered)"
        )
    if not valid:
        claimed = ", ".join(s.key_id[:16] for s in signed.signatures) or "none"
        raise UnknownKeyError(f"signed by no trusted key (signed by: {claimed})")
    raise ThresholdError(f"{len(valid)} trusted signature(s) verify, {trusted.threshold} required")


class SignedManifest(SignedDocument):
    """Canonical manifest bytes and their signatures, as received or as produced."""

    KIND = MANIFEST_KIND

    @property
    def manifest_bytes(self) -> bytes:
        """The canonical manifest bytes (the signed document)."""
        return self.document

    @cached_property
    def manifest(self) -> Manifest:
        """The parsed manifest. Parsing is not trust: call :func:`verify_signatures`.

        Raises:
            ManifestError: the bytes are not a valid canonical manifest.
        """
        return Manifest.from_bytes(self.document)


def sign_manifest(manifest: Manifest, keys: Sequence[SigningKey]) -> SignedManifest:
    """Sign a manifest's canonical bytes with each of ``keys``.

    Raises:
        ManifestError: no keys given.
    """
    return sign_document(SignedManifest, manifest.to_bytes(), keys)


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
    verify_threshold(signed, trusted)
    return signed.manifest
