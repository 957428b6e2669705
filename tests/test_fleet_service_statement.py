"""The service's ``[fleet]`` table and the statement the service keeps (in-memory hub).

The config: ``[fleet]`` with an ``id`` makes a :class:`FleetConfig` (keys required,
the lifetime bounded, the state file next to the database by default) and its keys
are read only by :meth:`FleetConfig.load`. The service: a statement is published when
it starts, every deploy (one-shot or rollout stage) is named before its command
goes out, and a device of the fleet accepts what the service deploys and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from compress.errors import NotTargetedError
from compress.keys import SigningKey, save_keypair
from compress.signing import TrustedKeys
from compress.statement import SignedStatement, check_targeted, verify_statement
from coordinator.delivery.deliveries import Artifact
from coordinator.errors import ServiceConfigError
from coordinator.link.memory import MemoryHub
from coordinator.service.config_reader import build_service_config
from coordinator.service.fleet_config import FleetConfig
from coordinator.service.fleet_service import FleetService, ServiceSettings
from coordinator.service.operations import CLI_ACTOR, DeployRequest, RolloutRequest
from coordinator.service.store import MEMORY, Store
from edge_agent.protocol import Channel, Deploy, Status, device_topic
from edge_agent.protocol.messages_fleet import FleetStatementMessage
from edge_agent.protocol.topics import broadcast_topic, statement_broadcast
from tests.fleet_support import make_artifact, wait_for

FLEET = "plant-a"
TOPIC = broadcast_topic(statement_broadcast(FLEET))
DEVICES = ("d1", "d2")
BASE: dict[str, Any] = {
    "db": "state.db",
    "dev": True,
    "broker": {"embedded": True},
    "trust": {"keys": ["k.pub"]},
}


def build(fleet: dict[str, Any]) -> FleetConfig | None:
    config = build_service_config({**BASE, "fleet": fleet}, {}, base_dir=Path("/etc/fedge"))
    return config.fleet


def test_no_fleet_id_means_no_statement() -> None:
    assert build({}) is None
    assert build({"lifetime_s": 60}) is None


def test_a_fleet_table_with_its_defaults() -> None:
    fleet = build({"id": FLEET, "keys": ["keys/statement.pem"]})
    assert fleet == FleetConfig(
        FLEET,
        (Path("/etc/fedge/keys/statement.pem"),),
        21600.0,
        Path("/etc/fedge/fleet-plant-a.statement.json"),
    )


@pytest.mark.parametrize(
    ("fleet", "message"),
    [
        ({"id": "bad/id", "keys": ["k.pem"]}, "invalid fleet id"),
        ({"id": FLEET}, "fleet.keys: give the private key"),
        ({"id": FLEET, "keys": ["k.pem"], "lifetime_s": 0.5}, "fleet.lifetime_s must be"),
        ({"id": 7, "keys": ["k.pem"]}, "fleet.id must be a string"),
    ],
)
def test_bad_fleet_tables_are_refused(fleet: dict[str, Any], message: str) -> None:
    with pytest.raises(ServiceConfigError, match=message):
        build(fleet)


def test_load_reads_the_keys_and_names_a_bad_one(tmp_path: Path, signing_key: SigningKey) -> None:
    private, _public = save_keypair(signing_key, tmp_path / "statement")
    config = FleetConfig(FLEET, (private,), 60.0, tmp_path / "state.json")
    settings = config.load()
    assert settings.keys[0].key_id == signing_key.key_id
    assert (settings.fleet, settings.lifetime_s) == (FLEET, 60.0)
    missing = FleetConfig(FLEET, (tmp_path / "none.pem",), 60.0, tmp_path / "state.json")
    with pytest.raises(ServiceConfigError, match=r"fleet\.keys: .*none\.pem"):
        missing.load()


def test_an_encrypted_statement_key_loads_with_its_password_file(
    tmp_path: Path, signing_key: SigningKey
) -> None:
    private, _public = save_keypair(
        signing_key, tmp_path / "statement", password=b"correct horse battery"
    )
    password = tmp_path / "statement.password"
    password.write_text("correct horse battery\n")
    password.chmod(0o600)
    fleet = build({"id": FLEET, "keys": [str(private)], "key_password_file": str(password)})
    assert fleet is not None
    assert fleet.key_password_file == password
    assert fleet.load().keys[0].key_id == signing_key.key_id
    without = FleetConfig(FLEET, (private,), 60.0, tmp_path / "state.json")
    with pytest.raises(ServiceConfigError, match=r"fleet\.keys: .*encrypted"):
        without.load()
    password.write_text("wrong password\n")
    with pytest.raises(ServiceConfigError, match=r"fleet\.keys: "):
        fleet.load()


# --------------------------------------------------------------------------- the service


@pytest.fixture
def hub() -> MemoryHub:
    return MemoryHub()


@pytest.fixture
def service(hub: MemoryHub, signing_key: SigningKey, tmp_path: Path) -> Iterator[FleetService]:
    private, _public = save_keypair(signing_key, tmp_path / "statement")
    fleet = FleetConfig(FLEET, (private,), 3600.0, tmp_path / "state.json").load()
    service = FleetService(
        Store.open(MEMORY, artifact_dir=tmp_path / "artifacts"),
        hub,
        TrustedKeys.of([signing_key.public_key]),
        settings=ServiceSettings(accept_wait_s=0.05, rollout_tick_s=0.05, fleet=fleet),
    )
    service.start()
    for device in DEVICES:
        hub.receive(device, Status(online=True, agent_version="1"))
    try:
        yield service
    finally:
        service.stop()


def held(hub: MemoryHub, key: SigningKey) -> Any:
    """The last statement, as a device of the fleet trusting ``key`` accepts it."""
    [*_, last] = [p for p in hub.published if p.topic == TOPIC]
    assert last.retained
    message = last.envelope().message
    assert isinstance(message, FleetStatementMessage)
    return verify_statement(
        SignedStatement.from_bytes(message.statement),
        TrustedKeys.of([key.public_key]),
        fleet=FLEET,
        now=datetime.now(UTC),
        last_version=None,
    )


def test_the_service_publishes_at_start_and_names_a_deploy_before_sending_it(
    service: FleetService, hub: MemoryHub, signing_key: SigningKey, tmp_path: Path
) -> None:
    assert held(hub, signing_key).targets == {}
    data = make_artifact(tmp_path, signing_key, version=2).read_bytes()
    sha = service.upload_artifact(data, actor=CLI_ACTOR).sha256
    other = make_artifact(tmp_path, signing_key, version=1, name="digits-canary").read_bytes()
    service.upload_artifact(other, actor=CLI_ACTOR)
    hub.clear_published()

    service.deploy(DeployRequest(sha, target="all", timeout_s=1.0), actor=CLI_ACTOR)

    topics = [p.topic for p in hub.published]
    assert topics.index(TOPIC) < topics.index(device_topic("d1", Channel.CMD))
    statement = held(hub, signing_key)
    check_targeted(statement, Artifact.from_bytes(data).manifest)
    with pytest.raises(NotTargetedError):  # an old manifest under another name
        check_targeted(statement, Artifact.from_bytes(other).manifest)


def test_a_rollout_stage_is_named_before_its_deploy(
    service: FleetService, hub: MemoryHub, signing_key: SigningKey, tmp_path: Path
) -> None:
    data = make_artifact(tmp_path, signing_key, version=3).read_bytes()
    sha = service.upload_artifact(data, actor=CLI_ACTOR).sha256
    hub.clear_published()
    service.create_rollout(
        RolloutRequest(artifact_sha256=sha, canary="1", soak="1h"), actor=CLI_ACTOR
    )

    def first_deploy() -> int | None:
        for index, published in enumerate(hub.published):
            if isinstance(published.envelope().message, Deploy):
                return index
        return None

    index = wait_for(first_deploy, what="the canary's deploy")
    assert any(p.topic == TOPIC for p in hub.published[:index])
    check_targeted(held(hub, signing_key), Artifact.from_bytes(data).manifest)
