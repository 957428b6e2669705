"""Staged rollouts end to end: RolloutManager, a real mosquitto, in-process agents.

The agents share one network loop (as in ``fedge simulate``); the coordinator keeps
its state in a SQLite store in the test's directory, so a second manager on the
same store resumes what the first left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compress.keys import SigningKey, generate_signing_key
from coordinator.delivery.deliveries import Artifact
from coordinator.link.fleet import Target
from coordinator.link.hub import MqttHub
from coordinator.rollout.actions import RolloutState
from coordinator.rollout.manager import RolloutManager
from coordinator.rollout.policy import RolloutPolicy
from coordinator.service.store import Store
from edge_agent.agent import Agent
from edge_agent.transport.network_loop import NetworkLoop
from tests.fleet_support import (
    ACCEPT_WAIT_S,
    Mosquitto,
    agent_config,
    coordinator,
    make_artifact,
    public_key_file,
)

pytestmark = pytest.mark.slow

DEVICES = [f"ro{i}" for i in range(6)]
WAIT_S = 60.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path, DEVICES) as instance:
        yield instance


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate_signing_key()


@pytest.fixture
def fleet(tmp_path: Path, broker: Mosquitto, key: SigningKey) -> Iterator[list[Agent]]:
    trust = public_key_file(tmp_path / "keys", key)
    network = NetworkLoop(name="ro-net")
    network.start()
    agents = [
        Agent(agent_config(broker, d, tmp_path / "agents" / d, trust), network=network)
        for d in DEVICES
    ]
    for agent in agents:
        agent.start()
    yield agents
    for agent in agents:
        agent.stop()
    network.close()


@pytest.fixture
def operator(broker: Mosquitto, fleet: list[Agent]) -> Iterator[MqttHub]:
    instance = coordinator(broker)
    wait_for(lambda: sum(r.online for r in instance.fleet()) == len(fleet))
    yield instance
    instance.stop()


def wait_for(condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting")
        time.sleep(0.05)


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
    tmp_path: Path, key: SigningKey, fleet: list[Agent], operator: MqttHub
) -> None:
    store = Store.open(tmp_path / "state.db")
    sha, artifact = stored(store, make_artifact(tmp_path, key, version=2))
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


def test_a_failing_artifact_halts_after_the_canary_and_rolls_it_back(
    tmp_path: Path, key: SigningKey, fleet: list[Agent], operator: MqttHub
) -> None:
    store = Store.open(tmp_path / "state.db")
    good_sha, good = stored(store, make_artifact(tmp_path, key, version=2))
    bad_sha, bad = stored(store, make_artifact(tmp_path, key, version=3, break_health_check=True))
    manager = start_manager(operator, store)
    try:
        first = manager.create(artifact_sha256=good_sha, artifact=good,
                               policy=RolloutPolicy.parse(canary="6", soak="0s"),
                               target=Target.parse("all"), actor="test")  # fmt: skip
        wait_for(lambda: state_of(store, first) == RolloutState.COMPLETED)
        policy = RolloutPolicy.parse(canary="2", waves="50,100", soak="1s", max_failure="10%")
        second = manager.create(artifact_sha256=bad_sha, artifact=bad, policy=policy,
                                target=Target.parse("all"), actor="test")  # fmt: skip
        wait_for(lambda: state_of(store, second) == RolloutState.HALTED)
        time.sleep(2.0)  # no later stage goes out
        # The halted rollout settled (canary rolled back) and the completed one
        # has every device installed: no delivery is still tracked.
        wait_for(lambda: manager.deliveries.tracked() == [])
    finally:
        manager.stop()
    assert set(served(operator).values()) == {2}  # the canary's health check failed on device
    rows = {r.device_id: r for r in store.rollout_devices(second)}
    canary = [d for d, r in rows.items() if r.stage == 0]
    assert len(canary) == 2
    assert {rows[d].state for d in canary} == {"rolled_back"}
    assert {r.state for d, r in rows.items() if d not in canary} == {"waiting"}
