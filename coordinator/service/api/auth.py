"""Bearer-token authentication and role checks for the HTTP API.

Workflow, per request:

1. :class:`AuthMiddleware`, the app's outermost layer, authenticates every request
   but the public paths before anything of its body is read (FastAPI itself reads
   and parses a JSON body before a route's dependencies run, so a dependency alone
   would let anyone make the server parse a body). It reads ``Authorization:
   Bearer <token>``: a missing or malformed header, a string that cannot be a
   token (:func:`coordinator.service.tokens.looks_like_token`), or a token ``authenticate``
   does not know (unknown, revoked) is a 401 with ``WWW-Authenticate: Bearer``.
   ``authenticate``, which may hit SQLite, runs in the threadpool.
2. The method decides the role: ``GET`` and ``HEAD`` need ``viewer``, anything
   else ``operator``. A known token whose role is too weak is a 403.
3. The middleware leaves the :class:`~coordinator.service.operations.Actor` in the
   request's state. Each route's dependency (:meth:`Guard.require`, which also
   declares the bearer scheme in the OpenAPI document) takes it from there and
   checks the route's own role, and the endpoint receives it; mutating calls pass
   it on for the audit log.

Every refusal is logged at INFO with the client address and, for a presented
token, its public id (:func:`coordinator.service.tokens.token_id`), never the token itself.

The API knows nothing of the store: ``authenticate`` is any callable from the
presented token to an ``Actor`` (the service wraps ``Store.authenticate``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from coordinator.errors import CoordinatorError
from coordinator.service.operations import Actor
from coordinator.service.tokens import Role, hash_token, looks_like_token, token_id

__all__ = [
    "BEARER",
    "AuthMiddleware",
    "Authenticate",
    "Guard",
    "RoleDependency",
    "client_address",
    "role_for_method",
]

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

ACTOR_STATE = "fedge_actor"
"""Key of the authenticated actor in the ASGI scope's ``state``."""

READ_METHODS = frozenset({"GET", "HEAD"})
"""Methods a ``viewer`` may use; every other method needs ``operator``."""


def role_for_method(method: str) -> Role:
    """The role a request with this method needs."""
    return Role.VIEWER if method.upper() in READ_METHODS else Role.OPERATOR


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

        def dependency(request: Request, _credentials: Credentials) -> Actor:
            actor = request.scope.get("state", {}).get(ACTOR_STATE)
            if not isinstance(actor, Actor):
                raise RuntimeError("the API's routes need AuthMiddleware around them")
            return self._check_role(request, actor, role)

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
        return self._check_role(request, actor, role)

    @staticmethod
    def _check_role(request: Request, actor: Actor, role: Role) -> Actor:
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


class AuthMiddleware:
    """Pure ASGI middleware: authenticate before the app reads a byte of the body.

    Args:
        app: The wrapped application.
        guard: Does the checks (:meth:`Guard.check`).
        public: Paths served without a token (health, the API's own docs).
        refuse: Turns a 401/403 (or a failed ``authenticate``) into the API's error
            response.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        guard: Guard,
        public: frozenset[str],
        refuse: Callable[[Request, Exception], Response],
    ) -> None:
        """Keep the guard and the public paths."""
        self._app = app
        self._guard = guard
        self._public = public
        self._refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse the request, or hand it on with its actor in the scope's state."""
        if scope["type"] != "http" or scope["path"] in self._public:
            await self._app(scope, receive, send)
            return
        request = Request(scope)
        role = role_for_method(scope["method"])
        try:
            credentials = await BEARER(request)
            actor = await run_in_threadpool(self._guard.check, request, credentials, role)
        except (HTTPException, CoordinatorError) as exc:
            await self._refuse(request, exc)(scope, receive, send)
            return
        scope.setdefault("state", {})[ACTOR_STATE] = actor
        await self._app(scope, receive, send)


def _refused(request: Request, reason: str) -> None:
    logger.info(
        "refused %s %r from %s: %s",
        request.method,
        request.url.path,
        client_address(request),
        reason,
    )
