"""Drift statistics: how far a window of observed counts is from a reference (pure).

A deployed model's manifest carries a reference profile (:mod:`compress.profile`): for
each input feature, the share of the reference data that fell in each of its bins, plus
the shares of predicted classes and of a confidence signal. Devices send, per telemetry
window, the COUNTS of their inputs in the same bins. This module compares the two:

* :func:`psi` - the Population Stability Index,
  ``sum((q - p) * ln(q / p))`` over bins, with reference shares ``p`` and observed
  shares ``q``. Both are smoothed with :data:`EPSILON` first so that an empty bin on
  either side gives a large but finite score. The usual reading (:func:`severity`):
  below :data:`PSI_MODERATE` (0.1) nothing moved, up to :data:`PSI_MAJOR` (0.25) a
  moderate shift, above a major one; a score of fewer than :data:`MIN_INPUTS`
  effective rows is ``insufficient`` (small samples, on either side, inflate PSI).
* :func:`js` - the Jensen-Shannon divergence in bits: symmetric, 0 for identical
  distributions, 1 for distributions with disjoint support. It needs no smoothing.
* :func:`feature_scores` - both statistics for every feature of an ``(F, B)`` matrix
  of reference shares against an ``(F, B)`` matrix of counts;
  :func:`fleet_counts` sums several devices' count matrices into one (the fleet-wide
  view is the drift of the pooled counts, not an average of per-device scores).
* :func:`top_features` - the k features with the highest PSI (the root-cause view).

Every function checks its arrays and raises
:class:`~coordinator.errors.SummaryRejectedError` (``reason`` one of
:data:`REJECT_REASONS`) for wrong shapes, negative, non-finite or non-integer counts
and for reference shares that are not a distribution. An empty window (zero counts)
has no distribution: it is refused with ``reason="empty"`` and callers skip it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from coordinator.errors import SummaryRejectedError

__all__ = [
    "EPSILON",
    "INSUFFICIENT",
    "MIN_INPUTS",
    "PSI_MAJOR",
    "PSI_MODERATE",
    "REJECT_REASONS",
    "FeatureScores",
    "check_counts",
    "check_shares",
    "effective_rows",
    "feature_scores",
    "fleet_counts",
    "js",
    "min_rows",
    "psi",
    "severity",
    "top_features",
]

PSI_MODERATE = 0.1
"""PSI at or above which a distribution counts as moderately shifted (convention)."""
PSI_MAJOR = 0.25
"""PSI at or above which a distribution counts as majorly shifted (convention)."""
MIN_INPUTS = 500
"""Fewest effective rows behind a score for it to get a severity.

PSI has a small-sample bias: with ``n`` inputs in 10 bins an unshifted feature scores
about ``9 / n`` on average (chi-square with 9 degrees of freedom over ``n``), and the
largest of 64 features about ``35 / n`` at the 99.98th percentile. Reference shares
estimated from ``m`` rows add their own noise: the bias goes with ``1/n + 1/m``
(:func:`effective_rows`). From 500 effective rows it stays below
:data:`PSI_MODERATE` (0.07), so an unshifted device raises no alarm; below, a score
is shown but its severity is ``insufficient``."""
INSUFFICIENT = "insufficient"
"""Severity of a score with fewer than :data:`MIN_INPUTS` inputs behind it."""
EPSILON = 1e-4
"""Share added to every bin of both sides before PSI (then renormalized)."""
SHARE_TOLERANCE = 1e-3
"""How far the reference shares of one distribution may sum away from 1."""
REJECT_REASONS = ("wrong_shape", "negative", "non_finite", "not_integer", "empty", "bad_reference")
"""Machine-readable reasons of a :class:`~coordinator.errors.SummaryRejectedError`."""

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class FeatureScores:
    """Drift of every feature of one window (or of the pooled fleet).

    Attributes:
        psi: PSI per feature, shape ``(F,)``.
        js: Jensen-Shannon divergence in bits per feature, shape ``(F,)``.
        n: Rows behind the counts (the largest per-feature count total).
    """

    psi: FloatArray
    js: FloatArray
    n: int

    @property
    def psi_max(self) -> float:
        """The largest per-feature PSI (0.0 when there are no features)."""
        return float(self.psi.max()) if self.psi.size else 0.0

    @property
    def js_max(self) -> float:
        """The largest per-feature JS divergence (0.0 when there are no features)."""
        return float(self.js.max()) if self.js.size else 0.0


def severity(psi_value: float, n: int | None = None, reference_rows: int | None = None) -> str:
    """``"none"``, ``"moderate"`` or ``"major"`` by the PSI conventions, or
    ``"insufficient"`` when the score rests on too few rows (see :data:`MIN_INPUTS`).

    Args:
        psi_value: The score's PSI.
        n: Inputs behind the observed counts (None: not checked).
        reference_rows: Rows the reference shares were computed from (None: exact).
    """
    if n is not None and effective_rows(n, reference_rows) < MIN_INPUTS:
        return INSUFFICIENT
    if psi_value >= PSI_MAJOR:
        return "major"
    if psi_value >= PSI_MODERATE:
        return "moderate"
    return "none"


def min_rows(bins: int) -> float:
    """Effective rows a single distribution of ``bins`` bins needs for a severity.

    :data:`MIN_INPUTS` for up to 10 bins (the features' own rule, which covers the
    largest of 64 of them); a class distribution of ``K`` classes has a bias growing
    with ``K - 1``, so it needs ``MIN_INPUTS * (K - 1) / 9`` (5500 for 100 classes).
    """
    return MIN_INPUTS * max(1.0, (bins - 1) / 9)


def effective_rows(n: int, reference_rows: int | None) -> float:
    """``1 / (1/n + 1/m)``: the sample size PSI's noise scales with, when ``n`` observed
    rows are compared with shares estimated from ``m`` reference rows (``n`` alone when
    the reference is exact)."""
    if n <= 0 or (reference_rows is not None and reference_rows <= 0):
        return 0.0
    if reference_rows is None:
        return float(n)
    return n * reference_rows / (n + reference_rows)


def check_shares(shares: npt.ArrayLike, *, ndim: int = 1) -> FloatArray:
    """Return ``shares`` as float64 after checking each row is a distribution.

    Raises:
        SummaryRejectedError: ``bad_reference`` for a wrong number of dimensions, fewer
            than 2 bins, non-finite or negative shares, or a row not summing to 1.
    """
    arr = np.asarray(shares, dtype=np.float64)
    if arr.ndim != ndim or arr.shape[-1] < 2:
        raise SummaryRejectedError("bad_reference", f"reference shares have shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise SummaryRejectedError("bad_reference", "reference shares are negative or not finite")
    sums = arr.sum(axis=-1)
    if np.any(np.abs(sums - 1.0) > SHARE_TOLERANCE):
        raise SummaryRejectedError("bad_reference", "reference shares do not sum to 1")
    return arr


def check_counts(counts: npt.ArrayLike, shape: tuple[int, ...]) -> FloatArray:
    """Return ``counts`` as float64 after checking it is a ``shape`` array of counts.

    Raises:
        SummaryRejectedError: ``wrong_shape``, ``non_finite``, ``negative`` or
            ``not_integer``.
    """
    try:
        arr = np.asarray(counts, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SummaryRejectedError("wrong_shape", "counts are not numbers") from exc
    if arr.shape != shape:
        raise SummaryRejectedError(
            "wrong_shape", f"counts have shape {arr.shape}, expected {shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise SummaryRejectedError("non_finite", "counts hold NaN or infinity")
    if np.any(arr < 0):
        raise SummaryRejectedError("negative", "counts hold a negative value")
    if np.any(arr != np.floor(arr)):
        raise SummaryRejectedError("not_integer", "counts hold a fraction")
    return arr


def _observed_shares(counts: FloatArray) -> FloatArray:
    totals = counts.sum(axis=-1, keepdims=True)
    if np.any(totals <= 0):
        raise SummaryRejectedError("empty", "a distribution has no counts")
    shares: FloatArray = counts / totals
    return shares


def _smooth(shares: FloatArray) -> FloatArray:
    smoothed = shares + EPSILON
    out: FloatArray = smoothed / smoothed.sum(axis=-1, keepdims=True)
    return out


def _psi_rows(ref: FloatArray, counts: FloatArray) -> FloatArray:
    p = _smooth(ref)
    q = _smooth(_observed_shares(counts))
    out: FloatArray = np.sum((q - p) * np.log(q / p), axis=-1)
    return out


def _js_rows(ref: FloatArray, counts: FloatArray) -> FloatArray:
    p = ref / ref.sum(axis=-1, keepdims=True)
    q = _observed_shares(counts)
    m = (p + q) / 2.0

    def kl(a: FloatArray) -> FloatArray:
        # 0 * log(0 / m) = 0; where a > 0, m >= a / 2 > 0.
        safe_a = np.where(a > 0, a, 1.0)
        safe_m = np.where(m > 0, m, 1.0)
        terms = np.where(a > 0, a * np.log2(safe_a / safe_m), 0.0)
        out: FloatArray = terms.sum(axis=-1)
        return out

    out: FloatArray = np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, 1.0)
    return out


def psi(ref_shares: npt.ArrayLike, counts: npt.ArrayLike, *, checked: bool = False) -> float:
    """PSI of observed ``counts`` against reference ``ref_shares`` (same bins).

    Args:
        ref_shares: The reference distribution.
        counts: The observed counts.
        checked: Both were checked already (:func:`check_shares`,
            :func:`check_counts`): skip the checks (the tracker's hot path).

    Raises:
        SummaryRejectedError: see :func:`check_shares` and :func:`check_counts`;
            ``empty`` when the counts sum to 0.
    """
    ref, obs = _arrays(ref_shares, counts, ndim=1, checked=checked)
    return float(_psi_rows(ref, obs))


def js(ref_shares: npt.ArrayLike, counts: npt.ArrayLike) -> float:
    """Jensen-Shannon divergence (bits, 0..1) of ``counts`` against ``ref_shares``.

    Raises:
        SummaryRejectedError: as :func:`psi`.
    """
    ref = check_shares(ref_shares)
    obs = check_counts(counts, ref.shape)
    return float(_js_rows(ref, obs))


def feature_scores(
    ref_shares: npt.ArrayLike, counts: npt.ArrayLike, *, checked: bool = False
) -> FeatureScores:
    """PSI and JS of every feature: ``(F, B)`` reference shares vs ``(F, B)`` counts.

    A feature whose row of counts is all zero makes the window ``empty`` (a device
    counts every accepted input in every feature, so rows differ only by saturation).
    ``checked`` as for :func:`psi`.

    Raises:
        SummaryRejectedError: as :func:`psi`, for any row.
    """
    ref, obs = _arrays(ref_shares, counts, ndim=2, checked=checked)
    n = int(obs.sum(axis=1).max()) if obs.size else 0
    return FeatureScores(psi=_psi_rows(ref, obs), js=_js_rows(ref, obs), n=n)


def _arrays(
    ref_shares: npt.ArrayLike, counts: npt.ArrayLike, *, ndim: int, checked: bool
) -> tuple[FloatArray, FloatArray]:
    if checked:
        return np.asarray(ref_shares, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    ref = check_shares(ref_shares, ndim=ndim)
    return ref, check_counts(counts, ref.shape)


def fleet_counts(windows: Sequence[npt.ArrayLike], shape: tuple[int, ...]) -> FloatArray:
    """Sum several windows' count arrays (each checked against ``shape``).

    Raises:
        SummaryRejectedError: as :func:`check_counts`; ``empty`` for no windows.
    """
    if not windows:
        raise SummaryRejectedError("empty", "no windows to pool")
    total: FloatArray = np.zeros(shape, dtype=np.float64)
    for window in windows:
        total = total + check_counts(window, shape)
    return total


def top_features(scores: npt.ArrayLike, k: int) -> list[tuple[int, float]]:
    """The ``k`` highest-scoring features as ``(index, score)``, highest first.

    Ties keep the lower index first; ``k`` larger than the number of features gives
    all of them.
    """
    arr = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-arr, kind="stable")[: max(k, 0)]
    return [(int(i), float(arr[i])) for i in order]
