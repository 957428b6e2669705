"""The device registry and its enrollment tokens in the store (issue 17, enrollment).

Tokens are random, stored as their hash only, bound to one device, one-time and
expiring; every refusal is typed (EnrollmentRefusedError) and logged with its
reason, while the error itself does not tell the client which check failed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.errors import ConflictError, EnrollmentRefusedError, NotFoundError, StoreError
from coordinator.service.store import Store
from coordinator.service.store.registry import (
    ENROLLMENT_PREFIX,
    Credential,
    DeviceState,
)

T0 = 1_800_000_000.0
DAY = 86_400.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state.db") as opened:
        yield opened


def refused(
    store: Store, token: str, device: str, at: float, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(EnrollmentRefusedError) as info:
        store.redeem_enrollment(token, device, at)
    assert "unknown, used, expired or for another device" in str(info.value)
    assert any(reason in record.getMessage() for record in caplog.records), caplog.text


def test_a_token_enrolls_its_device_once(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    row, token = store.add_enrollment("pi-1", actor="op", at=T0, expires_at=T0 + DAY)
    assert token.startswith(ENROLLMENT_PREFIX)
    assert len(token) > 40
    assert (row.state, row.created_by, row.credential) == (DeviceState.PENDING, "op", None)
    assert token.encode() not in (tmp_path / "state.db").read_bytes()  # only the hash
    assert store.redeem_enrollment(token, "pi-1", T0 + 1).state == DeviceState.PENDING
    accepted = store.accept_device("pi-1", Credential.PASSWORD, T0 + 2)
    assert (accepted.state, accepted.credential, accepted.accepted_at) == (
        DeviceState.ACCEPTED,
        Credential.PASSWORD,
        T0 + 2,
    )
    refused(store, token, "pi-1", T0 + 3, "used already", caplog)
    assert [device.device_id for device in store.registry()] == ["pi-1"]


def test_expired_foreign_unknown_and_replaced_tokens_are_refused(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    _row, first = store.add_enrollment("pi-1", actor="op", at=T0, expires_at=T0 + 60)
    refused(store, first, "pi-1", T0 + 60, "expired", caplog)
    refused(store, first, "pi-2", T0 + 1, "issued for 'pi-1'", caplog)
    refused(store, "fedge_enroll_" + "x" * 43, "pi-1", T0 + 1, "unknown token", caplog)
    refused(store, "fedge_" + "x" * 43, "pi-1", T0 + 1, "not an enrollment token", caplog)
    _row, second = store.add_enrollment("pi-1", actor="op", at=T0 + 1, expires_at=T0 + DAY)
    refused(store, first, "pi-1", T0 + 2, "unknown token", caplog)  # replaced
    store.redeem_enrollment(second, "pi-1", T0 + 2)


def test_concurrent_redemptions_of_one_token_succeed_once(store: Store) -> None:
    _row, token = store.add_enrollment("pi-1", actor="op", at=T0, expires_at=T0 + DAY)
    outcomes: list[str] = []

    def redeem() -> None:
        try:
            store.redeem_enrollment(token, "pi-1", T0 + 1)
            outcomes.append("ok")
        except EnrollmentRefusedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=redeem) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["ok"] + ["refused"] * 7


def test_revocation_ends_unused_tokens_and_reenrollment_needs_it(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    _row, token = store.add_enrollment("pi-1", actor="op", at=T0, expires_at=T0 + DAY)
    store.redeem_enrollment(token, "pi-1", T0 + 1)
    store.accept_device("pi-1", Credential.CERTIFICATE, T0 + 1)
    with pytest.raises(ConflictError, match="revoke it first"):
        store.add_enrollment("pi-1", actor="op", at=T0 + 2, expires_at=T0 + DAY)
    revoked = store.revoke_device("pi-1", T0 + 3)
    assert (revoked.state, revoked.revoked_at) == (DeviceState.REVOKED, T0 + 3)
    assert store.revoke_device("pi-1", T0 + 4).revoked_at == T0 + 3  # the first time kept
    # a token issued and then revoked before use is dead
    _row, pending = store.add_enrollment("pi-2", actor="op", at=T0, expires_at=T0 + DAY)
    store.revoke_device("pi-2", T0 + 1)
    refused(store, pending, "pi-2", T0 + 2, "unknown token", caplog)
    # enrolling a revoked device again starts over
    again, _token = store.add_enrollment("pi-1", actor="op2", at=T0 + 5, expires_at=T0 + DAY)
    assert (again.state, again.revoked_at, again.created_by) == (DeviceState.PENDING, None, "op2")
    with pytest.raises(NotFoundError):
        store.revoke_device("pi-9", T0)
    with pytest.raises(NotFoundError):
        store.accept_device("pi-9", Credential.PASSWORD, T0 + 6)
    with pytest.raises(StoreError, match="must expire after"):
        store.add_enrollment("pi-3", actor="op", at=T0, expires_at=T0)
