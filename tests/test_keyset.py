"""Key sets: canonical encoding, self-signed provisioning, and threshold rotation."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.errors import (
    BadSignatureError,
    CompressError,
    ExpiredError,
    KeySetError,
    ManifestError,
    NotAnArtifactError,
    RollbackError,
    ThresholdError,
    UnknownKeyError,
)
from compress.keys import SigningKey, generate_signing_key
from compress.keyset import (
    KEYSET_KIND,
    MAX_KEYSET_KEYS,
    KeySet,
    SignedKeySet,
    add_keyset_signature,
    sign_keyset,
    verify_initial_keyset,
    verify_rotation,
    verify_rotation_chain,
    verify_self_signed,
)
from compress.signing import (
    SIGNATURE_CONTEXT,
    Signature,
    SignedManifest,
    sign_manifest,
    verify_signatures,
)
from tests.conftest import NOW, make_manifest

A, B, C, D, E = (generate_signing_key() for _ in range(5))
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def keyset(keys: list[SigningKey], threshold: int, version: int = 1, **kw: Any) -> KeySet:
    fields: dict[str, Any] = {
        "created": NOW - timedelta(days=1),
        "expires": NOW + timedelta(days=365),
    }
    fields.update(kw)
    return KeySet(version, tuple(k.public_key for k in keys), threshold, **fields)


V1 = keyset([A, B, C], 2)
SIGNED_V1 = sign_keyset(V1, [A, B])


def test_round_trip() -> None:
    assert KeySet.from_bytes(V1.to_bytes()) == V1
    assert SignedKeySet.from_bytes(SIGNED_V1.to_bytes()) == SIGNED_V1
    assert SIGNED_V1.keyset == V1
    assert SIGNED_V1.document == V1.to_bytes()
    assert list(V1.key_ids) == sorted(k.key_id for k in (A, B, C))
    assert V1.trusted().threshold == 2
    assert {k.key_id for k in V1.trusted().keys} == {A.key_id, B.key_id, C.key_id}


def test_construction_normalises_key_order_and_time() -> None:
    moment = datetime(2026, 1, 1, 12, 0, 0, 999_999, tzinfo=UTC)
    one = keyset([C, A, B], 2, created=moment, expires=moment + timedelta(days=1))
    two = keyset([A, B, C], 2, created=moment.replace(microsecond=0), expires=one.expires)
    assert one == two
    assert one.created.microsecond == 0
    assert KeySet.from_bytes(one.to_bytes()) == one


def test_encoding_is_canonical() -> None:
    data = V1.to_bytes()
    assert data.startswith(b'{"created":"')
    assert b" " not in data
    for spelling in (
        data.replace(b'{"created"', b'{ "created"'),
        data.replace(b'"threshold":2', b'"threshold":2.0'),
        data.replace(V1.keys[0].raw.hex().encode(), V1.keys[0].raw.hex().upper().encode()),
        data + b" ",
    ):
        with pytest.raises(KeySetError):
            KeySet.from_bytes(spelling)


def test_unsorted_keys_are_not_canonical() -> None:
    raw = [k.raw.hex() for k in V1.keys]
    data = V1.to_bytes().replace(",".join(f'"{h}"' for h in raw).encode(), ",".join(
        f'"{h}"' for h in reversed(raw)
    ).encode())  # fmt: skip
    assert data != V1.to_bytes()
    with pytest.raises(KeySetError, match="canonical"):
        KeySet.from_bytes(data)


def test_unknown_fields_survive() -> None:
    newer = keyset([A], 1, extra={"roles": {"deploy": [1, 2]}, "zz": "x"})
    again = KeySet.from_bytes(newer.to_bytes())
    assert again.extra == {"roles": {"deploy": [1, 2]}, "zz": "x"}
    assert again.to_bytes() == newer.to_bytes()
    with pytest.raises(KeySetError, match="shadow"):
        keyset([A], 1, extra={"version": 7})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"keys": [], "threshold": 1}, "1 to 8 keys"),
        ({"threshold": 3}, "threshold 3"),
        ({"threshold": 0}, "threshold 0"),
        ({"version": 0}, "version 0"),
        ({"schema": 2}, "schema 2"),
        ({"expires": NOW - timedelta(days=2)}, "expires before"),
        ({"created": datetime(2026, 1, 1)}, "timezone-aware"),
        ({"extra": {"big": "x" * 20_000}}, "max is"),
        ({"extra": {"nan": float("nan")}}, "cannot be encoded"),
    ],
)
def test_invalid_key_sets_are_refused(fields: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {
        "version": 1,
        "keys": (A.public_key, B.public_key),
        "threshold": 1,
        "created": NOW - timedelta(days=1),
        "expires": NOW + timedelta(days=1),
    }
    args.update(fields)
    with pytest.raises(KeySetError, match=message):
        KeySet(**args)


def test_limits_on_keys() -> None:
    with pytest.raises(KeySetError, match="twice"):
        keyset([A, A], 1)
    many = [generate_signing_key() for _ in range(MAX_KEYSET_KEYS + 1)]
    with pytest.raises(KeySetError, match="1 to 8 keys"):
        keyset(many, 1)
    assert len(keyset(many[:MAX_KEYSET_KEYS], 1).keys) == MAX_KEYSET_KEYS


def test_keyset_errors_are_manifest_errors_with_their_own_code() -> None:
    assert issubclass(KeySetError, ManifestError)
    assert KeySetError.code not in {ManifestError.code, CompressError.code}


def test_initial_key_set() -> None:
    assert verify_initial_keyset(SIGNED_V1, now=NOW) == V1
    with pytest.raises(ThresholdError, match="its own keys"):
        verify_initial_keyset(sign_keyset(V1, [A]), now=NOW)
    with pytest.raises(UnknownKeyError):
        verify_initial_keyset(sign_keyset(V1, [D, E]), now=NOW)
    with pytest.raises(ExpiredError, match="expired at"):
        verify_initial_keyset(SIGNED_V1, now=V1.expires)
    later = sign_keyset(keyset([A, B, C], 2, version=2), [A, B])
    with pytest.raises(KeySetError, match="must be version 1"):
        verify_initial_keyset(later, now=NOW)
    assert verify_self_signed(later).version == 2
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_initial_keyset(SIGNED_V1, now=NOW.replace(tzinfo=None))


def test_rotation_drops_a_compromised_key() -> None:
    # C is compromised: A and B (2 of the current 3) sign v2 = {A, B, D}, 2 of 3.
    v2 = keyset([A, B, D], 2, version=2)
    signed = sign_keyset(v2, [A, B])
    assert verify_rotation(V1, signed, now=NOW) == v2
    # From then on C's signature counts for nothing.
    manifest = make_manifest()
    with pytest.raises(ThresholdError):
        verify_signatures(sign_manifest(manifest, [A, C]), v2.trusted())
    assert verify_signatures(sign_manifest(manifest, [A, D]), v2.trusted()) == manifest


def test_rotation_needs_the_current_threshold() -> None:
    v2 = keyset([A, D, E], 2, version=2)
    signed = sign_keyset(v2, [A, D, E])  # only A of the current A, B, C
    with pytest.raises(ThresholdError, match=r"current keys .* 1 trusted signature"):
        verify_rotation(V1, signed, now=NOW)
    assert verify_rotation(V1, add_keyset_signature(signed, B), now=NOW) == v2


def test_rotation_needs_the_new_keys() -> None:
    v2 = keyset([D, E], 2, version=2)
    with pytest.raises(UnknownKeyError, match="new keys"):
        verify_rotation(V1, sign_keyset(v2, [A, B]), now=NOW)
    with pytest.raises(ThresholdError, match="new keys"):
        verify_rotation(V1, sign_keyset(v2, [A, B, D]), now=NOW)
    assert verify_rotation(V1, sign_keyset(v2, [A, B, D, E]), now=NOW) == v2


def test_replayed_and_skipped_versions_are_rollbacks() -> None:
    v2 = keyset([A, B, D], 2, version=2)
    signed_v2 = sign_keyset(v2, [A, B])
    with pytest.raises(RollbackError, match="replayed"):
        verify_rotation(v2, signed_v2, now=NOW)
    with pytest.raises(RollbackError, match="replayed"):
        verify_rotation(v2, SIGNED_V1, now=NOW)
    skipped = sign_keyset(keyset([A, B, D], 2, version=3), [A, B])
    with pytest.raises(RollbackError, match="next must be v2"):
        verify_rotation(V1, skipped, now=NOW)


def test_expired_rotation() -> None:
    v2 = keyset([A, B], 2, version=2, expires=NOW)
    with pytest.raises(ExpiredError):
        verify_rotation(V1, sign_keyset(v2, [A, B]), now=NOW)


def test_tampered_key_set_is_bad_signature() -> None:
    signed = sign_keyset(keyset([A, B, D], 2, version=2), [A, B])
    forged = signed.document.replace(b'"threshold":2', b'"threshold":1')
    assert forged != signed.document
    with pytest.raises(BadSignatureError, match="key set or its signature"):
        verify_rotation(V1, SignedKeySet(forged, signed.signatures), now=NOW)


def test_signed_by_unknown_keys() -> None:
    with pytest.raises(UnknownKeyError, match="current keys"):
        verify_rotation(V1, sign_keyset(keyset([D, E], 1, version=2), [D, E]), now=NOW)


def test_chain_of_two_rotations() -> None:
    v2 = keyset([A, B, D], 2, version=2, expires=NOW - timedelta(hours=1))
    v3 = keyset([D, E], 1, version=3)
    chain = [sign_keyset(v2, [A, B]), sign_keyset(v3, [A, D])]
    # v2 has expired since, but the device may still walk through it to v3.
    assert verify_rotation_chain(V1, chain, now=NOW) == v3
    with pytest.raises(RollbackError):
        verify_rotation_chain(V1, [chain[0], chain[0], chain[1]], now=NOW)
    with pytest.raises(ThresholdError):  # v3 first: v1's keys never vouched for it
        verify_rotation_chain(V1, chain[::-1], now=NOW)
    with pytest.raises(ExpiredError):
        verify_rotation_chain(V1, chain[:1], now=NOW)
    with pytest.raises(ThresholdError):
        verify_rotation_chain(V1, [chain[0], sign_keyset(v3, [D])], now=NOW)
    assert verify_rotation_chain(V1, [], now=NOW) == V1


def test_signatures_are_bound_to_their_kind() -> None:
    raw = A.sign(SIGNATURE_CONTEXT + V1.to_bytes())
    as_manifest_signature = SignedKeySet(V1.to_bytes(), (Signature(A.key_id, raw),))
    with pytest.raises(BadSignatureError):
        verify_initial_keyset(as_manifest_signature, now=NOW)
    assert KEYSET_KIND.context != SIGNATURE_CONTEXT
    with pytest.raises(NotAnArtifactError, match="bad magic"):
        SignedManifest.from_bytes(SIGNED_V1.to_bytes())
    with pytest.raises(KeySetError, match="bad magic"):
        SignedKeySet.from_bytes(sign_manifest(make_manifest(), [A]).to_bytes())


def test_no_keys_cannot_sign() -> None:
    with pytest.raises(KeySetError):
        sign_keyset(V1, [])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:3],
        lambda b: b[:-1],
        lambda b: b + b"\0",
        lambda b: b[:4] + b"\xff\xff\xff\xff" + b[8:],
    ],
)
def test_malformed_blobs(mutate: Any) -> None:
    with pytest.raises(KeySetError):
        SignedKeySet.from_bytes(mutate(SIGNED_V1.to_bytes()))


@PROPERTY
@given(st.binary(max_size=2048))
def test_blob_decoder_raises_only_compress_errors(data: bytes) -> None:
    with contextlib.suppress(CompressError):
        verify_initial_keyset(SignedKeySet.from_bytes(data), now=NOW)


@PROPERTY
@given(st.binary(max_size=2048))
def test_keyset_decoder_raises_only_compress_errors(data: bytes) -> None:
    with contextlib.suppress(CompressError):
        KeySet.from_bytes(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@PROPERTY
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "schema": JSON,
            "version": JSON,
            "keys": JSON | st.just([A.public_key.raw.hex()]),
            "threshold": JSON,
            "created": JSON | st.just("2026-01-01T00:00:00Z"),
            "expires": JSON | st.just("2027-13-01T00:00:00Z"),
        },
    )
)
def test_keyset_fields_raise_only_keyset_errors(obj: dict[str, Any]) -> None:
    with contextlib.suppress(KeySetError):
        KeySet.from_dict(obj)


BLOB = SIGNED_V1.to_bytes()


@PROPERTY
@given(st.integers(min_value=0, max_value=len(BLOB) - 1), st.integers(min_value=1, max_value=255))
def test_every_byte_change_is_refused(at: int, xor: int) -> None:
    changed = BLOB[:at] + bytes([BLOB[at] ^ xor]) + BLOB[at + 1 :]
    with pytest.raises(CompressError):
        verify_initial_keyset(SignedKeySet.from_bytes(changed), now=NOW)
