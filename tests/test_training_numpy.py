"""Tests for edge_agent.training.numpy_trainers: the built-in dense trainers and registry."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np
import pytest

from compress.families import forward, init_weights
from edge_agent.errors import DataSourceError, NoDataError, TrainingError
from edge_agent.training import numpy_trainers
from edge_agent.training.numpy_trainers import (
    DenseTrainer,
    MlpTrainer,
    SoftmaxTrainer,
    register_trainer,
    registered_families,
    trainer_for,
    unregister_trainer,
)
from edge_agent.training.trainer import (
    Dataset,
    EvalResult,
    FitResult,
    FloatArray,
    TrainConfig,
    Trainer,
)

SIZES = {"softmax": [4, 3], "mlp": [4, 16, 3]}


def blobs(n: int, seed: int) -> Dataset:
    """Three well separated Gaussian blobs in 4-D (a linearly separable problem)."""
    rng = np.random.default_rng(seed)
    centers = np.array([[3, 0, 0, 1], [0, 3, 0, -1], [0, 0, 3, 0]], dtype=np.float32)
    y = rng.integers(0, 3, n)
    x = centers[y] + rng.normal(0, 0.6, (n, 4)).astype(np.float32)
    return Dataset.from_arrays(x, y)


TRAIN = blobs(600, seed=1)
TEST = blobs(300, seed=2)


def start_weights(family: str, seed: int = 0) -> dict[str, FloatArray]:
    return init_weights(family, SIZES[family], np.random.default_rng(seed))


def fit(
    family: str, weights: Mapping[str, FloatArray] | None = None, seed: int = 0, **settings: object
) -> FitResult:
    config = TrainConfig.from_mapping({"epochs": 3, **settings})  # type: ignore[dict-item]
    return trainer_for(family).fit(
        weights if weights is not None else start_weights(family),
        TRAIN,
        config,
        np.random.default_rng(seed),
    )


def distance(a: Mapping[str, FloatArray], b: Mapping[str, FloatArray]) -> float:
    return math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a))


# ------------------------------------------------------------------------ learning


@pytest.mark.parametrize("family", ["softmax", "mlp"])
@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.1), ("adam", 0.05)])
def test_fit_reduces_loss_and_learns(family: str, optimizer: str, lr: float) -> None:
    trainer = trainer_for(family)
    weights = start_weights(family)
    before = trainer.evaluate(weights, TEST)
    result = fit(family, weights, optimizer=optimizer, lr=lr)
    after = trainer.evaluate(result.weights, TEST)
    assert after.loss < before.loss / 3
    assert after.accuracy >= 0.95
    assert before.accuracy < 0.9
    assert result.num_examples == len(TRAIN)
    assert set(result.metrics) == {"train_loss", "train_accuracy"}
    assert result.metrics["train_accuracy"] >= 0.9
    assert 0 < result.metrics["train_loss"] < before.loss


@pytest.mark.parametrize("family", ["softmax", "mlp"])
def test_fit_keeps_names_shapes_and_does_not_touch_its_input(family: str) -> None:
    weights = start_weights(family)
    snapshot = {k: v.copy() for k, v in weights.items()}
    result = fit(family, weights)
    assert set(result.weights) == set(weights)
    for name, array in result.weights.items():
        assert array.dtype == np.float32
        assert array.shape == weights[name].shape
        assert not np.shares_memory(array, weights[name])
        assert np.array_equal(weights[name], snapshot[name])
    assert distance(result.weights, weights) > 0.1


def test_more_epochs_fit_better() -> None:
    one = fit("softmax", epochs=1, lr=0.01, momentum=0.0)
    many = fit("softmax", epochs=10, lr=0.01, momentum=0.0)
    trainer = SoftmaxTrainer()
    assert trainer.evaluate(many.weights, TEST).loss < trainer.evaluate(one.weights, TEST).loss


def test_mlp_learns_digits() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    data = Dataset.from_arrays(x / 16.0, y)
    train, test = data.split(0.25, seed=0)
    weights = init_weights("mlp", [64, 32, 10], np.random.default_rng(0))
    config = TrainConfig(epochs=5, lr=0.1, batch_size=32)
    trainer = MlpTrainer()
    result = trainer.fit(weights, train, config, config.rng())
    assert trainer.evaluate(weights, test).accuracy < 0.3
    assert trainer.evaluate(result.weights, test).accuracy >= 0.9


# ------------------------------------------------------------------- the gradient


def reference_loss(weights: Mapping[str, np.ndarray], data: Dataset) -> float:
    """Mean cross-entropy of the dense model, computed independently in float64."""
    h = data.x.astype(np.float64)
    n_layers = len(weights) // 2
    for i in range(n_layers):
        h = h @ weights[f"W{i}"].astype(np.float64) + weights[f"b{i}"]
        if i < n_layers - 1:
            h = np.maximum(h, 0.0)
    h = h - h.max(axis=1, keepdims=True)
    log_probs = h - np.log(np.exp(h).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(data)), data.y].mean())


def numeric_gradient(weights: dict[str, FloatArray], data: Dataset) -> dict[str, np.ndarray]:
    """Central finite differences of :func:`reference_loss`."""
    base = {k: v.astype(np.float64) for k, v in weights.items()}
    grads: dict[str, np.ndarray] = {}
    eps = 1e-6
    for name, array in base.items():
        grad = np.zeros(array.shape)
        for index in np.ndindex(array.shape):
            plus = {k: v.copy() for k, v in base.items()}
            minus = {k: v.copy() for k, v in base.items()}
            plus[name][index] += eps
            minus[name][index] -= eps
            grad[index] = (reference_loss(plus, data) - reference_loss(minus, data)) / (2 * eps)
        grads[name] = grad
    return grads


def one_step(
    family: str, weights: dict[str, FloatArray], data: Dataset, **settings: object
) -> dict[str, FloatArray]:
    config = TrainConfig.from_mapping(
        {"epochs": 1, "batch_size": len(data), "momentum": 0.0, **settings}  # type: ignore[dict-item]
    )
    return trainer_for(family).fit(weights, data, config, np.random.default_rng(0)).weights


@pytest.mark.parametrize("family", ["softmax", "mlp"])
def test_one_sgd_step_follows_the_cross_entropy_gradient(family: str) -> None:
    data = Dataset.from_arrays(TRAIN.x[:20].astype(np.float64) / 3, TRAIN.y[:20])
    weights = start_weights(family, seed=3)
    lr = 1e-3
    stepped = one_step(family, weights, data, lr=lr)
    expected = numeric_gradient(weights, data)
    for name in weights:
        analytic = (weights[name].astype(np.float64) - stepped[name]) / lr
        assert np.allclose(analytic, expected[name], atol=5e-4, rtol=1e-2), name


@pytest.mark.parametrize("family", ["softmax", "mlp"])
def test_first_adam_step_moves_each_weight_by_lr_against_the_gradient(family: str) -> None:
    # With bias correction, Adam's first step is lr * g / |g| (up to epsilon).
    weights = start_weights(family, seed=3)
    lr = 1e-3
    gradient = numeric_gradient(weights, TRAIN)
    stepped = one_step(family, weights, TRAIN, lr=lr, optimizer="adam")
    for name in weights:
        moved = stepped[name].astype(np.float64) - weights[name]
        clear = np.abs(gradient[name]) > 1e-4  # ReLU-dead units have no gradient
        assert clear.mean() > 0.5, name
        assert np.allclose(moved[clear], -lr * np.sign(gradient[name][clear]), rtol=2e-2), name


def test_weight_decay_shrinks_weight_matrices_not_biases() -> None:
    weights = start_weights("mlp", seed=3)
    weights["b0"] = np.full_like(weights["b0"], 0.5)
    lr, decay = 1e-2, 0.5
    plain = one_step("mlp", weights, TRAIN, lr=lr)
    decayed = one_step("mlp", weights, TRAIN, lr=lr, weight_decay=decay)
    for name in weights:
        expected = lr * decay * weights[name] if name.startswith("W") else 0 * weights[name]
        assert np.allclose(plain[name] - decayed[name], expected, atol=1e-6), name


def test_proximal_term_pulls_towards_the_global_weights() -> None:
    # Two full-batch steps: the second sees mu * (w1 - w_global) on top of the data
    # gradient, which is the same with and without the proximal term.
    weights = start_weights("softmax", seed=3)
    lr, mu = 1e-2, 3.0
    first = one_step("softmax", weights, TRAIN, lr=lr)
    plain = one_step("softmax", weights, TRAIN, lr=lr, epochs=2)
    prox = one_step("softmax", weights, TRAIN, lr=lr, epochs=2, proximal_mu=mu)
    for name in weights:
        expected = -lr * mu * (first[name] - weights[name])
        assert np.allclose(prox[name] - plain[name], expected, atol=1e-6), name


@pytest.mark.parametrize("family", ["softmax", "mlp"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fedprox_with_large_mu_stays_near_the_global_weights(family: str, optimizer: str) -> None:
    weights = start_weights(family)
    lr = 0.1 if optimizer == "sgd" else 0.01
    free = fit(family, weights, optimizer=optimizer, lr=lr, epochs=5)
    held = fit(family, weights, optimizer=optimizer, lr=lr, epochs=5, proximal_mu=5.0)
    assert distance(held.weights, weights) < 0.5 * distance(free.weights, weights)


# ------------------------------------------------------------------ reproducibility


@pytest.mark.parametrize("family", ["softmax", "mlp"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_same_seed_same_weights_different_seed_different(family: str, optimizer: str) -> None:
    a = fit(family, seed=11, optimizer=optimizer)
    b = fit(family, seed=11, optimizer=optimizer)
    c = fit(family, seed=12, optimizer=optimizer)
    for name in a.weights:
        assert np.array_equal(a.weights[name], b.weights[name])
    assert a.metrics == b.metrics
    assert any(not np.array_equal(a.weights[k], c.weights[k]) for k in a.weights)


def test_config_rng_differs_between_rounds() -> None:
    weights = start_weights("softmax")
    trainer = SoftmaxTrainer()
    results = []
    for server_round in (1, 1, 2):
        config = TrainConfig(seed=5, server_round=server_round)
        results.append(trainer.fit(weights, TRAIN, config, config.rng()).weights["W0"])
    assert np.array_equal(results[0], results[1])
    assert not np.array_equal(results[0], results[2])


def test_max_examples_caps_and_samples_reproducibly() -> None:
    a = fit("softmax", seed=4, max_examples=50)
    b = fit("softmax", seed=4, max_examples=50)
    c = fit("softmax", seed=5, max_examples=50)
    assert a.num_examples == 50
    assert np.array_equal(a.weights["W0"], b.weights["W0"])
    assert not np.array_equal(a.weights["W0"], c.weights["W0"])
    assert fit("softmax", max_examples=10_000).num_examples == len(TRAIN)


# ------------------------------------------------------------------------ evaluate


def test_evaluate_on_a_hand_made_case() -> None:
    weights = {"W0": np.eye(2, dtype=np.float32) * 4, "b0": np.zeros(2, np.float32)}
    x = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    data = Dataset.from_arrays(x, [0, 1, 1, 1])
    result = SoftmaxTrainer().evaluate(weights, data)
    right = math.log1p(math.exp(-4))  # -log softmax of the true class, logits (4, 0)
    wrong = math.log1p(math.exp(4))
    assert result.loss == pytest.approx((3 * right + wrong) / 4, rel=1e-5)
    assert result.accuracy == 0.75
    assert result.num_examples == 4


def test_evaluate_loss_is_stable_for_extreme_logits() -> None:
    weights = {"W0": np.array([[1e4, -1e4]], np.float32), "b0": np.zeros(2, np.float32)}
    data = Dataset.from_arrays([[1.0], [1.0]], [0, 1])
    result = SoftmaxTrainer().evaluate(weights, data)
    assert result.loss == pytest.approx(1e4, rel=1e-5)  # (0 + 2e4) / 2
    assert result.accuracy == 0.5


@pytest.mark.parametrize("family", ["softmax", "mlp"])
def test_predictions_match_compress_forward(family: str) -> None:
    weights = fit(family).weights
    trainer = DenseTrainer(family, eval_batch_size=7)
    probs = trainer.predict_proba(weights, TEST.x)
    assert np.allclose(probs, forward(family, weights, TEST.x), atol=1e-6)
    accuracy = float(np.mean(forward(family, weights, TEST.x).argmax(axis=1) == TEST.y))
    assert trainer.evaluate(weights, TEST).accuracy == pytest.approx(accuracy)
    with pytest.raises(TrainingError, match="shape"):
        trainer.predict_proba(weights, TEST.x[:, :3])


def test_evaluate_in_chunks_equals_one_pass() -> None:
    weights = fit("mlp").weights
    small = DenseTrainer("mlp", eval_batch_size=16).evaluate(weights, TEST)
    whole = DenseTrainer("mlp", eval_batch_size=10_000).evaluate(weights, TEST)
    assert small.accuracy == whole.accuracy
    assert small.loss == pytest.approx(whole.loss, rel=1e-6)
    assert small.num_examples == len(TEST)


# ---------------------------------------------------------------------- validation


def test_refuses_data_with_the_wrong_feature_count() -> None:
    data = Dataset.from_arrays(np.ones((5, 3)), np.zeros(5, int))
    trainer = SoftmaxTrainer()
    with pytest.raises(DataSourceError, match="3 features but the model expects 4"):
        trainer.fit(start_weights("softmax"), data, TrainConfig(), np.random.default_rng())
    with pytest.raises(DataSourceError, match="expects 4"):
        trainer.evaluate(start_weights("softmax"), data)


def test_refuses_labels_the_model_does_not_have() -> None:
    data = Dataset.from_arrays(np.ones((2, 4)), [0, 3])
    with pytest.raises(DataSourceError, match=r"label 3 is out of range .* 3 classes"):
        MlpTrainer().fit(start_weights("mlp"), data, TrainConfig(), np.random.default_rng())
    with pytest.raises(DataSourceError, match="out of range"):
        MlpTrainer().evaluate(start_weights("mlp"), data)


@pytest.mark.parametrize("family", ["softmax", "mlp"])
@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            Dataset.from_arrays(np.ones((6, 4)), np.linspace(0, 1, 6), "regression"),
            "classification only, not regression",
            id="regression",
        ),
        pytest.param(
            Dataset.from_arrays(np.ones((6, 4)), None, "reconstruction"),
            "classification only, not reconstruction",
            id="reconstruction",
        ),
        pytest.param(  # 2x2 images: as many values as the model's 4 features
            Dataset.from_arrays(np.ones((6, 1, 2, 2)), [0, 1, 2, 0, 1, 2]),
            r"rows of features.*shape \(1, 2, 2\)",
            id="images",
        ),
        pytest.param(
            Dataset.from_arrays(np.ones((6, 2, 2)), [0, 1, 2, 0, 1, 2]),
            r"shape \(2, 2\): flatten them",
            id="windows",
        ),
    ],
)
def test_refuses_other_tasks_and_examples_that_are_not_rows(
    family: str, data: Dataset, message: str
) -> None:
    trainer = trainer_for(family)
    weights = start_weights(family)
    for run in (
        lambda: trainer.fit(weights, data, TrainConfig(), np.random.default_rng(0)),
        lambda: trainer.evaluate(weights, data),
    ):
        with pytest.raises(TrainingError, match=message) as caught:
            run()
        assert type(caught.value) is TrainingError  # not a data problem: the wrong trainer


def test_refuses_empty_data() -> None:
    with pytest.raises(NoDataError):
        SoftmaxTrainer().fit(
            start_weights("softmax"), Dataset.empty(4), TrainConfig(), np.random.default_rng()
        )
    with pytest.raises(NoDataError):
        SoftmaxTrainer().evaluate(start_weights("softmax"), Dataset.empty(4))


def test_refuses_something_that_is_not_a_dataset() -> None:
    with pytest.raises(TrainingError, match="Dataset"):
        SoftmaxTrainer().evaluate(start_weights("softmax"), (TRAIN.x, TRAIN.y))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("family", "weights", "message"),
    [
        ("softmax", {"W0": np.ones((4, 3), np.float32)}, "W0, b0"),
        ("softmax", start_weights("mlp"), "exactly one layer"),
        ("mlp", start_weights("softmax"), "at least two"),
        ("softmax", {"W0": np.ones((4, 3)), "b0": np.ones(2)}, "expected W0"),
        ("softmax", {"W0": np.full((4, 3), np.nan), "b0": np.ones(3)}, "NaN"),
    ],
)
def test_refuses_unusable_weights(
    family: str, weights: dict[str, FloatArray], message: str
) -> None:
    trainer = trainer_for(family)
    with pytest.raises(TrainingError, match=message):
        trainer.fit(weights, TRAIN, TrainConfig(), np.random.default_rng())
    with pytest.raises(TrainingError, match=message):
        trainer.evaluate(weights, TRAIN)


def test_divergence_is_an_error_not_nan_weights() -> None:
    huge = Dataset.from_arrays(TRAIN.x * 1e18, TRAIN.y)
    config = TrainConfig(lr=50.0, epochs=2)
    with pytest.raises(TrainingError, match="diverged"):
        MlpTrainer().fit(start_weights("mlp"), huge, config, np.random.default_rng(0))


def test_dense_trainer_needs_a_built_in_family() -> None:
    with pytest.raises(TrainingError, match="unknown model family"):
        DenseTrainer("cnn")
    with pytest.raises(TrainingError, match="eval_batch_size"):
        DenseTrainer("mlp", eval_batch_size=0)
    assert DenseTrainer("mlp").family == "mlp"
    assert SoftmaxTrainer().family == "softmax"


# ------------------------------------------------------------------------ registry


@pytest.fixture
def clean_registry() -> Iterator[None]:
    before = registered_families()
    yield
    for family in registered_families():
        unregister_trainer(family)
    assert registered_families() == before


class ConstantTrainer:
    """A custom trainer that returns its input and a fixed evaluation."""

    def fit(
        self,
        weights: Mapping[str, FloatArray],
        data: Dataset,
        config: TrainConfig,
        rng: np.random.Generator,
    ) -> FitResult:
        return FitResult(weights=dict(weights), num_examples=len(data), metrics={})

    def evaluate(self, weights: Mapping[str, FloatArray], data: Dataset) -> EvalResult:
        return EvalResult(loss=1.0, accuracy=0.5, num_examples=len(data))


def test_built_in_trainers_are_registered() -> None:
    assert isinstance(trainer_for("softmax"), SoftmaxTrainer)
    assert isinstance(trainer_for("mlp"), MlpTrainer)
    assert trainer_for("mlp") is not trainer_for("mlp")
    assert isinstance(trainer_for("mlp"), Trainer)
    assert {"softmax", "mlp"} <= set(registered_families())


def test_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(TrainingError, match=r"no trainer for model family 'cnn'.*mlp, softmax"):
        trainer_for("cnn")


@pytest.mark.usefixtures("clean_registry")
def test_register_a_custom_trainer() -> None:
    register_trainer("constant", ConstantTrainer)
    assert "constant" in registered_families()
    trainer = trainer_for("constant")
    assert isinstance(trainer, ConstantTrainer)
    assert trainer.evaluate({}, TRAIN).accuracy == 0.5
    with pytest.raises(TrainingError, match="already has a trainer"):
        register_trainer("constant", ConstantTrainer)
    unregister_trainer("constant")
    with pytest.raises(TrainingError):
        trainer_for("constant")


@pytest.mark.usefixtures("clean_registry")
def test_replace_a_built_in_and_restore_it() -> None:
    with pytest.raises(TrainingError, match="replace=True"):
        register_trainer("mlp", ConstantTrainer)
    register_trainer("mlp", ConstantTrainer, replace=True)
    assert isinstance(trainer_for("mlp"), ConstantTrainer)
    unregister_trainer("mlp")
    assert isinstance(trainer_for("mlp"), MlpTrainer)


@pytest.mark.usefixtures("clean_registry")
def test_bad_registrations_and_factories() -> None:
    with pytest.raises(TrainingError, match="invalid family name"):
        register_trainer("bad name/..", ConstantTrainer)
    with pytest.raises(TrainingError, match="not callable"):
        register_trainer("x", 42)  # type: ignore[arg-type]
    register_trainer("not-a-trainer", object)  # type: ignore[arg-type]
    with pytest.raises(TrainingError, match="no fit/evaluate"):
        trainer_for("not-a-trainer")

    def broken() -> Trainer:
        raise RuntimeError("no GPU")

    register_trainer("broken", broken)
    with pytest.raises(TrainingError, match="no GPU"):
        trainer_for("broken")


def test_registry_module_state_is_not_shared_with_builtins() -> None:
    # unregister_trainer on an unknown family is a no-op; built-ins cannot be removed.
    unregister_trainer("never-registered")
    unregister_trainer("softmax")
    assert isinstance(trainer_for("softmax"), SoftmaxTrainer)
    assert numpy_trainers.DEFAULT_EVAL_BATCH_SIZE >= 1
