"""Quality metrics of exported models, in pure numpy.

Packaging compares a float32 model with its int8 version on held-out data, and the
coordinator reports the same figures for a federated run; both use these functions so
that a metric has one definition::

    classification  -> accuracy (edge_agent.runtime.base.accuracy)
    regression      -> mean_squared_error(prediction, target)
    reconstruction  -> roc_auc(anomaly_score, is_anomaly)

:func:`roc_auc` is the rank (Mann-Whitney U) form of the area under the ROC curve:
the probability that a random positive scores higher than a random negative, ties
counting one half. Tied scores get their average rank, so the result equals
``sklearn.metrics.roc_auc_score``; one sort, O(n log n).

Every bad input (shapes, emptiness, NaN, labels other than 0/1, a single class)
raises :class:`compress.errors.MetricError`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from compress.errors import MetricError

__all__ = ["mean_squared_error", "roc_auc"]


def roc_auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels``.

    Args:
        scores: One finite real score per example, higher meaning "more positive"
            (e.g. an anomaly score), shape ``(n,)``.
        labels: ``0`` (negative, normal) or ``1`` (positive, anomaly) per example,
            integers or booleans, shape ``(n,)``.

    Returns:
        The AUC in ``[0, 1]``; ``0.5`` for scores that do not separate the classes.

    Raises:
        MetricError: not two 1-D arrays of one length, non-finite or non-real
            scores, labels other than 0 and 1, or only one class present.
    """
    score = _finite_vector(scores, "scores")
    label_arr = np.asarray(labels)
    if label_arr.dtype != np.bool_ and not np.issubdtype(label_arr.dtype, np.integer):
        raise MetricError(f"labels must be integers 0/1 or booleans, got dtype {label_arr.dtype}")
    if label_arr.shape != score.shape:
        raise MetricError(
            f"need one label per score, got scores {score.shape} and labels {label_arr.shape}"
        )
    values = label_arr.astype(np.int64)
    if not np.isin(values, (0, 1)).all():
        raise MetricError(f"labels must be 0 or 1, found {sorted(set(values.tolist()) - {0, 1})}")
    positive = values == 1
    n_pos = int(positive.sum())
    n_neg = values.size - n_pos
    if n_pos == 0 or n_neg == 0:
        missing = "positive (1)" if n_pos == 0 else "negative (0)"
        raise MetricError(f"ROC-AUC needs both classes; no {missing} example among {values.size}")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    # Tie group g covers ranks start_g + 1 .. start_g + count_g: average rank below.
    ends = np.cumsum(counts, dtype=np.float64)
    average_rank = ends - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse][positive].sum())
    u_statistic = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u_statistic / (n_pos * n_neg)


def mean_squared_error(pred: npt.ArrayLike, target: npt.ArrayLike) -> float:
    """Mean over examples and outputs of ``(pred - target) ** 2``.

    ``pred`` and ``target`` have one row per example; their other dimensions must
    hold the same number of values, so a prediction ``(n, 1)`` compares with a
    target ``(n,)`` (a model with one output and a vector of targets).

    Raises:
        MetricError: empty or non-finite arrays, different numbers of examples or
            of values per example.
    """
    p = _finite_array(pred, "predictions")
    t = _finite_array(target, "targets")
    if p.shape[0] != t.shape[0] or p.size != t.size:
        raise MetricError(
            f"predictions {p.shape} and targets {t.shape} do not have the same examples"
        )
    diff = p.reshape(p.shape[0], -1) - t.reshape(t.shape[0], -1)
    return float(np.mean(np.square(diff)))


def _finite_array(values: npt.ArrayLike, what: str) -> npt.NDArray[np.float64]:
    """``values`` as a float64 array of at least one dimension and one element.

    Raises:
        MetricError: not real numbers, a scalar, empty, or NaN/infinite.
    """
    arr = np.asarray(values)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise MetricError(f"{what} must be real numbers, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.size == 0:
        raise MetricError(f"{what} must be a non-empty array, got shape {arr.shape}")
    out = arr.astype(np.float64)
    if not np.isfinite(out).all():
        raise MetricError(f"{what} contain NaN or infinity")
    return out


def _finite_vector(values: npt.ArrayLike, what: str) -> npt.NDArray[np.float64]:
    """Like :func:`_finite_array`, for a 1-D array.

    Raises:
        MetricError: as :func:`_finite_array`, or not 1-D.
    """
    arr = _finite_array(values, what)
    if arr.ndim != 1:
        raise MetricError(f"{what} must be 1-D (one per example), got shape {arr.shape}")
    return arr
