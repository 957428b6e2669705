"""Labelled feedback on a real agent: predictions become local training data.

An agent with no data directory installs a model over MQTT, answers predictions
(in-process and over ``POST /v1/predict``), gets their true labels (``Agent.feedback``
and ``POST /v1/feedback``), announces how many examples it holds, and so becomes
eligible for federated rounds; a round then trains on exactly those examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg

from compress.families import init_weights
from compress.keys import SigningKey
from coordinator.delivery.deliveries import Artifact
from coordinator.federated.runs import RunConfig, run_training
from coordinator.link.fleet import Target
from coordinator.link.hub import MqttHub
from edge_agent.agent import Agent
from edge_agent.errors import TrainingError, UnknownPredictionError
from edge_agent.spool import SPOOL_FILE
from edge_agent.training.feedback import FEEDBACK_FILE, FeedbackBuffer
from tests.fleet_support import (
    CLASSES,
    FEATURES,
    InProcessFleet,
    Mosquitto,
    coordinator,
    free_port,
    make_artifact,
    open_deliveries,
    post_json,
    wait_for,
)

pytestmark = pytest.mark.slow


def _announced(coord: MqttHub, device_id: str, examples: int) -> bool:
    return any(r.device_id == device_id and r.train_examples == examples for r in coord.fleet())


@pytest.fixture
def broker_users() -> list[str]:
    return ["pi-1"]


@pytest.fixture
def setup(
    tmp_path: Path, broker: Mosquitto, fleet: InProcessFleet, signing_key: SigningKey
) -> Iterator[tuple[Agent, MqttHub, int]]:
    port = free_port()
    agent = fleet.start("pi-1", private_loop=True, http=f"127.0.0.1:{port}")
    coord = coordinator(broker)
    try:
        wait_for(lambda: any(r.device_id == "pi-1" and r.online for r in coord.fleet()),
                 what="pi-1 online")  # fmt: skip
        artifact = Artifact.load(make_artifact(tmp_path, signing_key, version=1))
        with open_deliveries(coord) as ops:
            assert ops.wait(ops.deploy(artifact, Target.parse("all")), timeout=30).succeeded
        yield agent, coord, port
    finally:
        coord.stop()


def test_feedback_turns_predictions_into_training_data_for_rounds(
    setup: tuple[Agent, MqttHub, int],
) -> None:
    agent, coord, port = setup
    rng = np.random.default_rng(0)
    assert _announced(coord, "pi-1", 0)
    # In process: one prediction of 3 rows, one label per row.
    rows = rng.random((3, FEATURES), dtype=np.float32)
    prediction = agent.predict(rows)
    assert agent.feedback(prediction.id, [0, 1, 2]) == 3
    with pytest.raises(UnknownPredictionError):
        agent.feedback(prediction.id, [0, 1, 2])  # already labelled
    with pytest.raises(TrainingError):
        agent.feedback(agent.predict(rows[:1]).id, CLASSES)  # not a class of this model
    # Over HTTP: predict, then label it.
    status, answer = post_json(port, "/v1/predict", {"inputs": rng.random((1, FEATURES)).tolist()})
    assert status == 200
    status, stored = post_json(port, "/v1/feedback", {"prediction_id": answer["id"], "label": 3})
    assert (status, stored) == (200, {"stored": 1})
    status, error = post_json(port, "/v1/feedback", {"prediction_id": "0" * 32, "label": 1})
    assert status == 404
    assert error["error"]["code"] == "unknown_prediction"
    # The agent announces its 4 examples (at its next telemetry tick) ...
    wait_for(lambda: _announced(coord, "pi-1", 4), what="4 examples announced")
    # ... and trains on them (80 % of 4 = 3 examples; 1 is held out) when asked.
    weights = init_weights("softmax", [FEATURES, CLASSES], np.random.default_rng(1))
    config = RunConfig(
        model="feedback", family="softmax", initial_weights=weights, rounds=1,
        clients_per_round=1, min_clients=1, round_timeout_s=20,
    )  # fmt: skip
    result = run_training(coord, FedAvg(min_train_nodes=1, min_available_nodes=1), config)
    (report,) = result.rounds
    assert report.status == "ok"
    assert report.clients == 1
    assert not np.allclose(result.weights["W0"], weights["W0"])


def test_a_stopped_agent_closes_its_stores(setup: tuple[Agent, MqttHub, int]) -> None:
    agent, _coord, _port = setup
    prediction = agent.predict(np.ones((1, FEATURES), dtype=np.float32))
    assert agent.feedback(prediction.id, 2) == 1
    data_dir = agent.config.data_dir
    stores = [data_dir / "spool" / SPOOL_FILE, data_dir / "feedback" / FEEDBACK_FILE]
    assert all(Path(f"{store}-wal").exists() for store in stores)  # open, in WAL mode
    agent.stop()
    # The last connection to close checkpoints its write-ahead log and deletes it.
    assert not any(Path(f"{store}-wal").exists() for store in stores)
    assert len(FeedbackBuffer(data_dir / "feedback", fsync=False)) == 1
