"""Rounds of a PyTorch model on the coordinator, against devices played on a MemoryHub.

Only devices whose status lists the model's spec (``train_models``) get tasks; a
run that no online device can train is refused; tasks carry the spec, the task and
the factory's arguments; federated evaluation keeps the task's metrics. The devices
are the test: they answer each task on the spot with an acknowledgement and an
update (or an evaluation), as an agent would.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from compress.codecs import encode_update, parse_codec
from coordinator.errors import RunError
from coordinator.federated.models import ModelDef
from coordinator.federated.runs import RunConfig, RunResult, run_training
from coordinator.federated.strategies import build_strategy
from coordinator.federated.update_check import UPDATE_ARRAY
from coordinator.link.memory import MemoryHub, Published
from edge_agent.protocol import (
    Channel,
    EvalReport,
    Status,
    TaskAck,
    TaskAction,
    TrainTask,
    UpdateReport,
    device_topic,
)

SPEC = "edge_agent.training.zoo:mlp_regressor"
MODEL = ModelDef("torch", "regression", SPEC, input_shape=(4,), num_outputs=1)
WEIGHTS = {
    "net.weight": np.zeros((1, 4), np.float32),
    "net.bias": np.zeros(1, np.float32),
}
STEP = 0.25  # what each device adds to every weight
EVAL_METRICS = {"loss": 0.5, "mse": 0.5, "mae": 0.6, "train_loss": 9.0}


class Devices:
    """Devices that answer every task on the spot (``on_publish`` of the hub)."""

    def __init__(self) -> None:
        self.hub = MemoryHub(on_publish=self.answer)
        self.tasks: dict[str, list[TrainTask]] = {}
        self.weights: dict[str, np.ndarray] = dict(WEIGHTS)  # the run's, for update shapes
        self.step = STEP  # what each update adds to every weight

    def answer(self, published: Published) -> None:
        message = published.envelope().message
        if not isinstance(message, TrainTask):
            return
        device_id = published.topic.split("/")[3]
        assert published.topic == device_topic(device_id, Channel.CMD)
        self.tasks.setdefault(device_id, []).append(message)
        common = {"round_id": message.round_id, "task_id": message.task_id}
        self.hub.receive(device_id, TaskAck(**common, has_weights=True))
        if message.action is TaskAction.EVALUATE:
            self.hub.receive(device_id, EvalReport(**common, num_examples=5, metrics=EVAL_METRICS))
            return
        delta = {
            entry.name: np.full(self.weights[entry.name].shape, self.step, np.float32)
            for entry in message.weights_index
        }
        update = encode_update(delta, parse_codec(message.codec), rng=np.random.default_rng(0))
        blob = np.frombuffer(update.payload, dtype=np.uint8)
        self.hub.receive(
            device_id,
            UpdateReport(**common, num_examples=10, codec=message.codec,
                         arrays={UPDATE_ARRAY: blob}),
        )  # fmt: skip

    def online(self, device_id: str, *, train_models: tuple[str, ...]) -> None:
        status = Status(online=True, agent_version="1", train_examples=10,
                        train_models=train_models)  # fmt: skip
        self.hub.receive(device_id, status)


@pytest.fixture
def devices() -> Iterator[Devices]:
    fleet = Devices()
    fleet.hub.start()
    yield fleet
    fleet.hub.stop()


def _config(**changes: object) -> RunConfig:
    fields: dict[str, object] = {
        "model": "regressor",
        "family": "torch",
        "model_def": MODEL,
        "initial_weights": WEIGHTS,
        "rounds": 1,
        "clients_per_round": 2,
        "min_clients": 1,
        "round_timeout_s": 2.0,
        "gather_s": 0.1,
    }
    fields.update(changes)
    return RunConfig(**fields)  # type: ignore[arg-type]


def _run(devices: Devices, *, federated_eval: bool = False, **changes: object) -> RunResult:
    strategy = build_strategy("fedavg", {}, federated_eval=federated_eval)
    return run_training(devices.hub, strategy, _config(**changes))


def test_only_the_device_that_lists_the_spec_gets_tasks(devices: Devices) -> None:
    devices.online("dev-a", train_models=(SPEC, "other.models:cnn"))
    devices.online("dev-b", train_models=("other.models:cnn",))
    devices.online("dev-c", train_models=())  # no torch
    result = _run(devices)
    assert set(devices.tasks) == {"dev-a"}
    assert not devices.hub.commands("dev-b")
    assert not devices.hub.commands("dev-c")
    [report] = result.rounds
    assert (report.status, report.sampled, report.clients) == ("ok", 1, 1)
    for name, value in result.weights.items():
        np.testing.assert_allclose(value, WEIGHTS[name] + STEP)


def test_train_tasks_carry_the_spec_the_task_and_the_factory_arguments(
    devices: Devices,
) -> None:
    devices.online("dev-a", train_models=(SPEC,))
    _run(devices)
    [task] = devices.tasks["dev-a"]
    assert task.family == "torch"
    assert task.model == "regressor"
    assert task.model_spec == SPEC
    assert task.task == "regression"
    assert task.model_args == {"input_shape": "4", "num_outputs": 1}
    assert [entry.name for entry in task.weights_index] == list(WEIGHTS)


def test_a_built_in_family_run_sends_no_spec(devices: Devices) -> None:
    devices.online("dev-a", train_models=())
    devices.weights = {"W0": np.zeros((4, 2), np.float32), "b0": np.zeros(2, np.float32)}
    result = _run(devices, family="softmax", model_def=None, initial_weights=devices.weights)
    assert result.rounds[0].status == "ok"
    [task] = devices.tasks["dev-a"]
    assert (task.family, task.model_spec, task.task, task.model_args) == (
        "softmax", "", "classification", {},
    )  # fmt: skip


def test_a_run_no_online_device_can_train_is_refused(devices: Devices) -> None:
    devices.online("dev-a", train_models=("other.models:cnn",))
    devices.online("dev-b", train_models=())
    with pytest.raises(RunError) as caught:
        _run(devices)
    message = str(caught.value)
    assert f"no online device can train {SPEC}: 2 online device(s) lack it" in message
    assert "fedge[torch]" in message
    assert "[training] models" in message
    assert "fedge.models" in message
    assert not devices.tasks


def test_offline_devices_and_devices_without_data_do_not_count(devices: Devices) -> None:
    devices.online("dev-a", train_models=(SPEC,))
    devices.hub.receive("dev-a", Status(online=False, agent_version="1", train_examples=10,
                                        train_models=(SPEC,)))  # fmt: skip
    devices.hub.receive("dev-b", Status(online=True, agent_version="1", train_examples=0))
    # nobody who could train is online: not refused, the round waits and fails
    result = _run(devices, round_timeout_s=0.3)
    [report] = result.rounds
    assert report.status == "failed"
    assert report.reason == "0 eligible device(s), need 1"
    assert not devices.tasks


def test_federated_evaluation_keeps_the_task_metrics(devices: Devices) -> None:
    devices.online("dev-a", train_models=(SPEC,))
    result = _run(devices, federated_eval=True)
    [report] = result.rounds
    assert report.eval_clients == 1
    assert report.metrics == {"loss": 0.5, "mse": 0.5, "mae": 0.6}  # not train_loss
    assert report.accuracy is None
    assert report.loss == 0.5
    assert result.final_metrics == report.metrics
    assert report.to_json()["metrics"] == report.metrics


def test_the_devices_status_gives_the_record_its_train_models(devices: Devices) -> None:
    devices.online("dev-a", train_models=(SPEC,))
    record = devices.hub.device("dev-a")
    assert record is not None
    assert record.train_models == (SPEC,)
    assert record.can_train_model(SPEC)
    assert record.can_train_model("")  # a built-in family
    assert not record.can_train_model("other.models:cnn")


def test_a_device_cannot_push_a_batchnorm_variance_below_zero(devices: Devices) -> None:
    devices.online("dev-a", train_models=(SPEC,))
    start = {**WEIGHTS, "bn.running_var": np.full(4, 0.1, np.float32)}
    devices.weights = start
    honest = _run(devices, initial_weights=start)
    np.testing.assert_allclose(honest.weights["bn.running_var"], 0.1 + STEP)
    devices.step = -1.0  # a hostile update: the variance would become -0.9
    poisoned = _run(devices, initial_weights=start)
    assert poisoned.rounds[0].status == "ok"
    assert poisoned.weights["bn.running_var"].tolist() == [0.0] * 4  # clamped
    np.testing.assert_allclose(poisoned.weights["net.bias"], -1.0)  # weights are not clamped
