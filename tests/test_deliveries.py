"""One-shot deliveries on the in-memory hub: every step of the workflow, no broker.

The test plays the devices through :meth:`MemoryHub.receive` and reads the commands
and chunks the deliveries sent from :attr:`MemoryHub.published`. The accept wait
is short: no device answers while ``deploy`` waits (the test runs on one thread).
The real-broker runs of the same workflow are in ``tests/test_delivery_mqtt.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from compress.signing import SignedManifest
from coordinator.delivery.deliveries import Artifact, Deliveries
from coordinator.delivery.tracker import DeviceState
from coordinator.errors import CoordinatorError, TargetError
from coordinator.link.fleet import Target
from coordinator.link.memory import MemoryHub, Published
from edge_agent.protocol import (
    Channel,
    ChunkRequest,
    Deploy,
    InstallState,
    InstallStatus,
    ModelInfo,
    Rollback,
    Status,
    device_topic,
)
from tests.conftest import PAYLOAD

CHUNK = 4096


def status(*models: ModelInfo, online: bool = True) -> Status:
    return Status(online=online, agent_version="0.1.0", models=models)


@pytest.fixture
def hub() -> MemoryHub:
    instance = MemoryHub(chunk_size=CHUNK)
    instance.start()
    for device_id in ("d0", "d1"):
        instance.receive(device_id, status())
    return instance


@pytest.fixture
def deliveries(hub: MemoryHub) -> Iterator[Deliveries]:
    with Deliveries(hub, accept_wait_s=0.01) as instance:
        yield instance


@pytest.fixture
def artifact(signed: SignedManifest) -> Artifact:
    return Artifact(signed, PAYLOAD)


def answer(hub: MemoryHub, device_id: str, deployment_id: str, state: InstallState) -> None:
    hub.receive(device_id, InstallStatus(deployment_id=deployment_id, state=state))


def deploys(hub: MemoryHub, device_id: str) -> list[Deploy]:
    return [e.message for e in hub.commands(device_id) if isinstance(e.message, Deploy)]


def test_a_deploy_sends_the_manifest_serves_the_payload_and_ends_installed(
    hub: MemoryHub, deliveries: Deliveries, artifact: Artifact
) -> None:
    delivery = deliveries.deploy(artifact, Target.parse("all"))
    for device_id in ("d0", "d1"):
        [command] = deploys(hub, device_id)
        assert command.deployment_id == delivery.deployment_id
        assert command.transfer_id == artifact.transfer_id
        assert (command.chunk_size, command.chunk_count) == (CHUNK, 3)
        assert command.manifest == artifact.signed.to_bytes()
    assert deliveries.tracked() == [delivery.deployment_id]
    # Nobody answered in time: nothing was pushed; a device pulls what it needs.
    assert hub.chunks("d0", artifact.transfer_id) == []
    hub.receive("d0", ChunkRequest(transfer_id=artifact.transfer_id, indices=(0, 1, 2)))
    assert b"".join(c.data for c in hub.chunks("d0", artifact.transfer_id)) == PAYLOAD
    for device_id in ("d0", "d1"):
        answer(hub, device_id, delivery.deployment_id, InstallState.INSTALLED)

    result = deliveries.wait(delivery, timeout=5)

    assert result.succeeded
    assert {p.state for p in result.devices} == {DeviceState.INSTALLED}
    assert deliveries.tracked() == []
    hub.clear_published()
    hub.receive("d0", ChunkRequest(transfer_id=artifact.transfer_id, indices=(0,)))
    assert hub.published == []  # forgotten: its chunks are no longer served


def test_devices_that_accepted_in_time_get_the_payload_pushed_once(
    artifact: Artifact,
) -> None:
    answered: list[str] = []

    def devices_accept(published: Published) -> None:
        """Each device accepts a deploy as soon as it is sent."""
        for device_id in ("d0", "d1"):
            message = published.envelope().message
            if published.topic == device_topic(device_id, Channel.CMD):
                assert isinstance(message, Deploy)
                answered.append(device_id)
                answer(twin, device_id, message.deployment_id, InstallState.ACCEPTED)

    twin = MemoryHub(chunk_size=CHUNK, on_publish=devices_accept)
    twin.start()
    for device_id in ("d0", "d1"):
        twin.receive(device_id, status())
    with Deliveries(twin, accept_wait_s=30.0) as deliveries:
        deliveries.deploy(artifact, Target.parse("all"))  # returns at once: both answered
    assert answered == ["d0", "d1"]
    chunks = twin.chunks("d0", artifact.transfer_id)
    assert len(chunks) == 3  # once, on the broadcast topic both devices hear
    assert chunks == twin.chunks("d1", artifact.transfer_id)
    assert twin.bytes_sent(artifact.transfer_id) > len(PAYLOAD)


def test_an_offline_device_gets_the_deploy_when_it_comes_back(
    hub: MemoryHub, deliveries: Deliveries, artifact: Artifact
) -> None:
    hub.receive("d1", status(online=False))
    delivery = deliveries.deploy(artifact, Target.parse("all"))
    assert deploys(hub, "d1") == []
    assert delivery.tracker.get("d1").state is DeviceState.OFFLINE  # type: ignore[union-attr]
    hub.receive("d1", status(online=False))  # still away: nothing
    assert deploys(hub, "d1") == []
    hub.receive("d1", status())
    [command] = deploys(hub, "d1")
    assert command.deployment_id == delivery.deployment_id
    hub.receive("d1", status())  # online again while online: no second deploy
    assert len(deploys(hub, "d1")) == 1


def test_a_status_showing_the_model_counts_as_installed(
    hub: MemoryHub, deliveries: Deliveries, artifact: Artifact
) -> None:
    delivery = deliveries.deploy(artifact, Target.parse("device:d0"))
    manifest = artifact.manifest
    hub.receive("d0", status(ModelInfo(manifest.name, manifest.version, artifact.transfer_id)))
    assert deliveries.wait(delivery, timeout=5).succeeded


def test_after_a_reconnection_deploys_are_resent_and_rollbacks_are_not(
    hub: MemoryHub, deliveries: Deliveries, artifact: Artifact
) -> None:
    deliveries.deploy(artifact, Target.parse("device:d0"))
    deliveries.rollback(Target.parse("device:d1"), "digits")
    hub.reconnect()
    assert len(deploys(hub, "d0")) == 2
    assert len(hub.commands("d1")) == 1


def test_a_rollback_answer_under_the_command_id_counts(
    hub: MemoryHub, deliveries: Deliveries
) -> None:
    delivery = deliveries.rollback(Target.parse("device:d0"), "digits", reason="bad")
    [envelope] = hub.commands("d0")
    assert envelope.message == Rollback(model="digits", reason="bad")
    answer(hub, "d0", f"rollback-{envelope.id}", InstallState.ROLLED_BACK)
    result = deliveries.wait(delivery, timeout=5)
    assert [p.state for p in result.devices] == [DeviceState.ROLLED_BACK]


def test_a_payload_shared_by_two_deliveries_is_served_until_both_are_forgotten(
    hub: MemoryHub, deliveries: Deliveries, artifact: Artifact
) -> None:
    first = deliveries.deploy(artifact, Target.parse("device:d0"))
    second = deliveries.deploy(artifact, Target.parse("device:d1"))
    request = ChunkRequest(transfer_id=artifact.transfer_id, indices=(0,))
    deliveries.forget(first)
    hub.receive("d0", request)
    assert len(hub.chunks("d0", artifact.transfer_id)) == 1
    deliveries.forget(second)
    hub.receive("d0", request)
    assert len(hub.chunks("d0", artifact.transfer_id)) == 1


def test_an_unknown_or_unmatched_target_is_refused(
    deliveries: Deliveries, artifact: Artifact
) -> None:
    with pytest.raises(TargetError, match="unknown device"):
        deliveries.deploy(artifact, Target.parse("device:nobody"))
    with pytest.raises(TargetError, match="no device matches"):
        deliveries.rollback(Target.parse("tag:none"), "digits")
    with pytest.raises(CoordinatorError):
        Deliveries(MemoryHub(), accept_wait_s=0)


def test_a_closed_deliveries_object_hears_nothing_more(
    hub: MemoryHub, deliveries: Deliveries, artifact: Artifact
) -> None:
    hub.receive("d1", status(online=False))
    deliveries.deploy(artifact, Target.parse("all"))
    deliveries.close()
    hub.receive("d1", status())
    assert deploys(hub, "d1") == []
