"""The local inference endpoint: JSON over HTTP on the device, standard library only.

Applications on the device (or, when explicitly allowed, on its network) ask the
installed model for predictions over plain HTTP; the agent runs one
:class:`LocalHttpServer` in front of its :class:`edge_agent.serving.server.ModelServer`::

    with LocalHttpServer(model_server, HttpConfig(port=8080), extra_health=agent.status):
        ...  # serves until the block ends (or call start() / stop())

Example request, for a model with one input of 4 features::

    curl -s -H 'Content-Type: application/json' \\
         -d '{"inputs": [[0.5, -1.0, 2.0, 0.25]]}' http://127.0.0.1:8080/v1/predict

    {"id":"kq3X...","model":"digits","version":3,
     "outputs":{"probabilities":[[0.1,0.7,0.1,0.1]]},"labels":[1],"latency_ms":0.21}

Endpoints:

* ``POST /v1/predict`` with ``{"inputs": [[...], ...]}`` (single-input models) or
  ``{"inputs": {"input": [[...]]}}`` (inputs by name) answers 200 with ``id`` (random,
  128 bits: only the client that got it can give feedback on it), ``model``,
  ``version``, ``outputs`` (name -> nested lists; non-finite values as ``null``),
  ``labels`` (one class per row for a 2-D first output, else ``null``) and
  ``latency_ms``. A 1-D input for a ``(batch, features)`` model is one row.
* ``GET /v1/health`` answers 200 ``{"status": "ok", "model": {...}, ...}`` or 503
  ``{"status": "no_model", "model": null, ...}``; the keys returned by
  ``extra_health()`` (connection state, telemetry totals ...) are merged in, except
  ``status`` and ``model``, which always come from the model server.
* ``POST /v1/feedback`` with ``{"prediction_id": "<id from /v1/predict>", "label": 3}``
  (or a list, one label per example of that prediction) stores the inputs of that
  prediction, whatever their shape (rows, images, windows), with their true class
  label(s) as local training examples (the raw data never leaves the device) and
  answers 200 ``{"stored": N}``. A regression model's feedback gives its true value
  instead: ``{"prediction_id": "...", "target": 21.5}`` (or one number per example,
  or per example a list of the model's outputs: ``[[1.0, 2.5]]``). Errors: 404
  ``unknown_prediction`` (never seen, too old, or already labelled), 400
  ``bad_label`` (a label or target that does not fit the prediction),
  ``bad_data`` (inputs that do not fit the examples already stored) or
  ``malformed``, 404 ``not_found`` when feedback is off.
* ``POST /v1/explain`` with ``{"inputs": [...], "target": 3}`` (``target``
  optional: the predicted class by default) answers 200 with per-feature occlusion
  attributions of one input (:mod:`edge_agent.serving.http_routes` has an example),
  at most 66 model evaluations in one runtime call; validated like predict, counted
  in telemetry as ``explanations``, not as predictions.
* ``GET /v1/model`` answers 200 with :meth:`edge_agent.serving.server.LoadedModel.info`, or
  404 with code ``no_model``.

Every error is JSON, ``{"error": {"code": "...", "message": "..."}}``; the table of
statuses and codes is in :mod:`edge_agent.serving.http_routes` (e.g. 400
``malformed``, 401 ``unauthorized``, 413 ``too_large``, 422 ``invalid_input`` with a
``reason``, 503 ``no_model``).

Access (:mod:`edge_agent.serving.http_access`, checked before routing): the endpoint
listens on loopback by default and :class:`HttpConfig` refuses any other address unless
``allow_remote=True`` (the agent sets it only with a bearer token); the ``Host`` header
must be a loopback name, the bind address or one of ``allowed_hosts``; an optional
bearer ``token`` guards every path but ``/v1/health``. With ``socket_path`` the same
API is served on a Unix socket of mode 0600 (:mod:`edge_agent.serving.unix_socket`;
no Host check there), and with ``tcp=False`` only there. There is **no TLS**: a token
sent over a network travels in clear (put a TLS proxy in front for that). Refusals are
logged at WARNING.

Each request runs in its own daemon thread (``ThreadingHTTPServer``), at most
:data:`MAX_CONCURRENT_REQUESTS` at once (more get 503 at once); each connection
serves one request (HTTP/1.0 semantics); a read that waits ``timeout_s`` is
answered 408, and a connection is cut ``2 * timeout_s`` after it was accepted however
slowly the client trickles bytes, so a slow or stalled client holds one thread for at
most that long.
Requests are logged at DEBUG through this module's logger, never to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from edge_agent.errors import ConfigError, NoModelError
from edge_agent.serving.http_access import (
    HEALTH_PATH,
    MAX_BODY_BYTES,
    HttpConfig,
    check_access,
    check_content_type,
    is_loopback,
)
from edge_agent.serving.http_bodies import RequestError
from edge_agent.serving.http_routes import (
    FeedbackHandler,
    explain_route,
    feedback_route,
    predict_route,
)
from edge_agent.serving.server import ModelServer
from edge_agent.serving.unix_socket import bind_owner_only, claim_path, peer_label, release_path

__all__ = ["MAX_BODY_BYTES", "FeedbackHandler", "HttpConfig", "LocalHttpServer", "is_loopback"]

logger = logging.getLogger(__name__)

MAX_CONCURRENT_REQUESTS = 16
"""Requests served at once; each may parse up to ``max_body_bytes`` of JSON."""
_BUSY_RESPONSE = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\n\r\n"
    b'{"error": {"code": "busy", "message": "too many requests at once; retry"}}'
)

_CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,18}")

_ROUTES = {
    "/v1/predict": "POST",
    "/v1/feedback": "POST",
    "/v1/explain": "POST",
    HEALTH_PATH: "GET",
    "/v1/model": "GET",
}
_STATUS_CODES = {
    400: "malformed",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    411: "length_required",
    413: "too_large",
    414: "too_large",
    415: "unsupported_media_type",
    431: "too_large",
    500: "internal",
    501: "not_implemented",
    505: "unsupported_version",
}


@dataclass(frozen=True)
class _Api:
    """What the request handlers need."""

    models: ModelServer
    config: HttpConfig
    extra_health: Callable[[], Mapping[str, Any]] | None
    feedback: FeedbackHandler | None = None


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # the stdlib's 5 resets bursts of local clients
    checks_host = True

    def __init__(self, address: Any, api: _Api) -> None:
        self.api = api
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Refuse (503) beyond :data:`MAX_CONCURRENT_REQUESTS` instead of a thread each."""
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(_BUSY_RESPONSE)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, with a deadline on the whole request; free its slot."""
        # Each read also times out after timeout_s (answered 408); this cut is for a
        # client that keeps every read just under it.
        deadline = threading.Timer(2 * self.api.config.timeout_s, _cut, (request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self.slots.release()

    def server_bind(self) -> None:
        # HTTPServer.server_bind() resolves the host's FQDN, which can hang for
        # seconds on a device without DNS; the name is only used for CGI.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


def _cut(connection: socket.socket) -> None:
    """Deadline passed: end a connection (a client trickling bytes cannot keep it)."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


class _HttpServer6(_HttpServer):
    address_family = socket.AF_INET6


class _UnixHttpServer(_HttpServer):
    """The same API on a Unix socket of mode 0600, removed when closed."""

    address_family = socket.AF_UNIX
    checks_host = False  # no browser reaches a Unix socket: no DNS rebinding

    def __init__(self, path: Path, api: _Api) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None
        super().__init__(path, api)

    def server_bind(self) -> None:
        claim_path(self.path)
        self._identity = bind_owner_only(self.socket, self.path)
        self.server_name, self.server_port = "localhost", 0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        connection, _ = self.socket.accept()
        return connection, (peer_label(connection), 0)  # client_address[0] names the user

    def server_close(self) -> None:
        super().server_close()
        if self._identity is not None:
            release_path(self.path, self._identity)


class _Handler(BaseHTTPRequestHandler):
    """Routes one request; every response is JSON."""

    server: _HttpServer
    server_version = "fedge-agent"
    sys_version = ""
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        self._responded = False
        self._body_read = False
        super().setup()
        self.connection.settimeout(self.server.api.config.timeout_s)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        logger.debug("%s " + format, self.client_address[0], *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors detected by the standard library (bad request line, 501 ...) as JSON."""
        del explain
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send_error(code, _STATUS_CODES.get(code, "http_error"), message or phrase)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    # --- routing -----------------------------------------------------------------

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        try:
            check_access(
                self.server.api.config,
                path,
                self.headers,
                self.client_address[0],
                host_check=self.server.checks_host,
            )
            allowed = _ROUTES.get(path)
            if allowed is None:
                raise RequestError(404, "not_found", f"no endpoint {path[:100]!r}")
            if self.command != allowed:
                raise RequestError(
                    405, "method_not_allowed", f"{path} accepts {allowed}, not {self.command}"
                )
            api = self.server.api
            if path == "/v1/predict":
                self._send_json(200, predict_route(api.models, self._read_body()))
            elif path == "/v1/feedback":
                self._send_json(200, feedback_route(api.feedback, self._read_body()))
            elif path == "/v1/explain":
                self._send_json(200, explain_route(api.models, self._read_body()))
            elif path == HEALTH_PATH:
                self._health()
            else:
                self._model()
        except RequestError as exc:
            headers = {"Allow": _ROUTES[path]} if exc.status == 405 else dict(exc.headers)
            self._drain_body()
            self._send_error(exc.status, exc.code, exc.message, headers, reason=exc.reason)
        except (ConnectionError, TimeoutError) as exc:  # the client left, or stopped reading
            logger.debug("client %s went away: %s", self.client_address[0], exc)
            self.close_connection = True
        except Exception:
            logger.exception("unexpected error serving %s %s", self.command, path[:100])
            if not self._responded:
                self._send_error(500, "internal", "internal error; see the agent's log")

    def _health(self) -> None:
        api = self.server.api
        body = dict(api.extra_health()) if api.extra_health is not None else {}
        body.update(api.models.health())
        self._send_json(200 if body["status"] == "ok" else 503, body)

    def _model(self) -> None:
        model = self.server.api.models.active
        if model is None:
            raise RequestError(404, NoModelError.code, "no model is installed yet")
        self._send_json(200, model.info())

    # --- request and response bodies ---------------------------------------------

    def _read_body(self) -> bytes:
        """The request body, after checking its declared length and type.

        Raises:
            RequestError: 411, 400 (bad length), 413, 408 (timeout), 415.
        """
        if self.headers.get("Transfer-Encoding") is not None:
            raise RequestError(
                411, "length_required", "chunked bodies are not accepted; send Content-Length"
            )
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise RequestError(411, "length_required", "a Content-Length header is required")
        if len(lengths) > 1 or not _CONTENT_LENGTH_RE.fullmatch(lengths[0].strip()):
            raise RequestError(400, "malformed", "invalid Content-Length header")
        length = int(lengths[0])
        limit = self.server.api.config.max_body_bytes
        if length > limit:
            raise RequestError(
                413, "too_large", f"the body is {length} bytes, the limit is {limit} bytes"
            )
        self._body_read = True
        try:
            body = self.rfile.read(length)
        except TimeoutError as exc:
            raise RequestError(408, "timeout", "timed out reading the request body") from exc
        if len(body) != length:
            raise RequestError(400, "malformed", "the body is shorter than its Content-Length")
        # Checked after reading (the body is within the limit): closing a connection
        # with unread data resets it, and the client would never see this answer.
        check_content_type(
            self.headers.get("Content-Type"), urlsplit(self.path).path, self.client_address[0]
        )
        return body

    def _drain_body(self) -> None:
        """Read and drop a body not read yet (a request refused before its body).

        Closing a connection with unread data resets it, and the client would never
        see the answer; a body over ``max_body_bytes``, or of a bad length, is not
        read (that client gets the reset).
        """
        if self._body_read:
            return
        self._body_read = True
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) != 1 or not _CONTENT_LENGTH_RE.fullmatch(lengths[0].strip()):
            return
        length = int(lengths[0])
        if length > self.server.api.config.max_body_bytes:
            return
        with contextlib.suppress(OSError):
            self.rfile.read(length)

    def _send_error(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        error = {"code": code, "message": message}
        if reason is not None:
            error["reason"] = reason
        self._send_json(status, {"error": error}, headers)

    def _send_json(
        self, status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        data = json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self._responded = True
        if self.command != "HEAD":
            self.wfile.write(data)


class LocalHttpServer:
    """The local inference endpoint, served from background threads (TCP, Unix socket).

    Args:
        server: The model server that answers predictions.
        config: Where to listen, body limit, timeout.
        extra_health: Called on each ``GET /v1/health``; its keys are merged into
            the answer (``status`` and ``model`` excepted).
        feedback: Stores the true label(s) of a prediction (``POST /v1/feedback``);
            None answers that endpoint 404.
    """

    def __init__(
        self,
        server: ModelServer,
        config: HttpConfig,
        *,
        extra_health: Callable[[], Mapping[str, Any]] | None = None,
        feedback: FeedbackHandler | None = None,
    ) -> None:
        self._api = _Api(models=server, config=config, extra_health=extra_health, feedback=feedback)
        self._lock = threading.Lock()
        self._running: list[tuple[_HttpServer, threading.Thread]] = []

    @property
    def address(self) -> tuple[str, int]:
        """The TCP ``(host, port)`` listened on (the real port when configured as 0).

        Raises:
            RuntimeError: the server is not running, or serves a Unix socket only.
        """
        for httpd, _ in self._running:
            if httpd.address_family != socket.AF_UNIX:
                host, port = httpd.server_address[:2]
                return str(host), int(port)
        raise RuntimeError("the HTTP server is not running (or serves a Unix socket only)")

    def start(self) -> None:
        """Bind (TCP, and the Unix socket if configured) and serve from daemon threads.

        Raises:
            ConfigError: an address cannot be bound (in use, not local, no
                permission, a socket path that is not free); nothing is left open.
            RuntimeError: the server is already running.
        """
        config = self._api.config
        with self._lock:
            if self._running:
                raise RuntimeError("the HTTP server is already running")
            opened: list[_HttpServer] = []
            try:
                if config.tcp:
                    server_class = _HttpServer6 if ":" in config.host else _HttpServer
                    opened.append(self._open(server_class, (config.host, config.port)))
                if config.socket_path is not None:
                    opened.append(self._open(_UnixHttpServer, config.socket_path))
            except ConfigError:
                for httpd in opened:
                    httpd.server_close()
                raise
            for httpd in opened:
                thread = threading.Thread(
                    target=httpd.serve_forever, name="fedge-http", kwargs={"poll_interval": 0.1}
                )
                thread.daemon = True
                thread.start()
                self._running.append((httpd, thread))
        guard = "a bearer token" if config.token is not None else "no token"
        if config.socket_path is not None:
            logger.info(
                "local inference endpoint listening on unix socket %s (mode 0600, %s)",
                config.socket_path,
                guard,
            )
        if not config.tcp:
            return
        host, port = self.address
        if config.allow_remote and not is_loopback(config.host):
            logger.warning(
                "local inference endpoint listening on %s:%d (not loopback, %s, no TLS)",
                host,
                port,
                guard,
            )
        else:
            logger.info("local inference endpoint listening on %s:%d (%s)", host, port, guard)

    def _open(self, server_class: type[_HttpServer], address: Any) -> _HttpServer:
        """Bind one listener.

        Raises:
            ConfigError: it cannot be bound.
        """
        try:
            return server_class(address, self._api)
        except OSError as exc:
            shown = address if isinstance(address, Path) else "{}:{}".format(*address)
            raise ConfigError(f"cannot listen on {shown}: {exc.strerror or exc}") from exc

    def stop(self) -> None:
        """Stop serving, close the sockets (a Unix socket's file is removed); does
        nothing if not running.

        Requests already being handled finish in their own threads.
        """
        with self._lock:
            running, self._running = self._running, []
        if not running:
            return
        for httpd, thread in running:
            httpd.shutdown()
            httpd.server_close()
            thread.join()
        logger.info("local inference endpoint stopped")

    def __enter__(self) -> Self:
        """Start serving.

        Raises:
            ConfigError: see :meth:`start`.
        """
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop serving."""
        self.stop()
