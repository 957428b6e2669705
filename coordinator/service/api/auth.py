"""Bearer-token authentication and role checks for the HTTP API.

Workflow, per request:

1. :class:`AuthMiddleware`, the app's outermost layer, authenticates every request
   but the public paths before anything of its body is read (FastAPI itself reads
   and parses a JSON body before a route's dependencies run, so a dependency alone
   would let anyone make the server parse a body). It reads ``Authorization:
   Bearer <token>``: a missing or malformed header, a string that cannot be a
   token (:func:`coordinator.service.tokens.looks_like_token`), or a token ``authenticate``
   does not accept (unknown, revoked, expired: all answered alike) is a 401 with
   ``WWW-Authenticate: Bearer``. ``authenticate``, which may hit SQLite, runs in
   the threadpool.
   Failed authentication is rate-limited per client address
   (:mod:`coordinator.service.api.auth_limits`): an address cooling down after too
   many failures gets 429 with ``Retry-After`` before its token is looked at.
   Each 401 is counted, logged and handed to the ``on_failure`` hook as an
   :class:`AuthFailure` (the service writes it to the audit log); so is the start
   of a cool-down. Neither ever holds the token, only its public id.
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
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from coordinator.errors import CoordinatorError
from coordinator.service.api.auth_limits import AuthLimits, FailedAuthLimiter
from coordinator.service.operations import Actor
from coordinator.service.tokens import Role, hash_token, looks_like_token, token_id

__all__ = [
    "BEARER",
    "AuthFailure",
    "AuthFailureHook",
    "AuthMiddleware",
    "Authenticate",
    "Guard",
    "RoleDependency",
    "client_address",
    "client_host",
    "role_for_method",
]

logger = logging.getLogger(__name__)

Authenticate = Callable[[str], Actor | None]
"""Maps a presented bearer token to its actor, or None if it is unknown, revoked or
expired."""

MAX_AUDITED_PATH = 200
"""Characters of a refused request's path kept in an :class:`AuthFailure`."""


@dataclass(frozen=True)
class AuthFailure:
    """A request refused for want of a valid token (401), for the audit log.

    Attributes:
        address: The client's IP address (the rate limit's key).
        method: The request's method.
        path: Its path (the first :data:`MAX_AUDITED_PATH` characters).
        reason: Why, without any token text (``unknown, revoked or expired token``).
        token_id: The public id of a presented token that looked like one, else None.
        failures: The address's failed authentications within the window, this one
            included.
        lockout_s: The cool-down this failure started (seconds), or None.
    """

    address: str
    method: str
    path: str
    reason: str
    token_id: str | None
    failures: int
    lockout_s: float | None


AuthFailureHook = Callable[[AuthFailure], None]
"""Records a failed authentication (the service writes an audit entry); runs in the
thread pool; a :class:`~coordinator.errors.CoordinatorError` it raises is logged and
does not change the 401."""

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


def client_host(request: Request) -> str:
    """The client's IP address as the server saw it (``unknown`` if none)."""
    client = request.client
    return "unknown" if client is None else client.host


class Guard:
    """Authenticates requests and enforces the role each route requires.

    Args:
        authenticate: Maps a presented token to its actor, or None.
        limiter: Rate-limits failed authentication per address (default: one with
            the default :class:`AuthLimits`).
        on_failure: Records each failed authentication (default: only the log line).
    """

    def __init__(
        self,
        authenticate: Authenticate,
        *,
        limiter: FailedAuthLimiter | None = None,
        on_failure: AuthFailureHook | None = None,
    ) -> None:
        """Keep the authenticate callable, the limiter and the hook."""
        self._authenticate = authenticate
        self._limiter = limiter if limiter is not None else FailedAuthLimiter(AuthLimits())
        self._on_failure = on_failure

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
            HTTPException: 429 while the client's address cools down after too many
                failures (the token is not checked), 401 without a valid token, 403
                if the role is too weak.
            StoreError: ``authenticate`` failed (the app answers 500).
        """
        self.refuse_if_cooling_down(request)
        if credentials is None:
            reason = (
                "no Authorization header"
                if "authorization" not in request.headers
                else "malformed Authorization header"
            )
            raise self._unauthorized(request, reason, None, "Bearer")
        presented = credentials.credentials
        invalid = 'Bearer error="invalid_token"'
        if not looks_like_token(presented):
            raise self._unauthorized(request, "not a fedge token", None, invalid)
        actor = self._authenticate(presented)
        if actor is None:
            presented_id = token_id(hash_token(presented))
            reason = "unknown, revoked or expired token"
            raise self._unauthorized(request, reason, presented_id, invalid)
        return self._check_role(request, actor, role)

    def refuse_if_cooling_down(self, request: Request) -> None:
        """Raise 429 while the client's address cools down after too many failures.

        Public routes that take a secret of their own (the enrollment token) call
        it before looking at the secret, and :meth:`failed` when it is wrong.

        Raises:
            HTTPException: 429 with ``Retry-After``.
        """
        wait = self._limiter.retry_after(client_host(request))
        if wait is not None:
            raise _too_many(request, wait)

    def failed(self, request: Request, reason: str, message: str) -> HTTPException:
        """Count, log and record a failed authentication by another secret than a token.

        Args:
            request: The request.
            reason: Why, for the log and the audit (no secret in it).
            message: What the client is told.

        Returns:
            The 401 to raise.
        """
        refusal = self._unauthorized(request, reason, None, "Bearer")
        refusal.detail = message
        return refusal

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

    def _unauthorized(
        self, request: Request, reason: str, presented_id: str | None, challenge: str
    ) -> HTTPException:
        """Count, log and record a failed authentication; give its 401."""
        address = client_host(request)
        counted = self._limiter.failed(address)
        limits = self._limiter.limits
        named = reason if presented_id is None else f"{reason} {presented_id}"
        _refused(
            request,
            f"{named} (failed authentication {counted.failures} of {limits.max_failures} "
            f"allowed within {limits.window_s:g} s)",
        )
        if counted.locked_out:
            logger.warning(
                "%s failed authentication %d times within %g s: refusing it (429) for %g s",
                address,
                counted.failures,
                limits.window_s,
                limits.lockout_s,
            )
        if self._on_failure is not None:
            failure = AuthFailure(
                address=address,
                method=request.method,
                path=request.url.path[:MAX_AUDITED_PATH],
                reason=reason,
                token_id=presented_id,
                failures=counted.failures,
                lockout_s=limits.lockout_s if counted.locked_out else None,
            )
            try:
                self._on_failure(failure)
            except CoordinatorError:
                logger.exception("could not record the failed authentication from %s", address)
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


def _too_many(request: Request, wait: float) -> HTTPException:
    """The 429 of an address that is cooling down (logged at DEBUG: it can be many)."""
    seconds = max(1, math.ceil(wait))
    logger.debug(
        "refused %s %r from %s: cooling down after failed authentication (%d s left)",
        request.method,
        request.url.path,
        client_address(request),
        seconds,
    )
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        f"too many failed authentications from this address; retry in {seconds} s",
        headers={"Retry-After": str(seconds)},
    )


def _refused(request: Request, reason: str) -> None:
    logger.info(
        "refused %s %r from %s: %s",
        request.method,
        request.url.path,
        client_address(request),
        reason,
    )
