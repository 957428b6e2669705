"""The HTTP side of :class:`~coordinator.service.api_client.ApiClient`: requests and errors.

:class:`ApiConnection` holds the connection pool to ``fedge coordinator serve``'s API
and sends one request at a time:

1. the URL (http or https; any ``user:password@`` part is never shown) and the token
   (printable ASCII) are checked when it is made; every request carries
   ``Authorization: Bearer <token>``, and the token is never logged, shown in an
   error or in a ``repr``;
2. :meth:`ApiConnection.call` sends a request and gives a 2xx answer's JSON; an
   error answer becomes the error the service raised (the table in
   :mod:`coordinator.service.api_client`), a timeout or a refused connection an
   :class:`~coordinator.errors.ApiUnavailableError`;
3. :func:`parse` validates the JSON into the service's rows and views with
   pydantic; an answer of another shape is an :class:`~coordinator.errors.ApiError`
   naming the first wrong field (a different fedge version).
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from pydantic import TypeAdapter, ValidationError

from coordinator import __version__
from coordinator.errors import (
    ApiAuthError,
    ApiError,
    ApiUnavailableError,
    ArtifactRejectedError,
    ConflictError,
    CoordinatorError,
    EnrollmentError,
    EnrollmentRefusedError,
    NotFoundError,
    PolicyError,
    RolloutError,
    RunError,
    StrategyError,
    TargetError,
)
from coordinator.lifecycle import Closeable

__all__ = ["AUTH_HINT", "DEFAULT_TIMEOUT_S", "ApiConnection", "parse", "segment"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
"""Seconds to wait for each step of a request (connect, send, each read)."""

AUTH_HINT = "the API refused the token: set FEDGE_TOKEN or pass --token"
"""The message of a 401."""

_ERRORS_BY_CODE: dict[str, type[CoordinatorError]] = {
    cls.code: cls
    for cls in (
        NotFoundError,
        ConflictError,
        ArtifactRejectedError,
        RolloutError,
        TargetError,
        RunError,
        StrategyError,
        EnrollmentError,
        EnrollmentRefusedError,
        PolicyError,
    )
}
"""Error classes the API's ``code`` names (each takes just a message)."""

_ERRORS_BY_STATUS: dict[int, type[CoordinatorError]] = {404: NotFoundError, 409: ConflictError}

_T = TypeVar("_T")


def _printable(token: str) -> bool:
    return bool(token) and all("!" <= ch <= "~" for ch in token)


def _without_userinfo(url: str) -> str:
    """The URL as it may be shown: without a ``user:password@`` part."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class ApiConnection(Closeable):
    """Requests to the coordinator's HTTP API with one token (see the module docstring).

    Args:
        base_url: The API's root, ``http://host:port`` or ``https://host:port``
            (a path prefix is kept: ``https://host/fedge``).
        token: An API token.
        timeout: Seconds to wait for each step of a request.
        transport: An httpx transport to use instead of the network (tests).

    Raises:
        ApiError: the URL is not http(s), or the token is empty or holds
            characters no token has.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """Check the URL and the token and prepare the connection pool."""
        shown = _without_userinfo(base_url)
        if urlsplit(base_url).scheme not in {"http", "https"} or not urlsplit(base_url).netloc:
            raise ApiError(f"the API URL must be http://host:port or https://host:port: {shown!r}")
        if not _printable(token):
            raise ApiError(
                "the API token is empty or holds spaces or non-ASCII characters; "
                "set FEDGE_TOKEN or pass --token"
            )
        self._url = shown.rstrip("/")
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=self._url + "/",
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": f"fedge/{__version__}",
            },
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
        )

    @property
    def url(self) -> str:
        """The API's root URL (without any credentials)."""
        return self._url

    def __repr__(self) -> str:
        """Name the URL, never the token."""
        return f"ApiConnection({self._url!r})"

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def get(
        self, adapter: TypeAdapter[_T], path: str, *, params: dict[str, Any] | None = None
    ) -> _T:
        answer = self.call("GET", path, action="read fleet data", params=params)
        return parse(adapter, answer, self._url)

    def call(
        self,
        method: str,
        path: str,
        *,
        action: str,
        params: dict[str, Any] | None = None,
        json: dict[str, Any] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """Send one request; give the answer's JSON or raise the error it means."""
        where = f"{self._url}/{path}"
        try:
            response = self._http.request(
                method, path, params=params, json=json, content=content, headers=headers
            )
        except httpx.TimeoutException as exc:
            raise ApiUnavailableError(
                f"the API at {self._url} did not answer {method} /{path} within {self._timeout:g}s"
            ) from exc
        except httpx.TransportError as exc:
            raise ApiUnavailableError(f"cannot reach the API at {self._url}: {exc}") from exc
        logger.debug("%s %s -> %d", method, where, response.status_code)
        if response.is_success:
            try:
                return response.json()
            except ValueError as exc:
                raise ApiError(
                    f"{method} {where} answered {response.status_code} without JSON; "
                    "is this a fedge coordinator?",
                    status=response.status_code,
                ) from exc
        raise _error(response, method=method, where=where, action=action)


def segment(value: str) -> str:
    """A path segment: every character that is not unreserved is escaped."""
    return quote(value, safe="")


def parse(adapter: TypeAdapter[_T], answer: Any, url: str) -> _T:
    try:
        return adapter.validate_python(answer)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.error_count() else {"loc": (), "msg": "invalid"}
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError(
            f"unexpected answer from the API at {url} ({where}: {first['msg']}); "
            "is it the same fedge version?"
        ) from exc


def _error(response: httpx.Response, *, method: str, where: str, action: str) -> CoordinatorError:
    """The error an error answer means (see the module docstring's table)."""
    status = response.status_code
    code, message = _error_body(response)
    if status == httpx.codes.UNAUTHORIZED:
        return ApiAuthError(AUTH_HINT, status=status)
    if status == httpx.codes.FORBIDDEN:
        reason = f": {message}" if message else ""
        return ApiAuthError(f"this token's role may not {action}{reason}", status=status)
    if message is None:
        message = f"{method} {where} answered {status} {response.reason_phrase}".rstrip()
    cls = _ERRORS_BY_CODE.get(code or "") or _ERRORS_BY_STATUS.get(status)
    if cls is not None:
        return cls(message)
    if status >= httpx.codes.INTERNAL_SERVER_ERROR:
        return ApiError(
            f"the API at {where} failed ({status}): {message}", status=status, code=code
        )
    return ApiError(message, status=status, code=code)


def _error_body(response: httpx.Response) -> tuple[str | None, str | None]:
    """``(code, message)`` of the API's error body, Nones if it is not one."""
    try:
        body = response.json()
    except ValueError:
        return None, None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, None
    code, message = error.get("code"), error.get("message")
    return (
        code if isinstance(code, str) else None,
        message if isinstance(message, str) and message else None,
    )
