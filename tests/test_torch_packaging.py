"""coordinator.delivery.torch_packaging: torch models to signed int8 artifacts, gated per task.

Three small models trained here for a few seconds: a CNN on scikit-learn's digits as
1x8x8 images (classification), an MLP on scikit-learn's diabetes (regression) and a
dense autoencoder on clean sine windows whose anomalies carry spikes (reconstruction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from sklearn.datasets import load_diabetes, load_digits

from compress.artifact import load_artifact
from compress.errors import ExportError
from compress.keys import SigningKey
from compress.metrics import roc_auc
from compress.signing import TrustedKeys
from coordinator.delivery.packaging import LabelledData, PackageResult
from coordinator.delivery.torch_packaging import METRIC_NAMES, package_torch
from coordinator.errors import AccuracyDropError, PackagingError, QualityGateError
from edge_agent.ota.health import run_health_check
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel
from edge_agent.training.model_spec import ModelTask
from tests.conftest import NOW

torch.set_num_threads(1)

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Trained:
    """A trained module with its data: calibration rows and held-out evaluation."""

    module: torch.nn.Module
    task: ModelTask
    sample_shape: tuple[int, ...]
    calibration: FloatArray
    evaluation: LabelledData


def _fit(
    module: torch.nn.Module,
    x: FloatArray,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    target: npt.NDArray[np.generic],
    epochs: int,
) -> torch.nn.Module:
    """Adam, batches of 64, a fixed seed."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(target)
    order = np.random.default_rng(0)
    module.train()
    for _ in range(epochs):
        for idx in np.array_split(order.permutation(len(x)), max(1, len(x) // 64)):
            optimizer.zero_grad()
            loss(module(xt[idx]), yt[idx]).backward()
            optimizer.step()
    module.eval()
    return module


@pytest.fixture(scope="module")
def digits_cnn() -> Trained:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
    )
    _fit(cnn, x[train], torch.nn.functional.cross_entropy, y[train], epochs=8)
    return Trained(cnn, "classification", (1, 8, 8), x[train[:256]],
                   LabelledData(x[test], y[test], "classification"))  # fmt: skip


@pytest.fixture(scope="module")
def diabetes_mlp() -> Trained:
    data = load_diabetes()
    x = data.data.astype(np.float32)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    y = ((data.target - data.target.mean()) / data.target.std()).astype(np.float32)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(pred.squeeze(1), target)

    _fit(mlp, x[:350], mse, y[:350], epochs=40)
    return Trained(mlp, "regression", (10,), x[:256], LabelledData(x[350:], y[350:], "regression"))


def _windows(n: int, anomalous: bool, rng: np.random.Generator) -> FloatArray:
    """Sine windows (2 channels, 16 steps) with noise; anomalies carry a spike."""
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    steps = np.arange(16)[None, None, :]
    x = np.sin(steps * 0.4 + phase + np.array([0.0, 1.0])[None, :, None])
    x = x + rng.normal(0, 0.05, x.shape)
    if anomalous:
        spike_at = rng.integers(0, 16, n)
        x[np.arange(n), 0, spike_at] += rng.choice([-1.5, 1.5], n)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def autoencoder() -> Trained:
    rng = np.random.default_rng(0)
    train = _windows(600, anomalous=False, rng=rng)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(32, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 32),
        torch.nn.Unflatten(1, (2, 16)),
    )
    _fit(net, train, torch.nn.functional.mse_loss, train, epochs=30)
    x_test = np.concatenate([_windows(150, False, rng), _windows(50, True, rng)])
    y_test = np.array([0] * 150 + [1] * 50, dtype=np.int64)
    return Trained(net, "reconstruction", (2, 16), train[:256],
                   LabelledData(x_test, y_test, "reconstruction"))  # fmt: skip


@pytest.fixture(params=["classification", "regression", "reconstruction"])
def trained(
    request: pytest.FixtureRequest, digits_cnn: Trained, diabetes_mlp: Trained, autoencoder: Trained
) -> Trained:
    return {"classification": digits_cnn, "regression": diabetes_mlp,
            "reconstruction": autoencoder}[request.param]  # fmt: skip


def _package(t: Trained, key: SigningKey, out: Path, **changes: object) -> PackageResult:
    kwargs: dict[str, object] = {
        "task": t.task,
        "sample_shape": t.sample_shape,
        "name": "model",
        "version": 3,
        "keys": [key],
        "out": out,
        "calibration": t.calibration,
        "evaluation": t.evaluation,
        "now": NOW,
        "metadata": {"run": "r1"},
    }
    kwargs.update(changes)
    return package_torch(t.module, **kwargs)  # type: ignore[arg-type]


def test_packaged_model_passes_its_gate(
    trained: Trained, signing_key: SigningKey, tmp_path: Path
) -> None:
    out = tmp_path / "m.fedge"
    result = _package(trained, signing_key, out)

    verified = load_artifact(out, TrustedKeys((signing_key.public_key,)), now=NOW)
    manifest = verified.manifest
    assert manifest == result.manifest
    assert manifest.quantization == "int8-static"
    assert manifest.inputs[0].shape == (None, *trained.sample_shape)
    assert result.metric_name == METRIC_NAMES[trained.task]
    assert result.fp32_metric is not None
    assert result.packaged_metric is not None
    meta = manifest.metadata
    assert meta["run"] == "r1"
    assert meta["task"] == trained.task
    assert meta["metric"] == result.metric_name
    assert float(meta["int8_metric"]) == pytest.approx(result.packaged_metric, rel=1e-5)
    assert float(meta["fp32_metric"]) == pytest.approx(result.fp32_metric, rel=1e-5)
    assert int(meta["fp32_bytes"]) == result.fp32_bytes
    # The deployed int8 model gives the packaged metric.
    runtime = OnnxRuntimeModel.from_bytes(verified.payload)
    scores = runtime.predict(trained.evaluation.x)
    if trained.task == "classification":
        assert result.fp32_metric >= 0.9  # a real CNN, not a coin
        assert 100 * (result.fp32_metric - result.packaged_metric) <= 1.0
        assert result.packaged_accuracy == result.packaged_metric
        assert float(meta["accuracy"]) == pytest.approx(result.packaged_metric, abs=1e-6)
        assert np.mean(scores.argmax(axis=1) == trained.evaluation.y) == result.packaged_metric
    elif trained.task == "regression":
        assert result.packaged_accuracy is None
        assert result.fp32_metric < 0.8  # better than predicting the mean (variance 1)
        assert result.packaged_metric <= 1.10 * result.fp32_metric
    else:
        assert result.packaged_accuracy is None
        assert result.fp32_metric >= 0.9
        assert result.fp32_metric - result.packaged_metric <= 0.02
        assert roc_auc(scores, trained.evaluation.y) == pytest.approx(result.packaged_metric)
    if trained.task != "reconstruction":
        assert result.anomaly_threshold is None
        assert "anomaly_threshold" not in meta


def test_health_check_references_are_calibration_rows(
    trained: Trained, signing_key: SigningKey, tmp_path: Path
) -> None:
    result = _package(trained, signing_key, tmp_path / "m.fedge")
    check = result.manifest.health_check
    assert check is not None
    reference = check.inputs["input"].array()
    assert reference.shape == (4, *trained.sample_shape)
    np.testing.assert_array_equal(reference, trained.calibration[:4])
    runtime = OnnxRuntimeModel.from_bytes(
        load_artifact(result.path, TrustedKeys((signing_key.public_key,)), now=NOW).payload
    )
    run_health_check(runtime, check)  # what an agent does before switching


def test_anomaly_threshold_from_normal_evaluation(
    autoencoder: Trained, signing_key: SigningKey, tmp_path: Path
) -> None:
    result = _package(autoencoder, signing_key, tmp_path / "m.fedge", threshold_quantile=0.9)
    signed = load_artifact(result.path, TrustedKeys((signing_key.public_key,)), now=NOW)
    scores = OnnxRuntimeModel.from_bytes(signed.payload).predict(autoencoder.evaluation.x)
    normal = scores[autoencoder.evaluation.y == 0]
    want = float(np.quantile(normal, 0.9))
    assert result.anomaly_threshold == pytest.approx(want, rel=1e-6)
    assert float(result.manifest.metadata["anomaly_threshold"]) == result.anomaly_threshold
    assert np.mean(normal > want) == pytest.approx(0.1, abs=0.01)
    # The spikes stand out: most anomalies score above the threshold.
    assert np.mean(scores[autoencoder.evaluation.y == 1] > want) >= 0.8


@pytest.mark.parametrize(
    ("task", "bound", "error", "match"),
    [
        ("classification", {"max_accuracy_drop": -100.0}, AccuracyDropError, "points below fp32"),
        ("regression", {"max_error_increase": -1.0}, QualityGateError, "MSE .* above fp32 MSE"),
        ("reconstruction", {"max_auc_drop": -1.0}, QualityGateError, "ROC-AUC .* below fp32"),
    ],
)
def test_gate_refuses(
    task: ModelTask,
    bound: dict[str, float],
    error: type[Exception],
    match: str,
    digits_cnn: Trained,
    diabetes_mlp: Trained,
    autoencoder: Trained,
    signing_key: SigningKey,
    tmp_path: Path,
) -> None:
    t = {"classification": digits_cnn, "regression": diabetes_mlp, "reconstruction": autoencoder}
    out = tmp_path / "m.fedge"
    with pytest.raises(error, match=match) as info:
        _package(t[task], signing_key, out, **bound)
    assert info.value.code == ("accuracy_drop" if task == "classification" else "quality_gate")
    assert not out.exists()


def test_without_evaluation_no_gate_and_no_threshold(
    autoencoder: Trained, signing_key: SigningKey, tmp_path: Path
) -> None:
    result = _package(autoencoder, signing_key, tmp_path / "m.fedge", evaluation=None,
                      max_auc_drop=-1.0)  # fmt: skip
    assert result.fp32_metric is None
    assert result.packaged_metric is None
    assert result.anomaly_threshold is None
    assert result.manifest.metadata["metric"] == "auc"
    assert "int8_metric" not in result.manifest.metadata
    assert result.manifest.health_check is not None


def _relabel(t: Trained, **changes: object) -> LabelledData:
    fields: dict[str, object] = {"x": t.evaluation.x, "y": t.evaluation.y, "task": t.task}
    fields.update(changes)
    return LabelledData(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"task": "ranking"}, "unknown task 'ranking'"),
        ({"name": "Bad Name"}, "model name"),
        ({"version": 0}, "positive integer"),
        ({"keys": []}, "signing key"),
        ({"max_auc_drop": float("nan")}, "max_auc_drop must be a finite number"),
        ({"max_error_increase": float("inf")}, "max_error_increase must be a finite"),
        ({"threshold_quantile": 0.0}, r"threshold_quantile must be in \(0, 1\]"),
        ({"threshold_quantile": 1.5}, r"threshold_quantile must be in \(0, 1\]"),
        ({"calibration": np.ones((4, 2, 15), np.float32)}, r"calibration .*\(n, 2, 16\)"),
        ({"calibration": np.ones((0, 2, 16), np.float32)}, "n >= 1"),
        ({"calibration": np.full((4, 2, 16), np.nan, np.float32)}, "finite numbers"),
    ],
    ids=[
        "task", "name", "version", "keys", "nan-bound", "inf-bound", "quantile-0", "quantile-big",
        "calibration-shape", "calibration-empty", "calibration-nan",
    ],
)  # fmt: skip
def test_bad_arguments(
    changes: dict[str, object],
    match: str,
    autoencoder: Trained,
    signing_key: SigningKey,
    tmp_path: Path,
) -> None:
    with pytest.raises(PackagingError, match=match):
        _package(autoencoder, signing_key, tmp_path / "m.fedge", **changes)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"task": "regression"}, "labelled for regression, the model does reconstruction"),
        ({"x": np.ones((200, 32), np.float32)}, r"evaluation x must be .*\(n, 2, 16\)"),
        ({"y": np.zeros(199, np.int64)}, "200 examples but 199 labels"),
        ({"y": np.zeros(200, np.int64)}, "got 200 normal of 200"),
        ({"y": np.ones(200, np.int64)}, "got 0 normal of 200"),
    ],
    ids=["task", "shape", "labels", "only-normal", "only-anomalies"],
)
def test_bad_evaluation(
    changes: dict[str, object],
    match: str,
    autoencoder: Trained,
    signing_key: SigningKey,
    tmp_path: Path,
) -> None:
    evaluation = _relabel(autoencoder, **changes)
    with pytest.raises(PackagingError, match=match):
        _package(autoencoder, signing_key, tmp_path / "m.fedge", evaluation=evaluation)


def test_regression_targets_must_fit_the_outputs(
    diabetes_mlp: Trained, signing_key: SigningKey, tmp_path: Path
) -> None:
    two_targets = np.stack([diabetes_mlp.evaluation.y, diabetes_mlp.evaluation.y], axis=1)
    evaluation = LabelledData(diabetes_mlp.evaluation.x, two_targets, "regression")
    with pytest.raises(PackagingError, match="does not fit the model's output"):
        _package(diabetes_mlp, signing_key, tmp_path / "m.fedge", evaluation=evaluation)


def test_export_errors_pass_through(
    digits_cnn: Trained, signing_key: SigningKey, tmp_path: Path
) -> None:
    """A module that does not fit its task fails in the export, not later."""
    wrong = Trained(digits_cnn.module, "reconstruction", (1, 8, 8), digits_cnn.calibration,
                    LabelledData(digits_cnn.evaluation.x, digits_cnn.evaluation.y % 2,
                                 "reconstruction"))  # fmt: skip
    with pytest.raises(ExportError, match="reconstruction of the input"):
        _package(wrong, signing_key, tmp_path / "m.fedge")


def test_expiry_and_creation(digits_cnn: Trained, signing_key: SigningKey, tmp_path: Path) -> None:
    result = _package(digits_cnn, signing_key, tmp_path / "m.fedge", evaluation=None)
    assert result.manifest.created == NOW
    assert result.manifest.expires == NOW + timedelta(days=365)


def test_reference_profile_from_calibration_with_fp32_outputs(
    trained: Trained, signing_key: SigningKey, tmp_path: Path
) -> None:
    result = _package(trained, signing_key, tmp_path / "m.fedge")
    profile = result.manifest.reference
    assert profile is not None
    assert profile.task == trained.task
    assert profile.input_shape == trained.sample_shape
    assert profile.rows == len(trained.calibration)
    signed = load_artifact(result.path, TrustedKeys((signing_key.public_key,)), now=NOW)
    assert signed.manifest.reference == profile  # signed with the manifest
    lo, hi = profile.value_range
    assert lo < float(trained.calibration.min()) <= float(trained.calibration.max()) < hi
    if trained.task == "classification":
        assert profile.classes is not None
        assert len(profile.classes) == 10
        with torch.no_grad():
            picked = trained.module(torch.from_numpy(trained.calibration)).argmax(dim=1).numpy()
        shares = np.bincount(picked, minlength=10) / len(picked)
        np.testing.assert_allclose(profile.classes, shares, atol=1e-5)  # the fp32 model's
        assert profile.confidence is not None
        assert profile.confidence.kind == "max_prob"
    elif trained.task == "regression":
        assert profile.classes is None
        assert profile.confidence is None
    else:
        assert profile.confidence is not None
        assert profile.confidence.kind == "score"
