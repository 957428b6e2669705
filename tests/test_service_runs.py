"""Federated runs through the service: settings, background rounds, interruptions."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.errors import CodecError
from compress.keys import load_public_key
from compress.signing import TrustedKeys
from coordinator.delivery.packaging import LabelledData
from coordinator.errors import NotFoundError, RunError, StrategyError
from coordinator.federated.models import ModelDef
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.link.memory import MemoryHub
from coordinator.service.fleet_service import FleetService
from coordinator.service.operations import CLI_ACTOR, RunRequest
from coordinator.service.runs import RunManager, run_strategy, training_config
from coordinator.service.store import MEMORY, RunState, Store
from edge_agent.config.agent import BrokerConfig
from edge_agent.protocol import Status
from edge_agent.training import task_model
from edge_agent.training.numpy_trainers import trainer_for
from tests.federated_support import FederatedFleet, device_ids, fleet_for_service
from tests.fleet_support import Mosquitto, wait_for

SETTINGS = {"features": 64, "classes": 10, "hidden": [32], "clients_per_round": 4,
            "train": {"epochs": 1, "lr": 0.05, "batch_size": 16}}  # fmt: skip


# --------------------------------------------------------------- settings (pure)


def test_a_request_becomes_a_seeded_training_config() -> None:
    request = RunRequest(rounds=3, codec="int8", min_clients=2, config={**SETTINGS, "seed": 7})
    config = training_config(request)
    assert (config.rounds, config.codec, config.min_clients, config.clients_per_round) == (
        3, "int8", 2, 4,
    )  # fmt: skip
    assert [w.shape for w in config.initial_weights.values()] == [(64, 32), (32,), (32, 10), (10,)]
    assert config.train_config == {"seed": 7, "epochs": 1, "lr": 0.05, "batch_size": 16}
    again = training_config(request)
    assert all((again.initial_weights[k] == v).all() for k, v in config.initial_weights.items())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"classes": 10}, "features is required"),
        ({**SETTINGS, "colour": "red"}, "unknown run setting"),
        ({**SETTINGS, "family": "transformer"}, "family must be one of"),
        ({**SETTINGS, "hidden": [0]}, "hidden must be"),
        ({**SETTINGS, "features": True}, "features must be an integer"),
        ({**SETTINGS, "train": {"lr": [1]}}, "train must map"),
        ({**SETTINGS, "clients_per_round": 1}, "min_clients"),
        ({**SETTINGS, "model": ""}, "config.model must be a non-empty string"),
        ({**SETTINGS, "model": 7}, "config.model must be a non-empty string"),
        ({**SETTINGS, "robust": "yes"}, "config.robust must be true or false"),
        ({**SETTINGS, "norm_multiple": "10"}, "config.norm_multiple must be a number"),
        ({**SETTINGS, "norm_multiple": True}, "config.norm_multiple must be a number"),
        ({**SETTINGS, "norm_multiple": 0.5}, "norm_multiple must be at least 1"),
        ({**SETTINGS, "max_examples_per_update": 0}, "max_examples_per_update must be"),
        ({**SETTINGS, "max_examples_per_update": 1.5}, "max_examples_per_update must be"),
    ],
)
def test_bad_settings_are_refused(config: dict[str, object], message: str) -> None:
    with pytest.raises(RunError, match=message):
        training_config(RunRequest(min_clients=2, config=config))


def test_a_request_sets_how_far_one_device_can_move_the_aggregate() -> None:
    defaults = training_config(RunRequest(config=SETTINGS))
    assert (defaults.robust, defaults.max_examples_per_update, defaults.norm_multiple) == (
        False, 100_000, 10.0,
    )  # fmt: skip
    chosen = {**SETTINGS, "robust": True, "max_examples_per_update": 500, "norm_multiple": 4}
    config = training_config(RunRequest(config=chosen))
    assert (config.robust, config.max_examples_per_update, config.norm_multiple) == (
        True, 500, 4.0,
    )  # fmt: skip


def test_fedge_train_adds_its_own_weights_evaluation_data_and_update_bound() -> None:
    """What only the process running the rounds holds (see coordinator.cli.train)."""
    settings = {"hidden": [8], "clients_per_round": 4}
    request = RunRequest(min_clients=2, config=settings)
    data = LabelledData(np.zeros((5, 12), dtype=np.float32), np.array([0, 1, 2, 0, 6]))
    config = training_config(request, eval_data=data, max_update_norm=3.0)
    # Features and classes default to the evaluation data's (12 columns, labels 0..6).
    assert [w.shape for w in config.initial_weights.values()] == [(12, 8), (8,), (8, 7), (7,)]
    assert config.eval_data is data
    assert config.max_update_norm == 3.0
    weights = {"W0": np.ones((3, 2), dtype=np.float32), "b0": np.zeros(2, dtype=np.float32)}
    given = training_config(request, initial_weights=weights)  # no features/classes needed
    assert given.initial_weights is weights
    assert given.eval_data is None
    with pytest.raises(RunError, match="features is required"):
        training_config(request)


TORCH = {"model_spec": "zoo:small_cnn", "task": "classification"}
IMAGES = LabelledData(np.zeros((4, 1, 8, 8), np.float32), np.array([0, 3, 9, 1]))
GIVEN = {"conv.weight": np.zeros((2, 1, 3, 3), np.float32)}


def test_a_model_spec_request_becomes_a_torch_run() -> None:
    request = RunRequest(min_clients=2, config={**TORCH, "seed": 3})
    config = training_config(request, initial_weights=GIVEN, eval_data=IMAGES)
    assert config.family == "torch"
    assert config.model == "small-cnn"  # the spec's name
    assert config.model_def == ModelDef(
        "torch", "classification", "edge_agent.training.zoo:small_cnn", (1, 8, 8), 10
    )
    assert config.initial_weights is GIVEN
    assert config.train_config == {"seed": 3}
    named = training_config(
        RunRequest(config={**TORCH, "model": "digits-cnn", "input_shape": [1, 8, 8],
                           "num_outputs": 12}),
        initial_weights=GIVEN,
    )  # fmt: skip
    assert named.model == "digits-cnn"
    assert named.model_def is not None
    assert (named.model_def.input_shape, named.model_def.num_outputs) == ((1, 8, 8), 12)


def test_a_torch_run_reads_its_outputs_from_the_task_s_data() -> None:
    x = np.zeros((3, 5), np.float32)
    targets = LabelledData(x, np.ones((3, 2), np.float32), task="regression")
    spec = {"model_spec": "mypkg.models:reg", "task": "regression"}
    regression = training_config(RunRequest(config=spec), initial_weights=GIVEN,
                                 eval_data=targets)  # fmt: skip
    assert regression.model_def == ModelDef("torch", "regression", "mypkg.models:reg", (5,), 2)
    flags = LabelledData(x, np.array([0, 1, 0]), task="reconstruction")
    spec = {"model_spec": "mypkg.models:ae", "task": "reconstruction"}
    anomaly = training_config(RunRequest(config=spec), initial_weights=GIVEN, eval_data=flags)
    assert anomaly.model_def == ModelDef("torch", "reconstruction", "mypkg.models:ae", (5,), 5)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**TORCH, "features": 64}, "model_spec does not go with features"),
        ({**TORCH, "family": "mlp"}, "model_spec does not go with family"),
        ({**TORCH, "num_outputs": 10}, "input_shape is required"),
        ({**TORCH, "input_shape": [1, 8, 8]}, "num_outputs is required"),
        ({**TORCH, "input_shape": "1,8,8", "num_outputs": 2}, "input_shape must be a list"),
        ({**TORCH, "input_shape": [1, 0], "num_outputs": 2}, "input_shape must be a list"),
        ({**TORCH, "input_shape": [4], "num_outputs": 0}, "num_outputs must be an integer >= 1"),
        ({**TORCH, "input_shape": [4], "num_outputs": 2, "task": "ranking"}, "unknown task"),
        ({**TORCH, "input_shape": [4], "num_outputs": 2, "model_spec": "no spec"},
         "must be module.path:function"),
        ({**TORCH, "input_shape": [4], "num_outputs": 2, "model_spec": 5}, "must be strings"),
        ({**TORCH, "input_shape": [4], "num_outputs": 2, "model": ""},
         "config.model must be a non-empty string"),
        ({**SETTINGS, "task": "regression"}, "needs a PyTorch model"),
        ({**SETTINGS, "input_shape": [64]}, "are for PyTorch models"),
        ({**SETTINGS, "num_outputs": 10}, "are for PyTorch models"),
    ],
)  # fmt: skip
def test_bad_torch_settings_are_refused(config: dict[str, object], message: str) -> None:
    with pytest.raises(RunError, match=message):
        training_config(RunRequest(config=config), initial_weights=GIVEN)


def test_a_built_in_run_may_name_the_classification_task() -> None:
    config = training_config(RunRequest(config={**SETTINGS, "task": "classification"}))
    assert config.model_def == ModelDef("mlp", input_shape=(64,), num_outputs=10)


def test_the_service_refuses_a_torch_run_no_online_device_can_train(tmp_path: Path) -> None:
    """Builds the zoo CNN's starting weights: needs torch (edge_agent.training.torch_models)."""
    hub = MemoryHub()
    hub.start()
    hub.receive("dev-a", Status(online=True, agent_version="1", train_examples=5))
    store = Store.open(MEMORY, artifact_dir=tmp_path)
    manager = RunManager(hub, store)
    request = RunRequest(config={**TORCH, "input_shape": [1, 8, 8], "num_outputs": 10})
    with pytest.raises(RunError, match="no online device can train edge_agent.training.zoo:"
                       r"small_cnn: 1 online device\(s\) lack it"):  # fmt: skip
        manager.start(request, actor=CLI_ACTOR)
    assert store.runs() == []
    assert manager.current() is None
    store.close()


def test_run_strategy_reads_the_strategy_args() -> None:
    request = RunRequest(strategy="fedprox", config={"strategy_args": {"proximal_mu": 0.5}})
    assert getattr(run_strategy(request), "proximal_mu", None) == 0.5
    assert getattr(run_strategy(request), "fraction_evaluate", None) != 0
    assert getattr(run_strategy(request, federated_eval=False), "fraction_evaluate", None) == 0
    with pytest.raises(RunError, match="strategy_args must be an object"):
        run_strategy(RunRequest(config={"strategy_args": [1]}))
    with pytest.raises(StrategyError):
        run_strategy(RunRequest(strategy="nope"))


def test_a_bad_codec_is_refused() -> None:
    with pytest.raises(CodecError):
        training_config(RunRequest(codec="zip", config=SETTINGS))


def test_runs_a_killed_service_left_running_are_marked_interrupted_at_start(
    tmp_path: Path,
) -> None:
    store = Store.open(MEMORY, artifact_dir=tmp_path)
    store.create_run("run-1", config={}, created_by="cli", at=1.0)
    store.record_round("run-1", 1, status="ok", metrics={}, started_at=1.0, finished_at=2.0)
    store.record_round("run-1", 2, status="running", metrics={}, started_at=2.0)
    broker = BrokerConfig.from_url("mqtt://127.0.0.1:1", username="coordinator")
    manager = RunManager(MqttHub(HubConfig(broker=broker)), store, clock=lambda: 9.0)
    assert manager.recover() == ["run-1"]
    run = store.run("run-1")
    assert run is not None
    assert run.state is RunState.INTERRUPTED
    rounds = store.rounds("run-1")
    assert [(r.status, r.reason) for r in rounds] == [("ok", ""), ("failed", "interrupted")]
    assert rounds[1].finished_at == 9.0
    assert manager.recover() == []
    store.close()


# ------------------------------------------------------------- over MQTT (slow)


@pytest.fixture
def broker_users() -> list[str]:
    return device_ids(4)


@pytest.fixture
def federated(tmp_path: Path, broker: Mosquitto) -> Iterator[FederatedFleet]:
    with fleet_for_service(broker, tmp_path, 4) as fleet:
        yield fleet


def open_service(fleet: FederatedFleet, db: Path) -> FleetService:
    hub = MqttHub(HubConfig(broker=fleet.broker.broker("coordinator")))
    trusted = TrustedKeys.of([load_public_key(fleet.trust)])
    service = FleetService(Store.open(db), hub, trusted)
    service.start()
    return service


@pytest.mark.slow
def test_a_run_started_through_the_service_records_its_rounds_as_they_end(
    tmp_path: Path, federated: FederatedFleet
) -> None:
    service = open_service(federated, tmp_path / "state.db")
    try:
        wait_for(lambda: sum(r.can_train for r in service.hub.fleet()) == 4)
        request = RunRequest(rounds=2, min_clients=3, round_timeout_s=30.0, config=SETTINGS)
        view = service.start_run(request, actor=CLI_ACTOR)
        run_id = view.run.run_id
        assert view.run.state is RunState.RUNNING
        with pytest.raises(RunError, match="one run at a time"):
            service.start_run(request, actor=CLI_ACTOR)
        wait_for(lambda: service.run(run_id).run.state is not RunState.RUNNING)
        view = service.run(run_id)
        assert view.run.state is RunState.FINISHED
        assert [(r.round, r.status) for r in view.rounds] == [(1, "ok"), (2, "ok")]
        for round_row in view.rounds:
            assert round_row.metrics["clients"] >= 3
            assert 0.0 <= round_row.metrics["accuracy"] <= 1.0
            assert round_row.metrics["uplink_bytes"] > 0
            assert round_row.finished_at is not None
        assert [r.round for r in service.metrics().rounds] == [1, 2]
        assert [a.action for a in service.audit_log()] == ["run.start"]
    finally:
        service.stop()
        service.store.close()


@pytest.mark.slow
def test_a_service_stopped_mid_run_marks_the_run_and_its_round_interrupted(
    tmp_path: Path, federated: FederatedFleet
) -> None:
    service = open_service(federated, tmp_path / "state.db")
    try:
        wait_for(lambda: sum(r.can_train for r in service.hub.fleet()) == 4)
        request = RunRequest(rounds=50, min_clients=3, round_timeout_s=30.0, config=SETTINGS)
        run_id = service.start_run(request, actor=CLI_ACTOR).run.run_id
        wait_for(lambda: any(r.status == "ok" for r in service.run(run_id).rounds))
    finally:
        service.stop()
    view = service.run(run_id)
    service.store.close()
    assert view.run.state is RunState.INTERRUPTED
    assert len(view.rounds) < 50
    assert all(r.status in ("ok", "failed") for r in view.rounds)
    assert {r.reason for r in view.rounds if r.status == "failed"} <= {"interrupted"}


@pytest.mark.slow
def test_an_operator_stops_a_run_waiting_for_devices_and_one_mid_training(
    tmp_path: Path, federated: FederatedFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    fitting = threading.Event()  # set when a device starts training

    class Telling:
        def __init__(self, trainer: Any) -> None:
            self.trainer = trainer

        def fit(self, *args: Any) -> Any:
            fitting.set()
            return self.trainer.fit(*args)

        def evaluate(self, *args: Any) -> Any:
            return self.trainer.evaluate(*args)

    monkeypatch.setattr(task_model, "trainer_for", lambda family: Telling(trainer_for(family)))
    service = open_service(federated, tmp_path / "state.db")
    try:
        wait_for(lambda: sum(r.can_train for r in service.hub.fleet()) == 4)
        # Five clients wanted, four there: round 1 waits for devices (up to 60 s).
        waiting = RunRequest(rounds=50, min_clients=5, round_timeout_s=60.0,
                             config={**SETTINGS, "clients_per_round": 5})  # fmt: skip
        run_id = service.start_run(waiting, actor=CLI_ACTOR).run.run_id
        wait_for(lambda: [r.status for r in service.run(run_id).rounds] == ["running"])
        view = service.stop_run(run_id, actor=CLI_ACTOR)
        assert view.run.state is RunState.INTERRUPTED
        assert [(r.round, r.status, r.reason) for r in view.rounds] == [
            (1, "failed", f"stopped by {CLI_ACTOR.name}")
        ]
        with pytest.raises(RunError, match="not running"):
            service.stop_run(run_id, actor=CLI_ACTOR)
        with pytest.raises(NotFoundError):
            service.stop_run("run-nope", actor=CLI_ACTOR)

        # The slot is free again. This run's rounds train long enough to be cut short.
        long_training = {**SETTINGS, "train": {"epochs": 150, "batch_size": 8}}
        slow = RunRequest(rounds=50, min_clients=3, round_timeout_s=120.0, config=long_training)
        run_id = service.start_run(slow, actor=CLI_ACTOR).run.run_id
        wait_for(fitting.is_set, what="a device training")
        started = time.monotonic()
        view = service.stop_run(run_id, actor=CLI_ACTOR)
        assert time.monotonic() - started < 5.0
        assert view.run.state is RunState.INTERRUPTED
        last = view.rounds[-1]
        assert (last.status, last.reason) == ("failed", f"stopped by {CLI_ACTOR.name}")
        assert last.metrics["clients"] == 0  # nothing aggregated from a cut-short round
        # The stop returned within its 5 s wait: the run's thread has ended, so no
        # round can come after it.
        assert len(service.run(run_id).rounds) == len(view.rounds)
        actions = [a.action for a in service.audit_log()]
        assert actions == ["run.start", "run.stop", "run.start", "run.stop"]
    finally:
        service.stop()
        service.store.close()
