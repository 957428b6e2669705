"""Fleet statements through a real mosquitto (shipped ACL) and a real agent process.

The operator side is the ``fedge`` CLI: ``fleet show`` before anything is published
(and the agent, run with ``--fleet``, refuses a plain deploy: ``no_statement``),
``deploy --fleet --statement-key`` (which names the artifact in a fresh statement,
retained, before deploying it: installed), a signed artifact the statement does not
name (refused: ``not_targeted``), ``fleet show`` with the signature checked, and
``fleet publish --keep`` on top.
Then ``fedge coordinator serve`` with a ``[fleet]`` table: it publishes at start,
re-publishes at half the (short) lifetime, and names what it deploys; once it
stops, the device reports ``stale`` and ``fedge devices`` shows it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from typer.testing import CliRunner

from compress.keys import SigningKey, generate_signing_key, save_keypair
from coordinator.cli.app import app
from coordinator.delivery.deliveries import Artifact
from coordinator.link.retained import read_retained
from edge_agent.protocol import decode
from edge_agent.protocol.messages_fleet import FleetStatementMessage
from edge_agent.protocol.topics import broadcast_topic, statement_broadcast
from tests.fleet_support import (
    AgentProcess,
    Mosquitto,
    free_port,
    make_artifact,
    password,
    public_key_file,
    wait_for,
)
from tests.test_delivery_mqtt import fedge_run
from tests.test_service_process import create_token, fedge_exe

DEVICE = "fs-0"
FLEET = "plant-a"
pytestmark = pytest.mark.slow


@pytest.fixture
def broker_users() -> list[str]:
    return [DEVICE]


def deploy_codes(broker: Mosquitto, trust: Path, artifact: Path) -> list[str]:
    """``fedge deploy`` without --fleet; the error codes of the devices' refusals."""
    result = fedge_run(
        broker, "deploy", str(artifact), "--trust", str(trust), "--timeout", "30", "--json"
    )
    assert result.exit_code == 1, result.stdout + result.stderr
    devices = json.loads(result.stdout)["devices"]
    assert {d["state"] for d in devices} == {"rejected"}, devices
    return [d["error_code"] for d in devices]


@pytest.fixture
def agent(
    broker: Mosquitto, tmp_path: Path, signing_key: SigningKey
) -> Iterator[tuple[AgentProcess, Path]]:
    trust = public_key_file(tmp_path / "keys", signing_key)
    process = AgentProcess(
        broker, DEVICE, tmp_path / DEVICE, trust, http_port=free_port(),
        extra=("--fleet", FLEET),
    )  # fmt: skip
    try:
        yield process, trust
    finally:
        process.kill()


def test_deploy_names_the_artifact_in_a_statement_the_agent_of_the_fleet_installs(
    broker: Mosquitto,
    tmp_path: Path,
    signing_key: SigningKey,
    agent: tuple[AgentProcess, Path],
) -> None:
    process, trust = agent
    statement_key, _ = save_keypair(signing_key, tmp_path / "statement")
    wait_for(
        lambda: DEVICE in fedge_run(broker, "devices", "--json").stdout, timeout=20, what="online"
    )
    nothing = fedge_run(broker, "fleet", "show", "--fleet", FLEET)
    assert nothing.exit_code == 1
    assert "holds no statement for fleet plant-a" in nothing.stderr

    # No statement yet: the agent of the fleet refuses a plain deploy.
    early = make_artifact(tmp_path, signing_key, version=2)
    assert deploy_codes(broker, trust, early) == ["no_statement"]

    artifact = make_artifact(tmp_path, signing_key, version=3)
    deployed = fedge_run(
        broker, "deploy", str(artifact), "--trust", str(trust), "--wait", "--timeout", "30",
        "--fleet", FLEET, "--statement-key", str(statement_key),
    )  # fmt: skip
    assert deployed.exit_code == 0, deployed.stderr + process.log_text()[-3000:]
    assert "nothing refreshes the fleet statement" in deployed.stderr

    shown = fedge_run(broker, "fleet", "show", "--fleet", FLEET, "--trust", str(trust), "--json")
    assert shown.exit_code == 0, shown.stderr
    view = json.loads(shown.stdout)
    sha256 = Artifact.load(artifact).transfer_id
    assert (view["fleet"], view["fresh"], view["verified"]) == (FLEET, True, True)
    assert view["targets"] == {"digits": {"version": 3, "sha256": sha256}}

    # A validly signed artifact the statement does not name is refused.
    unnamed = make_artifact(tmp_path, signing_key, version=5)
    assert deploy_codes(broker, trust, unnamed) == ["not_targeted"]

    # Published on top (--keep): a second model, a higher version, the first kept.
    other = make_artifact(tmp_path, signing_key, version=1, name="anomaly")
    published = fedge_run(
        broker, "fleet", "publish", "--fleet", FLEET, "--key", str(statement_key),
        "--model", str(other), "--keep", "--expires-in", "1h", "--json",
    )  # fmt: skip
    assert published.exit_code == 0, published.stderr
    again = json.loads(published.stdout)
    assert again["version"] > view["version"]
    assert set(again["targets"]) == {"digits", "anomaly"}
    # The broker keeps it for devices that subscribe later.
    topic = broadcast_topic(statement_broadcast(FLEET))
    retained = read_retained(broker.broker("coordinator"), topic, timeout=10)
    assert retained is not None
    assert isinstance(decode(retained).message, FleetStatementMessage)

    # A statement signed by a key the devices do not trust does not verify.
    stranger, _ = save_keypair(generate_signing_key(), tmp_path / "stranger")
    forged = fedge_run(
        broker, "fleet", "publish", "--fleet", FLEET, "--key", str(stranger),
        "--model", f"digits@9:{'0' * 64}",
    )  # fmt: skip
    assert forged.exit_code == 0, forged.stderr
    refused = fedge_run(broker, "fleet", "show", "--fleet", FLEET, "--trust", str(trust))
    assert refused.exit_code == 1
    assert "does not verify" in refused.stderr
    assert process.alive()


def test_the_service_names_its_deploy_and_keeps_the_statement_fresh(
    broker: Mosquitto,
    tmp_path: Path,
    signing_key: SigningKey,
    agent: tuple[AgentProcess, Path],
) -> None:
    process, trust = agent
    statement_key, _ = save_keypair(signing_key, tmp_path / "statement")
    secret = tmp_path / "coordinator.password"
    secret.write_text(password("coordinator"))
    port = free_port()
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'db = "state.db"\nbind = "127.0.0.1:{port}"\n'
        f'[broker]\nurl = "{broker.url}"\npassword_file = "{secret}"\n'
        f'[trust]\nkeys = ["{trust}"]\n'
        f'[fleet]\nid = "{FLEET}"\nkeys = ["{statement_key}"]\nlifetime_s = 6\n'
    )
    token = create_token(tmp_path / "state.db", "operator")
    log = tmp_path / "serve.log"
    with log.open("ab") as out:
        service = subprocess.Popen(
            [fedge_exe(), "coordinator", "serve", "--config", str(config)],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        api = f"http://127.0.0.1:{port}"
        wait_for(lambda: b"serving API" in log.read_bytes(), timeout=60, what="the service")

        def shown() -> dict[str, Any]:
            result = fedge_run(broker, "fleet", "show", "--fleet", FLEET, "--trust", str(trust),
                           "--json")  # fmt: skip
            assert result.exit_code in (0, 1), result.stderr
            return cast(dict[str, Any], json.loads(result.stdout)) if result.stdout else {}

        first = wait_for(shown, what="the service's statement")
        assert (first["fresh"], first["verified"], first["targets"]) == (True, True, {})
        # Re-published at half its 6 s lifetime: a newer, fresh statement.
        later = wait_for(lambda: shown().get("version", 0) > first["version"] and shown(),
                         timeout=10, what="a refreshed statement")  # fmt: skip
        assert later["fresh"]

        artifact = make_artifact(tmp_path, signing_key, version=4)
        env = {"FEDGE_API": api, "FEDGE_TOKEN": token}
        deployed = CliRunner(mix_stderr=False).invoke(
            app, ["deploy", str(artifact), "--wait", "--timeout", "30"], env=env
        )
        assert deployed.exit_code == 0, deployed.stderr + process.log_text()[-3000:]
        named = shown()["targets"]
        assert named == {"digits": {"version": 4, "sha256": Artifact.load(artifact).transfer_id}}
        assert not device_stale(broker)
    finally:
        service.terminate()
        service.wait(timeout=20)
    assert service.returncode == 0, log.read_text()[-3000:]
    # Nobody refreshes the 6 s statement now: the device reports stale, and the
    # operator sees it in the device list.
    wait_for(lambda: device_stale(broker), timeout=15, what="the device reported stale")


def device_stale(broker: Mosquitto) -> bool:
    result = fedge_run(broker, "devices", "--json")
    assert result.exit_code == 0, result.stderr
    [device] = json.loads(result.stdout)["devices"]
    return bool(device["stale"])
