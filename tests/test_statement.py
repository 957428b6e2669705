"""Fleet statements: canonical encoding, one-key signing, freshness, replay and targeting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from compress.errors import (
    BadSignatureError,
    ExpiredError,
    NotTargetedError,
    ReplayedStatementError,
    RollbackError,
    StaleStatementError,
    StatementError,
    UnknownKeyError,
    WrongFleetError,
)
from compress.keys import generate_signing_key
from compress.keyset import KeySet, sign_keyset
from compress.signing import SignedManifest, TrustedKeys, sign_manifest
from compress.statement import (
    MAX_STATEMENT_BYTES,
    MAX_TARGETS,
    FleetStatement,
    SignedStatement,
    Target,
    check_fresh,
    check_targeted,
    sign_statement,
    verify_statement,
)
from tests.conftest import NOW, make_manifest

A, B, C, OUTSIDER = (generate_signing_key() for _ in range(4))
TRUSTED = TrustedKeys.of([A.public_key, B.public_key, C.public_key], threshold=2)
MANIFEST = make_manifest()  # digits v3
TARGET = Target(MANIFEST.version, MANIFEST.sha256)


def statement(version: int = 7, **kw: Any) -> FleetStatement:
    fields: dict[str, Any] = {
        "fleet": "plant-a",
        "version": version,
        "issued": NOW - timedelta(minutes=1),
        "expires": NOW + timedelta(hours=6),
        "targets": {"digits": TARGET},
    }
    fields.update(kw)
    return FleetStatement(**fields)


def verify(signed: SignedStatement, **kw: Any) -> FleetStatement:
    args: dict[str, Any] = {"fleet": "plant-a", "now": NOW, "last_version": None}
    args.update(kw)
    return verify_statement(signed, TRUSTED, **args)


# ----------------------------------------------------------------------------- encoding


def test_round_trip_is_canonical_and_byte_exact() -> None:
    original = statement(targets={"zeta": Target(1, "a" * 64), "digits": TARGET})
    data = original.to_bytes()
    assert data.startswith(b'{"expires":"2026-11-22T18:00:00Z","fleet":"plant-a"')
    assert FleetStatement.from_bytes(data) == original
    assert list(FleetStatement.from_bytes(data).targets) == ["digits", "zeta"]
    blob = sign_statement(original, [A]).to_bytes()
    assert SignedStatement.from_bytes(blob).statement == original


def test_unknown_fields_survive_and_cannot_shadow() -> None:
    newer = statement(extra={"note": "from a newer coordinator"})
    assert FleetStatement.from_bytes(newer.to_bytes()).extra == {"note": "from a newer coordinator"}
    with pytest.raises(StatementError, match="shadow"):
        statement(extra={"version": 9})


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.replace(b'"version":7', b'"version": 7'),  # not canonical
        lambda d: d.replace(b'"fleet":"plant-a"', b'"fleet":"plant/a"'),  # topic-unsafe id
        lambda d: d.replace(b'"version":7', b'"version":0'),
        lambda d: d.replace(b'"version":3', b'"version":true'),  # bool is no int
        lambda d: d.replace(b'"digits"', b'"Digits"'),  # not a model name
        lambda d: d.replace(b'"schema":1', b'"schema":2'),  # a newer schema
        lambda d: d.replace(b"2026-11-22T18:00:00Z", b"2026-11-22 18:00:00"),
        lambda d: d + b" ",
        lambda d: b"[]",
    ],
)
def test_from_bytes_rejects_malformed(mutate: Any) -> None:
    with pytest.raises(StatementError):
        FleetStatement.from_bytes(mutate(statement().to_bytes()))


def test_construction_checks_fields() -> None:
    with pytest.raises(StatementError, match="expires before"):
        statement(expires=NOW - timedelta(hours=1))
    with pytest.raises(StatementError, match="timezone-aware"):
        statement(issued=datetime(2026, 1, 1))
    with pytest.raises(StatementError, match="fleet id"):
        statement(fleet="x" * 49)
    with pytest.raises(StatementError, match="at most"):
        statement(targets={f"m{i}": TARGET for i in range(MAX_TARGETS + 1)})
    with pytest.raises(StatementError, match="sha256"):
        Target(1, "A" * 64)
    with pytest.raises(StatementError):
        Target(0, "a" * 64)


def test_size_cap_holds_for_the_largest_statement() -> None:
    largest = statement(targets={f"m{i:02d}-" + "x" * 58: TARGET for i in range(MAX_TARGETS)})
    assert len(largest.to_bytes()) <= MAX_STATEMENT_BYTES
    with pytest.raises(StatementError, match="bytes"):
        FleetStatement.from_bytes(b"{" + b" " * MAX_STATEMENT_BYTES + b"}")


# ---------------------------------------------------------------------------- verifying


def test_one_trusted_signature_is_enough_whatever_the_threshold() -> None:
    accepted = verify(sign_statement(statement(), [A]), last_version=6)
    assert accepted == statement()


def test_outsider_or_tampered_statement_is_refused() -> None:
    with pytest.raises(UnknownKeyError):
        verify(sign_statement(statement(), [OUTSIDER]))
    signed = sign_statement(statement(), [A])
    forged = SignedStatement(statement(targets={}).to_bytes(), signed.signatures)
    with pytest.raises(BadSignatureError):
        verify(forged)


def test_other_documents_signatures_do_not_count() -> None:
    """A manifest or key-set signature by a trusted key never verifies a statement."""
    body = statement().to_bytes()
    manifest_sigs = sign_manifest(MANIFEST, [A]).signatures
    with pytest.raises(BadSignatureError):
        verify(SignedStatement(body, manifest_sigs))
    keys = KeySet(1, (A.public_key,), 1, NOW - timedelta(days=1), NOW + timedelta(days=9))
    with pytest.raises(BadSignatureError):
        verify(SignedStatement(body, sign_keyset(keys, [A]).signatures))
    with pytest.raises(StatementError, match="bad magic"):
        SignedStatement.from_bytes(SignedManifest(body, manifest_sigs).to_bytes())


def test_wrong_fleet_is_refused() -> None:
    with pytest.raises(WrongFleetError, match="plant-b"):
        verify(sign_statement(statement(fleet="plant-b"), [A]))


def test_replayed_or_older_statement_is_refused() -> None:
    signed = sign_statement(statement(version=7), [A])
    with pytest.raises(ReplayedStatementError, match="not newer than the accepted v7") as info:
        verify(signed, last_version=7)
    assert isinstance(info.value, RollbackError)
    assert info.value.code == "replayed_statement"
    with pytest.raises(ReplayedStatementError):
        verify(signed, last_version=8)
    assert verify(signed, last_version=6).version == 7


def test_expired_statement_is_stale() -> None:
    signed = sign_statement(statement(), [A])
    later = NOW + timedelta(hours=6)
    with pytest.raises(StaleStatementError) as info:
        verify(signed, now=later)
    assert isinstance(info.value, ExpiredError)
    assert info.value.code == "stale_statement"
    check_fresh(statement(), now=later - timedelta(seconds=1))
    with pytest.raises(StaleStatementError):
        check_fresh(statement(), now=later)
    with pytest.raises(ValueError, match="timezone-aware"):
        check_fresh(statement(), now=datetime(2026, 1, 1))


# --------------------------------------------------------------------------- targeting


def test_targeted_manifest_passes() -> None:
    check_targeted(statement(), MANIFEST)


@pytest.mark.parametrize(
    ("manifest", "match"),
    [
        (make_manifest(name="digits-canary", version=1), "not named"),
        (make_manifest(version=2), "v3"),  # an older version of the named model
        (make_manifest(version=4), "v3"),  # a newer one the statement does not name yet
        (make_manifest(payload=b"other bytes"), "sha256"),
    ],
)
def test_untargeted_manifest_is_refused(manifest: Any, match: str) -> None:
    with pytest.raises(NotTargetedError, match=match) as info:
        check_targeted(statement(), manifest)
    assert info.value.code == "not_targeted"


def test_statement_times_are_utc_whole_seconds() -> None:
    odd = statement(issued=datetime(2026, 11, 22, 13, 0, 0, 500, tzinfo=UTC))
    assert odd.issued == datetime(2026, 11, 22, 13, 0, 0, tzinfo=UTC)
