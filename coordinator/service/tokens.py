"""API tokens and roles for the coordinator's HTTP API: pure functions, no I/O.

Workflow:

1. An operator creates a token (``fedge coordinator token create --role viewer``,
   optionally ``--expires-in 90d``); the store calls :func:`new_token`, keeps only
   :func:`hash_token` of it, the public :func:`token_id` and the expiry, and shows
   the plaintext once.
2. A client sends ``Authorization: Bearer fedge_...``; the API hashes the presented
   token, looks the hash up (:meth:`coordinator.service.store.Store.authenticate`) and gets
   the token's :class:`Role`, unless the token is unknown, revoked or expired (all
   refused alike, and failures rate-limited: :mod:`coordinator.service.api.auth_limits`).
3. Each endpoint declares the role it requires; :meth:`Role.allows` decides.
   ``operator`` includes every right of ``viewer``.

Audit entries and token listings name a token by its :func:`token_id`, never by
its plaintext or full hash.
"""

from __future__ import annotations

import hashlib
import secrets
from enum import StrEnum

__all__ = [
    "MAX_TOKEN_LENGTH",
    "TOKEN_ID_LENGTH",
    "TOKEN_PREFIX",
    "Role",
    "hash_token",
    "looks_like_token",
    "new_token",
    "token_id",
]

TOKEN_PREFIX = "fedge_"  # noqa: S105 - a public prefix, not a secret
"""Every token starts with this, so secret scanners and humans recognise one."""

_TOKEN_BYTES = 32
TOKEN_ID_LENGTH = 12
"""Hex digits of the hash that form a token's public id (48 bits)."""

MAX_TOKEN_LENGTH = 128
"""Longer strings are not tokens (ours are 49 characters); refused before hashing."""


class Role(StrEnum):
    """What a token may do. ``operator`` includes every right of ``viewer``."""

    VIEWER = "viewer"
    """Read fleet, artifacts, rollouts, runs, telemetry and the audit log."""
    OPERATOR = "operator"
    """Everything a viewer may, plus upload artifacts, start and stop rollouts and runs."""

    def allows(self, required: Role) -> bool:
        """Tell whether this role grants what an endpoint requiring ``required`` needs."""
        return _RANK[self] >= _RANK[required]


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1}


def new_token() -> str:
    """Make a new random API token: ``fedge_`` + 32 random bytes, urlsafe base64."""
    return TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)


def hash_token(token: str) -> str:
    """Give the hex SHA-256 of a token, the only form the store keeps.

    A plain fast hash is right here, unlike for passwords: a token carries 256
    random bits, so there is no dictionary to try and brute force over the hash is
    hopeless, salt or not. A slow KDF (bcrypt, scrypt) would only cost CPU on every
    API request. The hash being deterministic is what lets the store find a token
    by an index lookup.

    Any string hashes without error (lone surrogates included), so hostile input
    cannot crash the caller.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_id(token_hash: str) -> str:
    """Give a token's short public id: the first 12 hex digits of its hash.

    Safe to show and log: it says nothing useful about the token (a preimage of a
    48-bit prefix of SHA-256 is not the token), and it is derived, so the API can
    name even a presented token it does not know: ``token_id(hash_token(t))``.
    """
    return token_hash[:TOKEN_ID_LENGTH]


def looks_like_token(candidate: str) -> bool:
    """Tell whether a string could be a token (prefix and length), before any lookup."""
    return candidate.startswith(TOKEN_PREFIX) and len(candidate) <= MAX_TOKEN_LENGTH
