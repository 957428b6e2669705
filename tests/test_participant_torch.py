"""Participant with PyTorch tasks (``family="torch"``): the allow list, no torch, a zoo round.

The twins are those of tests/test_rounds_participant.py (a MemoryLink, an outbox that
encodes and decodes every message as the agent and the coordinator would). A device
trains a model spec only when it is on its allow list (the zoo, the ``fedge.models``
entry points, ``[training] models``); anything else is refused with
``unknown_model`` before any download, and nothing is imported for it. A device
without PyTorch refuses torch tasks with ``no_torch`` and lists no train models.

The tests that train need the torch trainer and the zoo
(``edge_agent.training.torch_trainer``, ``edge_agent.training.zoo``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.codecs import layout_of, parse_codec
from coordinator.federated.update_check import UpdateCheck, check_update
from edge_agent.protocol import (
    DEFAULT_LIMITS,
    ErrorReport,
    EvalReport,
    TaskAck,
    TaskAction,
    TrainTask,
    UpdateReport,
)
from edge_agent.training.data import LocalData
from edge_agent.training.model_spec import ZOO, ZOO_MODULE, check_task
from edge_agent.training.participant import Participant
from edge_agent.training.residuals import ResidualStore
from edge_agent.transport.memory import MemoryLink
from tests.clock_support import ManualClock
from tests.test_rounds_participant import (
    DEVICE,
    WAIT_S,
    Outbox,
    RoundWeights,
    Weights,
    deliver,
    memory_link,
    only_error,
    take,
    weights_of,
)

SHAPE = (1, 8, 8)
CLASSES = 3
EXAMPLES = 30
MODEL_ARGS: dict[str, int | float | str | bool] = {"input_shape": "1,8,8", "num_outputs": CLASSES}
OWN_SPEC = "owner_models.nets:tiny_net"  # allowed by the device's [training] models
ZOO_SPECS = tuple(f"{ZOO_MODULE}:{name}" for name in ZOO)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "images"
    directory.mkdir()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((EXAMPLES, *SHAPE)).astype(np.float32)
    np.savez(directory / "local.npz", x=x, y=rng.integers(0, CLASSES, EXAMPLES))
    return directory


class Device:
    """A participant on image data, with its outbox, link and clock."""

    def __init__(
        self, participant: Participant, link: MemoryLink, out: Outbox, clock: ManualClock
    ) -> None:
        self.participant = participant
        self.link = link
        self.out = out
        self.clock = clock

    @property
    def subscriptions(self) -> list[tuple[str, str]]:
        return self.link.subscription_changes


@pytest.fixture
def make_device(tmp_path: Path, image_dir: Path) -> Iterator[Callable[..., Device]]:
    made: list[Participant] = []

    def make(**kwargs: Any) -> Device:
        link, out, clock = memory_link(), Outbox(), ManualClock(1_800_000_000.0)
        kwargs.setdefault("data", LocalData(image_dir))
        participant = Participant(
            device_id=DEVICE,
            link=link,
            send=out,
            residuals=ResidualStore(tmp_path / "res"),
            limits=DEFAULT_LIMITS,
            clock=clock,
            **kwargs,
        )
        made.append(participant)
        return Device(participant, link, out, clock)

    yield make
    for participant in made:
        assert participant.close(WAIT_S)


@pytest.fixture
def without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch not installed, as far as the device can tell (find_spec finds nothing)."""
    monkeypatch.setitem(sys.modules, "torch", None)


def torch_task(
    weights: RoundWeights,
    clock: ManualClock,
    spec: str = "zoo:small_cnn",
    *,
    task: str = "classification",
    model_args: dict[str, int | float | str | bool] | None = None,
    **fields: Any,
) -> TrainTask:
    return weights.task(
        clock,
        family="torch",
        model_spec=spec,
        task=task,
        model_args=dict(MODEL_ARGS if model_args is None else model_args),
        **fields,
    )


def assert_refused(device: Device, task: TrainTask, code: str) -> str:
    take(device.participant, task)
    assert device.out.types() == [ErrorReport]
    error = only_error(device.out)
    assert (error.code, error.ref) == (code, task.task_id)
    assert device.subscriptions == []  # no download started
    assert not device.participant.wants_broadcast(task.weights_transfer_id)
    assert device.participant.completed == 0
    return error.message


# ----------------------------------------------------------------- allow list


def test_the_status_lists_the_zoo_and_the_owners_models(make_device: Callable[..., Device]) -> None:
    models = make_device(models=[OWN_SPEC, "zoo:small_cnn"]).participant.train_models
    assert models == tuple(sorted({*ZOO_SPECS, OWN_SPEC}))
    assert make_device().participant.train_models == tuple(sorted(ZOO_SPECS))


@pytest.mark.usefixtures("without_torch")
def test_a_device_without_torch_lists_no_models(make_device: Callable[..., Device]) -> None:
    assert make_device(models=[OWN_SPEC]).participant.train_models == ()


@pytest.mark.parametrize(
    "spec",
    [
        "evil_models_not_imported.payload:build",  # well-formed, not allowed
        "owner_models.nets:other_net",  # the allowed module, another function
        "",  # a torch task without a spec
        "zoo:resnet",  # not in the zoo
    ],
)
def test_a_model_not_on_the_allow_list_is_refused_before_any_download(
    make_device: Callable[..., Device], spec: str
) -> None:
    device = make_device(models=[OWN_SPEC])
    weights = RoundWeights.of(weights_of())
    message = assert_refused(device, torch_task(weights, device.clock, spec), "unknown_model")
    assert "evil_models_not_imported" not in sys.modules  # nothing imported for it
    assert "owner_models" not in sys.modules
    if spec.startswith("evil"):
        assert "not installed on this device" in message


@pytest.mark.usefixtures("without_torch")
def test_an_allowed_model_on_a_device_without_torch_is_refused_with_no_torch(
    make_device: Callable[..., Device],
) -> None:
    device = make_device(models=[OWN_SPEC])
    weights = RoundWeights.of(weights_of())
    message = assert_refused(device, torch_task(weights, device.clock, OWN_SPEC), "no_torch")
    assert "fedge[torch]" in message


@pytest.mark.usefixtures("without_torch")
def test_an_unlisted_model_is_unknown_even_without_torch(
    make_device: Callable[..., Device],
) -> None:
    device = make_device()
    weights = RoundWeights.of(weights_of())
    assert_refused(device, torch_task(weights, device.clock, OWN_SPEC), "unknown_model")


@pytest.mark.parametrize(
    ("changes", "task"),
    [
        ({"input_shape": None}, "classification"),
        ({"input_shape": "1,x,8"}, "classification"),
        ({"input_shape": "1,0,8"}, "classification"),
        ({"input_shape": ""}, "classification"),
        ({"input_shape": True}, "classification"),
        ({"input_shape": "1,,8"}, "classification"),
        ({"num_outputs": -1}, "classification"),
        ({"num_outputs": True}, "classification"),
        ({"num_outputs": "3"}, "classification"),
        ({}, "segmentation"),
    ],
)
def test_bad_model_args_or_task_are_refused_as_bad_train_config(
    make_device: Callable[..., Device], changes: dict[str, Any], task: str
) -> None:
    device = make_device()
    args = {**MODEL_ARGS, **changes}
    args = {key: value for key, value in args.items() if value is not None}
    weights = RoundWeights.of(weights_of())
    refused = torch_task(weights, device.clock, task=task, model_args=args)
    assert_refused(device, refused, "bad_train_config")


def test_numpy_rounds_are_unchanged_on_a_device_that_allows_torch_models(
    make_device: Callable[..., Device], tmp_path: Path
) -> None:
    rows = tmp_path / "rows"
    rows.mkdir()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((EXAMPLES, 8)).astype(np.float32)
    np.savez(rows / "local.npz", x=x, y=rng.integers(0, CLASSES, EXAMPLES))
    device = make_device(data=LocalData(rows), models=[OWN_SPEC])
    flat = RoundWeights.of(weights_of())
    task = flat.task(device.clock, family="softmax")
    take(device.participant, task)
    deliver(device.participant, flat.chunks())
    assert device.out.types() == [TaskAck, UpdateReport]
    assert device.out.of(UpdateReport)[0].task_id == task.task_id


# ----------------------------------------------------------------- training


def zoo_weights(spec: str, *, task: str, num_outputs: int) -> Weights:
    from edge_agent.training.torch_models import initial_weights  # noqa: PLC0415 - needs torch

    arrays = initial_weights(spec, task=task, input_shape=SHAPE, num_outputs=num_outputs, seed=0)
    return {name: np.asarray(value, np.float32) for name, value in arrays.items()}


def test_an_allowed_zoo_model_trains_and_its_update_is_accepted(
    make_device: Callable[..., Device],
) -> None:
    device = make_device(torch_threads=1)
    weights = RoundWeights.of(zoo_weights("zoo:small_cnn", task="classification", num_outputs=3))
    task = torch_task(weights, device.clock, chunk_size=DEFAULT_LIMITS.default_chunk_bytes)
    take(device.participant, task)
    deliver(device.participant, weights.chunks(task.chunk_size))
    assert device.out.types() == [TaskAck, UpdateReport]
    report = device.out.of(UpdateReport)[0]
    assert report.task_id == task.task_id
    assert report.num_examples == EXAMPLES - round(EXAMPLES * 0.2)
    arrays = report.arrays
    assert arrays is not None
    check = UpdateCheck(parse_codec(report.codec), layout_of(weights.weights))
    delta = check_update(report, arrays, check)
    assert list(delta) == list(weights.weights)
    assert any(np.abs(d).max() > 0 for d in delta.values())  # it trained

    evaluate = torch_task(weights, device.clock, action=TaskAction.EVALUATE, round_id="r2")
    take(device.participant, evaluate)  # the same weights: no download
    result = device.out.of(EvalReport)[-1]
    assert result.task_id == evaluate.task_id
    assert {"loss", "accuracy"} <= set(result.metrics)
    assert device.participant.completed == 2


def test_a_reconstruction_model_evaluates_on_unlabelled_use_of_the_data(
    make_device: Callable[..., Device],
) -> None:
    device = make_device(torch_threads=1)
    weights = RoundWeights.of(
        zoo_weights("zoo:dense_autoencoder", task="reconstruction", num_outputs=0)
    )
    task = torch_task(
        weights,
        device.clock,
        "zoo:dense_autoencoder",
        task="reconstruction",
        model_args={"input_shape": "1,8,8", "num_outputs": 0},
        action=TaskAction.EVALUATE,
        chunk_size=DEFAULT_LIMITS.default_chunk_bytes,
    )
    take(device.participant, task)
    deliver(device.participant, weights.chunks(task.chunk_size))
    result = device.out.of(EvalReport)[-1]
    assert result.task_id == task.task_id
    assert "reconstruction_error" in result.metrics
    assert "accuracy" not in result.metrics


@pytest.mark.parametrize("task", ["classification", "regression", "reconstruction"])
def test_local_data_is_split_for_the_tasks_learning_task(image_dir: Path, task: str) -> None:
    train, held_out = LocalData(image_dir).split(0.2, seed=1, task=check_task(task))
    assert (train.task, held_out.task) == (task, task)
    assert (len(train), len(held_out)) == (EXAMPLES - 6, 6)
    assert train.sample_shape == SHAPE
