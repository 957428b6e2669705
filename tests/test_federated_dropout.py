"""Devices killed in the middle of a round (SIGKILL of real agent processes).

Ten ``fedge-agent run --train-data DIR`` processes (``AgentProcess``) on the suite's
mosquitto (the ``broker`` fixture). Training is made slow (many local epochs) so
that the kill lands while the devices train; the broker publishes the killed
agents' Last Will, and the round goes on without them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.families import init_weights
from compress.keys import generate_signing_key
from coordinator.federated.runs import RoundReport, RunConfig, RunResult, run_training
from coordinator.federated.strategies import build_strategy
from coordinator.link.hub import MqttHub
from tests.federated_support import LAYERS, digits_shards
from tests.fleet_support import (
    AgentProcess,
    Mosquitto,
    coordinator,
    public_key_file,
    wait_trainers,
)

pytestmark = pytest.mark.slow

DEVICES = [f"proc{i}" for i in range(10)]
SLOW_TRAINING: dict[str, int | float | str | bool] = {"epochs": 150, "lr": 0.01, "batch_size": 8}


class ProcessFleet:
    def __init__(self, broker: Mosquitto, root: Path) -> None:
        self.broker = broker
        self.trust = public_key_file(root / "keys", generate_signing_key())
        self.shards, self.test_set = digits_shards(len(DEVICES), root / "data")
        self.root = root
        self.agents = {d: self.spawn(i, d) for i, d in enumerate(DEVICES)}
        self.hub: MqttHub = coordinator(self.broker)

    def spawn(self, index: int, device_id: str) -> AgentProcess:
        return AgentProcess(
            self.broker, device_id, self.root / device_id / "state", self.trust,
            extra=["--train-data", str(self.shards[index])],
        )  # fmt: skip

    def kill(self, count: int) -> list[str]:
        victims = DEVICES[:count]
        for device_id in victims:
            self.agents[device_id].kill()
        return victims

    def restart(self, device_ids: list[str]) -> None:
        for device_id in device_ids:
            self.agents[device_id] = self.spawn(DEVICES.index(device_id), device_id)

    def run(self, on_round: Any, *, min_clients: int, rounds: int = 2) -> RunResult:
        config = RunConfig(
            model=f"dropout-{min_clients}",
            family="mlp",
            initial_weights=init_weights("mlp", LAYERS, np.random.default_rng(0)),
            rounds=rounds,
            clients_per_round=10,
            min_clients=min_clients,
            round_timeout_s=60.0,
            train_config=SLOW_TRAINING,
            eval_data=self.test_set,
        )
        strategy = build_strategy("fedavg", {}, federated_eval=False)
        return run_training(self.hub, strategy, config, on_round=on_round)

    def stop(self) -> None:
        self.hub.stop()
        for agent in self.agents.values():
            agent.stop()


@pytest.fixture
def broker_users() -> list[str]:
    return DEVICES


@pytest.fixture
def processes(broker: Mosquitto, tmp_path: Path) -> Iterator[ProcessFleet]:
    fleet = ProcessFleet(broker, tmp_path)
    try:
        wait_trainers(fleet.hub, len(DEVICES), 60)
        yield fleet
    finally:
        fleet.stop()


def _killer(fleet: ProcessFleet, *, restart: bool) -> tuple[Any, list[str]]:
    killed: list[str] = []

    def on_round(report: RoundReport, what: str) -> None:
        if report.round == 1 and what.startswith("training") and not killed:
            killed.extend(fleet.kill(3))  # the tasks are out: the devices are training
        elif report.round == 1 and what == "done" and restart:
            fleet.restart(killed)

    return on_round, killed


def test_a_round_completes_from_the_devices_left_after_30_percent_are_killed(
    processes: ProcessFleet,
) -> None:
    on_round, killed = _killer(processes, restart=False)
    result = processes.run(on_round, min_clients=5)
    first, second = result.rounds
    assert len(killed) == 3
    assert first.status == "ok"
    assert (first.sampled, first.clients, first.dropped) == (10, 7, 3)
    assert second.status == "ok"
    assert second.sampled == second.clients == 7
    assert first.seconds < 55  # ended on the Last Wills, not on the deadline


def test_a_round_short_of_min_clients_fails_and_the_next_one_proceeds(
    processes: ProcessFleet,
) -> None:
    on_round, killed = _killer(processes, restart=True)
    result = processes.run(on_round, min_clients=8)
    first, second = result.rounds
    assert len(killed) == 3
    assert first.status == "failed"
    assert "7 update(s) accepted, need 8" in first.reason
    # Round 2 starts as soon as min_clients devices are back (restarted ones count).
    assert second.status == "ok"
    assert second.clients >= 8
    assert second.accuracy is not None
