"""SimModel: what fedge simulate trains, fitted to the fleet's data (no broker)."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.errors import RunError
from coordinator.sim.fleet_data import fleet_data
from coordinator.sim.sim_model import CALIBRATION_ROWS, SimModel
from edge_agent.errors import UnknownModelError
from edge_agent.training.trainer import TrainConfig


def test_a_built_in_family_trains_on_flattened_images() -> None:
    data = fleet_data("digits-images", "iid", 3, 0)
    sim = SimModel.choose("mlp", None, data, hidden=16)
    assert not sim.model.is_torch
    assert sim.model.input_shape == (64,)
    assert sim.model.num_outputs == 10
    assert sim.rows(data.x).shape == (len(data.x), 64)
    assert sim.test.x.shape[1:] == (64,)
    assert sim.train_set().sample_shape == (64,)


def test_a_torch_model_keeps_the_example_shape() -> None:
    data = fleet_data("digits-images", "iid", 3, 0)
    sim = SimModel.choose("zoo:small_cnn", None, data, hidden=16)
    assert sim.model.is_torch
    assert sim.model.spec == "edge_agent.training.zoo:small_cnn"
    assert sim.model.input_shape == (1, 8, 8)
    assert sim.test.x.shape[1:] == (1, 8, 8)
    weights = sim.initial_weights(0)
    assert any(w.ndim == 4 for w in weights.values())  # conv kernels travel as N-D arrays
    again = sim.initial_weights(0)
    assert all(np.array_equal(weights[k], again[k]) for k in weights)


def test_the_task_comes_from_the_data_and_must_fit_it() -> None:
    diabetes = fleet_data("diabetes", "iid", 3, 0)
    regressor = SimModel.choose("zoo:mlp_regressor", None, diabetes, hidden=16)
    assert regressor.model.task == "regression"
    assert regressor.model.num_outputs == 1
    with pytest.raises(RunError, match="built-in mlp classifies"):
        SimModel.choose("mlp", None, diabetes, hidden=16)
    with pytest.raises(RunError, match="does not fit the dataset"):
        SimModel.choose("zoo:mlp_regressor", "classification", diabetes, hidden=16)


def test_an_unknown_factory_is_refused() -> None:
    data = fleet_data("digits-images", "iid", 3, 0)
    with pytest.raises(UnknownModelError, match="no_such_module_here"):
        SimModel.choose("no_such_module_here:cnn", None, data, hidden=16)
    with pytest.raises(RunError, match="is a reconstruction model"):
        SimModel.choose("zoo:dense_autoencoder", None, data, hidden=16)


def test_calibration_is_a_seeded_sample_of_the_training_data() -> None:
    data = fleet_data("digits-images", "iid", 3, 0)
    sim = SimModel.choose("zoo:small_cnn", None, data, hidden=16)
    first, again, other = sim.calibration(1), sim.calibration(1), sim.calibration(2)
    assert first.shape == (CALIBRATION_ROWS, 1, 8, 8)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_the_centralized_baseline_reports_the_task_metrics() -> None:
    data = fleet_data("ucr-anomaly", "iid", 2, 0)
    sim = SimModel.choose("zoo:dense_autoencoder", None, data, hidden=16)
    assert sim.model.task == "reconstruction"
    metrics = sim.centralized(
        sim.initial_weights(0), TrainConfig(epochs=2, lr=0.005, optimizer="adam", batch_size=16)
    )
    assert set(metrics) == {"auc", "loss"}
    assert 0.0 <= metrics["auc"] <= 1.0
