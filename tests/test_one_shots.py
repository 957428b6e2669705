"""The service's one-shot deliveries (:class:`coordinator.service.deployments.OneShots`)
on the in-memory hub: what ``fedge deploy`` and ``fedge rollback`` poll.

The test plays the devices through :meth:`MemoryHub.receive`; the background wait
of each delivery runs in its own thread, so the views are awaited with ``wait_for``.
The real-broker runs are ``tests/test_delivery_mqtt.py`` (through the CLI).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from compress.signing import SignedManifest
from coordinator.delivery.deliveries import Artifact, Deliveries
from coordinator.delivery.tracker import DeviceState
from coordinator.errors import NotFoundError, TargetError
from coordinator.link.fleet import Target
from coordinator.link.memory import MemoryHub
from coordinator.service.deployments import OneShots
from coordinator.service.operations import DeploymentView
from edge_agent.protocol import InstallState, InstallStatus, Rollback, Status
from tests.conftest import PAYLOAD
from tests.fleet_support import wait_for

ALL = Target.parse("all")


@pytest.fixture
def hub() -> MemoryHub:
    instance = MemoryHub(chunk_size=4096)
    instance.start()
    for device_id in ("d0", "d1"):
        instance.receive(device_id, Status(online=True, agent_version="0.1.0", models=()))
    return instance


@pytest.fixture
def one_shots(hub: MemoryHub) -> Iterator[OneShots]:
    with Deliveries(hub, accept_wait_s=0.01) as deliveries:
        instance = OneShots(deliveries, kept=2)
        yield instance
        instance.stop()


@pytest.fixture
def artifact(signed: SignedManifest) -> Artifact:
    return Artifact(signed, PAYLOAD)


def report(hub: MemoryHub, device_id: str, deployment_id: str, state: InstallState) -> None:
    hub.receive(device_id, InstallStatus(deployment_id=deployment_id, state=state))


def settled(one_shots: OneShots, deployment_id: str) -> DeploymentView:
    view: DeploymentView = wait_for(
        lambda: (v := one_shots.view(deployment_id)).done and v, what=f"{deployment_id} done"
    )
    return view


def test_a_deploy_is_followed_until_every_device_installed(
    hub: MemoryHub, one_shots: OneShots, artifact: Artifact
) -> None:
    started = one_shots.deploy(artifact, ALL, timeout_s=30)
    deployment_id = started.result.deployment_id
    assert (started.done, started.delivered) == (False, False)
    assert [p.state for p in started.result.devices] == [DeviceState.PENDING] * 2

    report(hub, "d0", deployment_id, InstallState.DOWNLOADING)
    report(hub, "d1", deployment_id, InstallState.REJECTED)
    wait_for(
        lambda: one_shots.view(deployment_id).result.devices[1].state == "rejected",
        what="d1's answer",
    )
    assert not one_shots.view(deployment_id).delivered  # d0 is still downloading
    report(hub, "d0", deployment_id, InstallState.INSTALLING)
    wait_for(lambda: one_shots.view(deployment_id).delivered, what="delivered")
    assert not one_shots.view(deployment_id).done
    report(hub, "d0", deployment_id, InstallState.INSTALLED)

    view = settled(one_shots, deployment_id)
    assert [p.state for p in view.result.devices] == [DeviceState.INSTALLED, DeviceState.REJECTED]
    assert not view.result.succeeded


def test_devices_still_going_at_the_timeout_time_out(
    hub: MemoryHub, one_shots: OneShots, artifact: Artifact
) -> None:
    deployment_id = one_shots.deploy(artifact, ALL, timeout_s=0.05).result.deployment_id
    view = settled(one_shots, deployment_id)
    assert {p.state for p in view.result.devices} == {DeviceState.TIMED_OUT}


def test_a_rollback_is_delivered_at_once_and_done_when_the_devices_answered(
    hub: MemoryHub, one_shots: OneShots
) -> None:
    started = one_shots.rollback(Target.parse("device:d1"), "digits", reason="bad", timeout_s=30)
    assert started.delivered
    [command] = [e for e in hub.commands("d1") if isinstance(e.message, Rollback)]
    assert command.message.reason == "bad"
    report(hub, "d1", f"rollback-{command.id}", InstallState.ROLLED_BACK)
    view = settled(one_shots, started.result.deployment_id)
    assert [p.state for p in view.result.devices] == [DeviceState.ROLLED_BACK]


def test_bad_targets_fail_the_call(one_shots: OneShots, artifact: Artifact) -> None:
    with pytest.raises(TargetError, match="no device matches"):
        one_shots.deploy(artifact, Target.parse("tag:none"), timeout_s=5)
    with pytest.raises(TargetError, match="ghost"):
        one_shots.rollback(Target.parse("device:ghost"), "digits", reason="", timeout_s=5)
    with pytest.raises(NotFoundError, match="no deployment 'nope'"):
        one_shots.view("nope")


def test_stop_ends_the_waits_and_only_the_last_finished_views_are_kept(
    hub: MemoryHub, one_shots: OneShots, artifact: Artifact
) -> None:
    ids = [one_shots.deploy(artifact, ALL, timeout_s=60).result.deployment_id for _ in range(3)]
    one_shots.stop()  # returns once every wait ended
    with pytest.raises(NotFoundError):
        one_shots.view(ids[0])  # kept=2: the oldest finished view went
    for deployment_id in ids[1:]:
        view = one_shots.view(deployment_id)
        assert view.done
        assert {p.state for p in view.result.devices} == {DeviceState.PENDING}
