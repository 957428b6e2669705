"""The HTTP API's application factory, body limits and error handlers.

Workflow of a request through the app built by :func:`create_app`:

1. :class:`~coordinator.service.api.auth.AuthMiddleware` authenticates the request
   (401/403) before any of its body is read; only the public paths pass without
   a token. An address that failed authentication too often within a window
   (:attr:`ApiConfig.auth_limits`) is answered 429 for a cool-down (see
   :mod:`coordinator.service.api.auth_limits`).
2. :class:`BodyLimitMiddleware` refuses a ``Content-Length`` over the route's
   limit with 413 before anything is read, and counts the bytes of the body as
   the app reads them, stopping with 413 as soon as the count passes the limit
   (chunked uploads without a length included). The limit is
   :attr:`ApiConfig.max_artifact_bytes` for ``POST /v1/artifacts`` and
   :attr:`ApiConfig.max_body_bytes` for everything else.
3. The router (:mod:`coordinator.service.api.routes`) checks each route's role, validates
   and calls the :class:`~coordinator.service.operations.Operations` object.
4. The handlers installed here turn what went wrong into a JSON error body
   ``{"error": {"code": ..., "message": ...}}``:

   ==================================  ======================================
   NotFoundError                       404
   ConflictError                       409
   ArtifactRejectedError               422 (the message says why)
   StoreError (any other)              500, generic message, detail logged
   RolloutError, TargetError,          400
   RunError, any CoordinatorError
   request validation                  422, ``details`` lists the fields
   HTTPException (401, 403, 413, 429)  its status and headers
   ==================================  ======================================

Public without a token: ``GET /v1/health`` and, when :attr:`ApiConfig.docs` is
on, ``/docs``, ``/redoc`` and ``/openapi.json``: they describe the API and hold
no fleet data (the bearer scheme is declared there, so "Authorize" in ``/docs``
works). Everything else needs a token (see :mod:`coordinator.service.api.auth`), unknown
paths included: a client without one learns nothing of the routes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator import __version__
from coordinator.errors import (
    ArtifactRejectedError,
    ConflictError,
    CoordinatorError,
    NotFoundError,
    StoreError,
)
from coordinator.service.api.auth import (
    Authenticate,
    AuthFailureHook,
    AuthMiddleware,
    Guard,
    client_address,
)
from coordinator.service.api.auth_limits import AuthLimits, FailedAuthLimiter
from coordinator.service.api.enrollment_routes import ENROLL_PATH, add_enrollment_routes
from coordinator.service.api.routes import ARTIFACTS_PATH, PUBLIC_PATHS, add_routes
from coordinator.service.enrollment import EnrollmentDesk
from coordinator.service.operations import Operations

__all__ = ["ApiConfig", "BodyLimitMiddleware", "BodyTooLargeError", "create_app", "status_for"]

logger = logging.getLogger(__name__)

MIB = 1 << 20


@dataclass(frozen=True)
class ApiConfig:
    """Settings of the HTTP API.

    Attributes:
        max_body_bytes: Largest request body of any route but the artifact upload
            (JSON requests).
        max_artifact_bytes: Largest artifact upload.
        title: Title of the OpenAPI document.
        version: Version of the OpenAPI document.
        docs: Serve ``/docs``, ``/redoc`` and ``/openapi.json`` (publicly).
        auth_limits: How many failed authentications an address may make within a
            window before it is refused (429) for a cool-down.

    Raises:
        ValueError: A limit is not a positive number of bytes.
    """

    max_body_bytes: int = MIB
    max_artifact_bytes: int = 512 * MIB
    title: str = "fedge coordinator"
    version: str = __version__
    docs: bool = True
    auth_limits: AuthLimits = field(default_factory=AuthLimits)

    def __post_init__(self) -> None:
        """Check the limits."""
        for name in ("max_body_bytes", "max_artifact_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive number of bytes, not {value!r}")


# --- body limits --------------------------------------------------------------------


class BodyTooLargeError(HTTPException):
    """A request body (declared or read so far) is over the route's limit."""

    def __init__(self, limit: int) -> None:
        """Say what the limit is."""
        super().__init__(
            int(HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
            f"the request body is larger than this route's limit of {limit} bytes",
            headers={"Connection": "close"},
        )


class BodyLimitMiddleware:
    """Pure ASGI middleware that caps request bodies (see the module docstring).

    Args:
        app: The wrapped application.
        default_limit: Limit of every route not in ``limits``.
        limits: Limits by ``(method, path)``, path without the ``root_path``.
    """

    def __init__(
        self, app: ASGIApp, *, default_limit: int, limits: Mapping[tuple[str, str], int]
    ) -> None:
        """Keep the limits."""
        self._app = app
        self._default = default_limit
        self._limits = dict(limits)

    def limit_for(self, scope: Scope) -> int:
        """The body limit of a request."""
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        path = path.rstrip("/") or "/"
        return self._limits.get((scope["method"], path), self._default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse or cap the request's body, then hand it on."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, limit)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self._app(scope, limited_receive, watched_send)
        except BodyTooLargeError:
            # Normally the app's handler answers it; this catches the rare route
            # that lets it escape.
            if started:
                raise
            await self._refuse(scope, receive, send, limit)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        exc = BodyTooLargeError(limit)
        logger.info(
            "refused %s %r from %s: body over %d bytes",
            scope["method"],
            scope["path"],
            client_address(Request(scope)),
            limit,
        )
        response = error_response(exc.status_code, "payload_too_large", exc.detail, exc.headers)
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# --- errors -------------------------------------------------------------------------

_STATUS: dict[type[CoordinatorError], int] = {
    NotFoundError: HTTPStatus.NOT_FOUND,
    ConflictError: HTTPStatus.CONFLICT,
    StoreError: HTTPStatus.INTERNAL_SERVER_ERROR,
    ArtifactRejectedError: HTTPStatus.UNPROCESSABLE_ENTITY,
    CoordinatorError: HTTPStatus.BAD_REQUEST,
}
"""Status by error class; the most specific class in the error's MRO wins."""

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def status_for(exc: CoordinatorError) -> int:
    """The HTTP status of a coordinator error (see the module docstring's table)."""
    for cls in type(exc).__mro__:
        found = _STATUS.get(cls)
        if found is not None:
            return int(found)
    return int(HTTPStatus.BAD_REQUEST)  # pragma: no cover - CoordinatorError is mapped


def error_response(
    status_code: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    """The API's one error body: ``{"error": {"code": ..., "message": ...}}``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status_code, headers=headers)


async def _coordinator_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, CoordinatorError):  # registered for this class only
        raise exc
    return _coordinator_error_response(request, exc)


def _coordinator_error_response(request: Request, exc: CoordinatorError) -> Response:
    status_code = status_for(exc)
    if status_code >= 500:
        logger.error(
            "%s %r failed: %s: %s",
            request.method,
            request.url.path,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        return error_response(
            status_code, "internal_error", "internal error; the coordinator's log has details"
        )
    logger.debug("%s %r: %s (%d)", request.method, request.url.path, exc, status_code)
    return error_response(status_code, exc.code, str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, HTTPException):  # registered for this class only
        raise exc
    return _http_error_response(request, exc)


def _http_error_response(request: Request, exc: HTTPException) -> Response:
    code = _HTTP_CODES.get(exc.status_code) or _phrase_code(exc.status_code)
    if exc.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
        logger.info(
            "refused %s %r from %s: %s",
            request.method,
            request.url.path,
            client_address(request),
            exc.detail,
        )
    return error_response(exc.status_code, code, str(exc.detail), exc.headers)


def _refusal(request: Request, exc: Exception) -> Response:
    """The response of a request the auth middleware refused (see :class:`AuthMiddleware`)."""
    if isinstance(exc, CoordinatorError):
        return _coordinator_error_response(request, exc)
    if isinstance(exc, HTTPException):
        return _http_error_response(request, exc)
    raise exc  # pragma: no cover - the middleware passes only these two


async def _validation_error(_request: Request, exc: Exception) -> Response:
    if not isinstance(exc, RequestValidationError):  # registered for this class only
        raise exc
    details = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in exc.errors()
    ]
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    message = f"{where}: {first['msg']}" if where else str(first["msg"])
    return error_response(
        HTTPStatus.UNPROCESSABLE_ENTITY, "invalid_request", message, details=details
    )


def _phrase_code(status_code: int) -> str:
    try:
        return HTTPStatus(status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


# --- the factory --------------------------------------------------------------------


def create_app(
    ops: Operations,
    *,
    authenticate: Authenticate,
    config: ApiConfig | None = None,
    on_auth_failure: AuthFailureHook | None = None,
    auth_clock: Callable[[], float] = time.monotonic,
    auth_history: Iterable[tuple[str, float]] = (),
    enrollment: EnrollmentDesk | None = None,
) -> FastAPI:
    """Build the coordinator's HTTP API over an operations object.

    Args:
        ops: What the routes call (the service object, or a twin in tests).
        authenticate: Maps a presented bearer token to its actor, or None if the
            token is unknown, revoked or expired. Called in the threadpool; may
            raise :class:`~coordinator.errors.StoreError` (answered with 500).
        config: Limits and OpenAPI settings; defaults to :class:`ApiConfig()`.
        on_auth_failure: Records each failed authentication (the service audits
            it); without it they are only logged.
        auth_clock: Monotonic seconds for the failed-authentication limiter (a
            fake in tests).
        auth_history: Failed authentications from before a restart, ``(address,
            age in seconds)`` (the service reads them from its audit log), replayed
            into the limiter so cool-downs survive the restart.
        enrollment: The device registry and enrollment (its routes, ``POST
            /v1/enroll`` public, are added only with it; see
            :mod:`coordinator.service.api.enrollment_routes`).

    Returns:
        An ASGI app to hand to uvicorn (or to ``TestClient``).
    """
    config = config or ApiConfig()
    app = FastAPI(
        title=config.title,
        version=config.version,
        description=(
            "Operate a fedge fleet: devices, telemetry, signed artifacts, staged "
            "rollouts, federated runs, the audit log and Prometheus metrics. Every "
            "route but `/v1/health` needs `Authorization: Bearer <token>`; every "
            "POST needs an `operator` token."
        ),
        docs_url="/docs" if config.docs else None,
        redoc_url="/redoc" if config.docs else None,
        openapi_url="/openapi.json" if config.docs else None,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=config.max_body_bytes,
        limits={("POST", ARTIFACTS_PATH): config.max_artifact_bytes},
    )
    limiter = FailedAuthLimiter(config.auth_limits, auth_clock)
    history = list(auth_history)
    if history:
        cooling = limiter.restore(history)
        logger.info(
            "restored %d failed authentication(s) from before the restart; "
            "%d address(es) cooling down",
            len(history),
            cooling,
        )
    guard = Guard(authenticate, limiter=limiter, on_failure=on_auth_failure)
    docs = (
        {"/docs", "/redoc", "/openapi.json", app.swagger_ui_oauth2_redirect_url or "/docs"}
        if config.docs
        else set()
    )
    public = PUBLIC_PATHS | docs | ({ENROLL_PATH} if enrollment is not None else set())
    app.add_middleware(  # added last: the outermost layer, before the body limits
        AuthMiddleware, guard=guard, public=frozenset(public), refuse=_refusal
    )
    app.add_exception_handler(CoordinatorError, _coordinator_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    add_routes(app.router, ops, guard)
    if enrollment is not None:
        add_enrollment_routes(app.router, enrollment, guard)
    return app
