"""Bearer-token authentication and role checks for the HTTP API.

Workflow, per request:

1. :class:`Guard.require` gives each route a FastAPI dependency for the role it
   needs (``viewer`` for reads, ``operator`` for every ``POST``). FastAPI runs it
   before the endpoint (and before the body is validated); it is a plain ``def``,
   so the ``authenticate`` callable, which may hit SQLite, runs in the threadpool.
2. The dependency reads ``Authorization: Bearer <token>``. A missing or malformed
   header, a string that cannot be a token
   (:func:`coordinator.auth.looks_like_token`), or a token ``authenticate`` does
   not know (unknown, revoked) is a 401 with ``WWW-Authenticate: Bearer``.
3. A known token whose role does not allow the route's role is a 403.
4. Otherwise the endpoint receives the :class:`~coordinator.operations.Actor`,
   which mutating calls pass on for the audit log.

Every refusal is logged at INFO with the client address and, for a presented
token, its public id (:func:`coordinator.auth.token_id`), never the token itself.

The API knows nothing of the store: ``authenticate`` is any callable from the
presented token to an ``Actor`` (the service wraps ``Store.authenticate``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from coordinator.auth import Role, hash_token, looks_like_token, token_id
from coordinator.operations import Actor

__all__ = ["BEARER", "Authenticate", "Guard", "RoleDependency", "client_address"]

logger = logging.getLogger(__name__)

Authenticate = Callable[[str], Actor | None]
"""Maps a presented bearer token to its actor, or None if it is unknown or revoked."""

BEARER = HTTPBearer(
    scheme_name="bearer",
    description="An API token (`fedge coordinator token create --role viewer|operator`).",
    auto_error=False,
)
"""Parses the header and declares the security scheme in the OpenAPI document."""

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]

RoleDependency = Callable[[Request, HTTPAuthorizationCredentials | None], Actor]
"""A FastAPI dependency that returns the request's actor (see :meth:`Guard.require`)."""


def client_address(request: Request) -> str:
    """The client's ``host:port`` as the server saw it, for log lines."""
    client = request.client
    return "unknown" if client is None else f"{client.host}:{client.port}"


class Guard:
    """Authenticates requests and enforces the role each route requires.

    Args:
        authenticate: Maps a presented token to its actor, or None.
    """

    def __init__(self, authenticate: Authenticate) -> None:
        """Keep the authenticate callable."""
        self._authenticate = authenticate

    def require(self, role: Role) -> RoleDependency:
        """Build the dependency of a route that needs ``role``.

        Args:
            role: The role the route requires.

        Returns:
            A FastAPI dependency that returns the request's actor.
        """

        def dependency(request: Request, credentials: Credentials) -> Actor:
            return self.check(request, credentials, role)

        dependency.__name__ = f"require_{role.value}"
        return dependency

    def check(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None, role: Role
    ) -> Actor:
        """Authenticate a request and check its role.

        Args:
            request: The request (for its address and the log line).
            credentials: The parsed ``Authorization`` header, None if missing or
                not a bearer credential.
            role: The role required.

        Returns:
            The actor the token belongs to.

        Raises:
            HTTPException: 401 without a valid token, 403 if the role is too weak.
            StoreError: ``authenticate`` failed (the app answers 500).
        """
        if credentials is None:
            reason = (
                "no Authorization header"
                if "authorization" not in request.headers
                else "malformed Authorization header"
            )
            raise self._unauthorized(request, reason, "Bearer")
        presented = credentials.credentials
        if not looks_like_token(presented):
            raise self._unauthorized(request, "not a fedge token", 'Bearer error="invalid_token"')
        actor = self._authenticate(presented)
        if actor is None:
            raise self._unauthorized(
                request,
                f"unknown or revoked token {token_id(hash_token(presented))}",
                'Bearer error="invalid_token"',
            )
        if not actor.role.allows(role):
            _refused(request, f"token {actor.name} is a {actor.role.value}, needs {role.value}")
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"this call needs the {role.value} role; the token is a {actor.role.value}",
                headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
            )
        return actor

    @staticmethod
    def _unauthorized(request: Request, reason: str, challenge: str) -> HTTPException:
        _refused(request, reason)
        return HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a valid API token is required: Authorization: Bearer <token>",
            headers={"WWW-Authenticate": challenge},
        )


def _refused(request: Request, reason: str) -> None:
    logger.info(
        "refused %s %r from %s: %s",
        request.method,
        request.url.path,
        client_address(request),
        reason,
    )
