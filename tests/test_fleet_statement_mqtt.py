"""Fleet statements end to end: real mosquitto, real ``fedge-agent run`` processes.

The attacks (issue 17, finding 2): an old, unexpired manifest signed for another
name (``digits-canary`` v1) used to install over the serving ``digits`` v5, since
the rollback counter was per name; and nothing told a device that it was being kept
on a stale model (a freeze). Now a device with a fleet (``--fleet``) installs only
what its fresh, signed fleet statement names and reports ``stale`` when the
statement runs out; a device without one keeps a floor per slot. The statements are
signed here with :mod:`compress.statement` and published retained with paho, as the
coordinator's publisher would.
"""

from __future__ import annotations

import json
import time
import urllib.error
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from compress.artifact import read_artifact_unverified
from compress.keys import SigningKey
from compress.statement import FleetStatement, Target, sign_statement
from coordinator.delivery.deliveries import Artifact
from coordinator.delivery.tracker import DeployResult, DeviceState
from coordinator.link.fleet import Target as DeviceTarget
from edge_agent.config.agent import TelemetryConfig, TrustConfig
from edge_agent.protocol import (
    Channel,
    FleetStatementMessage,
    Status,
    TelemetryBatch,
    broadcast_topic,
    decode,
    device_topic,
    encode,
)
from edge_agent.protocol.topics import statement_broadcast
from tests.fleet_support import (
    AgentProcess,
    InProcessFleet,
    Mosquitto,
    coordinator,
    free_port,
    make_artifact,
    open_deliveries,
    password,
    public_key_file,
    wait_for,
)
from tests.test_delivery_mqtt import Subscriber, http_json, online, served_version

DEVICE = "dev-0"
FLEET = "plant-a"
pytestmark = pytest.mark.slow


@pytest.fixture
def broker_users() -> list[str]:
    return [DEVICE]


@pytest.fixture
def trust(tmp_path: Path, signing_key: SigningKey) -> Path:
    return public_key_file(tmp_path / "keys", signing_key)


@pytest.fixture
def artifacts(tmp_path: Path, signing_key: SigningKey) -> dict[str, Path]:
    """``digits`` v5, and a genuine, unexpired ``digits-canary`` v1 and v6."""
    return {
        "digits-v5": make_artifact(tmp_path, signing_key, version=5, seed=5),
        "canary-v1": make_artifact(tmp_path, signing_key, version=1, seed=1, name="digits-canary"),
        "canary-v6": make_artifact(tmp_path, signing_key, version=6, seed=6, name="digits-canary"),
    }


@pytest.fixture
def agents(broker: Mosquitto, tmp_path: Path, trust: Path) -> Iterator[list[AgentProcess]]:
    """The agent processes a test starts (killed at the end if still running)."""
    started: list[AgentProcess] = []
    yield started
    for process in started:
        process.kill()


def start_agent(
    broker: Mosquitto, tmp_path: Path, trust: Path, started: list[AgentProcess], *extra: str
) -> tuple[AgentProcess, int]:
    port = free_port()
    process = AgentProcess(broker, DEVICE, tmp_path / DEVICE, trust, http_port=port, extra=extra)
    started.append(process)
    online(broker, DEVICE)
    return process, port


def target(path: Path) -> tuple[str, Target]:
    manifest = read_artifact_unverified(path)[0].manifest
    return manifest.name, Target(manifest.version, manifest.sha256)


def publish_statement(
    broker: Mosquitto,
    key: SigningKey,
    version: int,
    *named: Path,
    lifetime: timedelta = timedelta(hours=1),
) -> tuple[bytes, datetime]:
    """Sign a statement naming ``named`` and publish it retained; return it and its expiry."""
    issued = datetime.now(UTC).replace(microsecond=0)
    statement = FleetStatement(
        fleet=FLEET,
        version=version,
        issued=issued,
        expires=issued + lifetime,
        targets=dict(target(path) for path in named),
    )
    payload = encode(
        FleetStatementMessage(statement=sign_statement(statement, [key]).to_bytes()),
        sender="coordinator",
        sent_at=time.time(),
    )
    publish_retained(broker, payload)
    return payload, statement.expires


def publish_retained(broker: Mosquitto, payload: bytes) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}")
    client.username_pw_set("coordinator", password("coordinator"))
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        info = client.publish(
            broadcast_topic(statement_broadcast(FLEET)), payload, qos=1, retain=True
        )
        info.wait_for_publish(timeout=10)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def deploy(broker: Mosquitto, artifact: Path) -> DeployResult:
    operator = coordinator(broker)
    try:
        with open_deliveries(operator) as deliveries:
            delivery = deliveries.deploy(Artifact.load(artifact), DeviceTarget.parse("all"))
            return deliveries.wait(delivery, timeout=30)
    finally:
        operator.stop()


def health(port: int) -> dict[str, Any]:
    """``/v1/health`` (its body also when it answers 503: no model served)."""
    try:
        return dict(http_json(port, "/v1/health"))
    except urllib.error.HTTPError as error:
        return dict(json.loads(error.read()))


def outcome(result: DeployResult) -> tuple[DeviceState, str | None]:
    (device,) = result.devices
    return device.state, device.error_code


def test_with_a_fleet_only_what_the_fresh_statement_names_installs(
    broker: Mosquitto,
    tmp_path: Path,
    trust: Path,
    signing_key: SigningKey,
    artifacts: dict[str, Path],
    agents: list[AgentProcess],
) -> None:
    first, _ = publish_statement(broker, signing_key, 1, artifacts["digits-v5"])
    process, port = start_agent(broker, tmp_path, trust, agents, "--fleet", FLEET)

    # Normal operation: the model the statement names installs.
    assert outcome(deploy(broker, artifacts["digits-v5"])) == (DeviceState.INSTALLED, None)
    assert served_version(port) == 5

    # The attack: a genuine, unexpired manifest under another name, not named.
    assert outcome(deploy(broker, artifacts["canary-v1"])) == (DeviceState.REJECTED, "not_targeted")
    assert served_version(port) == 5
    wait_for(lambda: "is not named by fleet plant-a statement v1" in process.log_text())

    # A replayed older statement is refused (and logged); the newer one stays in force.
    publish_statement(broker, signing_key, 2, artifacts["canary-v1"])
    wait_for(lambda: "accepted fleet plant-a statement v2" in process.log_text())
    publish_retained(broker, first)
    wait_for(lambda: "refused a fleet statement: replayed_statement" in process.log_text())

    # The coordinator's word changes what runs: now the canary, named, installs.
    assert outcome(deploy(broker, artifacts["canary-v1"])) == (DeviceState.INSTALLED, None)
    health = http_json(port, "/v1/health")
    assert health["stale"] is False
    assert health["fleet"]["statement_version"] == 2
    assert process.stop() == 0, process.log_text()[-2000:]


def test_without_a_fleet_another_name_must_beat_the_slot_floor(
    broker: Mosquitto,
    tmp_path: Path,
    trust: Path,
    artifacts: dict[str, Path],
    agents: list[AgentProcess],
) -> None:
    process, port = start_agent(broker, tmp_path, trust, agents)
    assert outcome(deploy(broker, artifacts["digits-v5"])) == (DeviceState.INSTALLED, None)

    assert outcome(deploy(broker, artifacts["canary-v1"])) == (
        DeviceState.REJECTED,
        "slot_rollback",
    )
    assert served_version(port) == 5
    wait_for(lambda: "must be above the slot floor v5" in process.log_text())

    assert outcome(deploy(broker, artifacts["canary-v6"])) == (DeviceState.INSTALLED, None)
    assert http_json(port, "/v1/model")["name"] == "digits-canary"
    assert http_json(port, "/v1/health")["stale"] is False  # no fleet: never stale
    assert process.stop() == 0, process.log_text()[-2000:]


def test_a_device_held_on_a_stale_statement_reports_stale_within_its_lifetime(
    broker: Mosquitto,
    tmp_path: Path,
    trust: Path,
    signing_key: SigningKey,
    artifacts: dict[str, Path],
    agents: list[AgentProcess],
) -> None:
    statuses = Subscriber(broker, device_topic(DEVICE, Channel.STATUS))
    telemetry = Subscriber(broker, device_topic(DEVICE, Channel.TELEMETRY))
    try:
        process, port = start_agent(broker, tmp_path, trust, agents, "--fleet", FLEET)
        lifetime = timedelta(seconds=4)
        _, expires = publish_statement(
            broker, signing_key, 1, artifacts["digits-v5"], lifetime=lifetime
        )
        wait_for(lambda: health(port)["stale"] is False, what="fresh")
        seen = len(statuses.messages)

        # The freeze: no newer statement comes. The device notices by itself.
        def stale_status() -> float | None:
            for _topic, payload in statuses.messages[seen:]:
                status = decode(payload).message
                if isinstance(status, Status) and status.online and status.stale:
                    return time.time()
            return None

        reported = wait_for(stale_status, timeout=20, what="a retained status saying stale")
        assert reported - expires.timestamp() < lifetime.total_seconds()
        assert health(port)["stale"] is True
        assert "no fresh fleet statement" in process.log_text()
        wait_for(
            lambda: any(
                isinstance(batch := decode(p).message, TelemetryBatch) and batch.stale
                for _t, p in telemetry.messages
            ),
            what="a telemetry batch saying stale",
        )

        # While stale, even the model the statement named is refused.
        result = deploy(broker, artifacts["digits-v5"])
        assert outcome(result) == (DeviceState.REJECTED, "stale_statement")
        assert process.stop() == 0, process.log_text()[-2000:]
    finally:
        statuses.close()
        telemetry.close()


def test_the_agent_wakes_by_itself_when_its_statement_expires(
    broker: Mosquitto, fleet: InProcessFleet, signing_key: SigningKey, artifacts: dict[str, Path]
) -> None:
    """No telemetry tick and no message to wake the worker: only the statement's expiry."""
    statuses = Subscriber(broker, device_topic(DEVICE, Channel.STATUS))
    try:
        agent = fleet.start(
            DEVICE,
            private_loop=True,
            trust=TrustConfig(keys=(fleet.trust,), fleet=FLEET),
            telemetry=TelemetryConfig(interval_s=600.0),
        )
        fleet.wait_connected()
        lifetime = timedelta(seconds=3)
        _, expires = publish_statement(
            broker, signing_key, 1, artifacts["digits-v5"], lifetime=lifetime
        )

        def last_status() -> Status | None:
            found = [decode(p).message for _t, p in statuses.messages]
            return found[-1] if found and isinstance(found[-1], Status) else None

        wait_for(lambda: (s := last_status()) is not None and not s.stale, what="fresh status")
        wait_for(lambda: (s := last_status()) is not None and s.stale, what="stale status")
        assert time.time() - expires.timestamp() < lifetime.total_seconds()
        assert agent.fleet.stale()
    finally:
        statuses.close()
