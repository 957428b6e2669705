"""The service SIGKILLed in the middle of a rollout, restarted, finishes it.

``fedge coordinator serve`` runs as a real process against mosquitto, with its
state in SQLite; 20 agents run in this process. The rollout (canary 2, waves
50,100) is driven through the HTTP API. The service is killed with SIGKILL as soon
as the first wave is released (devices are downloading), started again on the same
database, and must finish the rollout: every device installed, none left pending,
downloading or unknown.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from compress.keys import SigningKey
from edge_agent.agent import Agent
from tests.fleet_support import (
    InProcessFleet,
    Mosquitto,
    free_port,
    make_artifact,
    password,
    wait_for,
)

pytestmark = pytest.mark.slow

DEVICES = [f"rk{i:02d}" for i in range(20)]
FEDGE = str(Path(sys.executable).parent / "fedge")


class Service:
    """``fedge coordinator serve`` as a child process."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [FEDGE, "coordinator", "serve", *self.args], stdout=sink, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def running(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            pytest.fail(f"the service exited: {self.log.read_text()[-3000:]}")
        return True


@pytest.fixture
def broker_users() -> list[str]:
    return DEVICES


@pytest.fixture
def setup(
    tmp_path: Path, broker: Mosquitto, fleet: InProcessFleet, signing_key: SigningKey
) -> Iterator[dict[str, Any]]:
    (tmp_path / "pw").write_text(password("coordinator"))
    db = tmp_path / "service" / "state.db"
    port = free_port()
    service = Service(
        ["--db", str(db), "--bind", f"127.0.0.1:{port}", "--broker", broker.url,
         "--password-file", str(tmp_path / "pw"), "--trust", str(fleet.trust)],
        tmp_path / "service.log",
    )  # fmt: skip
    try:
        agents = fleet.start_all(DEVICES)
        created = subprocess.run(
            [FEDGE, "coordinator", "token", "create", "--role", "operator", "--db", str(db)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        token = created.stdout.strip().splitlines()[-1]
        yield {
            "service": service,
            "api": f"http://127.0.0.1:{port}",
            "token": token,
            "artifact": make_artifact(tmp_path, signing_key, version=2),
            "agents": agents,
            "db": db,
        }
    finally:
        service.kill()


def saved_states(db: Path, rollout_id: str, *, stage: int) -> list[str]:
    """The device states of a rollout stage as the database holds them."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT state FROM rollout_devices WHERE rollout_id = ? AND stage = ?",
            (rollout_id, stage),
        ).fetchall()
    finally:
        conn.close()
    return [str(row[0]) for row in rows]


def healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/v1/health").status_code == 200
    except httpx.TransportError:
        return False


def test_a_service_killed_mid_rollout_finishes_it_after_a_restart(setup: dict[str, Any]) -> None:
    service: Service = setup["service"]
    agents: list[Agent] = setup["agents"]
    headers = {"Authorization": f"Bearer {setup['token']}"}
    service.start()
    with httpx.Client(base_url=setup["api"], headers=headers, timeout=30.0) as client:
        wait_for(lambda: service.running() and healthy(client), what="the service")

        def online() -> int:
            return sum(d["online"] for d in client.get("/v1/devices").json())

        wait_for(lambda: online() == 20, what="20 devices online")
        uploaded = client.post("/v1/artifacts", content=setup["artifact"].read_bytes(),
                               headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert uploaded.status_code == 201, uploaded.text
        body = {"artifact_sha256": uploaded.json()["sha256"], "target": "all", "canary": "2",
                "waves": "50,100", "soak": "2s", "max_failure": "10%"}  # fmt: skip
        created = client.post("/v1/rollouts", json=body)
        assert created.status_code == 201, created.text
        rollout_id = created.json()["rollout"]["rollout_id"]

        def view() -> dict[str, Any]:
            answer: dict[str, Any] = client.get(f"/v1/rollouts/{rollout_id}").json()
            return answer

        wait_for(lambda: view()["summary"]["stage"] >= 1, what="the first wave")
        service.kill()  # SIGKILL: no flush, no goodbye
        # The kill landed mid-install: the database it left has part of the first
        # wave not installed yet.
        wave = saved_states(setup["db"], rollout_id, stage=1)
        assert len(wave) == 8
        assert any(state != "installed" for state in wave), wave
        assert not healthy(client)

        service.start()
        wait_for(lambda: service.running() and healthy(client), what="the restarted service")
        wait_for(lambda: view()["rollout"]["state"] == "completed", what="completion")
        final = view()

    states = {d["device_id"]: d["state"] for d in final["devices"]}
    assert sorted(states) == DEVICES
    assert set(states.values()) == {"installed"}
    assert sorted({d["stage"] for d in final["devices"]}) == [0, 1, 2]
    served = {a.device_id: a.model.version if a.model else None for a in agents}
    assert set(served.values()) == {2}
    log = Path(service.log).read_text()
    assert f"resumed rollout {rollout_id}" in log
