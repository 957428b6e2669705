"""Store methods for the device registry and its one-time enrollment tokens.

Part of :class:`coordinator.service.store.Store` (a mixin; see that package's docstring).

Workflow (driven by :mod:`coordinator.service.enrollment`):

1. :meth:`RegistryTables.add_enrollment` records the device as ``pending`` and
   draws a random enrollment token bound to it, valid until ``expires_at``. Only
   the token's SHA-256 is stored; the plaintext leaves this call once. A new token
   for the same device replaces its unused ones. An ``accepted`` device gets no
   token (revoke it first): re-keying is an explicit revoke, then enroll.
2. :meth:`RegistryTables.redeem_enrollment` spends a token: in ONE transaction it
   checks that the token exists, is unused, has not expired, names the device that
   presents it and that device is still pending, and marks it used. Anything else
   raises :class:`~coordinator.errors.EnrollmentRefusedError` (logged with the
   reason; the caller does not tell the client which check failed). A token works
   once, even under concurrent requests.
3. :meth:`RegistryTables.accept_device` marks the device ``accepted`` once its
   broker credentials exist; :meth:`RegistryTables.revoke_device` marks it
   ``revoked`` and deletes its unused tokens.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
from dataclasses import dataclass
from enum import StrEnum

from coordinator.errors import ConflictError, EnrollmentRefusedError, NotFoundError, StoreError
from coordinator.service.store.database import Database, check_finite
from coordinator.service.tokens import MAX_TOKEN_LENGTH, hash_token

__all__ = [
    "ENROLLMENT_PREFIX",
    "Credential",
    "DeviceState",
    "RegisteredDevice",
    "RegistryTables",
    "new_enrollment_token",
]

logger = logging.getLogger(__name__)

ENROLLMENT_PREFIX = "fedge_enroll_"
"""Every enrollment token starts with this (an API token starts with ``fedge_``
too, but the two are kept in different tables: neither works as the other)."""

_TOKEN_BYTES = 32


def new_enrollment_token() -> str:
    """A new random enrollment token: the prefix + 32 random bytes, urlsafe base64."""
    return ENROLLMENT_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)


class DeviceState(StrEnum):
    """Where a device is in its enrollment."""

    PENDING = "pending"
    """A token was issued; the device has not redeemed it."""
    ACCEPTED = "accepted"
    """The device redeemed its token and has broker credentials."""
    REVOKED = "revoked"
    """An operator revoked it: its broker credentials are gone."""


class Credential(StrEnum):
    """How an accepted device authenticates to the broker."""

    PASSWORD = "password"  # noqa: S105 - a kind of credential, not a secret
    CERTIFICATE = "certificate"


@dataclass(frozen=True)
class RegisteredDevice:
    """A device in the registry.

    Attributes:
        device_id: Its id (= its broker username).
        state: Pending, accepted or revoked.
        credential: How it authenticates once accepted, else None.
        created_by: The actor who enrolled it (last).
        created_at: When it was (last) enrolled, unix seconds.
        accepted_at: When it redeemed its token, or None.
        revoked_at: When it was revoked, or None.
        updated_at: Its last change.
    """

    device_id: str
    state: DeviceState
    credential: Credential | None
    created_by: str
    created_at: float
    accepted_at: float | None
    revoked_at: float | None
    updated_at: float


def _device(row: sqlite3.Row) -> RegisteredDevice:
    credential = row["credential"]
    return RegisteredDevice(
        device_id=row["device_id"],
        state=DeviceState(row["state"]),
        credential=None if credential is None else Credential(credential),
        created_by=row["created_by"],
        created_at=row["created_at"],
        accepted_at=row["accepted_at"],
        revoked_at=row["revoked_at"],
        updated_at=row["updated_at"],
    )


def _refuse(device_id: str, reason: str) -> EnrollmentRefusedError:
    logger.warning("enrollment of %r refused: %s", device_id[:64], reason)
    return EnrollmentRefusedError(
        "enrollment refused: the token is unknown, used, expired or for another device"
    )


class RegistryTables:
    """The device registry (mixed into :class:`~coordinator.service.store.Store`)."""

    _db: Database

    def add_enrollment(
        self, device_id: str, *, actor: str, at: float, expires_at: float
    ) -> tuple[RegisteredDevice, str]:
        """Record ``device_id`` as pending and issue its one-time enrollment token.

        Args:
            device_id: The device (its broker username); checked by the caller.
            actor: Who enrolls it (for the record).
            at: Now, unix seconds.
            expires_at: When the token stops working (after ``at``).

        Returns:
            The device's row and the token's plaintext (shown once; only its hash
            is stored). Earlier unused tokens of the device no longer work.

        Raises:
            ConflictError: the device is accepted (revoke it first).
            StoreError: ``expires_at`` is not after ``at``, or the database failed.
        """
        check_finite("at", at, expires_at)
        if expires_at <= at:
            raise StoreError(f"an enrollment token must expire after it is made, not {expires_at}")
        plaintext = new_enrollment_token()
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT * FROM registry WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is not None and row["state"] == DeviceState.ACCEPTED:
                raise ConflictError(
                    f"device {device_id!r} is enrolled already: revoke it first "
                    "(fedge device revoke) to enroll it again"
                )
            conn.execute(
                "INSERT INTO registry (device_id, state, credential, created_by, created_at, "
                "updated_at) VALUES (?, 'pending', NULL, ?, ?, ?) ON CONFLICT (device_id) DO "
                "UPDATE SET state = 'pending', credential = NULL, created_by = excluded.created_by,"
                " created_at = excluded.created_at, accepted_at = NULL, revoked_at = NULL, "
                "updated_at = excluded.updated_at",
                (device_id, actor, at, at),
            )
            conn.execute(
                "DELETE FROM enrollment_tokens WHERE device_id = ? AND used_at IS NULL",
                (device_id,),
            )
            conn.execute(
                "INSERT INTO enrollment_tokens (hash, device_id, created_at, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (hash_token(plaintext), device_id, at, expires_at),
            )
            stored = conn.execute(
                "SELECT * FROM registry WHERE device_id = ?", (device_id,)
            ).fetchone()
        return _device(stored), plaintext

    def redeem_enrollment(self, plaintext: str, device_id: str, at: float) -> RegisteredDevice:
        """Spend an enrollment token presented by ``device_id`` (see the module docstring).

        Returns:
            The device's row (still pending: :meth:`accept_device` follows).

        Raises:
            EnrollmentRefusedError: the token is malformed, unknown, used, expired,
                bound to another device, or its device is no longer pending.
            StoreError: The database failed.
        """
        check_finite("at", at)
        if not plaintext.startswith(ENROLLMENT_PREFIX) or len(plaintext) > MAX_TOKEN_LENGTH:
            raise _refuse(device_id, "not an enrollment token")
        with self._db.transaction() as conn:
            token = conn.execute(
                "SELECT * FROM enrollment_tokens WHERE hash = ?", (hash_token(plaintext),)
            ).fetchone()
            if token is None:
                raise _refuse(device_id, "unknown token")
            if token["device_id"] != device_id:
                raise _refuse(device_id, f"the token was issued for {token['device_id']!r}")
            if token["used_at"] is not None:
                raise _refuse(device_id, "the token was used already")
            if at >= token["expires_at"]:
                raise _refuse(device_id, "the token expired")
            row = conn.execute(
                "SELECT * FROM registry WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is None or row["state"] != DeviceState.PENDING:
                raise _refuse(device_id, "the device is not pending")
            conn.execute(
                "UPDATE enrollment_tokens SET used_at = ? WHERE hash = ? AND used_at IS NULL",
                (at, token["hash"]),
            )
        return _device(row)

    def accept_device(self, device_id: str, credential: Credential, at: float) -> RegisteredDevice:
        """Mark a pending device accepted (its broker credentials exist now).

        Raises:
            NotFoundError: no such device, or it is no longer pending.
            StoreError: The database failed.
        """
        check_finite("at", at)
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE registry SET state = 'accepted', credential = ?, accepted_at = ?, "
                "updated_at = ? WHERE device_id = ? AND state = 'pending'",
                (Credential(credential).value, at, at, device_id),
            )
            row = conn.execute(
                "SELECT * FROM registry WHERE device_id = ?", (device_id,)
            ).fetchone()
        if row is None or row["state"] != DeviceState.ACCEPTED:
            raise NotFoundError(f"no pending device {device_id!r} to accept")
        return _device(row)

    def revoke_device(self, device_id: str, at: float) -> RegisteredDevice:
        """Mark a device revoked and delete its unused tokens; again keeps the first time.

        Raises:
            NotFoundError: the device is not in the registry.
            StoreError: The database failed.
        """
        check_finite("at", at)
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE registry SET state = 'revoked', revoked_at = COALESCE(revoked_at, ?), "
                "updated_at = ? WHERE device_id = ?",
                (at, at, device_id),
            )
            conn.execute(
                "DELETE FROM enrollment_tokens WHERE device_id = ? AND used_at IS NULL",
                (device_id,),
            )
            row = conn.execute(
                "SELECT * FROM registry WHERE device_id = ?", (device_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"device {device_id!r} is not in the registry")
        return _device(row)

    def registered(self, device_id: str) -> RegisteredDevice | None:
        """One device of the registry, or None.

        Raises:
            StoreError: The database failed.
        """
        row = self._db.one("SELECT * FROM registry WHERE device_id = ?", (device_id,))
        return None if row is None else _device(row)

    def registry(self) -> list[RegisteredDevice]:
        """Every device of the registry, sorted by id.

        Raises:
            StoreError: The database failed.
        """
        return [_device(row) for row in self._db.rows("SELECT * FROM registry ORDER BY device_id")]
