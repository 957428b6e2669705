"""Property tests: no byte string makes the artifact decoders raise a foreign error.

Every decoder of untrusted bytes in ``compress`` (manifest, signed-manifest blob,
artifact container) must either succeed or raise :class:`CompressError`; and every
single-byte change to a valid artifact must be rejected.
"""

from __future__ import annotations

import contextlib
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.artifact import encode_artifact, read_payload, read_signed_manifest
from compress.errors import CompressError
from compress.keys import generate_signing_key
from compress.manifest import Manifest
from compress.signing import SignedManifest, TrustedKeys, sign_manifest
from compress.trust import verify_manifest
from tests.conftest import NOW, PAYLOAD, make_manifest

KEY = generate_signing_key()
TRUSTED = TrustedKeys.of([KEY.public_key])
SMALL_PAYLOAD = PAYLOAD[:300]
SIGNED = sign_manifest(make_manifest(SMALL_PAYLOAD), [KEY])
ARTIFACT = encode_artifact(SIGNED, SMALL_PAYLOAD)
MANIFEST_BYTES = SIGNED.manifest_bytes

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(data: bytes) -> bytes:
    stream = io.BytesIO(data)
    signed = read_signed_manifest(stream)
    manifest = verify_manifest(signed, TRUSTED, now=NOW)
    return read_payload(stream, manifest)


@PROPERTY
@given(st.binary(max_size=4096))
def test_manifest_decoder_raises_only_manifest_errors(data: bytes) -> None:
    with contextlib.suppress(CompressError):
        Manifest.from_bytes(data)


@PROPERTY
@given(st.binary(max_size=4096))
def test_blob_decoder_raises_only_compress_errors(data: bytes) -> None:
    with contextlib.suppress(CompressError):
        SignedManifest.from_bytes(data)


@PROPERTY
@given(st.binary(max_size=4096))
def test_artifact_decoder_raises_only_compress_errors(data: bytes) -> None:
    with contextlib.suppress(CompressError):
        load(data)


@PROPERTY
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=len(ARTIFACT)))
def test_artifact_with_random_bytes_spliced_in(junk: bytes, at: int) -> None:
    with contextlib.suppress(CompressError):
        load(ARTIFACT[:at] + junk + ARTIFACT[at:])


@PROPERTY
@given(
    st.integers(min_value=0, max_value=len(ARTIFACT) - 1), st.integers(min_value=1, max_value=255)
)
def test_every_single_byte_change_is_rejected(position: int, xor: int) -> None:
    data = bytearray(ARTIFACT)
    data[position] ^= xor
    try:
        load(bytes(data))
    except CompressError:
        return
    raise AssertionError(f"changing byte {position} went unnoticed")


@PROPERTY
@given(st.integers(min_value=0, max_value=len(ARTIFACT) - 1))
def test_every_truncation_is_rejected(length: int) -> None:
    try:
        load(ARTIFACT[:length])
    except CompressError:
        return
    raise AssertionError(f"truncation to {length} bytes went unnoticed")


@PROPERTY
@given(
    st.integers(min_value=0, max_value=len(MANIFEST_BYTES) - 1),
    st.integers(min_value=0, max_value=255),
)
def test_mutated_manifest_json_raises_only_manifest_errors(position: int, value: int) -> None:
    data = bytearray(MANIFEST_BYTES)
    data[position] = value
    with contextlib.suppress(CompressError):
        Manifest.from_bytes(bytes(data))


def test_valid_artifact_passes() -> None:
    assert load(ARTIFACT) == SMALL_PAYLOAD
