"""What a run trains (coordinator.federated.models): model definitions, starting
weights and the coordinator's scores, for the built-in families and the parts of
PyTorch models that need no torch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from compress.errors import FamilyError
from compress.families import init_weights
from coordinator.delivery.packaging import LabelledData
from coordinator.errors import RunError
from coordinator.federated.models import (
    EVAL_METRIC_KEYS,
    HIGHER_IS_BETTER,
    PRIMARY_METRIC,
    ModelDef,
    check_eval_data,
    clamp_statistics,
    evaluate_model,
    implied_outputs,
    initial_weights,
    model_def_for,
)
from coordinator.federated.runs import RunConfig
from edge_agent.training.model_spec import TASKS

ZOO_CNN = "edge_agent.training.zoo:small_cnn"


def test_every_task_has_a_primary_metric_a_direction_and_device_metrics() -> None:
    assert set(PRIMARY_METRIC) == set(HIGHER_IS_BETTER) == set(EVAL_METRIC_KEYS) == set(TASKS)
    assert PRIMARY_METRIC == {"classification": "accuracy", "regression": "mse",
                              "reconstruction": "auc"}  # fmt: skip
    assert not HIGHER_IS_BETTER["regression"]
    assert HIGHER_IS_BETTER["classification"]
    assert HIGHER_IS_BETTER["reconstruction"]
    assert all(keys[0] == "loss" for keys in EVAL_METRIC_KEYS.values())


# --------------------------------------------------------------------------- ModelDef


def test_a_built_in_family_is_a_classifier_without_spec_or_args() -> None:
    model = ModelDef("mlp", input_shape=(64,), num_outputs=10)
    assert not model.is_torch
    assert model.task == "classification"
    assert model.model_args() == {}
    assert model.label == "mlp"


def test_a_torch_model_needs_a_spec_and_sizes() -> None:
    model = ModelDef("torch", "regression", "mypkg.models:reg", (3, 8), 2)
    assert model.is_torch
    assert model.label == "mypkg.models:reg"
    zoo = ModelDef("torch", spec=" zoo:small_cnn", input_shape=(1, 8, 8), num_outputs=10)
    assert zoo.spec == ZOO_CNN  # as devices list it
    with pytest.raises(RunError, match=r"must be module\.path:function"):
        ModelDef("torch", spec="no-colon", input_shape=(4,), num_outputs=2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"family": "tree"}, "unknown model family 'tree'; expected one of softmax, mlp, torch"),
        ({"family": "mlp", "task": "regression"}, "only does classification"),
        ({"family": "mlp", "spec": "a:b"}, "takes no model spec"),
        ({"family": "mlp", "task": "clustering"}, "unknown task 'clustering'"),
        ({"family": "mlp", "input_shape": (0,)}, "positive integers"),
        ({"family": "mlp", "num_outputs": -1}, "must not be negative"),
        ({"family": "torch", "input_shape": (4,), "num_outputs": 2}, "needs a model spec"),
        ({"family": "torch", "spec": "a:b", "num_outputs": 2}, "needs an input shape"),
        ({"family": "torch", "spec": "a:b", "input_shape": (4,)}, "and an output count"),
    ],
)
def test_model_def_refuses_what_cannot_be_trained(fields: dict[str, object], message: str) -> None:
    with pytest.raises(RunError, match=message):
        ModelDef(**fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- model_def_for


def test_model_def_for_a_family_keeps_today_s_models() -> None:
    model = model_def_for("softmax", None, (12,), 3)
    assert model == ModelDef("softmax", "classification", "", (12,), 3)
    assert model_def_for("mlp", "classification", [5], 2).family == "mlp"


def test_model_def_for_a_spec_is_torch_with_the_canonical_spec() -> None:
    model = model_def_for("zoo:small_cnn", "classification", (1, 8, 8), 10)
    assert model == ModelDef("torch", "classification", ZOO_CNN, (1, 8, 8), 10)
    regression = model_def_for(" mypkg.models:reg ", "regression", (4,), 1)
    assert (regression.spec, regression.task) == ("mypkg.models:reg", "regression")


def test_model_def_for_reconstruction_defaults_the_outputs_to_the_example_size() -> None:
    model = model_def_for("mypkg.models:ae", "reconstruction", (2, 16), 0)
    assert model.num_outputs == 32
    assert model_def_for("mypkg.models:ae", "reconstruction", (2, 16), 5).num_outputs == 5


@pytest.mark.parametrize(
    ("model", "task", "message"),
    [
        ("mlp", "regression", "only does classification"),
        ("mlp", "anomaly", "unknown task 'anomaly'"),
        ("zoo:resnet", None, "the zoo has no model 'resnet'"),
        ("my pkg:f", "regression", "must be module.path:function"),
        ("a:b:c", "regression", "must be module.path:function"),
        ("tree", None, "unknown model family 'tree'"),
    ],
)
def test_model_def_for_refuses_with_a_clear_error(
    model: str, task: str | None, message: str
) -> None:
    with pytest.raises(RunError, match=message):
        model_def_for(model, task, (4,), 2)


# --------------------------------------------------------------------------- initial_weights


def test_initial_weights_of_a_family_are_today_s_seeded_weights() -> None:
    model = ModelDef("mlp", input_shape=(6,), num_outputs=3)
    weights = initial_weights(model, seed=4, hidden=[8, 5])
    expected = init_weights("mlp", [6, 8, 5, 3], np.random.default_rng(4))
    assert list(weights) == list(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(weights[name], value)
    one_layer = initial_weights(model, seed=4, hidden=7)
    assert [w.shape for w in one_layer.values()] == [(6, 7), (7,), (7, 3), (3,)]
    softmax = initial_weights(ModelDef("softmax", input_shape=(6,), num_outputs=3), seed=0)
    assert [w.shape for w in softmax.values()] == [(6, 3), (3,)]


def test_initial_weights_need_the_sizes() -> None:
    with pytest.raises(RunError, match="input shape and output count are needed"):
        initial_weights(ModelDef("mlp"), seed=0)
    with pytest.raises(RunError, match="takes rows of features"):
        initial_weights(ModelDef("mlp", input_shape=(1, 8, 8), num_outputs=10), seed=0)


# --------------------------------------------------------------------------- evaluate_model


def _softmax_data() -> tuple[dict[str, np.ndarray], LabelledData]:
    weights = {"W0": 2.0 * np.eye(3, dtype=np.float32), "b0": np.zeros(3, np.float32)}
    x = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], np.float32)
    return weights, LabelledData(x, np.array([0, 1, 0, 2], np.int64))


def test_evaluate_model_of_a_family_gives_accuracy_and_cross_entropy() -> None:
    weights, data = _softmax_data()
    metrics = evaluate_model(ModelDef("softmax"), weights, data)
    assert set(metrics) == {"accuracy", "loss"}
    assert metrics["accuracy"] == pytest.approx(0.5)
    p_right, p_wrong = math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2)
    expected = -(2 * math.log(p_right) + 2 * math.log(p_wrong)) / 4
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)


def test_evaluate_model_refuses_labels_the_model_cannot_output() -> None:
    weights, data = _softmax_data()
    bad = LabelledData(data.x, np.array([0, 1, 3, 0], np.int64))
    with pytest.raises(RunError, match=r"labels must be in 0\.\.2"):
        evaluate_model(ModelDef("softmax"), weights, bad)
    with pytest.raises(FamilyError):
        evaluate_model(ModelDef("softmax"), weights, LabelledData(data.x[:, :2], data.y))


# --------------------------------------------------------------------------- check_eval_data


def test_check_eval_data_accepts_data_that_fits() -> None:
    _, data = _softmax_data()
    check_eval_data(ModelDef("softmax", input_shape=(3,), num_outputs=3), data)
    images = LabelledData(np.zeros((4, 1, 8, 8), np.float32), np.array([0, 1, 0, 1]))
    check_eval_data(ModelDef("torch", spec="a:b", input_shape=(1, 8, 8), num_outputs=2), images)
    flags = LabelledData(np.zeros((4, 6), np.float32), np.array([0, 0, 1, 0]),
                         task="reconstruction")  # fmt: skip
    check_eval_data(ModelDef("torch", "reconstruction", "a:b", (6,), 6), flags)
    targets = LabelledData(np.zeros((3, 2), np.float32), np.ones((3, 2), np.float32),
                           task="regression")  # fmt: skip
    check_eval_data(ModelDef("torch", "regression", "a:b", (2,), 2), targets)


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        (
            ModelDef("softmax", input_shape=(3,), num_outputs=3),
            LabelledData(np.zeros((2, 3), np.float32), np.zeros(2), task="regression"),
            "the evaluation data is for regression, the model for classification",
        ),
        (
            ModelDef("torch", spec="a:b", input_shape=(1, 8, 8), num_outputs=2),
            LabelledData(np.zeros((2, 64), np.float32), np.zeros(2, np.int64)),
            r"have shape \(64,\), a:b takes \(1, 8, 8\)",
        ),
        (
            ModelDef("softmax", input_shape=(3,), num_outputs=3),
            LabelledData(np.zeros((2, 3), np.float32), np.array([0, 3])),
            r"labels must be in 0\.\.2",
        ),
        (
            ModelDef("softmax", input_shape=(3,), num_outputs=3),
            LabelledData(np.zeros((2, 3), np.float32), np.array([0.5, 1.0])),
            "labels must be integers",
        ),
        (
            ModelDef("softmax"),
            LabelledData(np.zeros((0, 3), np.float32), np.zeros(0, np.int64)),
            "needs examples",
        ),
        (
            ModelDef("torch", "reconstruction", "a:b", (3,), 3),
            LabelledData(np.zeros((2, 3), np.float32), np.array([0, 0]), task="reconstruction"),
            "both present",
        ),
        (
            ModelDef("torch", "reconstruction", "a:b", (3,), 3),
            LabelledData(np.zeros((2, 3), np.float32), np.array([0, 2]), task="reconstruction"),
            "anomaly flags",
        ),
        (
            ModelDef("torch", "regression", "a:b", (3,), 1),
            LabelledData(np.zeros((2, 3), np.float32), np.array([0.0, np.nan]), task="regression"),
            "must be finite",
        ),
    ],
)
def test_check_eval_data_refuses_data_that_cannot_score_the_model(
    model: ModelDef, data: LabelledData, message: str
) -> None:
    with pytest.raises(RunError, match=message):
        check_eval_data(model, data)


def test_a_run_config_checks_its_evaluation_data_and_model() -> None:
    weights, data = _softmax_data()
    RunConfig(model="m", family="softmax", initial_weights=weights, eval_data=data)
    with pytest.raises(RunError, match="labels must be in"):
        RunConfig(model="m", family="softmax", initial_weights=weights, eval_data=data,
                  model_def=ModelDef("softmax", input_shape=(3,), num_outputs=2))  # fmt: skip
    with pytest.raises(RunError, match="differs from the model's"):
        RunConfig(model="m", family="mlp", initial_weights=weights,
                  model_def=ModelDef("softmax"))  # fmt: skip
    with pytest.raises(RunError, match="family 'torch' needs a model_def"):
        RunConfig(model="m", family="torch", initial_weights=weights)
    torch_model = ModelDef("torch", "regression", "a:b", (3,), 1)
    config = RunConfig(model="m", family="torch", initial_weights=weights, model_def=torch_model)
    assert config.definition is torch_model
    assert RunConfig(model="m", family="mlp", initial_weights=weights).definition == ModelDef("mlp")


def test_negative_batchnorm_variances_are_clamped_and_counted() -> None:
    weights = {
        "bn.weight": np.array([-1.0, 2.0], np.float32),  # a scale may be negative
        "bn.running_mean": np.array([-3.0, 1.0], np.float32),
        "bn.running_var": np.array([-0.5, 0.25], np.float32),
    }
    clamped, count = clamp_statistics(weights)
    assert count == 1
    assert clamped["bn.running_var"].tolist() == [0.0, 0.25]
    assert clamped["bn.weight"].tolist() == [-1.0, 2.0]
    assert clamped["bn.running_mean"].tolist() == [-3.0, 1.0]
    untouched, none = clamp_statistics({"bn.running_var": np.ones(2, np.float32)})
    assert none == 0
    assert untouched["bn.running_var"].tolist() == [1.0, 1.0]


def test_the_output_count_comes_from_the_labels_or_targets() -> None:
    assert implied_outputs("classification", np.array([0, 3, 1]), np.array([5, 0])) == 6
    assert implied_outputs("regression", np.zeros(4)) == 1
    assert implied_outputs("regression", np.zeros((4, 3))) == 3
    assert implied_outputs("reconstruction") == 0
