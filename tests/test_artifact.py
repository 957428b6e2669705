"""The artifact container and the trust rules, one error type per tamper case."""

from __future__ import annotations

import io
import os
from datetime import timedelta
from pathlib import Path

import pytest

from compress.artifact import (
    ARTIFACT_MAGIC,
    encode_artifact,
    load_artifact,
    read_artifact_unverified,
    read_payload,
    read_signed_manifest,
    write_artifact,
)
from compress.errors import (
    ArtifactError,
    BadSignatureError,
    ExpiredError,
    IncompatibleDeviceError,
    NotAnArtifactError,
    PayloadHashError,
    PayloadLengthError,
    RollbackError,
    UnknownKeyError,
)
from compress.keys import SigningKey, generate_signing_key
from compress.signing import SignedManifest, TrustedKeys, sign_manifest
from compress.trust import DeviceProfile, verify_manifest
from tests.conftest import NOW, PAYLOAD, ArtifactFactory, make_manifest


@pytest.fixture
def trusted(signing_key: SigningKey) -> TrustedKeys:
    return TrustedKeys.of([signing_key.public_key])


def payload_offset(path: Path) -> int:
    with path.open("rb") as f:
        read_signed_manifest(f)
        return f.tell()


def test_valid_artifact_loads(artifact_file: ArtifactFactory, trusted: TrustedKeys) -> None:
    result = load_artifact(artifact_file(), trusted, now=NOW)
    assert result.payload == PAYLOAD
    assert result.manifest.version == 3


def test_bad_signature(artifact_file: ArtifactFactory, trusted: TrustedKeys) -> None:
    path = artifact_file()
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"version":3', b'"version":4', 1))
    with pytest.raises(BadSignatureError):
        load_artifact(path, trusted, now=NOW)


def test_unknown_key(artifact_file: ArtifactFactory, trusted: TrustedKeys) -> None:
    path = artifact_file(keys=[generate_signing_key()])
    with pytest.raises(UnknownKeyError):
        load_artifact(path, trusted, now=NOW)


def test_payload_hash_mismatch(artifact_file: ArtifactFactory, trusted: TrustedKeys) -> None:
    path = artifact_file()
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PayloadHashError):
        load_artifact(path, trusted, now=NOW)


def test_truncated_payload(artifact_file: ArtifactFactory, trusted: TrustedKeys) -> None:
    path = artifact_file()
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(PayloadLengthError, match="declares"):
        load_artifact(path, trusted, now=NOW)


def test_trailing_bytes(artifact_file: ArtifactFactory, trusted: TrustedKeys) -> None:
    path = artifact_file()
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(PayloadLengthError, match="longer"):
        load_artifact(path, trusted, now=NOW)


def test_expired(artifact_file: ArtifactFactory, trusted: TrustedKeys) -> None:
    path = artifact_file()
    with pytest.raises(ExpiredError):
        load_artifact(path, trusted, now=NOW + timedelta(days=31))


def test_rollback(artifact_file: ArtifactFactory, trusted: TrustedKeys) -> None:
    path = artifact_file()
    assert load_artifact(path, trusted, now=NOW, installed_version=2).manifest.version == 3
    for installed in (3, 4):
        with pytest.raises(RollbackError):
            load_artifact(path, trusted, now=NOW, installed_version=installed)


def test_device_fit(artifact_file: ArtifactFactory, trusted: TrustedKeys) -> None:
    path = artifact_file(hardware_tags=("arm64", "camera"))
    fits = DeviceProfile(
        runtimes=frozenset({"onnxruntime"}), hardware_tags=frozenset({"arm64", "camera", "gpio"})
    )
    assert load_artifact(path, trusted, now=NOW, device=fits).manifest.hardware_tags
    with pytest.raises(IncompatibleDeviceError, match="camera"):
        load_artifact(
            path, trusted, now=NOW, device=DeviceProfile(hardware_tags=frozenset({"arm64"}))
        )
    with pytest.raises(IncompatibleDeviceError, match="onnxruntime"):
        load_artifact(
            path,
            trusted,
            now=NOW,
            device=DeviceProfile(
                runtimes=frozenset({"tflite"}), hardware_tags=frozenset({"arm64", "camera"})
            ),
        )


@pytest.mark.parametrize(
    "content", [b"", b"FEDGE", b"\x89PNG\r\n\x1a\n" + b"\0" * 100, b"FEDGEART\x00\x02\0\0\0\0"]
)
def test_not_an_artifact(tmp_path: Path, trusted: TrustedKeys, content: bytes) -> None:
    path = tmp_path / "x.fedge"
    path.write_bytes(content)
    with pytest.raises(NotAnArtifactError):
        load_artifact(path, trusted, now=NOW)


def test_truncated_header(artifact_file: ArtifactFactory, trusted: TrustedKeys) -> None:
    path = artifact_file()
    path.write_bytes(path.read_bytes()[: payload_offset(path) - 5])
    with pytest.raises(NotAnArtifactError, match="truncated"):
        load_artifact(path, trusted, now=NOW)


def test_missing_file_and_directory(tmp_path: Path, trusted: TrustedKeys) -> None:
    with pytest.raises(ArtifactError, match="no such file"):
        load_artifact(tmp_path / "nope.fedge", trusted, now=NOW)
    with pytest.raises(ArtifactError, match="directory"):
        load_artifact(tmp_path, trusted, now=NOW)


class CountingReader(io.BytesIO):
    """A stream that records how many bytes were read from it."""

    total = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.total += len(data)
        return data


def test_reader_never_buffers_past_declared_length(signed: SignedManifest) -> None:
    data = encode_artifact(signed, PAYLOAD) + b"\0" * 5_000_000
    stream = CountingReader(data)
    manifest = read_signed_manifest(stream)
    header_len = stream.total
    with pytest.raises(PayloadLengthError):
        read_payload(stream, manifest.manifest)
    assert stream.total <= header_len + len(PAYLOAD) + 1


def test_signature_is_checked_before_payload_is_read(
    signing_key: SigningKey, trusted: TrustedKeys
) -> None:
    stranger = sign_manifest(make_manifest(), [generate_signing_key()])
    stream = CountingReader(encode_artifact(stranger, PAYLOAD))
    header = read_signed_manifest(stream)
    with pytest.raises(UnknownKeyError):
        verify_manifest(header, trusted, now=NOW)
    assert stream.total < len(PAYLOAD)


def test_writer_refuses_mismatched_payload(tmp_path: Path, signed: SignedManifest) -> None:
    with pytest.raises(PayloadHashError):
        write_artifact(tmp_path / "a.fedge", signed, PAYLOAD[:-1] + b"?")
    with pytest.raises(PayloadLengthError):
        write_artifact(tmp_path / "a.fedge", signed, PAYLOAD + b"?")
    assert not list(tmp_path.iterdir())


def test_writer_reports_unwritable_destination(tmp_path: Path, signed: SignedManifest) -> None:
    with pytest.raises(ArtifactError, match="cannot write"):
        write_artifact(tmp_path / "missing-dir" / "a.fedge", signed, PAYLOAD)


def test_unverified_read_still_checks_the_payload(artifact_file: ArtifactFactory) -> None:
    path = artifact_file(keys=[generate_signing_key()])
    signed, payload = read_artifact_unverified(path)
    assert payload == PAYLOAD
    assert signed.manifest.name == "digits"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(PayloadLengthError):
        read_artifact_unverified(path)


def test_container_starts_with_magic(artifact_file: ArtifactFactory) -> None:
    assert artifact_file().read_bytes().startswith(ARTIFACT_MAGIC)


def test_naive_clock_is_a_caller_bug(signed: SignedManifest, trusted: TrustedKeys) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_manifest(signed, trusted, now=NOW.replace(tzinfo=None))


def test_a_pipe_is_refused_without_opening_it(tmp_path: Path, trusted: TrustedKeys) -> None:
    fifo = tmp_path / "pipe.fedge"
    os.mkfifo(fifo)
    with pytest.raises(ArtifactError, match="not a regular file"):
        load_artifact(fifo, trusted, now=NOW)
