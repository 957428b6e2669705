"""Staged rollouts end to end: RolloutManager, a real mosquitto, in-process agents.

The agents share one network loop (as in ``fedge simulate``); the coordinator keeps
its state in a SQLite store in the test's directory, so a second manager on the
same store resumes what the first left. A halt after the canary is proven once over
a real broker, through the service (test_service_mqtt), and on the engine with a
fake clock (test_rollout_plan).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compress.keys import SigningKey
from coordinator.delivery.deliveries import Artifact
from coordinator.link.fleet import Target
from coordinator.link.hub import MqttHub
from coordinator.rollout.actions import RolloutState
from coordinator.rollout.manager import RolloutManager
from coordinator.rollout.policy import RolloutPolicy
from coordinator.service.store import Store
from tests.fleet_support import (
    ACCEPT_WAIT_S,
    InProcessFleet,
    Mosquitto,
    coordinator,
    make_artifact,
    wait_for,
)

pytestmark = pytest.mark.slow

DEVICES = [f"ro{i}" for i in range(6)]


@pytest.fixture
def broker_users() -> list[str]:
    return DEVICES


@pytest.fixture
def operator(broker: Mosquitto, fleet: InProcessFleet) -> Iterator[MqttHub]:
    fleet.start_all(DEVICES)
    instance = coordinator(broker)
    wait_for(lambda: sum(r.online for r in instance.fleet()) == len(DEVICES), what="online")
    yield instance
    instance.stop()


def served(operator: MqttHub) -> dict[str, int | None]:
    """The version of ``digits`` each device serves, as its status says."""
    return {
        r.device_id: max((m.version for m in r.models if m.name == "digits"), default=None)
        for r in operator.fleet()
    }


def state_of(store: Store, rollout_id: str) -> str | None:
    row = store.rollout(rollout_id)
    return None if row is None else row.state


def start_manager(operator: MqttHub, store: Store) -> RolloutManager:
    manager = RolloutManager(operator, store, tick_s=0.2, accept_wait_s=ACCEPT_WAIT_S)
    operator.add_listener(manager.on_message)
    manager.start()
    return manager


def stored(store: Store, path: Path) -> tuple[str, Artifact]:
    data = path.read_bytes()
    artifact = Artifact.from_bytes(data)
    manifest = artifact.manifest
    row = store.put_artifact(data, name=manifest.name, version=manifest.version,
                             manifest={}, uploaded_by="cli", at=time.time())  # fmt: skip
    return row.sha256, artifact


def test_a_staged_rollout_completes_and_survives_a_manager_restart(
    tmp_path: Path, signing_key: SigningKey, operator: MqttHub
) -> None:
    store = Store.open(tmp_path / "state.db")
    sha, artifact = stored(store, make_artifact(tmp_path, signing_key, version=2))
    policy = RolloutPolicy.parse(canary="1", waves="50,100", soak="1s", max_failure="10%")
    manager = start_manager(operator, store)
    rollout_id = manager.create(artifact_sha256=sha, artifact=artifact, policy=policy,
                                target=Target.parse("all"), actor="test", seed=1)  # fmt: skip
    wait_for(lambda: sum(v == 2 for v in served(operator).values()) >= 1)  # the canary
    manager.stop()  # as if the service died: a new manager resumes from the store
    operator.remove_listener(manager.on_message)
    manager = start_manager(operator, store)
    try:
        wait_for(lambda: state_of(store, rollout_id) == RolloutState.COMPLETED)
        # Every device installed: the manager keeps none of the deliveries.
        wait_for(lambda: manager.deliveries.tracked() == [])
    finally:
        manager.stop()
    assert set(served(operator).values()) == {2}
    rows = store.rollout_devices(rollout_id)
    assert sorted(r.device_id for r in rows) == DEVICES
    assert {r.state for r in rows} == {"installed"}
    assert sorted({r.stage for r in rows}) == [0, 1, 2]
