"""Who may use the local inference endpoint: bind address, Host, token, media type.

:mod:`edge_agent.serving.http_api` serves predictions to applications on the device.
This module holds the rules that keep everything else out, checked on every request
before it is routed (:func:`check_access`):

1. **Where it listens** (:class:`HttpConfig`). Loopback only (``127.0.0.0/8``,
   ``::1``, ``localhost``), unless ``allow_remote`` is set; the agent sets it only
   when a bearer token is configured (:func:`http_config`), so the endpoint never
   listens on the network without authentication. Or (and) on a Unix socket,
   ``socket_path``, whose mode 0600 lets only the agent's user connect
   (:mod:`edge_agent.serving.unix_socket`); with only ``http_socket`` configured
   there is no TCP listener at all.
2. **The Host header** (:func:`check_host_header`), against DNS rebinding: a web page
   at ``evil.example`` whose name later resolves to ``127.0.0.1`` can make the
   browser send requests to the endpoint, but the browser still says
   ``Host: evil.example``. So the Host must be a loopback name (``localhost``,
   ``127.x.x.x``, ``[::1]``, any port or none), the bind address itself, or a name
   the operator listed in ``allowed_hosts`` (for a deliberate non-loopback bind).
   Anything else, or no Host, or two of them: 421 ``host_not_allowed``. Not
   checked on the Unix socket, which no browser can reach (clients send various
   Hosts there: ``localhost``, or the socket's path).
3. **The bearer token** (:func:`check_token`), when configured: every endpoint but
   ``GET /v1/health`` needs ``Authorization: Bearer <token>``, compared in constant
   time (:func:`hmac.compare_digest`); otherwise 401 ``unauthorized`` with a
   ``WWW-Authenticate: Bearer`` header.
4. **The body's media type** (:func:`check_content_type`, called once the body is
   read, so the client sees the answer): a POST body needs ``Content-Type:
   application/json``, else 415 ``unsupported_media_type``. A web page can send
   ``text/plain`` or a form cross-origin without asking; JSON needs a CORS
   preflight, which the endpoint never grants.

Every refusal is a :class:`~edge_agent.serving.http_bodies.RequestError` subclass
(in the agent's exception tree, under :class:`~edge_agent.errors.ProtocolError`)
with a stable ``code``, and is logged at WARNING with the client address; the
endpoint answers it as JSON.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

from edge_agent.config.agent import AgentConfig
from edge_agent.config.values import want_token
from edge_agent.errors import AddressError, ConfigError
from edge_agent.serving.http_bodies import RequestError, is_json_media_type
from edge_agent.serving.unix_socket import check_socket_path
from edge_agent.transport.address import check_host, parse_bind, split_host_port

__all__ = [
    "HEALTH_PATH",
    "MAX_BODY_BYTES",
    "HostNotAllowedError",
    "HttpConfig",
    "UnauthorizedError",
    "UnsupportedMediaTypeError",
    "check_access",
    "check_content_type",
    "check_host_header",
    "check_token",
    "http_config",
    "is_loopback",
]

logger = logging.getLogger(__name__)

#: Default largest request body (1 MiB).
MAX_BODY_BYTES = 1024 * 1024

HEALTH_PATH = "/v1/health"
"""The one path served without the bearer token (liveness probes have none)."""

_BEARER_RE = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +(\S+)")


class HostNotAllowedError(RequestError):
    """421: the Host header is not a name this endpoint answers to (DNS rebinding)."""

    code = "host_not_allowed"

    def __init__(self, message: str) -> None:
        super().__init__(421, self.code, message)


class UnsupportedMediaTypeError(RequestError):
    """415: a request body that is not declared ``application/json``."""

    code = "unsupported_media_type"

    def __init__(self, message: str) -> None:
        super().__init__(415, self.code, message)


class UnauthorizedError(RequestError):
    """401: the bearer token is missing or wrong."""

    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(
            401, self.code, message, headers={"WWW-Authenticate": 'Bearer realm="fedge-agent"'}
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a literal loopback address (no DNS).

    A host name other than ``localhost`` counts as not loopback, whatever it
    resolves to: nothing is looked up.

    Args:
        host: A host name or an IP literal (an IPv6 address without brackets).

    Returns:
        True for ``localhost`` (any case, trailing dot allowed), ``127.0.0.0/8`` and
        ``::1``; False otherwise.
    """
    if _name(host) == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _name(host: str) -> str:
    """A host as compared: lowercase, no trailing dot, an IP literal normalised."""
    name = host.lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


@dataclass(frozen=True)
class HttpConfig:
    """Where and how the local endpoint listens, and who may use it.

    Attributes:
        host: Address to bind: an IP literal or a host name. Only ``localhost`` and
            loopback IP literals count as local.
        port: TCP port; ``0`` picks a free ephemeral port.
        max_body_bytes: Largest request body accepted (checked from
            ``Content-Length`` before reading).
        allow_remote: Allow a non-loopback ``host``. Without ``token`` anyone who
            can reach the port can use the model.
        timeout_s: Longest wait for one read, in seconds (408 after it); a whole
            connection is cut after twice that.
        allowed_hosts: Host names (or IP literals) the Host header may name besides
            the loopback names and ``host`` itself: the names remote clients use.
        token: The bearer token every endpoint but ``/v1/health`` requires, or None
            for none; at least :data:`~edge_agent.config.values.MIN_TOKEN_CHARS` of
            ``A-Za-z0-9._~+/-`` (RFC 6750), never shown by ``repr``.
        socket_path: Also (or only) serve on this Unix socket, mode 0600.
        tcp: Listen on ``host:port``; False serves on ``socket_path`` only.

    Raises:
        ConfigError: a field is out of range, ``host`` is not a loopback address
            and ``allow_remote`` is false, an allowed host is not a host name, the
            token is too short or holds characters a header cannot carry, the
            socket path is too long, or neither TCP nor a socket is asked for.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = MAX_BODY_BYTES
    allow_remote: bool = False
    timeout_s: float = 10.0
    allowed_hosts: tuple[str, ...] = ()
    token: str | None = field(default=None, repr=False)
    socket_path: Path | None = None
    tcp: bool = True

    def __post_init__(self) -> None:
        if self.socket_path is not None:
            check_socket_path(self.socket_path)
        elif not self.tcp:
            raise ConfigError("the http endpoint needs a TCP address or a socket path")
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("http host must be a non-empty string")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ConfigError(f"http port must be an integer, got {self.port!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"http port must be 0-65535, got {self.port}")
        if (
            isinstance(self.max_body_bytes, bool)
            or not isinstance(self.max_body_bytes, int)
            or self.max_body_bytes < 1
        ):
            raise ConfigError(
                f"max_body_bytes must be a positive integer, got {self.max_body_bytes!r}"
            )
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, int | float)
            or not 0 < self.timeout_s < float("inf")
        ):
            raise ConfigError(f"timeout_s must be a positive number, got {self.timeout_s!r}")
        if not self.allow_remote and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to listen on {self.host!r}: the local inference endpoint only "
                "binds to loopback (127.0.0.1, ::1, localhost) unless it requires a bearer "
                "token (set http_token_file; allow_remote for library use)"
            )
        self._check_allowed_hosts()
        if self.token is not None:
            want_token("http token", self.token)

    def _check_allowed_hosts(self) -> None:
        if not isinstance(self.allowed_hosts, tuple):
            raise ConfigError("http allowed_hosts must be a tuple of host names")
        for host in self.allowed_hosts:
            if not isinstance(host, str) or _is_unspecified(host):
                raise ConfigError(f"http allowed host {host!r} is not a host name or address")
            try:
                check_host(host)
            except AddressError as exc:
                raise ConfigError(f"http allowed host: {exc}") from None

    def host_names(self) -> frozenset[str]:
        """The names (compared as :func:`_name` gives them) a Host header may carry
        besides any loopback name: ``allowed_hosts`` and the bind address itself."""
        names = {_name(host) for host in self.allowed_hosts}
        if not _is_unspecified(self.host):
            names.add(_name(self.host))
        return frozenset(names)


def check_host_header(config: HttpConfig, values: list[str]) -> None:
    """Refuse a request whose Host header is not a name this endpoint answers to.

    Args:
        config: The endpoint's configuration (bind address, ``allowed_hosts``).
        values: Every ``Host`` header of the request.

    Raises:
        HostNotAllowedError: no Host, more than one, one that is not ``HOST[:PORT]``,
            or a host that is neither a loopback name nor one of
            :meth:`HttpConfig.host_names`.
    """
    if len(values) != 1:
        raise HostNotAllowedError(
            "exactly one Host header is required" if values else "a Host header is required"
        )
    shown = values[0].strip()[:100]
    try:
        host, _ = split_host_port(values[0].strip(), default_port=80, min_port=0)
    except AddressError as exc:
        raise HostNotAllowedError(f"invalid Host header {shown!r}: {exc}") from None
    if not is_loopback(host) and _name(host) not in config.host_names():
        raise HostNotAllowedError(
            f"this endpoint does not answer to Host {shown!r}: use localhost or "
            "127.0.0.1 (a remote name must be listed in http_allowed_hosts)"
        )


def check_token(config: HttpConfig, values: list[str]) -> None:
    """Refuse a request without ``Authorization: Bearer <the configured token>``.

    Does nothing when no token is configured.

    Args:
        config: The endpoint's configuration (its ``token``).
        values: Every ``Authorization`` header of the request.

    Raises:
        UnauthorizedError: no such header, more than one, not a bearer token, or
            not the configured token (compared in constant time).
    """
    if config.token is None:
        return
    if not values:
        raise UnauthorizedError("this endpoint requires Authorization: Bearer <token>")
    match = _BEARER_RE.fullmatch(values[0].strip()) if len(values) == 1 else None
    if match is None:
        raise UnauthorizedError("expected one header Authorization: Bearer <token>")
    if not hmac.compare_digest(match.group(1).encode(), config.token.encode()):
        raise UnauthorizedError("the bearer token is not valid")


def check_access(
    config: HttpConfig, path: str, headers: Message, client: str, *, host_check: bool = True
) -> None:
    """The Host and token checks of one request, in that order; refusals are logged.

    Args:
        config: The endpoint's configuration.
        path: The request's path (``/v1/health`` needs no token).
        headers: The request's headers.
        client: The client's address, for the log line.
        host_check: Check the Host header (False on the Unix socket).

    Raises:
        HostNotAllowedError: see :func:`check_host_header`.
        UnauthorizedError: see :func:`check_token`.
    """
    try:
        if host_check:
            check_host_header(config, headers.get_all("Host") or [])
        if path != HEALTH_PATH:
            check_token(config, headers.get_all("Authorization") or [])
    except RequestError as exc:
        logger.warning("refused a request from %s to %s: %s", client, path[:100], exc.message)
        raise


def check_content_type(value: str | None, path: str, client: str) -> None:
    """Refuse (and log) a request body not declared ``application/json`` (UTF-8).

    Args:
        value: The request's ``Content-Type`` header, or None.
        path: The request's path, for the log line.
        client: The client's address, for the log line.

    Raises:
        UnsupportedMediaTypeError: no ``Content-Type``, or another media type or
            charset (see :func:`~edge_agent.serving.http_bodies.is_json_media_type`).
    """
    if value is not None and is_json_media_type(value):
        return
    got = "none" if value is None else repr(value[:100])
    logger.warning("refused a request from %s to %s: Content-Type %s", client, path[:100], got)
    raise UnsupportedMediaTypeError(f"expected Content-Type application/json, got {got}")


def http_config(config: AgentConfig) -> HttpConfig | None:
    """The endpoint configuration of an agent config (None when ``http`` and
    ``http_socket`` are both off; TCP only when ``http`` is given).

    A non-loopback bind is allowed only with a bearer token (``http_token_file``).

    Raises:
        ConfigError: the bind address is invalid, or not loopback without a token,
            or an allowed host, the token or the socket path is invalid.
    """
    if config.http is None and config.http_socket is None:
        return None
    host, port = parse_bind(config.http) if config.http is not None else ("127.0.0.1", 0)
    token = config.http_token
    return HttpConfig(
        host=host,
        port=port,
        allow_remote=token is not None,
        allowed_hosts=config.http_allowed_hosts,
        token=token,
        socket_path=config.http_socket,
        tcp=config.http is not None,
    )
