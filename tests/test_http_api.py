"""Tests for edge_agent.serving.http_api: the local inference endpoint, over real sockets."""

from __future__ import annotations

import http.client
import json
import logging
import re
import shlex
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from compress.families import INPUT_NAME, OUTPUT_NAME, FloatArray, forward
from edge_agent.errors import ConfigError
from edge_agent.runtime.base import ModelRuntime
from edge_agent.serving import http_api
from edge_agent.serving.http_api import (
    MAX_BODY_BYTES,
    MAX_CONCURRENT_REQUESTS,
    HttpConfig,
    LocalHttpServer,
)
from edge_agent.serving.server import LoadedModel, ModelServer
from tests.fleet_support import wait_for
from tests.model_fixtures import N_FEATURES, FakeRuntime, softmax_runtime, softmax_weights

LOCAL = "127.0.0.1"

Address = tuple[str, int]
Response = tuple[int, dict[str, str], Any]


# --- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def weights() -> dict[int, dict[str, FloatArray]]:
    return {version: softmax_weights(version) for version in (1, 2)}


@pytest.fixture(scope="module")
def models(weights: dict[int, dict[str, FloatArray]]) -> dict[int, LoadedModel]:
    return {version: loaded(softmax_runtime(w), version) for version, w in weights.items()}


def loaded(runtime: ModelRuntime, version: int = 1) -> LoadedModel:
    return LoadedModel(
        name="digits",
        version=version,
        sha256=f"{version:064x}",
        format="onnx",
        slot="ab"[version % 2],
        runtime=runtime,
        installed_at=1_790_000_000.0 + version,
    )


@pytest.fixture
def model_server() -> ModelServer:
    return ModelServer()


@pytest.fixture
def serve(model_server: ModelServer) -> Iterator[Callable[..., Address]]:
    """Start LocalHttpServers on 127.0.0.1:0; all are stopped at teardown."""
    started: list[LocalHttpServer] = []

    def start(
        server: ModelServer | None = None,
        extra_health: Callable[[], Mapping[str, Any]] | None = None,
        **config: Any,
    ) -> Address:
        config.setdefault("port", 0)
        endpoint = LocalHttpServer(
            server or model_server, HttpConfig(host=LOCAL, **config), extra_health=extra_health
        )
        endpoint.start()
        started.append(endpoint)
        return endpoint.address

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def address(serve: Callable[..., Address]) -> Address:
    return serve()


def call(
    address: Address,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), json.loads(data) if data else None
    finally:
        conn.close()


def post(
    address: Address, document: Any, content_type: str | None = "application/json"
) -> Response:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    return call(address, "POST", "/v1/predict", body, headers)


def raw(address: Address, data: bytes, *, shut_write: bool = False) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            # A server that answers and closes before reading everything sent
            # resets the connection; the answer arrived before the reset.
            if not chunks:
                raise
    return b"".join(chunks)


def parse_raw(data: bytes) -> tuple[int, Any]:
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def error_code(response: Response) -> str:
    _, headers, body = response
    assert headers["Content-Type"] == "application/json"
    assert set(body) == {"error"}
    # A refused input (422) also says why; no other error has more keys.
    extra = {"reason"} if body["error"]["code"] == "invalid_input" else set()
    assert set(body["error"]) == {"code", "message"} | extra
    assert body["error"]["message"]
    code: str = body["error"]["code"]
    return code


X = np.random.default_rng(5).standard_normal((3, N_FEATURES)).astype(np.float32)


# --- configuration ----------------------------------------------------------------------


def test_config_defaults() -> None:
    config = HttpConfig()
    assert (config.host, config.port, config.allow_remote) == ("127.0.0.1", 8080, False)
    assert config.max_body_bytes == MAX_BODY_BYTES == 1024 * 1024


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost", "LOCALHOST"])
def test_loopback_hosts_are_allowed(host: str) -> None:
    assert HttpConfig(host=host).host == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "fe80::1", "mypi.local"])
def test_remote_hosts_need_allow_remote(host: str) -> None:
    with pytest.raises(ConfigError, match="only binds to loopback"):
        HttpConfig(host=host)
    assert HttpConfig(host=host, allow_remote=True).allow_remote


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", -1),
        ("port", 65536),
        ("port", True),
        ("port", "80"),
        ("max_body_bytes", 0),
        ("max_body_bytes", 1.5),
        ("timeout_s", 0),
        ("timeout_s", float("inf")),
        ("timeout_s", float("nan")),
        ("host", ""),
    ],
)
def test_bad_config(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field.split("_", maxsplit=1)[0]):
        HttpConfig(**{field: value})  # type: ignore[arg-type]


# --- lifecycle --------------------------------------------------------------------------


def test_start_stop(model_server: ModelServer) -> None:
    server = LocalHttpServer(model_server, HttpConfig(port=0))
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.address

    with server:
        host, port = server.address
        assert host == LOCAL
        assert port != 0
        assert call((host, port), "GET", "/v1/health")[0] == 503
        with pytest.raises(RuntimeError, match="already running"):
            server.start()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5).close()
    server.stop()  # idempotent
    LocalHttpServer(model_server, HttpConfig(port=0)).stop()  # never started: no-op

    server.start()  # restartable
    try:
        assert call(server.address, "GET", "/v1/health")[0] == 503
    finally:
        server.stop()


def test_port_in_use(address: Address, model_server: ModelServer) -> None:
    server = LocalHttpServer(model_server, HttpConfig(port=address[1]))
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{address[1]}"):
        server.start()
    server.stop()


def test_ipv6_loopback(model_server: ModelServer, models: dict[int, LoadedModel]) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    model_server.activate(models[1])
    with LocalHttpServer(model_server, HttpConfig(host="::1", port=0)) as server:
        host, port = server.address
        assert host == "::1"
        status, _, body = call((host, port), "GET", "/v1/health")
    assert (status, body["status"]) == (200, "ok")


# --- predictions ------------------------------------------------------------------------


def test_predict(
    address: Address,
    model_server: ModelServer,
    models: dict[int, LoadedModel],
    weights: dict[int, dict[str, FloatArray]],
) -> None:
    model_server.activate(models[2])

    status, headers, body = post(address, {"inputs": X.tolist()})

    assert status == 200
    assert headers["Content-Type"] == "application/json"
    want = forward("softmax", weights[2], X)
    assert set(body) == {"id", "model", "version", "outputs", "labels", "latency_ms"}
    assert (body["model"], body["version"]) == ("digits", 2)
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", body["id"])
    np.testing.assert_allclose(body["outputs"][OUTPUT_NAME], want, rtol=1e-5, atol=1e-6)
    assert body["labels"] == want.argmax(axis=1).tolist()
    assert body["latency_ms"] >= 0


def test_predict_inputs_by_name(
    address: Address,
    model_server: ModelServer,
    models: dict[int, LoadedModel],
    weights: dict[int, dict[str, FloatArray]],
) -> None:
    model_server.activate(models[1])

    status, _, body = post(address, {"inputs": {INPUT_NAME: X[:1].tolist()}})

    assert status == 200
    want = forward("softmax", weights[1], X[:1])
    np.testing.assert_allclose(body["outputs"][OUTPUT_NAME], want, rtol=1e-5, atol=1e-6)
    assert body["labels"] == [int(want.argmax())]


def test_docstring_example(
    address: Address,
    model_server: ModelServer,
    models: dict[int, LoadedModel],
    weights: dict[int, dict[str, FloatArray]],
) -> None:
    doc = http_api.__doc__ or ""
    command = re.search(r"curl .*?/v1/predict", doc, re.DOTALL)
    assert command is not None
    args = shlex.split(command.group(0).replace("\\\n", " "))
    name, value = args[args.index("-H") + 1].split(":", 1)
    body = args[args.index("-d") + 1]
    url = args[-1]
    assert url == "http://127.0.0.1:8080/v1/predict"
    model_server.activate(models[1])

    request = urllib.request.Request(
        f"http://{address[0]}:{address[1]}/v1/predict",
        data=body.encode(),
        headers={name.strip(): value.strip()},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        answer = json.load(response)

    x = np.asarray(json.loads(body)["inputs"], dtype=np.float32)
    want = forward("softmax", weights[1], x)
    np.testing.assert_allclose(answer["outputs"][OUTPUT_NAME], want, rtol=1e-5, atol=1e-6)
    assert answer["labels"] == want.argmax(axis=1).tolist()
    # The documented answer has the keys an answer has.
    shown = re.search(r'\{"id".*?"latency_ms":[0-9.]+\}', doc, re.DOTALL)
    assert shown is not None
    assert set(json.loads(shown.group(0).replace('"kq3X..."', '"x"'))) == set(answer)


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        'Application/JSON;charset="UTF-8"',
    ],
)
def test_json_content_types_are_accepted(
    address: Address,
    model_server: ModelServer,
    models: dict[int, LoadedModel],
    content_type: str,
) -> None:
    model_server.activate(models[1])
    assert post(address, {"inputs": X.tolist()}, content_type)[0] == 200


def test_non_finite_outputs_are_null(address: Address, model_server: ModelServer) -> None:
    model_server.activate(
        loaded(FakeRuntime(lambda feeds: {"y": np.array([[np.inf, 1.0]], np.float32)}))
    )
    status, _, body = post(address, {"inputs": [[1, 2]]})
    assert status == 200
    assert body["outputs"] == {"y": [[None, 1.0]]}
    assert body["labels"] == [0]


# --- health and model info --------------------------------------------------------------


def test_health(
    serve: Callable[..., Address], model_server: ModelServer, models: dict[int, LoadedModel]
) -> None:
    extra = {"broker": "connected", "status": "overridden?", "predictions": 12}
    address = serve(extra_health=lambda: extra)

    status, _, body = call(address, "GET", "/v1/health")
    assert status == 503
    assert body == {"status": "no_model", "model": None, "broker": "connected", "predictions": 12}

    model_server.activate(models[1])
    status, headers, body = call(address, "GET", "/v1/health?verbose=1")
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    assert body["status"] == "ok"
    assert body["model"] == models[1].info()
    assert body["broker"] == "connected"


def test_model_info(
    address: Address, model_server: ModelServer, models: dict[int, LoadedModel]
) -> None:
    response = call(address, "GET", "/v1/model")
    assert response[0] == 404
    assert error_code(response) == "no_model"

    model_server.activate(models[2])
    status, _, body = call(address, "GET", "/v1/model")
    assert status == 200
    assert body == json.loads(json.dumps(models[2].info()))
    assert body["inputs"] == [{"name": INPUT_NAME, "dtype": "float32", "shape": [None, N_FEATURES]}]


# --- errors -----------------------------------------------------------------------------


def test_no_model(address: Address) -> None:
    response = post(address, {"inputs": X.tolist()})
    assert response[0] == 503
    assert error_code(response) == "no_model"


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"",
        b'{"inputs": [[NaN, 1, 2, 3]]}',
        b'{"inputs": [[Infinity, 1, 2, 3]]}',
        b'{"inputs": [[-Infinity, 1, 2, 3]]}',
        b'{"inputs": [[1e400, 1, 2, 3]]}',
        b'{"inputs": [[1, 2, 3, 4]], "inputs": [[1, 2, 3, 4]]}',
        b"[[1, 2, 3, 4]]",
        b'{"input": [[1, 2, 3, 4]]}',
        b'{"inputs": [[1, 2, 3, 4]], "debug": true}',
        b'{"inputs": [[1, 2, 3, null]]}',
        b'{"inputs": [["1", 2, 3, 4]]}',
        b'{"inputs": [[{"a": 1}, 2, 3, 4]]}',
        b'{"inputs": "1,2,3,4"}',
        b'{"inputs": null}',
        b'{"inputs": {}}',
        b'{"inputs": {"input": [[1, 2, 3, "x"]]}}',
        b'{"inputs": [[1, 2, 3, 4]]}\xff',
        b"\xef\xbb\xbf{}",
        b"[" * 100_000,
        b'{"inputs": [[1' + b"0" * 400 + b', 0, 0, 0]]}',
    ],
    ids=[
        "truncated", "empty", "nan", "infinity", "minus-infinity", "overflow", "duplicate-key",
        "not-an-object", "no-inputs", "unknown-field", "null", "string", "object", "text",
        "inputs-null", "no-named-inputs", "named-string", "bad-utf8", "bom", "deep",
        "huge-integer",  # over the strict parser's 40 digits
    ],
)  # fmt: skip
def test_malformed_body(
    address: Address, model_server: ModelServer, models: dict[int, LoadedModel], body: bytes
) -> None:
    model_server.activate(models[1])
    response = post(address, body)
    assert response[0] == 400
    assert error_code(response) == "malformed"


@pytest.mark.parametrize(
    "body", [b'{"inputs": [[1, 2, 3, 4]]}\n', b' \r\n{"inputs": [[1, 2, 3, 4]]}\t']
)
def test_whitespace_around_the_body_is_allowed(
    address: Address, model_server: ModelServer, models: dict[int, LoadedModel], body: bytes
) -> None:
    model_server.activate(models[1])
    assert post(address, body)[0] == 200


@pytest.mark.parametrize(
    ("inputs", "reason", "message"),
    [
        ([[1.0, 2.0, 3.0]], "shape", "must have shape"),
        ([[1.0, 2.0, 3.0, 4.0], [1.0]], "dtype", "cannot convert"),
        ({"image": [[1.0, 2.0, 3.0, 4.0]]}, "shape", "unknown"),
        ([[1e39, 0, 0, 0]], "dtype", "cannot convert"),
        (3.5, "shape", "must have shape"),
    ],
)
def test_inputs_that_do_not_fit(
    address: Address,
    model_server: ModelServer,
    models: dict[int, LoadedModel],
    inputs: object,
    reason: str,
    message: str,
) -> None:
    model_server.activate(models[1])
    response = post(address, {"inputs": inputs})
    assert response[0] == 422
    assert error_code(response) == "invalid_input"
    assert response[2]["error"]["reason"] == reason
    assert message in response[2]["error"]["message"]


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/predict/", "/v2/predict", "/v1/models"])
def test_unknown_path(address: Address, path: str) -> None:
    for method in ("GET", "POST"):
        response = call(address, method, path, b"{}", {"Content-Type": "application/json"})
        assert response[0] == 404
        assert error_code(response) == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/predict", "POST"),
        ("PUT", "/v1/predict", "POST"),
        ("POST", "/v1/health", "GET"),
        ("DELETE", "/v1/model", "GET"),
        ("PATCH", "/v1/model", "GET"),
        ("OPTIONS", "/v1/health", "GET"),
    ],
)
def test_wrong_method(address: Address, method: str, path: str, allow: str) -> None:
    response = call(address, method, path)
    assert response[0] == 405
    assert error_code(response) == "method_not_allowed"
    assert response[1]["Allow"] == allow


def test_head_gets_no_body(address: Address) -> None:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("HEAD", "/v1/health")
        response = conn.getresponse()
        assert response.status == 405
        assert response.read() == b""
    finally:
        conn.close()


def test_unsupported_method_is_json(address: Address) -> None:
    status, body = parse_raw(raw(address, b"BREW /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n"))
    assert status == 501
    assert body["error"]["code"] == "not_implemented"


def test_missing_content_length(address: Address) -> None:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.putrequest("POST", "/v1/predict")
        conn.putheader("Content-Type", "application/json")
        conn.endheaders()
        response = conn.getresponse()
        status, body = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert status == 411
    assert body["error"]["code"] == "length_required"


def test_chunked_body_is_refused(address: Address) -> None:
    # One write of the whole request: the server answers after the headers and
    # closes, which a client still sending chunks would meet as a broken pipe.
    body = b'{"inputs": [[1, 2, 3, 4]]}'
    request = (
        b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body
        + b"\r\n0\r\n\r\n"
    )  # fmt: skip
    status, answer = parse_raw(raw(address, request, shut_write=True))
    assert status == 411
    assert "chunked" in answer["error"]["message"]


@pytest.mark.parametrize("length", ["abc", "-1", "1e3", "12, 12"])
def test_bad_content_length(address: Address, length: str) -> None:
    request = (
        f"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    status, body = parse_raw(raw(address, request, shut_write=True))
    assert status == 400
    assert "Content-Length" in body["error"]["message"]


def test_duplicate_content_length(address: Address) -> None:
    request = (
        b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}"
    )
    status, _ = parse_raw(raw(address, request, shut_write=True))
    assert status == 400


def test_body_too_large_is_refused_before_reading(serve: Callable[..., Address]) -> None:
    address = serve(max_body_bytes=64)
    # Headers only: the answer must come without the server waiting for the body.
    request = (
        b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: 65\r\n\r\n"
    )
    started = time.monotonic()
    status, body = parse_raw(raw(address, request))
    assert time.monotonic() - started < 5
    assert status == 413
    assert body["error"]["code"] == "too_large"
    assert "limit is 64 bytes" in body["error"]["message"]


def test_body_at_the_limit_is_read(
    serve: Callable[..., Address], model_server: ModelServer, models: dict[int, LoadedModel]
) -> None:
    model_server.activate(models[1])
    document = json.dumps({"inputs": [[1, 2, 3, 4]]}).encode()
    address = serve(max_body_bytes=len(document))
    assert post(address, document)[0] == 200
    assert post(address, document + b" ")[0] == 413


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json-patch+json",
        "application/json; charset=latin-1",
        "",
        None,
    ],
)
def test_unsupported_media_type(
    address: Address,
    model_server: ModelServer,
    models: dict[int, LoadedModel],
    content_type: str | None,
) -> None:
    model_server.activate(models[1])
    response = post(address, {"inputs": X.tolist()}, content_type)
    assert response[0] == 415
    assert error_code(response) == "unsupported_media_type"


def test_short_body(address: Address) -> None:
    request = (
        b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"inputs"'
    )
    status, body = parse_raw(raw(address, request, shut_write=True))
    assert status == 400
    assert "shorter" in body["error"]["message"]


def test_slow_body_times_out(serve: Callable[..., Address]) -> None:
    address = serve(timeout_s=0.3)
    request = (
        b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"inputs"'
    )
    started = time.monotonic()
    status, body = parse_raw(raw(address, request))  # the client never finishes
    assert time.monotonic() - started < 5
    assert status == 408
    assert body["error"]["code"] == "timeout"


def test_a_trickling_client_is_cut_off(serve: Callable[..., Address]) -> None:
    address = serve(timeout_s=0.3)
    started = time.monotonic()
    with socket.create_connection(address, timeout=5) as sock:
        closed = False
        for byte in b"POST /v1/predict HTTP/1.1\r\nHost: localhost\r\n" * 4:
            try:
                sock.sendall(bytes([byte]))  # each read waits well under timeout_s
            except OSError:
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - started > 3:
                break
        if not closed:
            sock.settimeout(2)
            try:
                closed = sock.recv(1) == b""
            except OSError:
                closed = True
    assert closed
    assert time.monotonic() - started < 2.5


def test_too_many_requests_at_once_get_503(serve: Callable[..., Address]) -> None:
    address = serve(timeout_s=2.0)
    stalled = [socket.create_connection(address, timeout=5) for _ in range(MAX_CONCURRENT_REQUESTS)]
    try:
        # Until the server holds every stalled connection, a request takes a free
        # slot and is answered; then it is refused at once.

        def refused() -> tuple[int, Any] | None:
            answer = parse_raw(raw(address, b"GET /v1/health HTTP/1.0\r\n\r\n"))
            return answer if answer[0] == 503 else None

        status, body = wait_for(refused, 10.0, what="a request refused while every slot is held")
        assert status == 503
        assert body["error"]["code"] == "busy"
    finally:
        for sock in stalled:
            sock.close()


def test_slow_headers_time_out(serve: Callable[..., Address]) -> None:
    address = serve(timeout_s=0.3)
    started = time.monotonic()
    assert raw(address, b"GET /v1/hea") == b""  # closed without an answer
    assert time.monotonic() - started < 5
    assert call(address, "GET", "/v1/health")[0] == 503  # still serving


def explode(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    raise KeyError("secret internal detail")


def test_unexpected_error_is_500(
    address: Address, model_server: ModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    model_server.activate(loaded(FakeRuntime(explode)))
    with caplog.at_level(logging.ERROR, logger="edge_agent.serving.http_api"):
        response = post(address, {"inputs": [[1, 2]]})
    assert response[0] == 500
    assert error_code(response) == "internal"
    assert "secret" not in json.dumps(response[2])
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


def test_failing_extra_health_is_500(serve: Callable[..., Address]) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("telemetry down")

    response = call(serve(extra_health=broken), "GET", "/v1/health")
    assert response[0] == 500
    assert error_code(response) == "internal"


def test_requests_are_logged_at_debug_not_stderr(
    address: Address, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="edge_agent.serving.http_api"):
        status, headers, _ = call(address, "GET", "/v1/health")
    assert status == 503
    assert capsys.readouterr().err == ""
    assert any(
        r.levelno == logging.DEBUG and "/v1/health" in r.getMessage() for r in caplog.records
    )
    assert "Python" not in headers["Server"]


# --- concurrency ------------------------------------------------------------------------


def test_predictions_while_models_swap(
    address: Address,
    model_server: ModelServer,
    models: dict[int, LoadedModel],
    weights: dict[int, dict[str, FloatArray]],
) -> None:
    want = {v: forward("softmax", w, X) for v, w in weights.items()}
    model_server.activate(models[1])
    errors: list[BaseException] = []
    versions: list[int] = []

    def client() -> None:
        try:
            for _ in range(25):
                status, _, body = post(address, {"inputs": X.tolist()})
                assert status == 200, body
                np.testing.assert_allclose(
                    body["outputs"][OUTPUT_NAME], want[body["version"]], rtol=1e-5, atol=1e-6
                )
                versions.append(body["version"])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    swaps = 0
    while any(t.is_alive() for t in threads):
        model_server.activate(models[1 + swaps % 2])
        swaps += 1
        time.sleep(0.001)
    for t in threads:
        t.join()

    assert errors == []
    assert len(versions) == 200
    assert set(versions) == {1, 2}
    assert swaps > 1
