"""The pure drift statistics (coordinator.monitoring.drift)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.errors import SummaryRejectedError
from coordinator.monitoring import drift


def _smoothed(shares: list[float]) -> np.ndarray:
    arr = np.asarray(shares, dtype=np.float64) + drift.EPSILON
    return arr / arr.sum()


def test_identical_distributions_score_zero() -> None:
    ref = np.full(10, 0.1)
    counts = np.full(10, 37)
    assert drift.psi(ref, counts) == pytest.approx(0.0, abs=1e-12)
    assert drift.js(ref, counts) == pytest.approx(0.0, abs=1e-12)


def test_psi_matches_a_hand_computed_value() -> None:
    # p = (0.5, 0.5), q = (0.25, 0.75):
    # (0.25-0.5)*ln(0.5) + (0.75-0.5)*ln(1.5) = 0.25*(ln 2 + ln 1.5) = 0.25*ln 3
    got = drift.psi([0.5, 0.5], [25, 75])
    p = _smoothed([0.5, 0.5])
    q = _smoothed([0.25, 0.75])
    assert got == pytest.approx(float(np.sum((q - p) * np.log(q / p))), rel=1e-12)
    assert got == pytest.approx(0.25 * math.log(3), rel=1e-3)


def test_js_matches_a_hand_computed_value() -> None:
    # p = (1, 0), q = (0.5, 0.5): m = (0.75, 0.25)
    # 0.5 * log2(1/0.75) + 0.5 * (0.5 log2(0.5/0.75) + 0.5 log2(0.5/0.25))
    expected = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5 * math.log2(2))
    assert drift.js([1.0, 0.0], [5, 5]) == pytest.approx(expected, rel=1e-12)


def test_empty_bins_give_large_finite_psi_and_js_of_one() -> None:
    ref = [0.5, 0.5, 0.0, 0.0]
    counts = [0, 0, 10, 10]
    value = drift.psi(ref, counts)
    assert math.isfinite(value)
    assert value > 5
    assert drift.js(ref, counts) == pytest.approx(1.0)


def test_js_is_symmetric_and_bounded() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        a = rng.integers(0, 100, size=10)
        b = rng.integers(0, 100, size=10)
        a[0] += 1
        b[0] += 1
        pa = a / a.sum()
        pb = b / b.sum()
        ab = drift.js(pa, b)
        ba = drift.js(pb, a)
        assert ab == pytest.approx(ba, abs=1e-12)
        assert 0.0 <= ab <= 1.0


def test_psi_grows_with_the_shift() -> None:
    ref = np.full(10, 0.1)
    small = np.array([12, 10, 10, 10, 10, 10, 10, 10, 10, 8])
    large = np.array([40, 20, 10, 10, 5, 5, 4, 3, 2, 1])
    assert drift.psi(ref, small) < drift.PSI_MODERATE
    assert drift.psi(ref, large) >= drift.PSI_MAJOR
    assert drift.severity(drift.psi(ref, small)) == "none"
    assert drift.severity(drift.psi(ref, large)) == "major"
    assert drift.severity(0.15) == "moderate"


def test_too_few_inputs_have_no_severity() -> None:
    assert drift.severity(0.4, drift.MIN_INPUTS - 1) == drift.INSUFFICIENT
    assert drift.severity(0.4, drift.MIN_INPUTS) == "major"
    assert drift.severity(0.01, drift.MIN_INPUTS) == "none"
    # A reference of few rows is noisy too: 1000 inputs against 1000 rows count as 500.
    assert drift.effective_rows(1000, 1000) == 500.0
    assert drift.severity(0.01, 1000, reference_rows=1000) == "none"
    assert drift.severity(0.4, 10**6, reference_rows=32) == drift.INSUFFICIENT
    assert drift.effective_rows(0, 10) == 0.0
    assert drift.effective_rows(10, None) == 10.0


def test_unshifted_windows_of_min_inputs_raise_no_alarm_over_64_features() -> None:
    # The small-sample bias of PSI stays below the moderate threshold from MIN_INPUTS on.
    rng = np.random.default_rng(11)
    ref = np.full((64, 10), 0.1)
    worst = 0.0
    for _ in range(200):
        counts = rng.multinomial(drift.MIN_INPUTS, np.full(10, 0.1), size=64)
        worst = max(worst, drift.feature_scores(ref, counts).psi_max)
    assert worst < drift.PSI_MODERATE


def test_an_estimated_reference_of_m_rows_and_n_inputs_stay_quiet_from_500_effective() -> None:
    rng = np.random.default_rng(12)
    worst = 0.0
    for _ in range(200):  # 1000 reference rows against 1000 inputs: 500 effective rows
        ref = rng.multinomial(1000, np.full(10, 0.1), size=64) / 1000
        counts = rng.multinomial(1000, np.full(10, 0.1), size=64)
        worst = max(worst, drift.feature_scores(ref, counts).psi_max)
    assert worst < drift.PSI_MODERATE


def test_feature_scores_per_row_and_top_features() -> None:
    ref = np.full((3, 4), 0.25)
    counts = np.array([[10, 10, 10, 10], [40, 0, 0, 0], [20, 10, 5, 5]])
    scores = drift.feature_scores(ref, counts)
    assert scores.psi.shape == (3,)
    assert scores.psi[0] == pytest.approx(0.0, abs=1e-12)
    assert scores.psi_max == pytest.approx(scores.psi[1])
    assert scores.js_max == pytest.approx(scores.js[1])
    assert scores.n == 40
    assert [i for i, _ in drift.top_features(scores.psi, 2)] == [1, 2]
    assert drift.top_features(scores.psi, 10)[-1][0] == 0
    assert drift.top_features([0.5, 0.5], 1) == [(0, 0.5)]


def test_fleet_counts_pool_the_windows() -> None:
    pooled = drift.fleet_counts([[1, 2], [3, 4]], (2,))
    assert pooled.tolist() == [4.0, 6.0]
    with pytest.raises(SummaryRejectedError) as err:
        drift.fleet_counts([], (2,))
    assert err.value.reason == "empty"
    with pytest.raises(SummaryRejectedError) as err:
        drift.fleet_counts([[1, 2], [1, 2, 3]], (2,))
    assert err.value.reason == "wrong_shape"


@pytest.mark.parametrize(
    ("counts", "reason"),
    [
        ([1, 2, 3], "wrong_shape"),
        ([[1, 2]], "wrong_shape"),
        (["a", "b"], "wrong_shape"),
        ([1, float("nan")], "non_finite"),
        ([1, float("inf")], "non_finite"),
        ([-1, 3], "negative"),
        ([0.5, 3], "not_integer"),
        ([0, 0], "empty"),
    ],
)
def test_hostile_counts_are_refused_with_a_reason(counts: object, reason: str) -> None:
    for func in (drift.psi, drift.js):
        with pytest.raises(SummaryRejectedError) as err:
            func([0.5, 0.5], counts)  # type: ignore[arg-type]
        assert err.value.reason == reason
        assert err.value.code == "summary_rejected"


@pytest.mark.parametrize(
    "ref",
    [[1.0], [0.5, 0.6], [1.5, -0.5], [float("nan"), 1.0], [[0.5, 0.5]]],
)
def test_bad_reference_is_refused(ref: object) -> None:
    with pytest.raises(SummaryRejectedError) as err:
        drift.psi(ref, [1, 1])  # type: ignore[arg-type]
    assert err.value.reason == "bad_reference"


def test_feature_scores_refuse_an_empty_feature_row() -> None:
    with pytest.raises(SummaryRejectedError) as err:
        drift.feature_scores(np.full((2, 2), 0.5), [[1, 1], [0, 0]])
    assert err.value.reason == "empty"
