"""A federated fleet for tests: agents with Dirichlet-split digits and a coordinator.

The workload every federated test (and the codec benchmark) shares: sklearn's
digits, a stratified 70/30 split, the training part split over the devices with
Dirichlet(alpha=0.5) label skew, an MLP 64-256-10, two local epochs of SGD.

The broker is the suite's (the ``broker`` or ``module_broker`` fixture, whose users
are :func:`device_ids`); the agents are a :class:`~tests.fleet_support.InProcessFleet`
on one shared network loop, with the settings ``fedge simulate`` gives its agents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from compress.families import init_weights
from compress.keys import SigningKey, generate_signing_key
from coordinator.delivery.packaging import LabelledData
from coordinator.federated.runs import RunConfig, RunResult, run_training
from coordinator.federated.strategies import build_strategy, parse_strategy_args
from coordinator.link.hub import MqttHub
from coordinator.sim.datasets import load_digits_split
from coordinator.sim.local_fleet import write_shards
from edge_agent.agent import Agent
from edge_agent.config.agent import TelemetryConfig, TrainingConfig, TransferConfig
from tests.fleet_support import (
    InProcessFleet,
    Mosquitto,
    coordinator,
    public_key_file,
    wait_trainers,
)

LAYERS = [64, 256, 10]
TRAIN_CONFIG: dict[str, int | float | str | bool] = {"epochs": 2, "lr": 0.05, "batch_size": 16}
ALPHA = 0.5

Encode = Callable[..., npt.NDArray[np.uint8]]


def digits_shards(
    clients: int, directory: Path, *, seed: int = 0
) -> tuple[list[Path], LabelledData]:
    """Write one ``local.npz`` per client (Dirichlet split); return the dirs and the test set."""
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    shards = write_shards(x_train, y_train, clients=clients, alpha=ALPHA, directory=directory,
                          seed=seed)  # fmt: skip
    return shards, LabelledData(x_test, y_test)


def device_ids(count: int) -> list[str]:
    """The ids (and MQTT users) of a federated fleet of ``count`` agents."""
    return [f"dev{i:02d}" for i in range(count)]


ELIGIBLE_WAIT_S = 20.0
"""How long :meth:`FederatedFleet.start` waits for the devices with data."""


@dataclass
class FederatedFleet:
    """Running agents (``devices``) and a coordinator on a running broker."""

    broker: Mosquitto
    devices: InProcessFleet
    agents: list[Agent]
    extra: list[Agent]
    hub: MqttHub
    test_set: LabelledData
    shards: list[Path]
    trust: Path
    root: Path
    key: SigningKey | None = None
    """The private half of ``trust`` (to sign what the agents must install)."""

    @classmethod
    def start(
        cls, broker: Mosquitto, root: Path, clients: int = 10, *, without_data: int = 0
    ) -> FederatedFleet:
        """Start ``clients`` agents with data and ``without_data`` more without.

        ``broker`` must know the users ``device_ids(clients + without_data)``. The
        agents keep their data under ``root / <device id>``.
        """
        key = generate_signing_key()
        trust = public_key_file(root / "keys", key)
        shards, test_set = digits_shards(clients, root / "data")
        devices = InProcessFleet(broker, root, trust, name="federated-net")
        try:
            started = [
                devices.start(
                    device_id,
                    telemetry=TelemetryConfig(interval_s=5.0),
                    transfer=TransferConfig(stall_timeout_s=1.0),
                    training=TrainingConfig(data=shard, feedback_max_examples=0),
                )
                for device_id, shard in zip(
                    device_ids(clients + without_data),
                    [*shards, *[None] * without_data],
                    strict=True,
                )
            ]
            hub = coordinator(broker)
        except BaseException:
            devices.stop()
            raise
        fleet = cls(broker, devices, started[:clients], started[clients:], hub, test_set,
                    shards, trust, root, key)  # fmt: skip
        try:
            wait_trainers(hub, clients, ELIGIBLE_WAIT_S)
        except BaseException:
            fleet.stop()
            raise
        return fleet

    def run(
        self,
        *,
        codec: str = "fp32",
        strategy: str = "fedavg",
        strategy_args: tuple[str, ...] = (),
        rounds: int = 20,
        model: str | None = None,
        eval_data: bool = True,
        on_round: Callable[[Any, str], None] | None = None,
        layers: list[int] | None = None,
        **changes: Any,
    ) -> RunResult:
        """One federated run (a fresh model name per codec, so residuals start empty)."""
        weights = init_weights("mlp", layers or LAYERS, np.random.default_rng(0))
        fields: dict[str, Any] = {
            "model": model or f"digits-{codec.replace(':', '-').replace('+', '-')}-{strategy}",
            "family": "mlp",
            "initial_weights": weights,
            "rounds": rounds,
            "clients_per_round": 10,
            "min_clients": 8,
            "round_timeout_s": 30.0,
            "codec": codec,
            "train_config": TRAIN_CONFIG,
            "eval_data": self.test_set if eval_data else None,
            "seed": 0,
        }
        fields.update(changes)
        chosen = build_strategy(
            strategy, parse_strategy_args(list(strategy_args)), federated_eval=not eval_data
        )
        return run_training(self.hub, chosen, RunConfig(**fields), on_round=on_round)

    def stop(self) -> None:
        """Stop the coordinator and the agents (the broker is the fixture's)."""
        self.hub.stop()
        self.devices.stop()


@contextmanager
def fleet_for_service(broker: Mosquitto, root: Path, clients: int) -> Iterator[FederatedFleet]:
    """A started :class:`FederatedFleet` whose own hub is stopped, for tests of the
    coordinator service (which brings its own); the agents stop on exit."""
    fleet = FederatedFleet.start(broker, root, clients=clients)
    fleet.hub.stop()  # the service brings its own
    try:
        yield fleet
    finally:
        fleet.stop()
