"""``fedge coordinator serve`` as a real process: HTTP API, tokens, uploads, SIGTERM.

The service runs with its embedded broker on a free port and a database in
tmp_path; tokens are made beforehand with ``fedge coordinator token create``, as an
operator would. Every started process is killed at teardown, whatever happened.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from compress.keys import generate_signing_key
from tests.fleet_support import free_port, make_artifact, public_key_file, wait_for

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
OCTETS = {"Content-Type": "application/octet-stream"}


def fedge_exe() -> str:
    exe = shutil.which("fedge", path=str(BIN))
    if exe is None:
        pytest.fail(f"the fedge console script is not installed in {BIN}")
    return exe


def fedge(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [fedge_exe(), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def create_token(db: Path, role: str, name: str | None = None) -> str:
    named = ("--name", name) if name else ()
    done = fedge("coordinator", "token", "create", "--role", role, *named, "--db", db,
                 cwd=db.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("fedge_"), done.stdout
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class ServiceProcess:
    """``fedge coordinator serve`` with an embedded broker, logging to a file."""

    def __init__(self, directory: Path, trust: Path) -> None:
        self.directory = directory
        self.db = directory / "state.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / f"serve-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.trust = trust

    def start(self) -> None:
        args = [
            fedge_exe(), "coordinator", "serve", "--db", str(self.db),
            "--embedded-broker", "--dev", "--embedded-broker-port", str(free_port()),
            "--trust", str(self.trust), "--bind", f"127.0.0.1:{self.port}",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                args, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_ready()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        """Until GET /v1/health answers 200; fail at once if the process exits."""
        process = self.process
        assert process is not None

        def healthy() -> bool:
            if process.poll() is not None:
                pytest.fail(f"the service exited ({process.returncode}):\n{self.log_text()}")
            try:
                return httpx.get(f"{self.url}/v1/health", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, START_TIMEOUT_S, what=f"the service to answer (log: {self.log})")

    def signal(self, signum: int) -> int:
        """Send ``signum``; return the exit status (fails if it takes too long)."""
        assert self.process is not None
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_TIMEOUT_S}s after {signum}:\n{self.log_text()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)


@dataclass(frozen=True)
class Running:
    service: ServiceProcess
    client: httpx.Client
    viewer: str
    operator: str
    good: Path
    tampered: Path
    untrusted: Path


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    directory = tmp_path_factory.mktemp("service")
    key, stranger = generate_signing_key(), generate_signing_key()
    trust = public_key_file(directory / "keys", key)
    artifacts = directory / "artifacts-in"
    artifacts.mkdir()
    good = make_artifact(artifacts, key, version=1)
    tampered = make_artifact(artifacts, key, version=2, tamper_payload=True)
    untrusted = make_artifact(artifacts, stranger, version=3)
    service = ServiceProcess(directory, trust)
    viewer = create_token(service.db, "viewer")
    operator = create_token(service.db, "operator")
    try:
        service.start()
        with httpx.Client(base_url=service.url, timeout=30.0) as client:
            yield Running(service, client, viewer, operator, good, tampered, untrusted)
    finally:
        service.kill()


def artifact_ids(running: Running) -> list[str]:
    response = running.client.get("/v1/artifacts", headers=bearer(running.viewer))
    assert response.status_code == 200, response.text
    return [row["sha256"] for row in response.json()]


def test_health_is_public_and_everything_else_needs_a_token(running: Running) -> None:
    assert running.client.get("/v1/health").status_code == 200
    response = running.client.get("/v1/devices")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = running.client.get("/v1/devices", headers=bearer("fedge_" + "x" * 43))
    assert wrong.status_code == 401
    assert running.client.get("/v1/devices", headers=bearer(running.viewer)).status_code == 200


def test_a_viewer_cannot_upload(running: Running) -> None:
    response = running.client.post(
        "/v1/artifacts",
        content=running.good.read_bytes(),
        headers={**OCTETS, **bearer(running.viewer)},
    )
    assert response.status_code == 403
    assert hashlib.sha256(running.good.read_bytes()).hexdigest() not in artifact_ids(running)


def test_an_operator_uploads_a_signed_artifact(running: Running) -> None:
    data = running.good.read_bytes()
    response = running.client.post(
        "/v1/artifacts", content=data, headers={**OCTETS, **bearer(running.operator)}
    )
    assert response.status_code == 201, response.text
    sha256 = hashlib.sha256(data).hexdigest()
    assert response.json()["sha256"] == sha256
    assert (response.json()["name"], response.json()["version"]) == ("digits", 1)
    assert sha256 in artifact_ids(running)


@pytest.mark.parametrize("which", ["tampered", "untrusted"])
def test_a_tampered_or_untrusted_artifact_is_refused_and_not_stored(
    running: Running, which: str
) -> None:
    data = getattr(running, which).read_bytes()
    response = running.client.post(
        "/v1/artifacts", content=data, headers={**OCTETS, **bearer(running.operator)}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "artifact_rejected"
    assert hashlib.sha256(data).hexdigest() not in artifact_ids(running)


def test_a_token_revoked_while_serving_is_refused_at_once(running: Running) -> None:
    db = running.service.db
    token = create_token(db, "viewer", "short-lived")
    assert running.client.get("/v1/devices", headers=bearer(token)).status_code == 200
    listed = fedge("coordinator", "token", "list", "--db", db, "--json", cwd=db.parent)
    assert listed.returncode == 0, listed.stderr
    (token_id,) = [t["token_id"] for t in json.loads(listed.stdout)["tokens"]
                   if t["name"] == "short-lived"]  # fmt: skip
    done = fedge("coordinator", "token", "revoke", token_id, "--db", db, cwd=db.parent)
    assert done.returncode == 0, done.stderr
    assert running.client.get("/v1/devices", headers=bearer(token)).status_code == 401


def test_the_served_api_issues_enrollment_tokens_and_says_what_enrollment_needs(
    running: Running,
) -> None:
    # The real service wires the enrollment desk: fedge device enroll issues a token
    # through the API; without [enrollment] settings a device's redemption is
    # refused with a message that names what to set, and the token is not spent.
    service = running.service
    api = ["--api", running.service.url, "--token", running.operator]
    issued = fedge("device", "enroll", "sp-1", *api, cwd=service.directory)
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    body = {"token": token, "device_id": "sp-1", "password": "p" * 43}
    unset = running.client.post("/v1/enroll", json=body)
    assert unset.status_code == 400
    assert "enrollment.broker_url" in unset.json()["error"]["message"]
    listed = fedge("device", "list", "--json", *api, cwd=service.directory)
    assert [(row["device_id"], row["state"]) for row in json.loads(listed.stdout)] == [
        ("sp-1", "pending")
    ]


def test_a_second_service_on_a_busy_port_fails_in_one_line(running: Running) -> None:
    service = running.service
    done = fedge("coordinator", "serve", "--db", service.directory / "other.db",
                 "--embedded-broker", "--dev", "--embedded-broker-port", str(free_port()),
                 "--trust", service.trust, "--bind", f"127.0.0.1:{service.port}",
                 cwd=service.directory)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{service.port}: ")
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stdout + done.stderr


def test_nothing_else_runs_the_services_database_meanwhile(running: Running) -> None:
    service = running.service
    assert service.process is not None
    pid = service.process.pid
    second = fedge("coordinator", "serve", "--db", service.db, "--embedded-broker", "--dev",
                   "--embedded-broker-port", str(free_port()), "--trust", service.trust,
                   "--bind", f"127.0.0.1:{free_port()}", cwd=service.directory)  # fmt: skip
    in_process = fedge("devices", "--broker", "mqtt://127.0.0.1:1", "--db", service.db,
                       cwd=service.directory)  # fmt: skip
    for done in (second, in_process):
        assert done.returncode == 1
        assert f"is in use by another fedge coordinator (pid {pid})" in done.stderr
        assert "--api URL" in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
    # Token commands only read and write their table: they need no claim.
    create_token(service.db, "viewer", "while-serving")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_service_cleanly(tmp_path: Path, signum: signal.Signals) -> None:
    service = ServiceProcess(tmp_path, public_key_file(tmp_path / "keys", generate_signing_key()))
    try:
        service.start()
        log = service.log_text()
        assert f"serving API on {service.url} (docs at /docs)" in log
        assert service.signal(signum) == 0, service.log_text()
        log = service.log_text()
        assert f"{signum.name} received: stopping" in log
        assert log.rstrip().endswith("fedge coordinator stopped cleanly")
        assert "Traceback" not in log
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{service.url}/v1/health", timeout=1.0)
    finally:
        service.kill()


def test_the_anonymous_embedded_broker_is_refused_without_dev(tmp_path: Path) -> None:
    """Issue 17: ``fedge coordinator init`` + ``serve --embedded-broker`` used to run
    an anonymous broker without an ACL; now it needs ``--dev``."""
    trust = public_key_file(tmp_path / "keys", generate_signing_key())
    init = fedge("coordinator", "init", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    port = free_port()
    done = fedge("coordinator", "serve", "--embedded-broker", "--embedded-broker-port",
                 str(port), "--trust", trust, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("error: --embedded-broker: the embedded broker accepts any")
    assert "configure a broker with credentials" in done.stderr
    assert "or pass --dev" in done.stderr
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "state.db").exists()  # nothing started


def test_a_client_cooling_down_stays_refused_across_a_crash(tmp_path: Path) -> None:
    """Issue 17: the failed-authentication limiter was in memory, so a restart (or a
    crash the client provoked) let it guess again at once. The service now replays
    the audit log's recent ``auth.fail`` entries at start-up."""
    service = ServiceProcess(tmp_path, public_key_file(tmp_path / "keys", generate_signing_key()))
    viewer = create_token(service.db, "viewer")
    try:
        service.start()
        with httpx.Client(base_url=service.url, timeout=30.0) as client:
            for n in range(10):
                guess = bearer(f"fedge_{n:043d}")
                assert client.get("/v1/devices", headers=guess).status_code == 401
            assert client.get("/v1/devices", headers=bearer(viewer)).status_code == 429
        service.kill()  # SIGKILL: nothing is saved on the way out
        service.start()
        with httpx.Client(base_url=service.url, timeout=30.0) as client:
            refused = client.get("/v1/devices", headers=bearer(viewer))
            assert refused.status_code == 429
            assert 0 < int(refused.headers["Retry-After"]) <= 60
            assert client.get("/v1/health").status_code == 200
        assert "restored 10 failed authentication(s)" in service.log_text()
    finally:
        service.kill()
