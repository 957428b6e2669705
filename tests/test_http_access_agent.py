"""The local endpoint's access rules in a real ``fedge-agent run`` process.

The agent is started with ``--http``, ``--http-token-file`` and
``--http-allowed-host`` on a real mosquitto; a DNS-rebinding request, a request
without the token and a cross-origin simple post are refused with their typed codes
and logged in the agent's log, while a client with the token (and health probes,
which need none) are served.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from compress.keys import SigningKey
from tests.fleet_support import AgentProcess, Mosquitto, free_port, public_key_file, wait_for

TOKEN = "0123456789abcdef" * 4


@pytest.fixture
def broker_users() -> Sequence[str]:
    return ["pi-1"]


@pytest.fixture
def agent(
    tmp_path: Path, broker: Mosquitto, signing_key: SigningKey
) -> Iterator[tuple[AgentProcess, int]]:
    token_file = tmp_path / "http-token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    process = AgentProcess(
        broker,
        "pi-1",
        tmp_path / "pi-1",
        public_key_file(tmp_path, signing_key),
        http_port=port,
        extra=["--http-token-file", str(token_file), "--http-allowed-host", "pi-1.lan"],
    )
    try:
        wait_for(lambda: _listening(port), what="the agent's HTTP endpoint")
        yield process, port
    finally:
        process.kill()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def _request(
    port: int, method: str, path: str, host: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, Any]:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(payload)


def test_a_running_agent_refuses_each_attack_and_serves_its_clients(
    agent: tuple[AgentProcess, int],
) -> None:
    process, port = agent
    auth = {"Authorization": f"Bearer {TOKEN}"}
    json_body = {"Content-Type": "application/json"}
    predict = json.dumps({"inputs": [[0.5, 0.5]]}).encode()

    # DNS rebinding: the attacker's name in Host, even with the token.
    status, answer = _request(port, "GET", "/v1/model", "attacker.example:8080", auth)
    assert (status, answer["error"]["code"]) == (421, "host_not_allowed")
    # No token, or a wrong one.
    status, answer = _request(port, "POST", "/v1/predict", "localhost", json_body, predict)
    assert (status, answer["error"]["code"]) == (401, "unauthorized")
    wrong = {"Authorization": "Bearer " + "f" * 64, **json_body}
    status, answer = _request(port, "POST", "/v1/predict", "localhost", wrong, predict)
    assert (status, answer["error"]["code"]) == (401, "unauthorized")
    # A cross-origin simple post (text/plain) with the token.
    plain = {**auth, "Content-Type": "text/plain"}
    status, answer = _request(port, "POST", "/v1/predict", "127.0.0.1", plain, predict)
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")

    # Normal clients: health without a token; the rest with it, by loopback or allowed name.
    status, answer = _request(port, "GET", "/v1/health", f"localhost:{port}", {})
    assert (status, answer["status"]) == (503, "no_model")  # served: no model installed yet
    for host in ("127.0.0.1", "pi-1.lan"):
        status, answer = _request(port, "GET", "/v1/model", host, auth)
        assert (status, answer["error"]["code"]) == (404, "no_model")
        status, answer = _request(port, "POST", "/v1/predict", host, {**auth, **json_body}, predict)
        assert (status, answer["error"]["code"]) == (503, "no_model")

    assert process.stop() == 0
    log = process.log.read_text()
    assert log.count("refused a request from 127.0.0.1") == 4
    assert "does not answer to Host 'attacker.example:8080'" in log
    assert TOKEN not in log
