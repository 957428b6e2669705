"""Tests for edge_agent.serving.http_access: who may use the local endpoint, over real sockets.

Each attack on the agent's loopback HTTP API is reproduced against a running
:class:`LocalHttpServer` and shown to fail with a typed, logged refusal (DNS
rebinding through the Host header, a cross-origin post without
``Content-Type: application/json``, a missing or wrong bearer token, a guessed
prediction id), and normal clients are shown to be unaffected.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.config.agent import build_config
from edge_agent.config.values import MIN_TOKEN_CHARS
from edge_agent.errors import ConfigError, ProtocolError
from edge_agent.serving.http_access import (
    HostNotAllowedError,
    HttpConfig,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    check_host_header,
    check_token,
    http_config,
)
from edge_agent.serving.http_api import LocalHttpServer
from edge_agent.serving.server import ModelServer, Prediction
from edge_agent.training.feedback import FeedbackBuffer, FeedbackCollector, PredictionLog
from tests.model_fixtures import N_FEATURES, softmax_runtime, softmax_weights
from tests.test_http_api import loaded

LOCAL = "127.0.0.1"
TOKEN = "tok_" + "a1B2" * 8  # 36 characters of the RFC 6750 alphabet
ACCESS_LOGGER = "edge_agent.serving.http_access"
PREDICT = json.dumps({"inputs": [[0.5] * N_FEATURES]}).encode()
JSON = "application/json"

Address = tuple[str, int]


@pytest.fixture
def collector(tmp_path: Path) -> FeedbackCollector:
    return FeedbackCollector(PredictionLog(), FeedbackBuffer(tmp_path / "feedback", fsync=False))


@pytest.fixture
def serve(collector: FeedbackCollector) -> Iterator[Callable[..., Address]]:
    """Start endpoints over a served softmax model (predictions remembered for feedback)."""
    started: list[LocalHttpServer] = []

    def remember(prediction: Prediction, inputs: Any) -> None:
        collector.remember(prediction.id, inputs)

    def start(**config: Any) -> Address:
        config.setdefault("host", LOCAL)
        models = ModelServer(on_prediction=remember)
        models.activate(loaded(softmax_runtime(softmax_weights(1))))
        endpoint = LocalHttpServer(
            models, HttpConfig(port=0, **config), feedback=collector.record_feedback
        )
        endpoint.start()
        started.append(endpoint)
        return endpoint.address

    yield start
    for endpoint in started:
        endpoint.stop()


def request(
    address: Address,
    method: str,
    path: str,
    *,
    host: str | None = "localhost",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, str], Any]:
    """One request over a raw socket, so that the Host header is exactly ``host``."""
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer_headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split(" ")[1]), answer_headers, json.loads(payload)


def predict(address: Address, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": JSON, **kwargs.pop("headers", {})}
    return request(address, "POST", "/v1/predict", headers=headers, body=PREDICT, **kwargs)


def code(answer: Any) -> str:
    assert set(answer) == {"error"}
    assert answer["error"]["message"]
    result: str = answer["error"]["code"]
    return result


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == ACCESS_LOGGER and r.levelno == logging.WARNING
    ]


# --------------------------------------------------------------------------- Host header


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example",  # DNS rebinding: the page's own name, now resolving to 127.0.0.1
        "attacker.example:8080",
        "localhost.attacker.example",
        "127.0.0.1.nip.io",
        "[::2]:8080",
        "10.0.0.5",
    ],
)
def test_dns_rebinding_host_is_refused(
    serve: Callable[..., Address], caplog: pytest.LogCaptureFixture, host: str
) -> None:
    address = serve()
    caplog.set_level(logging.WARNING, ACCESS_LOGGER)
    for method, path in (("GET", "/v1/health"), ("GET", "/v1/model")):
        status, _, answer = request(address, method, path, host=host)
        assert (status, code(answer)) == (421, "host_not_allowed")
    status, _, answer = predict(address, host=host)
    assert (status, code(answer)) == (421, "host_not_allowed")
    logged = refusals(caplog)
    assert len(logged) == 3
    assert all("does not answer to Host" in line for line in logged)


@pytest.mark.parametrize(
    ("hosts", "why"),
    [
        ([], "a Host header is required"),
        (["localhost", "attacker.example"], "exactly one Host header"),
        (["local host"], "invalid Host header"),
        (["[::1"], "invalid Host header"),
    ],
)
def test_missing_duplicate_or_malformed_host_is_refused(
    serve: Callable[..., Address], caplog: pytest.LogCaptureFixture, hosts: list[str], why: str
) -> None:
    address = serve()
    caplog.set_level(logging.WARNING, ACCESS_LOGGER)
    lines = ["GET /v1/health HTTP/1.0", *(f"Host: {h}" for h in hosts)]
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"421"
    assert code(json.loads(payload)) == "host_not_allowed"
    assert why in json.loads(payload)["error"]["message"]
    assert len(refusals(caplog)) == 1


@pytest.mark.parametrize(
    "host",
    ["localhost", "LOCALHOST.", "localhost:{port}", "127.0.0.1", "127.0.0.1:{port}", "127.9.9.9"],
)
def test_loopback_hosts_are_served(serve: Callable[..., Address], host: str) -> None:
    address = serve()
    status, _, answer = predict(address, host=host.format(port=address[1]))
    assert status == 200
    assert answer["model"] == "digits"


def test_ipv6_loopback_host_is_served(serve: Callable[..., Address]) -> None:
    address = serve(host="::1")
    for host in ("[::1]", f"[::1]:{address[1]}", "[0:0:0:0:0:0:0:1]"):
        assert request(address, "GET", "/v1/health", host=host)[0] == 200


def test_allowed_hosts_are_served_and_others_still_refused(serve: Callable[..., Address]) -> None:
    address = serve(allowed_hosts=("pi-kitchen.lan", "192.168.1.20"))
    for host in ("pi-kitchen.lan", "PI-KITCHEN.LAN.:8080", "192.168.1.20:8080", "localhost"):
        assert predict(address, host=host)[0] == 200, host
    status, _, answer = predict(address, host="pi-kitchen.lan.attacker.example")
    assert (status, code(answer)) == (421, "host_not_allowed")


def test_non_loopback_bind_answers_its_names_and_needs_the_token(
    serve: Callable[..., Address],
) -> None:
    address = (LOCAL, serve(host="0.0.0.0", allow_remote=True, token=TOKEN)[1])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert predict(address, headers=auth)[0] == 200  # a local client, by localhost
    status, _, answer = predict(address, host="attacker.example", headers=auth)
    assert (status, code(answer)) == (421, "host_not_allowed")
    status, _, answer = predict(address)
    assert (status, code(answer)) == (401, "unauthorized")


def test_host_names_include_the_bind_address_not_a_wildcard() -> None:
    config = HttpConfig(host="192.168.1.20", allow_remote=True, allowed_hosts=("Pi.Lan.",))
    assert config.host_names() == {"192.168.1.20", "pi.lan"}
    check_host_header(config, ["192.168.1.20:8080"])
    check_host_header(config, ["pi.lan"])
    wildcard = HttpConfig(host="::", allow_remote=True)
    assert wildcard.host_names() == set()
    with pytest.raises(HostNotAllowedError):
        check_host_header(wildcard, ["[::]:8080"])


@pytest.mark.parametrize("bad", ["", "bad host", "0.0.0.0", "[::1]"])
def test_bad_allowed_hosts_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="allowed host"):
        HttpConfig(allowed_hosts=(bad,))


# --------------------------------------------------------------------------- Content-Type


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_cross_origin_simple_post_is_refused(
    serve: Callable[..., Address],
    collector: FeedbackCollector,
    caplog: pytest.LogCaptureFixture,
    content_type: str | None,
) -> None:
    """A web page may send these without a CORS preflight; the endpoint takes JSON only."""
    address = serve()
    status, _, answer = predict(address)
    assert status == 200
    caplog.set_level(logging.WARNING, ACCESS_LOGGER)
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = json.dumps({"prediction_id": answer["id"], "label": 1}).encode()
    status, _, refused = request(address, "POST", "/v1/feedback", headers=headers, body=body)
    assert (status, code(refused)) == (415, "unsupported_media_type")
    assert len(refusals(caplog)) == 1
    assert len(collector.buffer) == 0
    ok = request(address, "POST", "/v1/feedback", headers={"Content-Type": JSON}, body=body)
    assert ok[0] == 200  # the refusal stored nothing and used nothing up


# --------------------------------------------------------------------------- bearer token


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        "Bearer",
        f"Bearer {TOKEN} {TOKEN}",
    ],
)
def test_missing_or_wrong_token_is_refused(
    serve: Callable[..., Address], caplog: pytest.LogCaptureFixture, authorization: str | None
) -> None:
    address = serve(token=TOKEN)
    caplog.set_level(logging.WARNING, ACCESS_LOGGER)
    headers = {} if authorization is None else {"Authorization": authorization}
    for response in (
        predict(address, headers=headers),
        request(address, "GET", "/v1/model", headers=headers),
        request(address, "GET", "/v1/nothing", headers=headers),
    ):
        status, answer_headers, answer = response
        assert (status, code(answer)) == (401, "unauthorized")
        assert answer_headers["WWW-Authenticate"].startswith("Bearer")
        assert TOKEN not in json.dumps(answer)
    logged = refusals(caplog)
    assert len(logged) == 3
    assert not any(TOKEN[4:20] in line for line in logged)


def test_the_right_token_is_served_and_health_needs_none(serve: Callable[..., Address]) -> None:
    address = serve(token=TOKEN)
    for scheme in ("Bearer", "bearer"):
        status, _, answer = predict(address, headers={"Authorization": f"{scheme} {TOKEN}"})
        assert status == 200
        assert answer["model"] == "digits"
    assert request(address, "GET", "/v1/health")[0] == 200  # probes carry no token
    status, _, answer = request(address, "GET", "/v1/health", host="attacker.example")
    assert (status, code(answer)) == (421, "host_not_allowed")  # but the Host rule holds


def test_a_duplicate_authorization_header_is_refused() -> None:
    config = HttpConfig(token=TOKEN)
    with pytest.raises(UnauthorizedError):
        check_token(config, [f"Bearer {TOKEN}", f"Bearer {TOKEN}"])
    check_token(config, [f"Bearer {TOKEN}"])
    check_token(HttpConfig(), [])  # no token configured: nothing required


@pytest.mark.parametrize(
    "token", ["short", "x" * (MIN_TOKEN_CHARS - 1), "with space " * 3, "ünïcode-" * 4]
)
def test_weak_or_unsendable_tokens_are_refused(token: str) -> None:
    with pytest.raises(ConfigError, match="at least 16 characters"):
        HttpConfig(token=token)


def test_the_token_is_not_in_the_repr() -> None:
    assert TOKEN not in repr(HttpConfig(token=TOKEN))


def test_refusals_are_in_the_agent_error_tree() -> None:
    for error in (
        HostNotAllowedError("x"),
        UnauthorizedError("x"),
        UnsupportedMediaTypeError("x"),
    ):
        assert isinstance(error, ProtocolError)
    assert (HostNotAllowedError.code, UnauthorizedError.code) == (
        "host_not_allowed",
        "unauthorized",
    )


# --------------------------------------------------------------------------- prediction ids


def test_prediction_ids_cannot_be_guessed_for_feedback_poisoning(
    serve: Callable[..., Address], collector: FeedbackCollector, caplog: pytest.LogCaptureFixture
) -> None:
    """Another local client sees one id and tries to label its neighbours' predictions."""
    address = serve()
    ids = [predict(address)[2]["id"] for _ in range(20)]
    assert len(set(ids)) == 20
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) for i in ids)  # 128 random bits
    assert len({i[:4] for i in ids}) > 10  # no shared prefix, no counter
    caplog.set_level(logging.INFO, "edge_agent.training.feedback")
    seen = ids[-1]
    # the old ids were a per-process prefix and a counter: guess the neighbours
    guesses = ({seen[:-1] + c for c in "AQgw"} | {format(n, "032x") for n in range(5)}) - set(ids)
    for guess in guesses:
        status, _, answer = request(
            address,
            "POST",
            "/v1/feedback",
            headers={"Content-Type": JSON},
            body=json.dumps({"prediction_id": guess, "label": 1}).encode(),
        )
        assert (status, code(answer)) == (404, "unknown_prediction")
    assert len(collector.buffer) == 0
    assert sum("unknown prediction id" in r.getMessage() for r in caplog.records) == len(guesses)
    body = json.dumps({"prediction_id": ids[0], "label": 1}).encode()
    ok = request(address, "POST", "/v1/feedback", headers={"Content-Type": JSON}, body=body)
    assert ok[0] == 200  # the client that got the id labels it as before
    assert len(collector.buffer) == 1


# --------------------------------------------------------------------------- agent config


def agent_config(tmp_path: Path, **top: Any) -> Any:
    file_values = {
        "device_id": "pi-1",
        "data_dir": str(tmp_path / "data"),
        "broker": {"url": "mqtt://127.0.0.1:1883"},
        "trust": {"keys": [str(tmp_path / "release.pub")]},
        **top,
    }
    return build_config(file_values, {}, base_dir=tmp_path)


def test_agent_config_reads_the_token_file_and_allowed_hosts(tmp_path: Path) -> None:
    (tmp_path / "http-token").write_text(f"  {TOKEN}\n")
    config = agent_config(
        tmp_path,
        http="0.0.0.0:8080",  # on purpose, with a token
        http_token_file="http-token",
        http_allowed_hosts=["pi-1.lan", "pi-1.lan"],
    )
    assert config.http_token == TOKEN
    assert TOKEN not in repr(config)
    assert config.http_allowed_hosts == ("pi-1.lan",)
    http = http_config(config)
    assert http is not None
    assert (http.host, http.port, http.allow_remote, http.token) == ("0.0.0.0", 8080, True, TOKEN)
    assert http.allowed_hosts == ("pi-1.lan",)


def test_agent_config_without_token_stays_on_loopback(tmp_path: Path) -> None:
    http = http_config(agent_config(tmp_path, http="127.0.0.1:8080"))
    assert http is not None
    assert (http.allow_remote, http.token) == (False, None)
    assert http_config(agent_config(tmp_path)) is None
    with pytest.raises(ConfigError, match="set http_token_file"):
        http_config(agent_config(tmp_path, http="0.0.0.0:8080"))


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"http_token_file": "missing"}, r"http_token_file: .*no such http token file"),
        ({"http_token_file": "weak"}, "http_token_file: the token must be at least 16"),
        ({"http_allowed_hosts": ["not a host"]}, "http_allowed_hosts: 'not a host'"),
        ({"http_allowed_hosts": "pi.lan"}, "http_allowed_hosts"),
    ],
)
def test_agent_config_refuses_bad_http_keys(
    tmp_path: Path, top: dict[str, Any], message: str
) -> None:
    (tmp_path / "weak").write_text("letmein\n")
    with pytest.raises(ConfigError, match=message):
        agent_config(tmp_path, **top)


def test_inputs_of_refused_requests_are_never_remembered(
    serve: Callable[..., Address], collector: FeedbackCollector
) -> None:
    address = serve(token=TOKEN)
    assert predict(address, host="attacker.example")[0] == 421
    assert predict(address)[0] == 401
    assert len(collector.log) == 0
    status, _, answer = predict(address, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    assert answer["id"] in collector.log
    np.testing.assert_array_equal(collector.log.get(answer["id"]), [[0.5] * N_FEATURES])
