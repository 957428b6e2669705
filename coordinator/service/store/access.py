"""Store methods for access control: API tokens and the audit log.

Part of :class:`coordinator.service.store.Store` (a mixin; see that package's docstring).

Tokens are stored as their SHA-256 only (see :mod:`coordinator.service.tokens`); the
plaintext leaves :meth:`AccessTables.add_token` once and is never written. A token
may carry an expiry (``expires_at``); from that moment :meth:`AccessTables.authenticate`
treats it exactly like an unknown one (and logs that it expired). Tokens made
before expiry existed (schema version 3) never expire.
:meth:`AccessTables.authenticate` is called on every API request, so it writes
``last_used_at`` at most once a minute per token, not once per request.

The audit log is append-only: who (token id or ``cli:<login>``, and role) did what to
what, when.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from coordinator.errors import NotFoundError, StoreError
from coordinator.service.store.database import Database, check_finite, dump_json, load_json
from coordinator.service.store.records import AuditRow, TokenRow
from coordinator.service.tokens import Role, hash_token, looks_like_token, new_token, token_id

__all__ = ["LAST_USED_RESOLUTION_S", "AccessTables"]

logger = logging.getLogger(__name__)

LAST_USED_RESOLUTION_S = 60.0
"""``last_used_at`` is refreshed only when it is at least this old."""


def _token(row: sqlite3.Row) -> TokenRow:
    return TokenRow(
        token_id=row["token_id"],
        name=row["name"],
        role=Role(row["role"]),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
        expires_at=row["expires_at"],
    )


def _audit(row: sqlite3.Row) -> AuditRow:
    return AuditRow(
        audit_id=row["id"],
        at=row["at"],
        actor=row["actor"],
        role=Role(row["role"]),
        action=row["action"],
        target=row["target"],
        detail=load_json(row["detail_json"]),
    )


class AccessTables:
    """Tokens and the audit log (mixed into :class:`~coordinator.service.store.Store`)."""

    _db: Database

    def add_token(
        self, name: str, role: Role, at: float, *, expires_at: float | None = None
    ) -> tuple[TokenRow, str]:
        """Create an API token.

        Args:
            name: What it is for.
            role: What it may do.
            at: Now, unix seconds (its creation time).
            expires_at: When it stops working (after ``at``), or None: never.

        Returns:
            The token's row and its plaintext. Show the plaintext to the operator
            now: only its hash is stored, it cannot be recovered.

        Raises:
            StoreError: ``expires_at`` is not after ``at``, or the database failed.
        """
        check_finite("at", at, expires_at)
        if expires_at is not None and expires_at <= at:
            raise StoreError(f"a token must expire after it is made, not at {expires_at!r}")
        role = Role(role)
        for _attempt in range(3):
            plaintext = new_token()
            token_hash = hash_token(plaintext)
            with self._db.transaction() as conn:
                public_id = token_id(token_hash)
                # A 48-bit id collision is astronomically rare; draw again if so.
                if conn.execute(
                    "SELECT 1 FROM tokens WHERE token_id = ? OR hash = ?", (public_id, token_hash)
                ).fetchone():
                    continue
                conn.execute(
                    "INSERT INTO tokens (token_id, name, role, hash, created_at, expires_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (public_id, name, role.value, token_hash, at, expires_at),
                )
            return TokenRow(public_id, name, role, at, None, None, expires_at), plaintext
        raise StoreError("could not draw an unused token id")  # pragma: no cover

    def tokens(self) -> list[TokenRow]:
        """Give every token (revoked ones included), oldest first.

        Raises:
            StoreError: The database failed.
        """
        rows = self._db.rows("SELECT * FROM tokens ORDER BY created_at, token_id")
        return [_token(row) for row in rows]

    def token(self, public_id: str) -> TokenRow | None:
        """Give one token by its public id, or None.

        Raises:
            StoreError: The database failed.
        """
        row = self._db.one("SELECT * FROM tokens WHERE token_id = ?", (public_id,))
        return None if row is None else _token(row)

    def revoke_token(self, public_id: str, at: float) -> TokenRow:
        """Revoke a token; revoking it again keeps the first revocation time.

        Raises:
            NotFoundError: No such token.
            StoreError: The database failed.
        """
        check_finite("at", at)
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE token_id = ?",
                (at, public_id),
            )
            row = conn.execute("SELECT * FROM tokens WHERE token_id = ?", (public_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no token {public_id!r}")
        return _token(row)

    def authenticate(self, plaintext: str, at: float) -> TokenRow | None:
        """Find the valid token a request presented.

        Args:
            plaintext: The presented token (the ``Bearer`` value).
            at: The current time, unix seconds.

        Returns:
            The token, or None for anything unknown, revoked, expired or malformed.

        Raises:
            StoreError: The database failed.
        """
        if not looks_like_token(plaintext):
            return None
        # No constant-time comparison is needed: the lookup compares the SHA-256
        # of the presented string, not the string, with stored hashes. What a
        # timing side channel could leak is how many leading bytes of an attacker-
        # chosen hash match a stored hash; turning that into a token would need a
        # SHA-256 preimage, and even the whole stored hash does not authenticate.
        token_hash = hash_token(plaintext)
        with self._db.lock:
            row = self._db.one(
                "SELECT * FROM tokens WHERE hash = ? AND revoked_at IS NULL",
                (token_hash,),
            )
            if row is None:
                return None
            found = _token(row)
            if found.expired(at):
                logger.info(
                    "token %s (%s) expired at %s: refused",
                    found.token_id,
                    found.name,
                    datetime.fromtimestamp(found.expires_at or 0.0, UTC).isoformat(),
                )
                return None
            last = found.last_used_at
            if last is not None and at - last < LAST_USED_RESOLUTION_S:
                return found
            with self._db.transaction() as conn:
                conn.execute(
                    "UPDATE tokens SET last_used_at = ? WHERE token_id = ?", (at, found.token_id)
                )
        return replace(found, last_used_at=at)

    def audit(
        self,
        actor: str,
        role: Role,
        action: str,
        target: str = "",
        *,
        detail: Mapping[str, Any] | None = None,
        at: float,
    ) -> AuditRow:
        """Append an entry to the audit log.

        Args:
            actor: Token id, or ``cli:<login>``.
            role: The actor's role.
            action: What, e.g. ``rollout.create``.
            target: On what (may be empty).
            detail: Anything else, as a JSON-able dict (default: empty).
            at: When, unix seconds.

        Raises:
            StoreError: ``detail`` cannot be stored as JSON, or the database failed.
        """
        check_finite("at", at)
        role = Role(role)
        details = dict(detail or {})
        detail_json = dump_json(details, "audit detail")
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO audit (at, actor, role, action, target, detail_json) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (at, actor, role.value, action, target, detail_json),
            )
            audit_id = cursor.lastrowid
        if audit_id is None:  # pragma: no cover - an INSERT into a rowid table sets it
            raise StoreError("the audit entry got no id")
        return AuditRow(audit_id, at, actor, role, action, target, details)

    def audit_log(self, limit: int = 100, since_id: int | None = None) -> list[AuditRow]:
        """Give audit entries in chronological (id) order.

        Without ``since_id``: the latest ``limit`` entries. With it: the first
        ``limit`` entries after that id, to page forward or follow the log.

        Raises:
            ValueError: ``limit`` is negative.
            StoreError: The database failed.
        """
        if since_id is None:
            rows = self._db.latest(
                "SELECT * FROM (SELECT * FROM audit ORDER BY id DESC LIMIT ?) ORDER BY id",
                (),
                limit,
            )
        else:
            rows = self._db.latest(
                "SELECT * FROM audit WHERE id > ? ORDER BY id LIMIT ?", (since_id,), limit
            )
        return [_audit(row) for row in rows]

    def auth_failures_since(self, since: float) -> list[tuple[str, float]]:
        """The ``auth.fail`` audit entries at or after ``since``: ``(actor, at)``,
        oldest first (the actor is ``client:<address>``; see
        :meth:`~coordinator.service.fleet_service.FleetService.record_auth_failure`).

        Raises:
            StoreError: The database failed.
        """
        check_finite("since", since)
        rows = self._db.rows(
            "SELECT actor, at FROM audit WHERE action = 'auth.fail' AND at >= ? ORDER BY id",
            (since,),
        )
        return [(str(row["actor"]), float(row["at"])) for row in rows]
