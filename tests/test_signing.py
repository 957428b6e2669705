"""Signing and k-of-n verification, and the signed-manifest blob."""

from __future__ import annotations

import dataclasses

import pytest

from compress.errors import (
    BadSignatureError,
    ManifestError,
    NotAnArtifactError,
    SignatureError,
    ThresholdError,
    UnknownKeyError,
)
from compress.keys import SigningKey, generate_signing_key
from compress.manifest import Manifest
from compress.signing import (
    SIGNATURE_CONTEXT,
    Signature,
    SignedManifest,
    TrustedKeys,
    add_signature,
    sign_manifest,
    verify_signatures,
)


def trust(keys: list[SigningKey], threshold: int = 1) -> TrustedKeys:
    return TrustedKeys.of((k.public_key for k in keys), threshold)


def test_sign_verify_round_trip(
    signed: SignedManifest, signing_key: SigningKey, manifest: Manifest
) -> None:
    assert verify_signatures(signed, trust([signing_key])) == manifest


def test_two_of_three(manifest: Manifest, signing_keys: list[SigningKey]) -> None:
    trusted = trust(signing_keys, threshold=2)
    one = sign_manifest(manifest, signing_keys[:1])
    with pytest.raises(ThresholdError, match="1 trusted signature"):
        verify_signatures(one, trusted)
    two = add_signature(one, signing_keys[2])
    assert verify_signatures(two, trusted) == manifest
    three = sign_manifest(manifest, signing_keys)
    assert verify_signatures(three, trusted) == manifest


def test_same_key_twice_counts_once(manifest: Manifest, signing_keys: list[SigningKey]) -> None:
    one = sign_manifest(manifest, signing_keys[:1])
    doubled = SignedManifest(one.manifest_bytes, one.signatures * 2)
    with pytest.raises(ThresholdError):
        verify_signatures(doubled, trust(signing_keys, threshold=2))


def test_re_signing_replaces_the_old_signature(
    signed: SignedManifest, signing_key: SigningKey
) -> None:
    again = add_signature(signed, signing_key)
    assert len(again.signatures) == 1


def test_unknown_key(signed: SignedManifest) -> None:
    with pytest.raises(UnknownKeyError, match="no trusted key"):
        verify_signatures(signed, trust([generate_signing_key()]))


def test_unsigned_manifest_is_unknown_key(manifest: Manifest, signing_key: SigningKey) -> None:
    with pytest.raises(UnknownKeyError):
        verify_signatures(SignedManifest(manifest.to_bytes(), ()), trust([signing_key]))


def test_tampered_manifest_is_bad_signature(
    signed: SignedManifest, signing_key: SigningKey
) -> None:
    forged = signed.manifest_bytes.replace(b'"version":3', b'"version":9')
    assert forged != signed.manifest_bytes
    with pytest.raises(BadSignatureError):
        verify_signatures(SignedManifest(forged, signed.signatures), trust([signing_key]))


def test_tampered_signature_is_bad_signature(
    signed: SignedManifest, signing_key: SigningKey
) -> None:
    sig = signed.signatures[0]
    flipped = bytes([sig.value[0] ^ 1]) + sig.value[1:]
    bad = dataclasses.replace(signed, signatures=(Signature(sig.key_id, flipped),))
    with pytest.raises(BadSignatureError):
        verify_signatures(bad, trust([signing_key]))


def test_signature_without_context_does_not_verify(
    manifest: Manifest, signing_key: SigningKey
) -> None:
    raw = signing_key.sign(manifest.to_bytes())
    naked = SignedManifest(manifest.to_bytes(), (Signature(signing_key.key_id, raw),))
    with pytest.raises(BadSignatureError):
        verify_signatures(naked, trust([signing_key]))
    assert SIGNATURE_CONTEXT.startswith(b"fedge/")


def test_one_bad_signature_does_not_spoil_enough_good_ones(
    manifest: Manifest, signing_keys: list[SigningKey]
) -> None:
    good = sign_manifest(manifest, signing_keys[:2])
    bogus = Signature(signing_keys[2].key_id, b"\0" * 64)
    mixed = SignedManifest(good.manifest_bytes, (*good.signatures, bogus))
    assert verify_signatures(mixed, trust(signing_keys, threshold=2)) == manifest


def test_all_signature_errors_share_a_base(signed: SignedManifest) -> None:
    with pytest.raises(SignatureError):
        verify_signatures(signed, trust([generate_signing_key()]))


def test_trusted_keys_validate_threshold(signing_keys: list[SigningKey]) -> None:
    with pytest.raises(ManifestError, match="threshold"):
        trust(signing_keys, threshold=4)
    with pytest.raises(ManifestError, match="threshold"):
        trust(signing_keys, threshold=0)
    with pytest.raises(ManifestError, match="twice"):
        trust([signing_keys[0], signing_keys[0]])


def test_blob_round_trip(manifest: Manifest, signing_keys: list[SigningKey]) -> None:
    signed = sign_manifest(manifest, signing_keys)
    assert SignedManifest.from_bytes(signed.to_bytes()) == signed


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:3],
        lambda b: b"XXXX" + b[4:],
        lambda b: b[:-1],
        lambda b: b + b"\0",
        lambda b: b[:4] + b"\xff\xff\xff\xff" + b[8:],
    ],
)
def test_malformed_blobs(signed: SignedManifest, mutate: object) -> None:
    with pytest.raises(NotAnArtifactError):
        SignedManifest.from_bytes(mutate(signed.to_bytes()))  # type: ignore[operator]


def test_signature_list_must_be_canonical(signed: SignedManifest) -> None:
    blob = signed.to_bytes().replace(b'{"signatures":', b'{ "signatures":')
    fixed = blob[:4] + blob[4:8] + blob[8:]
    # lengths now disagree with content: either framing or canonical check must refuse
    with pytest.raises((NotAnArtifactError, ManifestError)):
        SignedManifest.from_bytes(fixed)


def test_no_keys_cannot_sign(manifest: Manifest) -> None:
    with pytest.raises(ManifestError):
        sign_manifest(manifest, [])
