"""coordinator.delivery.packaging: limits and bad inputs the CLI tests do not reach."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from compress.artifact import read_artifact_unverified
from compress.errors import FamilyError
from compress.families import dense_layers, init_weights
from compress.keys import SigningKey
from compress.manifest import MAX_MANIFEST_BYTES
from compress.onnx_export import export_onnx
from coordinator.delivery.packaging import (
    LabelledData,
    PackageRequest,
    load_labelled_npz,
    package_model,
)
from coordinator.errors import PackagingError
from edge_agent.training.model_spec import ModelTask
from tests.conftest import NOW


def _request(tmp_path: Path, key: SigningKey, features: int, **changes: object) -> PackageRequest:
    weights = init_weights("softmax", [features, 3], np.random.default_rng(0))
    model = tmp_path / "m.onnx"
    model.write_bytes(export_onnx("softmax", weights))
    fields: dict[str, object] = {
        "model_path": model,
        "name": "wide",
        "version": 1,
        "keys": [key],
        "out": tmp_path / "m.fedge",
        "quantize": "none",
    }
    fields.update(changes)
    return PackageRequest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("features", "rows"), [(16, 4), (700, 3), (1500, 1)])
def test_health_check_shrinks_to_fit_the_manifest_limit(
    tmp_path: Path, signing_key: SigningKey, features: int, rows: int
) -> None:
    result = package_model(_request(tmp_path, signing_key, features), now=NOW)
    check = result.manifest.health_check
    assert check is not None
    assert check.inputs["input"].shape == (rows, features)
    assert len(result.manifest.to_bytes()) <= MAX_MANIFEST_BYTES


def test_too_wide_for_any_health_check(
    tmp_path: Path, signing_key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="coordinator.delivery.packaging"):
        result = package_model(_request(tmp_path, signing_key, 6000), now=NOW)
    assert result.manifest.health_check is None
    assert "without a health check" in caplog.text
    signed, _ = read_artifact_unverified(result.path)
    assert signed.manifest == result.manifest


def test_absurd_expiry_is_a_packaging_error(tmp_path: Path, signing_key: SigningKey) -> None:
    request = _request(tmp_path, signing_key, 4, expires_in=timedelta(days=3_000_000))
    with pytest.raises(PackagingError, match="year 9999"):
        package_model(request, now=NOW)


def test_nan_accuracy_bound_is_refused(tmp_path: Path, signing_key: SigningKey) -> None:
    request = _request(tmp_path, signing_key, 4, max_accuracy_drop=float("nan"))
    with pytest.raises(PackagingError, match="finite"):
        package_model(request, now=NOW)


def test_evaluation_data_must_be_finite(tmp_path: Path) -> None:
    x = np.ones((3, 4), dtype=np.float32)
    x[1, 2] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(3, dtype=np.int64))
    with pytest.raises(PackagingError, match="NaN"):
        load_labelled_npz(tmp_path / "d.npz")


def test_complex_weights_are_refused() -> None:
    weights = {"W0": np.ones((2, 2), dtype=np.complex64), "b0": np.zeros(2)}
    with pytest.raises(FamilyError, match="real numbers"):
        dense_layers("softmax", weights)


def test_package_model_reports_accuracy_as_its_metric(
    tmp_path: Path, signing_key: SigningKey
) -> None:
    x = np.random.default_rng(0).random((20, 4), dtype=np.float32)
    evaluation = LabelledData(x, np.zeros(20, np.int64))
    result = package_model(_request(tmp_path, signing_key, 4, evaluation=evaluation), now=NOW)
    assert result.metric_name == "accuracy"
    assert result.fp32_metric == result.fp32_accuracy
    assert result.packaged_metric == result.packaged_accuracy
    assert result.packaged_accuracy is not None
    # The health check's references are the evaluation rows.
    check = result.manifest.health_check
    assert check is not None
    np.testing.assert_array_equal(check.inputs["input"].array(), x[:4])
    # The reference profile is computed from the evaluation rows.
    profile = result.manifest.reference
    assert profile is not None
    assert profile.task == "classification"
    assert profile.rows == 20
    assert profile.classes is not None
    assert len(profile.classes) == 3
    assert profile.value_range[0] < float(x.min())


def test_without_reference_data_no_profile(
    tmp_path: Path, signing_key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="coordinator.delivery.packaging"):
        result = package_model(_request(tmp_path, signing_key, 4), now=NOW)
    assert result.manifest.reference is None
    assert "without a reference profile: no reference data" in caplog.text


def test_calibration_rows_give_the_profile(tmp_path: Path, signing_key: SigningKey) -> None:
    calibration = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    request = _request(tmp_path, signing_key, 16, calibration=calibration, quantize="int8")
    result = package_model(request, now=NOW)
    profile = result.manifest.reference
    assert profile is not None
    assert profile.rows == 64
    assert profile.feature_count == 16
    signed, _ = read_artifact_unverified(result.path)
    assert signed.manifest.reference == profile


@pytest.mark.parametrize(
    ("task", "x", "y", "y_dtype"),
    [
        ("classification", np.ones((3, 1, 2, 2)), np.array([0, 2, 1]), np.int64),
        ("regression", np.ones((3, 5)), np.array([[0.5, 1], [2, 3], [4, 5]]), np.float32),
        ("regression", np.ones((3, 5)), np.array([1, 2, 3]), np.float32),
        ("reconstruction", np.ones((3, 2, 8)), np.array([0, 1, 0], np.uint8), np.int64),
    ],
    ids=["images", "regression-2d", "regression-int", "anomaly-flags"],
)
def test_load_labelled_npz_per_task(
    tmp_path: Path,
    task: ModelTask,
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.generic],
    y_dtype: type[np.generic],
) -> None:
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_labelled_npz(tmp_path / "d.npz", task)
    assert data.task == task
    assert data.x.dtype == np.float32
    assert data.x.shape == x.shape
    assert data.y.dtype == y_dtype
    np.testing.assert_array_equal(data.y, y)


@pytest.mark.parametrize(
    ("task", "x", "y", "match"),
    [
        ("classification", np.ones(3), np.zeros(3, np.int64), r"x of shape \(n, \.\.\.\)"),
        ("classification", np.ones((3, 2)), np.zeros(2, np.int64), "one y per example"),
        ("classification", np.ones((3, 2)), np.zeros(3), "integer class labels"),
        ("classification", np.ones((3, 2)), np.zeros((3, 1), np.int64), "integer class labels"),
        ("regression", np.ones((3, 2)), np.array([1.0, np.nan, 2.0]), "finite numbers"),
        ("regression", np.ones((3, 2)), np.ones((3, 1, 1)), r"\(n,\) or \(n, k\)"),
        ("reconstruction", np.ones((3, 2)), np.array([0, 1, 2]), r"0 \(normal\) or 1"),
        ("reconstruction", np.ones((3, 2)), np.array([0.0, 1.0, 0.0]), "anomaly flags"),
        ("ranking", np.ones((3, 2)), np.zeros(3, np.int64), "unknown task 'ranking'"),
    ],
    ids=[
        "1d-x", "lengths", "float-labels", "2d-labels", "nan-target", "3d-target", "flag-2",
        "float-flags", "task",
    ],
)  # fmt: skip
def test_load_labelled_npz_refuses(
    tmp_path: Path,
    task: ModelTask,
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.generic],
    match: str,
) -> None:
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(PackagingError, match=match):
        load_labelled_npz(tmp_path / "d.npz", task)
