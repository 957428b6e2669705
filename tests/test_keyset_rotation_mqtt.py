"""Key rotation end to end: five ``fedge-agent run`` processes, a real mosquitto, the CLI.

The devices are provisioned with key set v1 (``--keyset``). ``fedge keys publish``
puts the rotation chain on the retained key-set broadcast; the agents apply it:

* v2 retires key A: an artifact signed by A is refused, one signed by B installs;
* dev-4 is offline during the rotations to v2 and v3 and catches up from v1 to v3
  in one step when it comes back;
* a replayed older chain (v1..v2, published again) is refused by every agent with
  a logged ``rollback`` refusal, and B (retired in v3) stays retired.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.keys import SigningKey, generate_signing_key
from compress.keyset import KeySet, sign_keyset
from coordinator.cli.app import app
from coordinator.delivery.deliveries import Artifact
from coordinator.delivery.tracker import DeployResult, DeviceState
from coordinator.link.fleet import Target
from edge_agent.errors import ProtocolError
from edge_agent.protocol import Status, decode, device_topic
from edge_agent.protocol.topics import Channel
from edge_agent.transport.mqtt import MqttLink
from tests.fleet_support import (
    AgentProcess,
    Mosquitto,
    coordinator,
    make_artifact,
    open_deliveries,
    password,
    public_key_file,
    wait_for,
)
from tests.test_delivery_mqtt import fedge_run

DEVICES = [f"dev-{i}" for i in range(5)]
ONLINE = DEVICES[:4]
LATE = DEVICES[4]
pytestmark = pytest.mark.slow

A, B, C, D = (generate_signing_key() for _ in range(4))


@pytest.fixture
def broker_users() -> list[str]:
    return DEVICES


def keyset_file(
    directory: Path, version: int, keys: list[SigningKey], signers: list[SigningKey]
) -> Path:
    now = datetime.now(UTC)
    keyset = KeySet(
        version,
        tuple(k.public_key for k in keys),
        1,
        created=now - timedelta(minutes=1),
        expires=now + timedelta(days=30),
    )
    path = directory / f"keyset-v{version}.fedgekeys"
    path.write_bytes(sign_keyset(keyset, signers).to_bytes())
    return path


def publish(broker: Mosquitto, *files: Path) -> tuple[int, str]:
    """``fedge keys publish`` as the coordinator; return (exit status, output)."""
    folder = files[0] if files[0].is_dir() else files[0].parent
    secret = folder.parent / "coordinator.password"
    secret.write_text(password("coordinator"))
    args = ["keys", "publish", "--broker", broker.url, "--password-file", str(secret)]
    result = CliRunner().invoke(app, [*args, *map(str, files)])
    return result.exit_code, result.output


def fleet_keyset_versions(broker: Mosquitto) -> dict[str, int | None]:
    """What ``fedge fleet --json`` says each device's key-set version is."""
    result = fedge_run(broker, "fleet", "--json")
    assert result.exit_code == 0, result.stderr
    return {d["device_id"]: d["keyset_version"] for d in json.loads(result.stdout)["devices"]}


class StatusWatch:
    """The key-set version in each device's latest status (a second MQTT client)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.versions: dict[str, int | None] = {}
        self._lock = threading.Lock()
        self._link = MqttLink(
            broker.broker("coordinator"),
            client_id=f"coordinator:watch-{uuid.uuid4().hex[:8]}",
            subscriptions=tuple(device_topic(d, Channel.STATUS) for d in DEVICES),
            on_message=self._on_message,
        )

    def _on_message(self, topic: str, payload: bytes, _retained: bool) -> None:
        try:
            envelope = decode(payload)
        except ProtocolError:
            return
        if isinstance(envelope.message, Status) and envelope.message.online:
            with self._lock:
                self.versions[envelope.sender] = envelope.message.keyset_version

    def wait(self, devices: list[str], version: int, timeout: float = 30) -> None:
        def there() -> bool:
            with self._lock:
                return all(self.versions.get(d) == version for d in devices)

        wait_for(there, timeout=timeout, what=f"{devices} on key set v{version}")

    def __enter__(self) -> StatusWatch:
        self._link.connect(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._link.stop()


def deploy(broker: Mosquitto, artifact: Path, devices: list[str]) -> DeployResult:
    hub = coordinator(broker)
    try:
        with open_deliveries(hub) as deliveries:
            target = Target.parse("device:" + ",".join(devices))
            return deliveries.wait(deliveries.deploy(Artifact.load(artifact), target), timeout=60)
    finally:
        hub.stop()


def states(result: DeployResult) -> dict[str, tuple[DeviceState, str | None]]:
    return {d.device_id: (d.state, d.error_code) for d in result.devices}


@pytest.fixture
def agents(broker: Mosquitto, tmp_path: Path) -> Iterator[dict[str, AgentProcess]]:
    """Five agents provisioned with key set v1 (the --trust file is replaced by it)."""
    keys = tmp_path / "keysets"
    keys.mkdir()
    v1 = keyset_file(keys, 1, [A, B], [A])
    unused = public_key_file(tmp_path / "unused", D)
    started: dict[str, AgentProcess] = {}

    def start(device: str) -> AgentProcess:
        process = AgentProcess(
            broker, device, tmp_path / device, unused, extra=("--keyset", str(v1))
        )
        started[device] = process
        return process

    for device in DEVICES:
        start(device)
    yield started
    for process in started.values():
        process.kill()


def test_rotation_retires_a_key_catches_up_and_refuses_a_replay(
    broker: Mosquitto, tmp_path: Path, agents: dict[str, AgentProcess]
) -> None:
    keys = tmp_path / "keysets"
    v1 = keys / "keyset-v1.fedgekeys"
    v2 = keyset_file(keys, 2, [B, C], [A, B])  # A retired: signed by v1's A and v2's B
    v3 = keyset_file(keys, 3, [C, D], [C])  # B retired: C is in both sets
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()

    with StatusWatch(broker) as watch:
        watch.wait(DEVICES, 1, timeout=90)  # five processes start on a busy machine
        assert agents[LATE].stop() == 0  # offline across the next two rotations

        status, out = publish(broker, v1, v2)
        assert status == 0, out
        assert "v1..v2" in out
        watch.wait(ONLINE, 2)

        # the retired key A signs nothing any more; B (still trusted) does
        by_a = deploy(broker, make_artifact(artifacts, A, version=2, seed=1), ONLINE)
        assert states(by_a) == dict.fromkeys(ONLINE, (DeviceState.REJECTED, "unknown_key"))
        by_b = deploy(broker, make_artifact(artifacts, B, version=2, seed=2), ONLINE)
        assert states(by_b) == dict.fromkeys(ONLINE, (DeviceState.INSTALLED, None))

        status, out = publish(broker, keys)  # the directory: v1, v2 and v3
        assert status == 0, out
        watch.wait(ONLINE, 3)

        # dev-4 comes back with its v1 provisioning file and catches up to v3
        late = AgentProcess(
            broker, LATE, tmp_path / LATE, tmp_path / "unused" / "signing.pub",
            extra=("--keyset", str(v1)),
        )  # fmt: skip
        agents[LATE] = late
        watch.wait(DEVICES, 3, timeout=60)
        assert "rotated the trusted key set from v1 to v3" in late.log_text()
        by_c = deploy(broker, make_artifact(artifacts, C, version=3, seed=3), DEVICES)
        assert states(by_c) == dict.fromkeys(DEVICES, (DeviceState.INSTALLED, None))

        # a replayed older chain is refused everywhere; B stays retired
        status, out = publish(broker, v1, v2)
        assert status == 0, out
        for device in DEVICES:
            wait_for(
                lambda d=device: "refused the key-set chain: rollback" in agents[d].log_text(),
                timeout=20,
                what=f"{device} refuses the replay",
            )
        by_b_again = deploy(broker, make_artifact(artifacts, B, version=4, seed=4), DEVICES)
        assert states(by_b_again) == dict.fromkeys(DEVICES, (DeviceState.REJECTED, "unknown_key"))
        assert all(watch.versions[d] == 3 for d in DEVICES)
        assert fleet_keyset_versions(broker) == dict.fromkeys(DEVICES, 3)

    for device, process in agents.items():
        assert process.stop() == 0, process.log_text()[-2000:]
        assert (tmp_path / device / "trust" / "keyset.json").read_bytes() == v3.read_bytes()
