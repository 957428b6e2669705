"""A federated fleet for tests: mosquitto, agents with Dirichlet-split digits, a coordinator.

The workload every federated test (and the codec benchmark) shares: sklearn's
digits, a stratified 70/30 split, the training part split over the devices with
Dirichlet(alpha=0.5) label skew, an MLP 64-256-10, two local epochs of SGD.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from compress.families import init_weights
from compress.keys import generate_signing_key
from coordinator.delivery.packaging import LabelledData
from coordinator.federated.runs import RunConfig, RunResult, run_training
from coordinator.federated.strategies import build_strategy, parse_strategy_args
from coordinator.link.hub import MqttHub
from coordinator.sim.datasets import load_digits_split
from coordinator.sim.local_fleet import LocalFleet, write_shards
from edge_agent.agent import Agent
from tests.fleet_support import Mosquitto, coordinator, public_key_file

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


@dataclass
class FederatedFleet:
    """A running broker, agents and coordinator."""

    broker: Mosquitto
    agents: list[Agent]
    hub: MqttHub
    test_set: LabelledData
    shards: list[Path]
    trust: Path
    root: Path
    extra: list[Agent] = field(default_factory=list)

    @classmethod
    def start(cls, root: Path, clients: int = 10, *, without_data: int = 0) -> FederatedFleet:
        """Start everything; ``without_data`` more agents have no training data."""
        ids = [f"dev{i:02d}" for i in range(clients + without_data)]
        (root / "broker").mkdir(parents=True)
        broker = Mosquitto(root / "broker", ids)
        broker.start()
        trust = public_key_file(root / "keys", generate_signing_key())
        shards, test_set = digits_shards(clients, root / "data")
        local = LocalFleet.start(
            [*shards, *[None] * without_data],
            broker_for=broker.broker, trust=[trust], root=root, prefix="dev",
        )  # fmt: skip
        agents = local.agents
        fleet = cls(broker, agents[:clients], coordinator(broker), test_set, shards, trust, root)
        fleet.extra = agents[clients:]
        local.wait_eligible(fleet.hub, clients, timeout=20)
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
        """Stop the coordinator, the agents and the broker."""
        self.hub.stop()
        for agent in [*self.agents, *self.extra]:
            agent.stop()
        self.broker.stop()
