"""The coordinator's side of PyTorch models with torch itself: the factory's declared
task, seeded starting weights, and the scores of each task (coordinator.federated.models
over edge_agent.training.torch_models / torch_trainer and compress.metrics).

The factories live in a user module written to a fresh directory (not part of fedge),
importable the way ``fedge`` makes the current directory importable.
"""

from __future__ import annotations

import math
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.delivery.packaging import LabelledData
from coordinator.errors import RunError
from coordinator.federated.models import (
    ModelDef,
    evaluate_model,
    initial_weights,
    model_def_for,
    model_task,
    torch_module,
)
from edge_agent.errors import TrainingError

MODULE = "fedge_h6_user_models"
USER_MODELS = """
    from torch import nn

    def linear(input_shape, num_outputs):
        return nn.Linear(input_shape[0], num_outputs)

    def regressor(input_shape, num_outputs):
        return nn.Linear(input_shape[0], num_outputs)

    regressor.task = "regression"

    def autoencoder(input_shape):
        return nn.Linear(input_shape[0], input_shape[0])

    autoencoder.task = "reconstruction"
"""


@pytest.fixture(autouse=True)
def user_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(USER_MODELS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop(MODULE, None)


def test_the_task_is_the_factory_s_own_unless_given() -> None:
    assert model_task(f"{MODULE}:regressor", None) == "regression"
    assert model_task(f"{MODULE}:autoencoder", None) == "reconstruction"
    assert model_task(f"{MODULE}:linear", None) == "classification"
    assert model_task(f"{MODULE}:regressor", "classification") == "classification"
    model = model_def_for(f"{MODULE}:autoencoder", None, (6,), 0)
    assert model == ModelDef("torch", "reconstruction", f"{MODULE}:autoencoder", (6,), 6)


def test_the_zoo_declares_its_tasks() -> None:
    assert model_def_for("zoo:dense_autoencoder", None, (8,), 0).task == "reconstruction"
    assert model_def_for("zoo:mlp_regressor", None, (5,), 1).task == "regression"
    assert model_def_for("zoo:small_cnn", None, (1, 8, 8), 10).task == "classification"


def test_starting_weights_are_seeded() -> None:
    model = ModelDef("torch", "classification", f"{MODULE}:linear", (3,), 2)
    first, again, other = (initial_weights(model, seed) for seed in (1, 1, 2))
    assert list(first) == ["weight", "bias"]
    assert first["weight"].shape == (2, 3)
    assert all(w.dtype == np.float32 for w in first.values())
    np.testing.assert_array_equal(first["weight"], again["weight"])
    assert not np.array_equal(first["weight"], other["weight"])


def test_the_module_holds_the_weights_it_is_given() -> None:
    model = ModelDef("torch", "classification", f"{MODULE}:linear", (3,), 2)
    weights = initial_weights(model, 7)
    module = torch_module(model, weights)
    for name, tensor in module.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), weights[name])
    with pytest.raises(TrainingError, match="has shape"):
        torch_module(model, {**weights, "bias": np.zeros(5, np.float32)})
    with pytest.raises(RunError, match="built-in family softmax has no PyTorch module"):
        torch_module(ModelDef("softmax"), weights)


def test_a_torch_classifier_scores_like_a_built_in_one() -> None:
    weights = {"weight": 2.0 * np.eye(3, dtype=np.float32), "bias": np.zeros(3, np.float32)}
    x = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], np.float32)
    data = LabelledData(x, np.array([0, 1, 0, 2], np.int64))
    torch_metrics = evaluate_model(
        ModelDef("torch", "classification", f"{MODULE}:linear", (3,), 3), weights, data
    )
    numpy_metrics = evaluate_model(
        ModelDef("softmax"), {"W0": weights["weight"].T, "b0": weights["bias"]}, data
    )
    assert torch_metrics == pytest.approx(numpy_metrics, rel=1e-5)
    assert torch_metrics["accuracy"] == pytest.approx(0.5)


def test_a_regressor_scores_mse_and_mae() -> None:
    weights = {"weight": np.array([[1.0, 0.0]], np.float32), "bias": np.zeros(1, np.float32)}
    x = np.array([[1.0, 5.0], [2.0, 5.0], [4.0, 5.0]], np.float32)
    targets = np.array([1.0, 3.0, 1.0], np.float32)  # errors 0, -1, 3
    data = LabelledData(x, targets, task="regression")
    metrics = evaluate_model(
        ModelDef("torch", "regression", f"{MODULE}:regressor", (2,), 1), weights, data
    )
    assert set(metrics) == {"mse", "mae", "loss"}
    assert metrics["mse"] == pytest.approx(10 / 3)
    assert metrics["mae"] == pytest.approx(4 / 3)
    assert metrics["loss"] == metrics["mse"]


def test_an_autoencoder_scores_the_roc_auc_of_its_anomaly_score() -> None:
    # A reconstruction of zeros: each example's score is the mean of its squares.
    weights = {"weight": np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float32)}
    x = np.array([[0.1, 0.1], [0.2, 0.0], [3.0, 3.0], [0.0, 0.3], [2.0, 1.0]], np.float32)
    flags = np.array([0, 0, 1, 0, 1])
    data = LabelledData(x, flags, task="reconstruction")
    model = ModelDef("torch", "reconstruction", f"{MODULE}:autoencoder", (2,), 2)
    metrics = evaluate_model(model, weights, data)
    assert set(metrics) == {"auc", "loss"}
    assert metrics["auc"] == pytest.approx(1.0)
    normal = (0.01 + 0.01) / 2, 0.04 / 2, 0.09 / 2
    assert metrics["loss"] == pytest.approx(sum(normal) / 3, rel=1e-5)
    swapped = LabelledData(x, 1 - flags, task="reconstruction")
    assert evaluate_model(model, weights, swapped)["auc"] == pytest.approx(0.0)
    assert math.isfinite(evaluate_model(model, weights, swapped)["loss"])
