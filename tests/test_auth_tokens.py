"""API tokens: the pure helpers in coordinator.service.tokens and the store's token table."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest

from coordinator.errors import NotFoundError, StoreError
from coordinator.service.store import LAST_USED_RESOLUTION_S, Store
from coordinator.service.tokens import (
    TOKEN_PREFIX,
    Role,
    hash_token,
    looks_like_token,
    new_token,
    token_id,
)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "state.db")


def test_roles_operator_includes_viewer() -> None:
    assert Role.OPERATOR.allows(Role.VIEWER)
    assert Role.OPERATOR.allows(Role.OPERATOR)
    assert Role.VIEWER.allows(Role.VIEWER)
    assert not Role.VIEWER.allows(Role.OPERATOR)
    assert Role("viewer") is Role.VIEWER
    with pytest.raises(ValueError, match="admin"):
        Role("admin")


def test_new_token_format_and_randomness() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert token.startswith(TOKEN_PREFIX)
        body = token.removeprefix(TOKEN_PREFIX)
        assert len(base64.urlsafe_b64decode(body + "=")) == 32
        assert looks_like_token(token)


def test_hash_and_id() -> None:
    token = new_token()
    digest = hash_token(token)
    assert digest == hash_token(token)
    assert len(digest) == 64
    assert int(digest, 16) >= 0
    assert hash_token(token + "x") != digest
    assert token_id(digest) == digest[:12]
    assert token not in digest
    # Hostile input never raises.
    assert len(hash_token("fedge_\ud800\x00")) == 64


def test_looks_like_token_rejects_garbage() -> None:
    assert not looks_like_token("")
    assert not looks_like_token("Bearer x")
    assert not looks_like_token(TOKEN_PREFIX + "a" * 500)


def test_add_list_authenticate(store: Store) -> None:
    row, plaintext = store.add_token("ci", Role.VIEWER, at=100.0)
    assert row.token_id == token_id(hash_token(plaintext))
    assert (row.name, row.role, row.created_at) == ("ci", Role.VIEWER, 100.0)
    assert row.revoked_at is None
    assert row.last_used_at is None
    assert store.tokens() == [row]
    assert store.token(row.token_id) == row

    found = store.authenticate(plaintext, at=200.0)
    assert found is not None
    assert found.token_id == row.token_id
    assert found.role is Role.VIEWER
    assert found.last_used_at == 200.0
    assert store.token(row.token_id) == found

    assert store.authenticate(plaintext + "x", at=200.0) is None
    assert store.authenticate(new_token(), at=200.0) is None
    assert store.authenticate("not a token", at=200.0) is None
    assert store.authenticate("", at=200.0) is None


def test_revoked_token_fails(store: Store) -> None:
    keep, keep_plain = store.add_token("keep", Role.OPERATOR, at=1.0)
    gone, gone_plain = store.add_token("gone", Role.OPERATOR, at=2.0)
    assert store.authenticate(gone_plain, at=3.0) is not None
    revoked = store.revoke_token(gone.token_id, at=4.0)
    assert revoked.revoked_at == 4.0
    assert store.authenticate(gone_plain, at=5.0) is None
    assert store.authenticate(keep_plain, at=5.0) is not None
    # Revoking twice keeps the first time.
    assert store.revoke_token(gone.token_id, at=9.0).revoked_at == 4.0
    assert [t.token_id for t in store.tokens()] == [keep.token_id, gone.token_id]
    with pytest.raises(NotFoundError):
        store.revoke_token("nope", at=1.0)


def test_a_token_expires(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    forever, forever_plain = store.add_token("forever", Role.OPERATOR, at=10.0)
    row, plaintext = store.add_token("ci", Role.OPERATOR, at=10.0, expires_at=110.0)
    assert row.expires_at == 110.0
    assert forever.expires_at is None
    assert store.token(row.token_id) == row
    found = store.authenticate(plaintext, at=109.9)
    assert found is not None
    assert found.expires_at == 110.0
    assert not found.expired(109.9)
    with caplog.at_level(logging.INFO, logger="coordinator.service.store.access"):
        assert store.authenticate(plaintext, at=110.0) is None
    assert f"token {row.token_id} (ci) expired" in caplog.text
    assert plaintext not in caplog.text
    assert store.authenticate(plaintext, at=1e9) is None
    assert store.authenticate(forever_plain, at=1e9) is not None
    [listed, _] = sorted(store.tokens(), key=lambda t: t.name)
    assert listed.expired(110.0)


@pytest.mark.parametrize("expires_at", [10.0, 5.0, float("nan"), float("inf")])
def test_an_expiry_must_be_a_finite_time_after_creation(store: Store, expires_at: float) -> None:
    with pytest.raises(StoreError):
        store.add_token("bad", Role.VIEWER, at=10.0, expires_at=expires_at)
    assert store.tokens() == []


def test_last_used_is_throttled(store: Store) -> None:
    row, plaintext = store.add_token("api", Role.VIEWER, at=0.0)
    t0 = 1000.0
    assert store.authenticate(plaintext, at=t0) is not None
    for offset in (1.0, 30.0, LAST_USED_RESOLUTION_S - 0.5):
        found = store.authenticate(plaintext, at=t0 + offset)
        assert found is not None
        assert found.last_used_at == t0
        stored = store.token(row.token_id)
        assert stored is not None
        assert stored.last_used_at == t0
    later = t0 + LAST_USED_RESOLUTION_S
    found = store.authenticate(plaintext, at=later)
    assert found is not None
    assert found.last_used_at == later
    stored = store.token(row.token_id)
    assert stored is not None
    assert stored.last_used_at == later


def test_plaintext_never_reaches_disk(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with Store.open(path) as store:
        row, plaintext = store.add_token("secret", Role.OPERATOR, at=1.0)
        assert store.authenticate(plaintext, at=100.0) is not None
        store.audit(row.token_id, Role.OPERATOR, "token.use", at=100.0)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert path in files
    blob = b"".join(p.read_bytes() for p in files)
    assert plaintext.encode() not in blob
    assert plaintext.removeprefix(TOKEN_PREFIX).encode() not in blob
    # The test reads the right bytes: the hash is there.
    assert hash_token(plaintext).encode() in blob
