"""The drift tracker (coordinator.monitoring.tracker): per device, fleet-wide, hostile windows."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from coordinator.errors import SummaryRejectedError
from coordinator.monitoring.drift import PSI_MAJOR, PSI_MODERATE
from coordinator.monitoring.scores import DriftScore
from coordinator.monitoring.tracker import DriftTracker, Reference, WindowCounts

F, B = 4, 10
REF = Reference(
    features=np.full((F, B), 0.1),
    classes=np.array([0.5, 0.3, 0.2]),
    confidence=np.full(B, 0.1),
)


def _window(rng: np.random.Generator, n: int = 500, *, shift: float = 0.0) -> WindowCounts:
    """Counts of ``n`` draws per feature from uniform bins, feature 2 shifted up by ``shift``."""
    rows = []
    for f in range(F):
        probs = np.full(B, 0.1)
        if f == 2 and shift:
            probs = np.linspace(0.0, 1.0, B) ** (1 + 4 * shift) + 1e-3
            probs /= probs.sum()
        rows.append(rng.multinomial(n, probs))
    classes = rng.multinomial(n, [0.5, 0.3, 0.2])
    confidence = rng.multinomial(n, np.full(B, 0.1))
    return WindowCounts(n=n, features=np.array(rows), classes=classes, confidence=confidence)


def _add(tracker: DriftTracker, device: str, counts: WindowCounts, version: int = 1) -> DriftScore:
    score = tracker.add(device, "m", version, REF, counts, at=100.0)
    assert score is not None
    return score


def test_unshifted_windows_stay_low_and_shifted_ones_rise() -> None:
    rng = np.random.default_rng(1)
    tracker = DriftTracker(windows=3)
    for _ in range(5):
        calm = _add(tracker, "calm", _window(rng))
        hot = _add(tracker, "hot", _window(rng, shift=1.0))
    assert calm.psi_max < PSI_MODERATE
    assert calm.severity == "none"
    assert calm.windows == 3
    assert calm.n == 1500
    assert hot.psi_max >= PSI_MAJOR
    assert hot.severity == "major"
    assert hot.top[0].index == 2
    assert hot.classes_psi is not None
    assert hot.classes_psi < PSI_MODERATE
    assert hot.confidence_psi is not None
    assert hot.confidence_psi < PSI_MODERATE
    fleet = tracker.fleet("m", 1, REF, at=101.0)
    assert fleet is not None
    assert fleet.scope == "fleet"
    assert fleet.device_id is None
    assert fleet.windows == 6
    assert fleet.devices == ("hot", "calm")
    assert fleet.top[0].index == 2
    assert PSI_MODERATE <= fleet.psi_max < hot.psi_max  # the calm device dilutes it
    assert tracker.versions() == [("m", 1)]


def test_concept_drift_seen_only_in_confidence_is_flagged() -> None:
    # The inputs look as they did; the model is less sure of itself (no labels needed).
    rng = np.random.default_rng(7)
    tracker = DriftTracker()
    unsure = np.array([0.3, 0.3, 0.2, 0.1, 0.05, 0.05, 0, 0, 0, 0])
    for _ in range(3):
        window = _window(rng)
        score = _add(tracker, "d", WindowCounts(
            n=window.n, features=window.features, classes=window.classes,
            confidence=rng.multinomial(window.n, unsure),
        ))  # fmt: skip
    assert score.psi_max < PSI_MODERATE
    assert score.confidence_psi is not None
    assert score.confidence_psi >= PSI_MAJOR
    assert (score.severity, score.signal) == ("major", "confidence")


def test_a_class_shift_needs_more_rows_the_more_classes() -> None:
    many = Reference(features=np.full((F, B), 0.1), classes=np.full(100, 0.01))
    tracker = DriftTracker()
    lopsided = np.zeros(100, dtype=int)
    lopsided[:50] = 20  # 1000 inputs on half of the classes: class PSI ~ 0.69
    counts = WindowCounts(n=1000, features=np.full((F, B), 100), classes=lopsided)
    score = tracker.add("d", "m", 1, many, counts, at=0.0)
    assert score is not None
    assert score.classes_psi is not None
    assert score.classes_psi >= PSI_MAJOR
    # 1000 rows are too few to judge 100 classes (5500 needed): the features decide.
    assert (score.severity, score.signal) == ("none", "features")
    score = _add(tracker, "e", _window(np.random.default_rng(8), n=600))
    assert score.signal == "features"
    # That was another reference for m v1: its windows started afresh (none of d's).
    fleet = tracker.fleet("m", 1, REF, at=0.0)
    assert fleet is not None
    assert fleet.devices == ("e",)
    assert fleet.n == 600


def test_windows_past_their_age_leave_the_device_and_the_fleet() -> None:
    rng = np.random.default_rng(9)
    tracker = DriftTracker()
    tracker.add("gone", "m", 1, REF, _window(rng, shift=1.0), at=10.0)
    tracker.add("here", "m", 1, REF, _window(rng), at=10.0)
    tracker.add("here", "m", 1, REF, _window(rng), at=100.0)
    assert tracker.expire(older_than=50.0) == 2
    fleet = tracker.fleet("m", 1, REF, at=100.0)
    assert fleet is not None
    assert fleet.devices == ("here",)
    assert fleet.windows == 1
    assert fleet.psi_max < PSI_MODERATE
    assert tracker.expire(older_than=1000.0) == 1
    assert tracker.fleet("m", 1, REF, at=1000.0) is None
    assert tracker.versions() == []
    score = tracker.add("here", "m", 1, REF, _window(rng), at=1001.0)  # starts afresh
    assert score is not None
    assert score.windows == 1


def test_old_windows_slide_out() -> None:
    rng = np.random.default_rng(2)
    tracker = DriftTracker(windows=2)
    _add(tracker, "d", _window(rng, shift=1.0))
    _add(tracker, "d", _window(rng, shift=1.0))
    _add(tracker, "d", _window(rng))
    score = _add(tracker, "d", _window(rng))
    assert score.psi_max < PSI_MODERATE
    fleet = tracker.fleet("m", 1, REF, at=0.0)
    assert fleet is not None
    assert fleet.n == 1000
    assert fleet.psi_max < PSI_MODERATE


def test_a_new_version_starts_afresh_and_leaves_the_old_fleet() -> None:
    rng = np.random.default_rng(3)
    tracker = DriftTracker()
    _add(tracker, "d", _window(rng, shift=1.0), version=1)
    score = _add(tracker, "d", _window(rng), version=2)
    assert score.windows == 1
    assert score.psi_max < PSI_MODERATE
    assert tracker.fleet("m", 1, REF, at=0.0) is None
    assert tracker.versions() == [("m", 2)]


def test_idle_windows_give_no_score_and_refused_inputs_are_counted() -> None:
    tracker = DriftTracker()
    idle = WindowCounts(n=0, features=np.zeros((F, B), dtype=int))
    assert tracker.add("d", "m", 1, REF, idle, at=0.0) is None
    assert tracker.fleet("m", 1, REF, at=0.0) is None
    refused = WindowCounts(n=0, features=np.zeros((F, B), dtype=int), invalid={"nan": 3})
    score = _add(tracker, "d", refused)
    assert score.invalid == {"nan": 3}
    assert score.psi_max == 0.0
    assert score.top == ()
    score = _add(tracker, "d", _window(np.random.default_rng(4)))
    assert score.invalid == {"nan": 3}
    assert score.windows == 2


def _hostile() -> list[tuple[WindowCounts, str]]:
    good = np.full((F, B), 5)
    return [
        (WindowCounts(n=50, features=np.full((F + 1, B), 5)), "wrong_features"),
        (WindowCounts(n=50, features=np.full((F, B + 1), 5)), "wrong_shape"),
        (WindowCounts(n=50, features=np.full(F * B, 5)), "wrong_features"),
        (WindowCounts(n=50, features=[["x"] * B] * F), "wrong_shape"),
        (WindowCounts(n=-1, features=good), "absurd"),
        (WindowCounts(n=10**12, features=good), "absurd"),
        (WindowCounts(n=True, features=good), "absurd"),  # type: ignore[arg-type]
        (WindowCounts(n=10, features=good), "inconsistent"),
        (WindowCounts(n=50, features=np.vstack([np.zeros((1, B)), good[1:]])), "inconsistent"),
        (WindowCounts(n=10**6, features=np.full((F, B), 10**5)), "absurd"),
        (WindowCounts(n=50, features=good.astype(float) * np.nan), "non_finite"),
        (WindowCounts(n=50, features=-good), "negative"),
        (WindowCounts(n=50, features=good + 0.5), "not_integer"),
        (WindowCounts(n=50, features=good, classes=[60, 0, 0]), "inconsistent"),
        (WindowCounts(n=50, features=good, classes=[1, 2]), "wrong_shape"),
        (WindowCounts(n=50, features=good, confidence=[1.0] * (B - 1)), "wrong_shape"),
        (WindowCounts(n=50, features=good, confidence=[float("nan")] * B), "non_finite"),
        (WindowCounts(n=50, features=good, invalid={"nan": -2}), "absurd"),
        (WindowCounts(n=50, features=good, invalid={"nan": 1.5}), "absurd"),  # type: ignore[dict-item]
    ]


def test_hostile_windows_are_refused_logged_counted_and_harmless(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(5)
    tracker = DriftTracker()
    before = _add(tracker, "good", _window(rng))
    _add(tracker, "evil", _window(rng))
    reasons: dict[str, int] = {}
    for counts, reason in _hostile():
        with caplog.at_level(logging.WARNING), pytest.raises(SummaryRejectedError) as err:
            tracker.add("evil", "m", 1, REF, counts, at=1.0)
        assert err.value.reason == reason, counts
        reasons[reason] = reasons.get(reason, 0) + 1
        assert "device evil" in caplog.records[-1].getMessage()
    assert tracker.rejected() == reasons
    after = _add(tracker, "good", _window(rng))
    assert after.windows == before.windows + 1
    fleet = tracker.fleet("m", 1, REF, at=2.0)
    assert fleet is not None
    assert fleet.windows == 3  # good x2, evil x1: nothing of the refused windows


def test_a_model_without_classes_refuses_class_counts() -> None:
    plain = Reference(features=np.full((F, B), 0.1))
    tracker = DriftTracker()
    counts = WindowCounts(n=40, features=np.full((F, B), 4), classes=[40])
    with pytest.raises(SummaryRejectedError) as err:
        tracker.add("d", "m", 1, plain, counts, at=0.0)
    assert err.value.reason == "wrong_shape"
    score = tracker.add("d", "m", 1, plain, WindowCounts(n=40, features=np.full((F, B), 4)), at=0.0)
    assert score is not None
    assert score.classes_psi is None
    assert score.confidence_psi is None


def test_a_reference_that_is_not_a_distribution_is_refused() -> None:
    with pytest.raises(SummaryRejectedError) as err:
        Reference(features=np.full((F, B), 0.2))
    assert err.value.reason == "bad_reference"
    with pytest.raises(SummaryRejectedError):
        Reference(features=np.full((F, B), 0.1), classes=np.array([0.9, 0.9]))


def test_scores_round_trip_through_their_dict() -> None:
    score = _add(DriftTracker(), "d", _window(np.random.default_rng(6)))
    assert DriftScore.from_dict(score.to_dict()) == score


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        DriftTracker(windows=0)
