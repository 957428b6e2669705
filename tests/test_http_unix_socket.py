"""The local endpoint on a Unix socket: owner-only, no TCP port, stale files replaced.

Issue 17 ("Agent HTTP: ... optional bearer token or a Unix socket"): a TCP port on
loopback is open to every user of the device and to a browser's DNS-rebinding
tricks. With ``http_socket`` the same API is served on an ``AF_UNIX`` socket of
mode 0600: another user's connection is refused by the kernel, no browser can
reach it, and with ``http`` unset there is no TCP listener at all. The file is
removed on stop; one left by a crash is replaced at the next start, while a
socket another process serves, or a path that is not a socket, is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from compress.keys import SigningKey
from edge_agent.config.agent import build_config
from edge_agent.errors import ConfigError
from edge_agent.serving.http_access import HttpConfig, http_config
from edge_agent.serving.http_api import LocalHttpServer
from edge_agent.serving.server import LoadedModel, ModelServer
from edge_agent.serving.unix_socket import MAX_SOCKET_PATH_BYTES
from tests.fleet_support import AgentProcess, Mosquitto, free_port, public_key_file, wait_for
from tests.model_fixtures import N_FEATURES, softmax_runtime, softmax_weights

TOKEN = "0123456789abcdef" * 4
JSON = {"Content-Type": "application/json"}
NOBODY = 65534


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory under /tmp (socket paths are limited to 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="fedge-sock-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def models() -> ModelServer:
    server = ModelServer()
    server.activate(
        LoadedModel(
            name="digits",
            version=1,
            sha256="0" * 64,
            format="onnx",
            slot="a",
            runtime=softmax_runtime(softmax_weights(0)),
            installed_at=1_790_000_000.0,
        )
    )
    return server


@pytest.fixture
def serve(models: ModelServer) -> Iterator[Callable[..., LocalHttpServer]]:
    started: list[LocalHttpServer] = []

    def start(**config: Any) -> LocalHttpServer:
        endpoint = LocalHttpServer(models, HttpConfig(**config))
        endpoint.start()
        started.append(endpoint)
        return endpoint

    yield start
    for endpoint in started:
        endpoint.stop()


def request(
    path: Path, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, Any]:
    """One HTTP/1.1 request over the Unix socket at ``path``; (status, JSON body)."""
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(payload)


def predict_body() -> bytes:
    return json.dumps({"inputs": [[0.5] * N_FEATURES]}).encode()


# ------------------------------------------------------------ the server object


def test_predict_over_the_socket_works_and_there_is_no_tcp_listener(
    serve: Callable[..., LocalHttpServer], sock_dir: Path
) -> None:
    path = sock_dir / "http.sock"
    endpoint = serve(socket_path=path, tcp=False)
    status, answer = request(path, "POST", "/v1/predict", {"Host": "localhost", **JSON},
                             predict_body())  # fmt: skip
    assert status == 200
    assert (answer["model"], answer["version"]) == ("digits", 1)
    assert len(answer["outputs"]["probabilities"][0]) > 1
    status, answer = request(path, "GET", "/v1/health", {"Host": "localhost"})
    assert (status, answer["status"]) == (200, "ok")
    with pytest.raises(RuntimeError, match="serves a Unix socket only"):
        _ = endpoint.address
    # The other rules still hold: the media type is still required.
    status, answer = request(path, "POST", "/v1/predict", {"Host": "localhost"}, predict_body())
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")


def test_the_socket_is_owner_only(serve: Callable[..., LocalHttpServer], sock_dir: Path) -> None:
    path = sock_dir / "http.sock"
    serve(socket_path=path, tcp=False)
    info = path.lstat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.getuid()


_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    sys.exit(13)
sys.exit(0)
"""


def test_another_user_cannot_connect(serve: Callable[..., LocalHttpServer], sock_dir: Path) -> None:
    """A real connection attempt as user ``nobody`` (needs root to switch user)."""
    if os.getuid() != 0:
        pytest.fail("this check switches to user nobody and must run as root")
    sock_dir.chmod(0o711)  # others may traverse the directory; the socket decides
    path = sock_dir / "http.sock"
    serve(socket_path=path, tcp=False)

    def as_nobody() -> int:
        return subprocess.run(
            ["/usr/bin/python3", "-c", _CONNECT, str(path)], user=NOBODY, check=False, timeout=30
        ).returncode

    assert as_nobody() == 13  # EACCES: the mode keeps them out
    path.chmod(0o666)  # the control: the same user connects once the mode allows it
    assert as_nobody() == 0


def test_no_host_check_on_the_socket_but_the_token_still_applies(
    serve: Callable[..., LocalHttpServer], sock_dir: Path
) -> None:
    path = sock_dir / "http.sock"
    serve(socket_path=path, tcp=False, token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}", **JSON}
    # requests-unixsocket and others send the socket's path as Host; served.
    status, _ = request(path, "POST", "/v1/predict", {"Host": "%2Ftmp%2Fhttp.sock", **auth},
                        predict_body())  # fmt: skip
    assert status == 200
    status, answer = request(path, "POST", "/v1/predict", {"Host": "localhost", **JSON},
                             predict_body())  # fmt: skip
    assert (status, answer["error"]["code"]) == (401, "unauthorized")


def test_tcp_and_socket_together_keep_the_host_check_on_tcp(
    serve: Callable[..., LocalHttpServer], sock_dir: Path
) -> None:
    path = sock_dir / "http.sock"
    endpoint = serve(host="127.0.0.1", port=0, socket_path=path)
    _, port = endpoint.address
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /v1/model HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    assert b" 421 " in data.split(b"\r\n")[0]
    assert request(path, "GET", "/v1/model", {"Host": "localhost"})[0] == 200


def test_the_socket_file_is_removed_on_stop(models: ModelServer, sock_dir: Path) -> None:
    path = sock_dir / "run" / "http.sock"  # a missing directory is made (0700)
    endpoint = LocalHttpServer(models, HttpConfig(socket_path=path, tcp=False))
    endpoint.start()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    endpoint.stop()
    assert not path.exists()


def test_a_stale_socket_is_replaced(
    serve: Callable[..., LocalHttpServer], sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = sock_dir / "http.sock"
    crashed = socket.socket(socket.AF_UNIX)
    crashed.bind(str(path))  # what a killed agent leaves: a socket nobody listens on
    crashed.close()
    assert stat.S_ISSOCK(path.lstat().st_mode)
    with caplog.at_level(logging.INFO):
        serve(socket_path=path, tcp=False)
    assert "replaced a stale http socket" in caplog.text
    assert request(path, "GET", "/v1/health", {"Host": "localhost"})[0] == 200


def test_a_live_socket_or_a_regular_file_is_not_replaced(
    models: ModelServer,
    serve: Callable[..., LocalHttpServer],
    sock_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = sock_dir / "http.sock"
    serve(socket_path=path, tcp=False)
    second = LocalHttpServer(models, HttpConfig(socket_path=path, tcp=False))
    with caplog.at_level(logging.ERROR), pytest.raises(ConfigError, match="in use by another"):
        second.start()
    assert "in use by another process" in caplog.text
    assert request(path, "GET", "/v1/health", {"Host": "localhost"})[0] == 200  # untouched
    precious = sock_dir / "notes.txt"
    precious.write_text("keep me")
    third = LocalHttpServer(models, HttpConfig(socket_path=precious, tcp=False))
    with pytest.raises(ConfigError, match="not a socket"):
        third.start()
    assert precious.read_text() == "keep me"


def test_the_socket_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TCP address or a socket path"):
        HttpConfig(tcp=False)
    with pytest.raises(ConfigError, match=f"longer than {MAX_SOCKET_PATH_BYTES} bytes"):
        HttpConfig(socket_path=tmp_path / ("s" * 120), tcp=False)


def test_the_agent_config_turns_tcp_off_when_only_the_socket_is_given(tmp_path: Path) -> None:
    key = tmp_path / "k.pub"
    base = {
        "device_id": "pi-1",
        "data_dir": "data",
        "broker": {"url": "mqtt://127.0.0.1:1883", "password": "x"},
        "trust": {"keys": [str(key)]},
    }
    only = http_config(build_config({**base, "http_socket": "http.sock"}, {},
                                          base_dir=tmp_path))  # fmt: skip
    assert only is not None
    assert (only.tcp, only.socket_path) == (False, tmp_path / "http.sock")
    both = http_config(build_config({**base, "http_socket": "s", "http": "127.0.0.1:8080"},
                                          {}, base_dir=tmp_path))  # fmt: skip
    assert both is not None
    assert (both.tcp, both.port) == (True, 8080)
    assert http_config(build_config(base, {}, base_dir=tmp_path)) is None


# ------------------------------------------------------- a real agent process


@pytest.fixture
def broker_users() -> Sequence[str]:
    return ["pi-1"]


def test_a_running_agent_serves_on_its_socket_only_and_replaces_it_after_a_crash(
    tmp_path: Path, sock_dir: Path, broker: Mosquitto, signing_key: SigningKey
) -> None:
    path = sock_dir / "agent.sock"
    trust = public_key_file(tmp_path, signing_key)
    port = free_port()  # the agent is not told to use it: nothing may listen there

    def start() -> AgentProcess:
        process = AgentProcess(broker, "pi-1", tmp_path / "pi-1", trust,
                               extra=["--http-socket", str(path)])  # fmt: skip
        wait_for(lambda: _serving(path), what="the agent's socket")
        return process

    process = start()
    try:
        status, answer = request(path, "GET", "/v1/health", {"Host": "localhost"})
        assert (status, answer["status"]) == (503, "no_model")  # served; nothing installed
        status, answer = request(path, "POST", "/v1/predict", {"Host": "localhost", **JSON},
                                 predict_body())  # fmt: skip
        assert (status, answer["error"]["code"]) == (503, "no_model")
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert "listening on unix socket" in process.log_text()
        assert "listening on 127.0.0.1" not in process.log_text()
        process.kill()  # SIGKILL: the socket file stays behind
        assert stat.S_ISSOCK(path.lstat().st_mode)
        process = start()
        assert "replaced a stale http socket" in process.log_text()
        assert request(path, "GET", "/v1/health", {"Host": "localhost"})[0] == 503
        assert process.stop() == 0
        assert not path.exists()  # removed on a clean stop
    finally:
        process.kill()


def _serving(path: Path) -> bool:
    try:
        return request(path, "GET", "/v1/health", {"Host": "localhost"})[0] in (200, 503)
    except OSError:
        return False
