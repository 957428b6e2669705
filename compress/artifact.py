"""The artifact container: one file holding a signed manifest and a model payload.

Layout (integers big-endian)::

    b"FEDGEART" | u16 container version (1) | u32 blob length | signed-manifest blob | payload

The signed-manifest blob is :meth:`compress.signing.SignedManifest.to_bytes`, the same
bytes a deploy command carries. The payload is exactly ``manifest.length`` bytes; a file
with fewer or more bytes is rejected.

Reading follows the trust model's order: read the bounded header, verify signatures,
expiry, version and device fit (:func:`compress.trust.verify_manifest`), and only then
stream the payload in chunks through a :class:`compress.trust.PayloadVerifier`. The
reader never holds more than the manifest's declared length (one extra byte is read to
detect trailing data), so a hostile file cannot make it allocate more.

Writing (:func:`write_artifact`) refuses a payload that does not match the manifest and
replaces the destination atomically.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from compress.errors import ArtifactError, NotAnArtifactError, PayloadLengthError
from compress.fileio import atomic_write, open_regular
from compress.manifest import MAX_PAYLOAD_BYTES, Manifest
from compress.signing import MAX_BLOB_BYTES, SignedManifest, TrustedKeys
from compress.trust import DeviceProfile, PayloadVerifier, verify_manifest

ARTIFACT_MAGIC = b"FEDGEART"
CONTAINER_VERSION = 1
_HEADER = struct.Struct(">8sHI")
READ_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class VerifiedArtifact:
    """An artifact whose manifest is trusted and whose payload matches it."""

    manifest: Manifest
    signed: SignedManifest
    payload: bytes


def encode_artifact(signed: SignedManifest, payload: bytes) -> bytes:
    """The artifact file's bytes for a signed manifest and its payload.

    Raises:
        ManifestError: the manifest bytes are invalid.
        PayloadError: ``payload`` does not match the manifest's length or sha256.
    """
    verifier = PayloadVerifier(signed.manifest)
    verifier.update(payload)
    verifier.finish()
    blob = signed.to_bytes()
    return _HEADER.pack(ARTIFACT_MAGIC, CONTAINER_VERSION, len(blob)) + blob + payload


def write_artifact(path: Path, signed: SignedManifest, payload: bytes) -> None:
    """Write an artifact file atomically (a crash leaves no partial file).

    Raises:
        ManifestError: the manifest bytes are invalid.
        PayloadError: ``payload`` does not match the manifest.
        ArtifactError: the file cannot be written.
    """
    data = encode_artifact(signed, payload)
    try:
        atomic_write(Path(path), data)
    except OSError as exc:
        raise ArtifactError(f"cannot write {path}: {exc.strerror or exc}") from exc


def read_signed_manifest(stream: BinaryIO) -> SignedManifest:
    """Read the container header and the signed manifest; leave the stream at the payload.

    Raises:
        NotAnArtifactError: wrong magic or version, or a truncated or oversized header.
        ManifestError: malformed signature list.
    """
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size or not header.startswith(ARTIFACT_MAGIC):
        raise NotAnArtifactError("not a fedge artifact (bad magic)")
    _, version, blob_len = _HEADER.unpack(header)
    if version != CONTAINER_VERSION:
        raise NotAnArtifactError(
            f"artifact container version {version} is not supported (this fedge reads "
            f"{CONTAINER_VERSION})"
        )
    if blob_len > MAX_BLOB_BYTES:
        raise NotAnArtifactError(f"manifest block of {blob_len} bytes is over the limit")
    blob = stream.read(blob_len)
    if len(blob) != blob_len:
        raise NotAnArtifactError("artifact is truncated inside its manifest block")
    return SignedManifest.from_bytes(blob)


def read_payload(stream: BinaryIO, manifest: Manifest) -> bytes:
    """Read and check exactly ``manifest.length`` payload bytes from ``stream``.

    Raises:
        PayloadLengthError: the stream ends early or holds bytes after the payload.
        PayloadHashError: the sha256 differs.
    """
    verifier = PayloadVerifier(manifest)
    parts: list[bytes] = []
    while verifier.remaining:
        part = stream.read(min(READ_CHUNK_BYTES, verifier.remaining))
        if not part:
            break
        verifier.update(part)
        parts.append(part)
    if verifier.remaining == 0 and stream.read(1):
        verifier.update(b"\0")  # raises: the file is longer than declared
    verifier.finish()
    return b"".join(parts)


def _open(path: Path) -> BinaryIO:
    stream, _ = open_regular(path, error=ArtifactError, what="file")
    return stream


def read_artifact_unverified(path: Path) -> tuple[SignedManifest, bytes]:
    """Read an artifact, checking structure and the payload against the manifest.

    Signatures are NOT checked: use this only to show an artifact to a person.

    Raises:
        ArtifactError: (subclasses) unreadable, not an artifact, payload mismatch.
        ManifestError: the manifest is malformed.
    """
    with _open(path) as stream:
        signed = read_signed_manifest(stream)
        return signed, read_payload(stream, signed.manifest)


def read_artifact_raw(path: Path) -> tuple[SignedManifest, bytes]:
    """Read an artifact's signed manifest and payload without judging the payload.

    For relaying to devices that verify everything themselves (the coordinator's
    delivery): the container and the manifest's form are checked, the payload is
    returned as it is (at most :data:`compress.manifest.MAX_PAYLOAD_BYTES`), whether
    or not it matches the manifest.

    Raises:
        ArtifactError: unreadable, not an artifact, or a payload over the limit.
        ManifestError: the manifest is malformed.
    """
    with _open(path) as stream:
        signed = read_signed_manifest(stream)
        signed.manifest  # noqa: B018 - parse now, so a malformed manifest fails here
        payload = stream.read(MAX_PAYLOAD_BYTES + 1)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadLengthError(f"payload is over the {MAX_PAYLOAD_BYTES}-byte limit")
    return signed, payload


def load_artifact(
    path: Path,
    trusted: TrustedKeys,
    *,
    now: datetime,
    installed_version: int | None = None,
    device: DeviceProfile | None = None,
) -> VerifiedArtifact:
    """Open an artifact file and verify it completely, manifest first.

    Raises:
        ArtifactError: (subclasses) every trust and integrity failure.
        ManifestError: the manifest is malformed.
    """
    with _open(path) as stream:
        signed = read_signed_manifest(stream)
        manifest = verify_manifest(
            signed, trusted, now=now, installed_version=installed_version, device=device
        )
        payload = read_payload(stream, manifest)
    return VerifiedArtifact(manifest=manifest, signed=signed, payload=payload)
