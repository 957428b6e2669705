"""edge_agent.training.torch_trainer: fit, evaluate and predict a PyTorch factory, reproducibly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edge_agent.errors import (
    DataSourceError,
    NoDataError,
    TorchUnavailableError,
    TrainConfigError,
    TrainingError,
    UnknownModelError,
)
from edge_agent.training.torch_models import build_module, initial_weights, load_module_weights
from edge_agent.training.torch_trainer import TorchTrainer
from edge_agent.training.trainer import Dataset, FloatArray, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent
HERE = "tests.test_torch_trainer"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ------------------------------------------------------------------ test factories


def bn_mlp(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Rows -> logits, with BatchNorm and dropout (train and eval differ)."""
    return nn.Sequential(
        nn.Linear(input_shape[0], 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(16, num_outputs),
    )


def wrong_width(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return nn.Linear(input_shape[0], num_outputs + 1)


def same_size_other_shape(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Logits (n, 2, outputs/2): as many values as (n, outputs), the wrong shape."""
    return nn.Sequential(nn.Linear(input_shape[0], num_outputs), nn.Unflatten(1, (2, -1)))


def returns_tuple(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(input_shape[0], num_outputs)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.linear(x), x

    return Pair()


def frozen_first_layer(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    module = nn.Sequential(nn.Linear(input_shape[0], 8), nn.ReLU(), nn.Linear(8, num_outputs))
    module[0].requires_grad_(False)
    return module


# ------------------------------------------------------------------------ data


def rows(n: int = 200, features: int = 6, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + 2 * (x[:, 2] > 0.5)
    return Dataset(x, y)


def targets(n: int = 200, features: int = 6, outputs: int = 1, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = x @ rng.normal(size=(features, outputs)).astype(np.float32)
    return Dataset(x, y[:, 0] if outputs == 1 else y, "regression")


def windows(n: int = 120, shape: tuple[int, ...] = (2, 10), seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    base = np.sin(np.linspace(0, 6, shape[-1], dtype=np.float32))
    x = base * rng.normal(1.0, 0.3, size=(n, *shape[:-1], 1)).astype(np.float32)
    return Dataset.from_arrays(x, None, task="reconstruction")


def trainer_for_bn(**kwargs: Any) -> TorchTrainer:
    return TorchTrainer(
        f"{HERE}:bn_mlp", task="classification", input_shape=(6,), num_outputs=4, **kwargs
    )


def start_for_bn(seed: int = 0) -> dict[str, FloatArray]:
    return initial_weights(
        f"{HERE}:bn_mlp", task="classification", input_shape=(6,), num_outputs=4, seed=seed
    )


CONFIG = TrainConfig(epochs=3, batch_size=16, lr=0.05)


# ------------------------------------------------------------------------ import


def test_importing_the_torch_modules_does_not_load_torch() -> None:
    code = (
        "import sys\n"
        "import edge_agent.training.torch_trainer, edge_agent.training.torch_models\n"
        "import edge_agent.training.zoo\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_the_trainer_is_a_trainer_and_says_what_it_trains() -> None:
    trainer = trainer_for_bn()
    assert isinstance(trainer, Trainer)
    assert (trainer.task, trainer.input_shape, trainer.num_outputs) == ("classification", (6,), 4)
    assert str(trainer.spec) == f"{HERE}:bn_mlp"
    assert "bn_mlp" in repr(trainer)


# ------------------------------------------------------------------ construction


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_outputs": 0}, "needs num_outputs >= 1"),
        ({"num_threads": 0}, "num_threads"),
        ({"num_threads": True}, "num_threads"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"input_shape": (0,)}, "input_shape"),
        ({"task": "clustering"}, "unknown task"),
    ],
)
def test_bad_trainer_settings_are_refused(kwargs: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {"task": "classification", "input_shape": (6,), "num_outputs": 4}
    settings.update(kwargs)
    with pytest.raises(TrainConfigError, match=message):
        TorchTrainer(f"{HERE}:bn_mlp", **settings)


def test_an_unknown_model_or_no_torch_is_refused_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(UnknownModelError):
        TorchTrainer(f"{HERE}:nothing", task="classification", input_shape=(6,), num_outputs=2)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(TorchUnavailableError):
        TorchTrainer("zoo:small_cnn", task="classification", input_shape=(1, 8, 8), num_outputs=2)


# ------------------------------------------------------------------------- fit


def test_fit_is_bit_for_bit_reproducible_and_depends_on_the_generator() -> None:
    trainer = trainer_for_bn()
    start = start_for_bn()
    data = rows()
    first = trainer.fit(start, data, CONFIG, np.random.default_rng(5))
    again = trainer_for_bn().fit(start, data, CONFIG, np.random.default_rng(5))
    other = trainer.fit(start, data, CONFIG, np.random.default_rng(6))
    assert list(first.weights) == list(start)
    for name in start:
        np.testing.assert_array_equal(first.weights[name], again.weights[name])
    assert first.metrics == again.metrics
    assert any(not np.array_equal(first.weights[n], other.weights[n]) for n in start)


def test_fit_does_not_modify_the_given_weights_and_restores_torch_settings() -> None:
    trainer = trainer_for_bn(num_threads=2)
    start = start_for_bn()
    for array in start.values():
        array.setflags(write=False)
    before = {n: a.copy() for n, a in start.items()}
    rng_state = torch.random.get_rng_state()
    result = trainer.fit(start, rows(), CONFIG, np.random.default_rng(0))
    for name, array in start.items():
        np.testing.assert_array_equal(array, before[name])
    assert torch.get_num_threads() == 1
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert result.weights["0.weight"] is not start["0.weight"]
    assert all(w.dtype == np.float32 for w in result.weights.values())


def test_fit_trains_batchnorm_statistics_and_reports_metrics() -> None:
    trainer = trainer_for_bn()
    start = start_for_bn()
    data = rows()
    result = trainer.fit(start, data, CONFIG, np.random.default_rng(0))
    assert result.num_examples == len(data)
    assert set(result.metrics) == {"train_loss", "train_accuracy"}
    assert 0.0 <= result.metrics["train_accuracy"] <= 1.0
    assert not np.array_equal(result.weights["1.running_mean"], start["1.running_mean"])
    assert trainer.evaluate(result.weights, data).loss < trainer.evaluate(start, data).loss


def test_max_examples_trains_on_a_seeded_sample() -> None:
    trainer = trainer_for_bn()
    config = TrainConfig(epochs=1, batch_size=8, lr=0.05, max_examples=50)
    result = trainer.fit(start_for_bn(), rows(), config, np.random.default_rng(0))
    assert result.num_examples == 50


def _distance(a: dict[str, FloatArray], b: dict[str, FloatArray]) -> float:
    """Squared distance over the parameters (not BatchNorm's statistics, which FedProx ignores)."""
    return float(sum(np.sum((a[n] - b[n]) ** 2) for n in a if "running" not in n))


def test_fedprox_keeps_the_weights_closer_to_the_global_ones() -> None:
    trainer = trainer_for_bn()
    start = start_for_bn()
    data = rows()
    free = trainer.fit(start, data, TrainConfig(epochs=3, lr=0.05), np.random.default_rng(0))
    prox = trainer.fit(
        start, data, TrainConfig(epochs=3, lr=0.05, proximal_mu=5.0), np.random.default_rng(0)
    )
    assert _distance(prox.weights, start) < 0.5 * _distance(free.weights, start)


def test_weight_decay_shrinks_weight_matrices_but_not_biases() -> None:
    trainer = TorchTrainer("zoo:mlp_regressor", task="regression", input_shape=(6,), num_outputs=1)
    start = initial_weights(
        "zoo:mlp_regressor", task="regression", input_shape=(6,), num_outputs=1, seed=0
    )
    data = targets()
    plain = trainer.fit(start, data, TrainConfig(epochs=2, lr=0.01), np.random.default_rng(0))
    decayed = trainer.fit(
        start, data, TrainConfig(epochs=2, lr=0.01, weight_decay=0.5), np.random.default_rng(0)
    )
    assert np.sum(decayed.weights["1.weight"] ** 2) < np.sum(plain.weights["1.weight"] ** 2)


def test_adam_and_frozen_parameters() -> None:
    trainer = TorchTrainer(
        f"{HERE}:frozen_first_layer", task="classification", input_shape=(6,), num_outputs=4
    )
    start = initial_weights(
        f"{HERE}:frozen_first_layer",
        task="classification",
        input_shape=(6,),
        num_outputs=4,
        seed=0,
    )
    config = TrainConfig(epochs=2, lr=0.01, optimizer="adam", proximal_mu=0.1)
    result = trainer.fit(start, rows(), config, np.random.default_rng(0))
    np.testing.assert_array_equal(result.weights["0.weight"], start["0.weight"])
    assert not np.array_equal(result.weights["2.weight"], start["2.weight"])


def test_a_diverging_fit_is_a_training_error() -> None:
    trainer = TorchTrainer("zoo:mlp_regressor", task="regression", input_shape=(6,), num_outputs=1)
    start = initial_weights(
        "zoo:mlp_regressor", task="regression", input_shape=(6,), num_outputs=1, seed=0
    )
    data = Dataset(targets().x * 1e3, targets().y * 1e15, "regression")
    with pytest.raises(TrainingError, match=r"diverged.*lower the learning rate"):
        trainer.fit(start, data, TrainConfig(epochs=5, lr=50.0), np.random.default_rng(0))


def test_regression_with_several_outputs_and_reconstruction_train() -> None:
    trainer = TorchTrainer("zoo:mlp_regressor", task="regression", input_shape=(6,), num_outputs=3)
    start = initial_weights(
        "zoo:mlp_regressor", task="regression", input_shape=(6,), num_outputs=3, seed=0
    )
    data = targets(outputs=3)
    config = TrainConfig(epochs=3, lr=0.01, optimizer="adam")
    result = trainer.fit(start, data, config, np.random.default_rng(0))
    assert set(result.metrics) == {"train_loss"}
    assert trainer.evaluate(result.weights, data).loss < trainer.evaluate(start, data).loss
    auto = TorchTrainer(
        "zoo:dense_autoencoder", task="reconstruction", input_shape=(2, 10), num_outputs=0
    )
    start = initial_weights(
        "zoo:dense_autoencoder", task="reconstruction", input_shape=(2, 10), num_outputs=0, seed=0
    )
    result = auto.fit(start, windows(), config, np.random.default_rng(0))
    assert set(result.metrics) == {"train_loss"}
    assert auto.evaluate(result.weights, windows()).loss < auto.evaluate(start, windows()).loss


# ------------------------------------------------------------------ bad input


def test_data_that_does_not_fit_the_model_is_refused() -> None:
    trainer = trainer_for_bn()
    start = start_for_bn()
    rng = np.random.default_rng(0)
    with pytest.raises(DataSourceError, match=r"shape \(5,\) but the model takes \(6,\)"):
        trainer.fit(start, rows(features=5), CONFIG, rng)
    with pytest.raises(DataSourceError, match="for regression, the model for classification"):
        trainer.fit(start, targets(), CONFIG, rng)
    with pytest.raises(DataSourceError, match="label 6 is out of range"):
        trainer.evaluate(start, Dataset(rows().x[:3], np.array([0, 6, 1])))
    with pytest.raises(NoDataError):
        trainer.fit(start, Dataset.empty(6), CONFIG, rng)
    with pytest.raises(NoDataError):
        trainer.evaluate(start, Dataset.empty(6))
    with pytest.raises(TrainingError, match="must be a Dataset"):
        trainer.fit(start, rows().x, CONFIG, rng)  # type: ignore[arg-type]
    regressor = TorchTrainer(
        "zoo:mlp_regressor", task="regression", input_shape=(6,), num_outputs=2
    )
    weights = initial_weights(
        "zoo:mlp_regressor", task="regression", input_shape=(6,), num_outputs=2, seed=0
    )
    with pytest.raises(DataSourceError, match="1 regression target"):
        regressor.evaluate(weights, targets(outputs=1))


def test_weights_that_do_not_fit_are_refused() -> None:
    trainer = trainer_for_bn()
    other = initial_weights(
        "zoo:mlp_regressor", task="regression", input_shape=(6,), num_outputs=1, seed=0
    )
    with pytest.raises(TrainingError, match="weights do not fit the model"):
        trainer.fit(other, rows(), CONFIG, np.random.default_rng(0))
    with pytest.raises(TrainingError, match="weights do not fit the model"):
        trainer.predict(other, rows().x)


def test_a_model_whose_output_does_not_fit_the_task_is_a_training_error() -> None:
    for factory in ("wrong_width", "returns_tuple", "same_size_other_shape"):
        spec = f"{HERE}:{factory}"
        trainer = TorchTrainer(spec, task="classification", input_shape=(6,), num_outputs=4)
        start = initial_weights(
            spec, task="classification", input_shape=(6,), num_outputs=4, seed=0
        )
        with pytest.raises(TrainingError, match=r"output has shape|not a tensor"):
            trainer.fit(start, rows(), CONFIG, np.random.default_rng(0))
        with pytest.raises(TrainingError, match=r"output has shape|not a tensor"):
            trainer.predict(start, rows().x)
    regressor = TorchTrainer(
        f"{HERE}:wrong_width", task="regression", input_shape=(6,), num_outputs=1
    )
    start = initial_weights(
        f"{HERE}:wrong_width", task="regression", input_shape=(6,), num_outputs=1, seed=0
    )
    with pytest.raises(TrainingError, match=r"output has shape \(200, 2\)"):
        regressor.evaluate(start, targets())


def test_a_model_failing_on_the_data_is_a_training_error() -> None:
    trainer = trainer_for_bn()
    one = Dataset(rows().x[:1], np.array([0]))  # BatchNorm cannot train on one example
    with pytest.raises(TrainingError, match="failed on a batch of shape"):
        trainer.fit(start_for_bn(), one, CONFIG, np.random.default_rng(0))


def test_a_last_batch_of_one_example_joins_the_one_before() -> None:
    trainer = trainer_for_bn()
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05)
    result = trainer.fit(start_for_bn(), rows(n=33), config, np.random.default_rng(0))
    assert result.num_examples == 33
    assert np.isfinite(result.metrics["train_loss"])


def test_predict_refuses_inputs_of_the_wrong_shape_or_values() -> None:
    trainer = trainer_for_bn()
    start = start_for_bn()
    with pytest.raises(TrainingError, match=r"shape \(n, 6\)"):
        trainer.predict(start, np.zeros((3, 5), np.float32))
    with pytest.raises(TrainingError, match=r"shape \(n, 6\)"):
        trainer.predict(start, np.array([["a"] * 6]))
    with pytest.raises(TrainingError, match="NaN"):
        trainer.predict(start, np.full((2, 6), np.nan, np.float32))
    with pytest.raises(TrainingError, match="NaN"):  # beyond float32: not a RuntimeWarning
        trainer.predict(start, np.full((2, 6), 1e300))


# ------------------------------------------------------------ evaluate, predict


def test_classification_evaluate_and_predict_agree() -> None:
    trainer = trainer_for_bn(eval_batch_size=7)
    data = rows()
    weights = trainer.fit(start_for_bn(), data, CONFIG, np.random.default_rng(0)).weights
    probs = trainer.predict(weights, data.x)
    assert probs.shape == (len(data), 4)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    result = trainer.evaluate(weights, data)
    assert result.accuracy == pytest.approx(float(np.mean(probs.argmax(axis=1) == data.y)))
    cross_entropy = -np.mean(np.log(probs[np.arange(len(data)), data.y]))
    assert result.loss == pytest.approx(cross_entropy, rel=1e-4)
    assert result.metrics() == {"loss": result.loss, "accuracy": result.accuracy}
    again = trainer.predict(weights, data.x)  # eval mode: dropout off, running statistics
    np.testing.assert_array_equal(probs, again)


@pytest.mark.parametrize("outputs", [1, 3])
def test_regression_evaluate_and_predict_agree(outputs: int) -> None:
    trainer = TorchTrainer(
        "zoo:mlp_regressor", task="regression", input_shape=(6,), num_outputs=outputs
    )
    weights = initial_weights(
        "zoo:mlp_regressor", task="regression", input_shape=(6,), num_outputs=outputs, seed=0
    )
    data = targets(n=50, outputs=outputs)
    prediction = trainer.predict(weights, data.x)
    assert prediction.shape == data.y.shape
    result = trainer.evaluate(weights, data)
    assert result.accuracy is None
    assert result.loss == pytest.approx(float(np.mean((prediction - data.y) ** 2)), rel=1e-5)
    assert result.extra["mse"] == result.loss
    assert result.extra["mae"] == pytest.approx(
        float(np.mean(np.abs(prediction - data.y))), rel=1e-5
    )
    assert set(result.metrics()) == {"loss", "mse", "mae"}


def test_reconstruction_scores_are_per_example_mean_squared_errors() -> None:
    trainer = TorchTrainer(
        "zoo:dense_autoencoder",
        task="reconstruction",
        input_shape=(2, 10),
        num_outputs=0,
        eval_batch_size=16,
    )
    weights = initial_weights(
        "zoo:dense_autoencoder", task="reconstruction", input_shape=(2, 10), num_outputs=0, seed=0
    )
    data = windows(n=40)
    scores = trainer.predict(weights, data.x)
    assert scores.shape == (40,)
    assert (scores >= 0).all()
    module = build_module(
        "zoo:dense_autoencoder", input_shape=(2, 10), num_outputs=0, task="reconstruction"
    )
    load_module_weights(module, weights)
    with torch.no_grad():
        recon = module(torch.from_numpy(data.x.copy())).numpy()
    np.testing.assert_allclose(scores, ((recon - data.x) ** 2).mean(axis=(1, 2)), rtol=1e-5)
    result = trainer.evaluate(weights, data)
    assert result.accuracy is None
    assert result.loss == pytest.approx(float(scores.mean()), rel=1e-5)
    assert result.extra == {"reconstruction_error": result.loss}
    assert trainer.predict(weights, np.zeros((0, 2, 10), np.float32)).shape == (0,)


def test_evaluate_uses_the_given_weights_not_the_last_fit() -> None:
    trainer = trainer_for_bn()
    start = start_for_bn()
    data = rows()
    before = trainer.evaluate(start, data)
    trainer.fit(start, data, CONFIG, np.random.default_rng(0))
    assert trainer.evaluate(start, data) == before
