"""compress.metrics: ROC-AUC (ties averaged) and mean squared error, and their refusals."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.metrics import roc_auc_score

from compress.errors import CompressError, MetricError
from compress.metrics import mean_squared_error, roc_auc


@pytest.mark.parametrize(
    ("scores", "labels", "want"),
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # 3 of 4 positive-negative pairs
        ([1.0, 2.0, 3.0], [0, 0, 1], 1.0),
        ([3.0, 2.0, 1.0], [0, 0, 1], 0.0),
        ([5.0, 5.0, 5.0, 5.0], [0, 1, 0, 1], 0.5),  # all tied: every pair counts 1/2
        ([1.0, 2.0, 2.0, 3.0], [0, 0, 1, 1], 0.875),  # one tied pair: (3 + 0.5) / 4
        ([0.2, 0.9], [True, False], 0.0),
    ],
)
def test_roc_auc_by_hand(scores: list[float], labels: list[int], want: float) -> None:
    assert roc_auc(np.array(scores), np.array(labels)) == pytest.approx(want)


def test_roc_auc_matches_sklearn_with_many_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    scores = np.round(rng.normal(size=2000) + labels * 0.7, 1)  # rounding makes ties
    assert len(np.unique(scores)) < 200
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert roc_auc(scores.astype(np.float32), labels.astype(np.int8)) == pytest.approx(
        roc_auc_score(labels, scores.astype(np.float32)), abs=1e-12
    )


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        (np.ones(3), np.ones(3, np.int64), r"no negative \(0\)"),
        (np.ones(3), np.zeros(3, np.int64), r"no positive \(1\)"),
        (np.ones(3), np.array([0, 1, 2]), r"0 or 1, found \[2\]"),
        (np.ones(3), np.array([0.0, 1.0, 0.0]), "integers 0/1 or booleans"),
        (np.ones(3), np.array([0, 1]), "one label per score"),
        (np.array([0.1, np.nan]), np.array([0, 1]), "NaN"),
        (np.array([0.1, np.inf]), np.array([0, 1]), "infinity"),
        (np.ones((2, 2)), np.ones((2, 2), np.int64), "1-D"),
        (np.array([], np.float32), np.array([], np.int64), "non-empty"),
        (np.array(["a", "b"]), np.array([0, 1]), "real numbers"),
        (np.array([True, False]), np.array([0, 1]), "real numbers"),
    ],
    ids=[
        "all-positive", "all-negative", "label-2", "float-labels", "lengths", "nan", "inf",
        "2d", "empty", "strings", "bool-scores",
    ],
)  # fmt: skip
def test_roc_auc_refuses(
    scores: npt.NDArray[np.generic], labels: npt.NDArray[np.generic], match: str
) -> None:
    with pytest.raises(MetricError, match=match) as info:
        roc_auc(scores, labels)
    assert isinstance(info.value, CompressError)
    assert info.value.code == "bad_metric_input"


def test_mean_squared_error() -> None:
    assert mean_squared_error(np.array([1.0, 2.0]), np.array([1.0, 4.0])) == pytest.approx(2.0)
    pred = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    assert mean_squared_error(pred, np.zeros((2, 2))) == pytest.approx(0.25)
    # One output per example: (n, 1) predictions against (n,) targets.
    assert mean_squared_error(np.array([[3.0], [1.0]]), np.array([1, 1])) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (np.ones(3), np.ones(4), "same examples"),
        (np.ones((3, 2)), np.ones(3), "same examples"),
        (np.ones(0), np.ones(0), "non-empty"),
        (np.float64(1.0), np.float64(1.0), "non-empty"),
        (np.array([1.0, np.nan]), np.ones(2), "predictions contain NaN"),
        (np.ones(2), np.array([1.0, np.inf]), "targets contain NaN or infinity"),
        (np.ones(2, complex), np.ones(2), "real numbers"),
    ],
    ids=["rows", "values-per-row", "empty", "scalar", "nan", "inf", "complex"],
)
def test_mean_squared_error_refuses(
    pred: npt.NDArray[np.generic], target: npt.NDArray[np.generic], match: str
) -> None:
    with pytest.raises(MetricError, match=match):
        mean_squared_error(pred, target)
