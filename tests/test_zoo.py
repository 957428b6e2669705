"""The built-in zoo: each model builds for its shapes, stays small, and learns on tiny data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from edge_agent.errors import TrainingError
from edge_agent.training import zoo
from edge_agent.training.model_spec import ZOO, ModelTask
from edge_agent.training.torch_models import build_module, factory_task, initial_weights
from edge_agent.training.torch_trainer import TorchTrainer
from edge_agent.training.trainer import Dataset, TrainConfig

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# name, task, input shape, outputs, the output shape of a batch of 5
SHAPES: list[tuple[str, ModelTask, tuple[int, ...], int, tuple[int, ...]]] = [
    ("small_cnn", "classification", (1, 8, 8), 10, (5, 10)),
    ("small_cnn", "classification", (1, 28, 28), 10, (5, 10)),
    ("small_cnn", "classification", (3, 5, 7), 2, (5, 2)),
    ("sensor_cnn", "classification", (12, 29), 9, (5, 9)),
    ("sensor_cnn", "classification", (3, 1), 2, (5, 2)),
    ("dense_autoencoder", "reconstruction", (3, 20), 0, (5, 3, 20)),
    ("dense_autoencoder", "reconstruction", (1, 8, 8), 0, (5, 1, 8, 8)),
    ("mlp_regressor", "regression", (10,), 1, (5, 1)),
    ("mlp_regressor", "regression", (10,), 3, (5, 3)),
]


def test_every_zoo_name_is_a_factory_of_the_zoo_module_and_tested_here() -> None:
    assert sorted(zoo.__all__) == sorted(ZOO)
    assert all(callable(getattr(zoo, name)) for name in ZOO)
    assert {name for name, *_ in SHAPES} == set(ZOO)


@pytest.mark.parametrize(("name", "task", "shape", "outputs", "out_shape"), SHAPES)
def test_zoo_models_map_batches_to_their_outputs(
    name: str, task: ModelTask, shape: tuple[int, ...], outputs: int, out_shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    module = build_module(f"zoo:{name}", input_shape=shape, num_outputs=outputs, task=task)
    assert module(torch.randn(5, *shape)).shape == out_shape
    size = sum(p.numel() for p in module.parameters())
    assert size < 60_000, f"{name} has {size} weights: too many for a small device"


def test_zoo_models_declare_their_tasks() -> None:
    assert factory_task("zoo:dense_autoencoder") == "reconstruction"
    assert factory_task("zoo:mlp_regressor") == "regression"
    assert factory_task("zoo:small_cnn") is None
    assert factory_task("zoo:sensor_cnn") is None


@pytest.mark.parametrize(
    ("name", "shape", "outputs", "message"),
    [
        ("small_cnn", (64,), 10, r"images \(channels, height, width\)"),
        ("small_cnn", (1, 3, 8), 10, "at least 4x4"),
        ("small_cnn", (1, 8, 8), 0, "num_outputs >= 1"),
        ("sensor_cnn", (1, 8, 8), 2, r"windows \(channels, steps\)"),
        ("sensor_cnn", (3, 8), 0, "num_outputs >= 1"),
        ("mlp_regressor", (4,), 0, "num_outputs >= 1"),
    ],
)
def test_zoo_models_refuse_shapes_they_cannot_take(
    name: str, shape: tuple[int, ...], outputs: int, message: str
) -> None:
    with pytest.raises(TrainingError, match=message):
        build_module(f"zoo:{name}", input_shape=shape, num_outputs=outputs, task="classification")


def _data(task: ModelTask, shape: tuple[int, ...], outputs: int) -> Dataset:
    """Tiny learnable data: classes and targets depend on the inputs."""
    rng = np.random.default_rng(0)
    n = 240
    if task == "reconstruction":  # examples on a low-dimensional pattern plus noise
        basis = rng.normal(size=(2, int(np.prod(shape)))).astype(np.float32)
        codes = rng.normal(size=(n, 2)).astype(np.float32)
        x = (codes @ basis).reshape(n, *shape) + 0.05 * rng.normal(size=(n, *shape))
        return Dataset.from_arrays(x, None, task=task)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    flat = x.reshape(n, -1)
    if task == "classification":
        y: Any = (flat[:, : flat.shape[1] // 2].mean(axis=1) > 0).astype(np.int64)
        y += 2 * (flat[:, flat.shape[1] // 2 :].mean(axis=1) > 0) if outputs > 2 else 0
        return Dataset.from_arrays(x, y, task=task)
    y = flat @ rng.normal(size=(flat.shape[1], outputs)).astype(np.float32)
    return Dataset.from_arrays(x, y[:, 0] if outputs == 1 else y, task=task)


@pytest.mark.parametrize(
    ("name", "task", "shape", "outputs"),
    [
        ("small_cnn", "classification", (1, 8, 8), 4),
        ("sensor_cnn", "classification", (3, 16), 4),
        ("dense_autoencoder", "reconstruction", (2, 12), 0),
        ("mlp_regressor", "regression", (6,), 1),
    ],
)
def test_zoo_models_learn_in_a_few_epochs(
    name: str, task: ModelTask, shape: tuple[int, ...], outputs: int
) -> None:
    spec = f"zoo:{name}"
    data = _data(task, shape, outputs)
    trainer = TorchTrainer(spec, task=task, input_shape=shape, num_outputs=outputs, num_threads=1)
    start = initial_weights(spec, task=task, input_shape=shape, num_outputs=outputs, seed=0)
    config = TrainConfig(epochs=4, batch_size=16, lr=0.01, optimizer="adam")
    fitted = trainer.fit(start, data, config, np.random.default_rng(0))
    before = trainer.evaluate(start, data)
    after = trainer.evaluate(fitted.weights, data)
    assert after.loss < 0.8 * before.loss, (before, after)
    if task == "classification":
        assert after.accuracy is not None
        assert before.accuracy is not None
        assert after.accuracy > before.accuracy
