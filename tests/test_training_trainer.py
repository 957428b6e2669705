"""Tests for edge_agent.training.trainer: Dataset, TrainConfig and results."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import DataSourceError, TrainConfigError, TrainingError
from edge_agent.training.trainer import (
    MAX_CLASSES,
    Dataset,
    EvalResult,
    TrainConfig,
    finite_float32,
    real_array,
)


def make_dataset(n: int = 10, features: int = 3) -> Dataset:
    x = np.arange(n * features, dtype=np.float32).reshape(n, features)
    return Dataset.from_arrays(x, np.arange(n) % 3)


# --------------------------------------------------------------------------- dataset


def test_dataset_converts_dtypes_and_reports_shape() -> None:
    data = Dataset.from_arrays(np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int32), [0, 2, 1])
    assert data.x.dtype == np.float32
    assert data.y.dtype == np.int64
    assert data.x.flags.c_contiguous
    assert len(data) == 3
    assert data.num_features == 2
    assert data.num_classes == 3


def test_dataset_keeps_arrays_already_in_form() -> None:
    x = np.ones((4, 2), np.float32)
    y = np.zeros(4, np.int64)
    data = Dataset(x, y)
    assert data.x is x
    assert data.y is y


def test_dataset_accepts_whole_float_labels() -> None:
    data = Dataset.from_arrays(np.ones((2, 1)), np.array([1.0, 0.0]))
    assert data.y.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.ones(3), np.zeros(3, int), "shape"),
        (np.ones((3, 0)), np.zeros(3, int), "shape"),
        (np.ones((3, 2, 0)), np.zeros(3, int), "shape"),
        (np.array([["a", "b"]]), np.zeros(1, int), "real numbers"),
        (np.array([[1.0, np.nan]]), np.zeros(1, int), "NaN"),
        (np.array([[1.0, np.inf]]), np.zeros(1, int), "NaN"),
        (np.array([[1e300]]), np.zeros(1, int), "NaN"),
        (np.ones((3, 2)), np.zeros(2, int), "3 examples but 2 labels"),
        (np.ones((2, 2)), np.array([0, -1]), "class indices"),
        (np.ones((1, 2)), np.array([MAX_CLASSES]), "class indices"),
        (np.ones((2, 2)), np.array([0.5, 1.0]), "whole numbers"),
        (np.ones((2, 2)), np.array([0.0, np.nan]), "whole numbers"),
        (np.ones((2, 2)), np.array([True, False]), "integers"),
        (np.ones((2, 2)), np.zeros((2, 1), int), "shape"),
    ],
)
def test_dataset_rejects_bad_arrays(x: Any, y: Any, message: str) -> None:
    with pytest.raises(DataSourceError, match=message):
        Dataset.from_arrays(x, y)


def test_empty_dataset_knows_its_features() -> None:
    data = Dataset.empty(5)
    assert len(data) == 0
    assert data.num_features == 5
    assert data.num_classes == 0


def test_concatenate_in_order_and_checks_features() -> None:
    a = Dataset.from_arrays(np.zeros((2, 2)), [0, 1])
    b = Dataset.from_arrays(np.ones((1, 2)), [2])
    both = Dataset.concatenate([a, b])
    assert both.y.tolist() == [0, 1, 2]
    assert both.x[2].tolist() == [1.0, 1.0]
    assert Dataset.concatenate([a]) is a
    with pytest.raises(DataSourceError, match="different feature counts"):
        Dataset.concatenate([a, Dataset.from_arrays(np.zeros((1, 3)), [0])])
    with pytest.raises(DataSourceError):
        Dataset.concatenate([])


def test_split_is_deterministic_disjoint_and_complete() -> None:
    data = make_dataset(50)
    train, test = data.split(0.2, seed=7)
    again_train, again_test = data.split(0.2, seed=7)
    assert np.array_equal(train.x, again_train.x)
    assert np.array_equal(test.x, again_test.x)
    assert (len(train), len(test)) == (40, 10)
    # Rows are unique (row i starts with 3*i), so the split is a partition.
    train_ids = set((train.x[:, 0] // 3).astype(int).tolist())
    test_ids = set((test.x[:, 0] // 3).astype(int).tolist())
    assert train_ids.isdisjoint(test_ids)
    assert train_ids | test_ids == set(range(50))
    # Labels travel with their rows.
    assert np.array_equal(train.y, (train.x[:, 0] // 3).astype(int) % 3)
    # Each side keeps the original order.
    assert np.all(np.diff(train.x[:, 0]) > 0)


def test_split_depends_on_the_seed() -> None:
    data = make_dataset(50)
    _, test_a = data.split(0.2, seed=1)
    _, test_b = data.split(0.2, seed=2)
    assert not np.array_equal(test_a.x, test_b.x)


@pytest.mark.parametrize(
    ("n", "fraction", "sizes"),
    [(10, 0.0, (10, 0)), (2, 0.1, (1, 1)), (3, 0.9, (1, 2)), (1, 0.5, (1, 0)), (0, 0.5, (0, 0))],
)
def test_split_sizes_at_the_edges(n: int, fraction: float, sizes: tuple[int, int]) -> None:
    train, test = make_dataset(n).split(fraction, seed=0)
    assert (len(train), len(test)) == sizes
    assert train.num_features == test.num_features == 3


@pytest.mark.parametrize(("fraction", "seed"), [(1.0, 0), (-0.1, 0), (0.2, -1), (True, 0)])
def test_split_rejects_bad_arguments(fraction: Any, seed: Any) -> None:
    with pytest.raises(TrainConfigError):
        make_dataset().split(fraction, seed)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "values must be real numbers, got dtype <U3"),
        ([[1, 2], [3]], "values are not a numeric array"),
        (np.array([1 + 2j]), "values must be real numbers, got dtype complex128"),
    ],
)
def test_real_array_refuses_what_is_not_real_numbers(value: Any, message: str) -> None:
    with pytest.raises(DataSourceError, match=message):
        real_array(value, "values")


def test_real_array_keeps_the_dtype() -> None:
    raw = np.array([True, False])
    assert real_array(raw, "values") is raw


@pytest.mark.parametrize("value", [[1.0, np.nan], [np.inf], [1e300], [-1e39]])
def test_finite_float32_refuses_what_float32_cannot_hold(value: list[float]) -> None:
    with pytest.raises(DataSourceError, match="values contain NaN or infinity"):
        finite_float32(np.array(value), "values")


def test_finite_float32_copies_only_when_asked() -> None:
    raw = np.ones((2, 3), np.float32)
    assert finite_float32(raw, "values") is raw
    copied = finite_float32(raw, "values", copy=True)
    assert copied is not raw
    assert np.array_equal(copied, raw)
    assert copied.flags.c_contiguous
    converted = finite_float32(np.arange(6, dtype=np.int16).reshape(3, 2).T, "values")
    assert converted.dtype == np.float32
    assert converted.flags.c_contiguous


def test_capped_samples_reproducibly_in_data_order() -> None:
    data = make_dataset(50)
    capped = data.capped(10, np.random.default_rng(3))
    again = data.capped(10, np.random.default_rng(3))
    assert len(capped) == 10
    assert np.array_equal(capped.x, again.x)
    assert np.all(np.diff(capped.x[:, 0]) > 0)  # rows keep the data's order
    assert np.array_equal(capped.y, (capped.x[:, 0] // 3).astype(int) % 3)
    other = data.capped(10, np.random.default_rng(4))
    assert not np.array_equal(capped.x, other.x)


@pytest.mark.parametrize("cap", [None, 50, 51])
def test_capped_keeps_a_dataset_within_the_cap_and_draws_nothing(cap: int | None) -> None:
    data = make_dataset(50)
    rng = np.random.default_rng(5)
    assert data.capped(cap, rng) is data
    assert rng.integers(1 << 30) == np.random.default_rng(5).integers(1 << 30)


# --------------------------------------------------------------------------- config


def test_config_defaults() -> None:
    config = TrainConfig.from_mapping({})
    assert config == TrainConfig()
    assert config.epochs == 1
    assert config.batch_size == 32
    assert config.lr == 0.1
    assert config.optimizer == "sgd"
    assert config.momentum == 0.9
    assert config.weight_decay == 0.0
    assert config.proximal_mu == 0.0
    assert config.seed == 0
    assert config.server_round == 0
    assert config.max_examples is None


def test_config_from_a_flower_style_mapping() -> None:
    config = TrainConfig.from_mapping(
        {
            "local-epochs": 3,
            "batch-size": 16,
            "learning-rate": 0.01,
            "optimizer": "ADAM",
            "momentum": 0,
            "weight_decay": 0.001,
            "proximal-mu": 2,
            "seed": 42,
            "server-round": 5,
            "max-examples": 100,
        }
    )
    assert config == TrainConfig(
        epochs=3,
        batch_size=16,
        lr=0.01,
        optimizer="adam",
        momentum=0.0,
        weight_decay=0.001,
        proximal_mu=2.0,
        seed=42,
        server_round=5,
        max_examples=100,
    )
    assert isinstance(config.proximal_mu, float)
    assert isinstance(config.momentum, float)


def test_config_round_trips_through_a_mapping() -> None:
    config = TrainConfig(epochs=2, optimizer="adam", lr=0.005, max_examples=7, server_round=3)
    assert TrainConfig.from_mapping(config.to_mapping()) == config
    assert TrainConfig.from_mapping(TrainConfig().to_mapping()) == TrainConfig()
    assert TrainConfig().to_mapping()["max_examples"] == 0


def test_config_max_examples_zero_means_no_cap() -> None:
    assert TrainConfig.from_mapping({"max_examples": 0}).max_examples is None


def test_config_ignores_unknown_keys_with_a_debug_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="edge_agent.training.trainer"):
        config = TrainConfig.from_mapping({"epochs": 2, "dropout": 0.5, "codec": "int8"})
    assert config.epochs == 2
    assert "'dropout'" in caplog.text
    assert "'codec'" in caplog.text


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epochs", 0),
        ("epochs", 1001),
        ("epochs", True),
        ("epochs", 1.5),
        ("epochs", "2"),
        ("batch_size", 0),
        ("batch_size", 2**21),
        ("lr", 0),
        ("lr", -0.1),
        ("lr", math.nan),
        ("lr", math.inf),
        ("lr", 1000.0),
        ("lr", "0.1"),
        ("lr", False),
        ("optimizer", "rmsprop"),
        ("optimizer", 3),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("weight_decay", -1e-3),
        ("weight_decay", 2.0),
        ("proximal_mu", -0.1),
        ("proximal_mu", math.nan),
        ("seed", -1),
        ("seed", 0.5),
        ("server_round", -2),
        ("max_examples", -1),
        ("max_examples", 2.0),
    ],
)
def test_config_rejects_bad_values_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(TrainConfigError, match=key) as caught:
        TrainConfig.from_mapping({key: value})
    assert caught.value.code == "bad_train_config"
    assert isinstance(caught.value, TrainingError)


def test_config_refuses_one_setting_given_twice_differently() -> None:
    with pytest.raises(TrainConfigError, match="both set"):
        TrainConfig.from_mapping({"batch_size": 8, "batch-size": 16})
    assert TrainConfig.from_mapping({"round": 4, "server-round": 4}).server_round == 4


def test_direct_construction_validates_too() -> None:
    with pytest.raises(TrainConfigError, match="epochs"):
        TrainConfig(epochs=0)


def test_rng_is_reproducible_and_varies_with_round_seed_and_salt() -> None:
    def draw(config: TrainConfig, *salt: int | str) -> list[float]:
        return [float(v) for v in config.rng(*salt).random(4)]

    base = TrainConfig(seed=3, server_round=1)
    assert draw(base) == draw(TrainConfig(seed=3, server_round=1))
    assert draw(base, "round-a") == draw(base, "round-a")
    others = [
        draw(TrainConfig(seed=3, server_round=2)),
        draw(TrainConfig(seed=4, server_round=1)),
        draw(base, "round-a"),
        draw(base, "round-b"),
        draw(base, 5),
        draw(base, -5),
    ]
    everything = [draw(base), *others]
    assert len({tuple(d) for d in everything}) == len(everything)


def test_eval_result_metrics() -> None:
    assert EvalResult(loss=0.5, accuracy=0.75, num_examples=4).metrics() == {
        "loss": 0.5,
        "accuracy": 0.75,
    }


def test_dataset_holds_examples_of_any_shape() -> None:
    images = Dataset.from_arrays(np.ones((4, 1, 8, 8)), [0, 1, 2, 1])
    assert images.sample_shape == (1, 8, 8)
    assert images.num_features == 64
    assert images.num_classes == 3
    train, test = images.split(0.25, seed=1)
    assert (len(train), len(test)) == (3, 1)
    assert train.sample_shape == (1, 8, 8)


def test_regression_dataset_keeps_float_targets() -> None:
    data = Dataset.from_arrays(np.ones((3, 2)), [0.5, 1.0, 151.0], task="regression")
    assert data.y.dtype == np.float32
    assert data.y.tolist() == [0.5, 1.0, 151.0]
    assert data.num_classes == 0
    with pytest.raises(DataSourceError, match="no class labels"):
        _ = data.labels
    with pytest.raises(DataSourceError, match="targets"):
        Dataset.from_arrays(np.ones((2, 2)), [0.0, np.nan], task="regression")


def test_reconstruction_dataset_needs_no_targets() -> None:
    data = Dataset.from_arrays(np.ones((5, 3, 16)), None, task="reconstruction")
    assert len(data) == 5
    assert data.y.shape == (5, 0)
    both = Dataset.concatenate([data, data.take(np.array([0, 1]))])
    assert len(both) == 7
    assert both.task == "reconstruction"
    with pytest.raises(DataSourceError, match="needs y"):
        Dataset.from_arrays(np.ones((2, 2)), None, task="regression")


def test_datasets_of_different_tasks_or_shapes_do_not_concatenate() -> None:
    rows = Dataset.from_arrays(np.ones((2, 4)), [0, 1])
    images = Dataset.from_arrays(np.ones((2, 1, 2, 2)), [0, 1])
    with pytest.raises(DataSourceError, match="example shapes"):
        Dataset.concatenate([rows, images])
    targets = Dataset.from_arrays(np.ones((2, 4)), [0.5, 1.0], task="regression")
    with pytest.raises(DataSourceError, match="different tasks"):
        Dataset.concatenate([rows, targets])
