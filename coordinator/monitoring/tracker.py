"""The drift tracker: recent window summaries per device, scored per device and fleet-wide (pure).

The service hands every telemetry window that carries a summary to
:meth:`DriftTracker.add` with the reference of the model version the window names
(both as plain arrays: :class:`Reference`, :class:`WindowCounts`). The tracker

1. checks the window against the reference: as many features and bins as the
   profile, counts that are whole, finite and not negative, a row count ``n``
   below :data:`MAX_WINDOW_INPUTS`, and no feature, class or confidence row
   holding more counts than ``n`` (cells saturate at 65535 on the device, so a row
   may hold fewer, never more; and none holds nothing when ``n`` > 0). A window
   that fails is refused: a
   :class:`~coordinator.errors.SummaryRejectedError` (``reason`` in
   :data:`TRACKER_REASONS` or :data:`~coordinator.monitoring.drift.REJECT_REASONS`),
   a warning naming the device, and a count by reason (:meth:`DriftTracker.rejected`).
   Nothing of that window is kept; other devices are untouched;
2. keeps the device's last ``windows`` windows that saw inputs, valid or refused
   (per device and model; a new version of the model starts afresh; idle windows
   are skipped) and scores their pooled counts:
   PSI and JS per feature, the top ``top_k`` features, the PSI of the confidence
   signal and of the predicted classes (:class:`~coordinator.monitoring.scores.DriftScore`).
   The severity is the worst of the three shifts that rest on enough rows, and
   ``signal`` names it: a concept drift that leaves the inputs alone but moves the
   model's confidence (or its predicted classes) is flagged without any label;
3. keeps, per model version, the running sum of every device's kept windows:
   :meth:`DriftTracker.fleet` scores it on demand and names the devices with the
   highest PSI (the devices that drive the fleet's drift).

Memory is bounded by the fleet: at most ``windows`` count arrays of uint16 per
device and model (1.3 KiB each for 64 features), and one int64 sum per version.
:meth:`DriftTracker.expire` drops windows older than a given time (the service
calls it every minute with a day's horizon), so devices that went quiet or away
stop weighing on the fleet. A model version's windows are pooled against one
reference: if the reference given for it changes shape (another profile under the
same name and version), its windows start afresh (logged). The tracker keeps no
clock: the caller passes ``at``. Not thread-safe: the service calls it under its own
lock.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.errors import SummaryRejectedError
from coordinator.monitoring import drift
from coordinator.monitoring.scores import (
    CLASSES,
    CONFIDENCE,
    DEVICE,
    FEATURES,
    FLEET,
    DriftScore,
    FeatureDrift,
)

__all__ = [
    "DEFAULT_TOP_K",
    "DEFAULT_WINDOWS",
    "MAX_WINDOW_INPUTS",
    "TRACKER_REASONS",
    "DriftTracker",
    "Reference",
    "WindowCounts",
]

logger = logging.getLogger(__name__)

DEFAULT_WINDOWS = 6
"""Windows (with inputs) of a device pooled into its score."""
DEFAULT_TOP_K = 5
"""Features named in a score (and devices named in a fleet score)."""
MAX_WINDOW_INPUTS = 10**9
"""Largest ``n`` a window may claim."""
CELL_MAX = 65535
"""A device's counts saturate at this value per cell (uint16 on the wire)."""
TRACKER_REASONS = ("wrong_features", "absurd", "inconsistent")
"""Refusal reasons of the tracker's own checks (beside :data:`drift.REJECT_REASONS`)."""

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Reference:
    """A model version's reference distributions, from its manifest's profile.

    Attributes:
        features: ``(F, B)`` reference shares per feature (each row sums to 1).
        classes: Reference predicted-class shares, or None (not a classifier).
        confidence: Reference shares of the confidence bins, or None.
        rows: Reference rows the shares were computed from (None: exact shares);
            fewer rows make every score noisier (:func:`drift.effective_rows`).
    """

    features: npt.NDArray[np.float64]
    classes: npt.NDArray[np.float64] | None = None
    confidence: npt.NDArray[np.float64] | None = None
    rows: int | None = None

    @property
    def signature(self) -> tuple[tuple[int, ...], int | None, int | None]:
        """The shapes windows of this reference have: features, classes, confidence."""
        return (
            tuple(self.features.shape),
            None if self.classes is None else self.classes.size,
            None if self.confidence is None else self.confidence.size,
        )

    def __post_init__(self) -> None:
        """Check every distribution (a profile that is not one cannot be scored).

        Raises:
            SummaryRejectedError: ``bad_reference``.
        """
        drift.check_shares(self.features, ndim=2)
        for shares in (self.classes, self.confidence):
            if shares is not None:
                drift.check_shares(shares)


@dataclass(frozen=True)
class WindowCounts:
    """One device window's summary, as counts.

    Attributes:
        n: Inputs the window summarized.
        features: ``(F, B)`` counts per feature and bin.
        classes: Counts per predicted class, or None.
        confidence: Counts per confidence bin, or None.
        invalid: Inputs refused by the device in the window, by reason.
    """

    n: int
    features: npt.ArrayLike
    classes: npt.ArrayLike | None = None
    confidence: npt.ArrayLike | None = None
    invalid: Mapping[str, int] = field(default_factory=dict)


@dataclass
class _Kept:
    """What one reference-checked window leaves in the tracker."""

    n: int
    features: npt.NDArray[np.uint16]
    classes: IntArray | None
    confidence: IntArray | None
    invalid: dict[str, int]
    at: float = 0.0


@dataclass
class _Pool:
    """Running sums of several windows (a device's, or a version's over the fleet)."""

    windows: int = 0
    n: int = 0
    features: IntArray | None = None
    classes: IntArray | None = None
    confidence: IntArray | None = None
    invalid: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, kept: _Kept, sign: int = 1) -> None:
        self.windows += sign
        self.n += sign * kept.n
        self.features = _plus(self.features, kept.features.astype(np.int64), sign)
        self.classes = _plus(self.classes, kept.classes, sign)
        self.confidence = _plus(self.confidence, kept.confidence, sign)
        for reason, count in kept.invalid.items():
            self.invalid[reason] += sign * count
        self.invalid = +self.invalid  # drop zeros


def _plus(total: IntArray | None, part: IntArray | None, sign: int) -> IntArray | None:
    if part is None:
        return total
    if total is None:
        return sign * part
    out: IntArray = total + sign * part
    return out


@dataclass
class _Device:
    version: int
    kept: collections.deque[_Kept]
    pool: _Pool = field(default_factory=_Pool)
    psi_max: float = 0.0


def _as_counts(values: npt.ArrayLike, size: int, n: int, what: str) -> IntArray:
    arr = drift.check_counts(values, (size,))
    if arr.sum() > n:
        raise SummaryRejectedError("inconsistent", f"{what} counts sum above n={n}")
    out: IntArray = arr.astype(np.int64)
    return out


def _optional_counts(
    values: npt.ArrayLike | None, shares: npt.NDArray[np.float64] | None, n: int, what: str
) -> IntArray | None:
    if values is None:
        return None
    if shares is None:
        raise SummaryRejectedError("wrong_shape", f"{what} counts for a model without them")
    return _as_counts(values, shares.size, n, what)


def _is_count(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        return False
    return 0 <= int(value) <= MAX_WINDOW_INPUTS


def _check(reference: Reference, counts: WindowCounts) -> _Kept:
    """The window's counts, checked against the reference (see the module docstring)."""
    f, bins = reference.features.shape
    n = counts.n
    if (
        isinstance(n, bool)
        or not isinstance(n, int | np.integer)
        or not 0 <= n <= MAX_WINDOW_INPUTS
    ):
        raise SummaryRejectedError("absurd", f"n={n!r} is not a count up to {MAX_WINDOW_INPUTS}")
    try:
        raw = np.asarray(counts.features, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SummaryRejectedError("wrong_shape", "feature counts are not a matrix") from exc
    if raw.ndim != 2 or raw.shape[0] != f:
        raise SummaryRejectedError(
            "wrong_features", f"counts of shape {raw.shape} for a profile of {f} features"
        )
    checked = drift.check_counts(raw, (f, bins))
    row_sums = checked.sum(axis=1)
    if np.any(row_sums > n):
        raise SummaryRejectedError("inconsistent", f"a feature counts more than n={n} inputs")
    if n > 0 and np.any(row_sums == 0):
        raise SummaryRejectedError("inconsistent", f"a feature counts nothing of n={n} inputs")
    if np.any(checked > CELL_MAX):
        raise SummaryRejectedError("absurd", f"a cell holds more than {CELL_MAX}")
    classes = _optional_counts(counts.classes, reference.classes, n, "class")
    confidence = _optional_counts(counts.confidence, reference.confidence, n, "confidence")
    invalid: dict[str, int] = {}
    for reason, count in counts.invalid.items():
        if (
            not isinstance(count, int)
            or isinstance(count, bool)
            or not 0 <= count <= MAX_WINDOW_INPUTS
        ):
            raise SummaryRejectedError("absurd", f"invalid[{reason!r}]={count!r}")
        if count:
            invalid[str(reason)] = count
    return _Kept(n, checked.astype(np.uint16), classes, confidence, invalid)


class DriftTracker:
    """Recent window summaries per device and their drift (see the module docstring).

    Args:
        windows: Windows with inputs pooled per device (>= 1).
        top_k: Features (and, fleet-wide, devices) named in a score (>= 1).

    Raises:
        ValueError: ``windows`` or ``top_k`` below 1.
    """

    def __init__(self, *, windows: int = DEFAULT_WINDOWS, top_k: int = DEFAULT_TOP_K) -> None:
        if windows < 1 or top_k < 1:
            raise ValueError("windows and top_k must be at least 1")
        self._windows = windows
        self._top_k = top_k
        self._devices: dict[tuple[str, str], _Device] = {}
        self._fleet: dict[tuple[str, int], _Pool] = {}
        self._signatures: dict[tuple[str, int], tuple[Any, ...]] = {}
        self._rejected: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ intake

    def add(
        self,
        device_id: str,
        model: str,
        version: int,
        reference: Reference,
        counts: WindowCounts,
        *,
        at: float,
    ) -> DriftScore | None:
        """Take one window of a device; give the device's score, None if it has no inputs yet.

        Raises:
            SummaryRejectedError: the window is refused (logged and counted; the
                device's earlier windows and every other device are unaffected).
        """
        try:
            kept = dataclasses.replace(_check(reference, counts), at=at)
        except SummaryRejectedError as exc:
            self.refused(device_id, model, version, exc)
            raise
        signature = reference.signature
        if self._signatures.setdefault((model, version), signature) != signature:
            logger.warning("%s v%d: its reference profile changed shape; its drift windows "
                           "start afresh", model, version)  # fmt: skip
            self._forget(model, version)
            self._signatures[(model, version)] = signature
        state = self._device(device_id, model, version)
        if kept.n == 0 and not kept.invalid:  # an idle window: nothing to learn from
            return self._score_device(
                state, reference, device_id=device_id, model=model, version=version, at=at
            )
        fleet = self._fleet.setdefault((model, version), _Pool())
        if len(state.kept) == self._windows:
            old = state.kept.popleft()
            fleet.add(old, sign=-1)
            state.pool.add(old, sign=-1)
        state.kept.append(kept)
        fleet.add(kept)
        state.pool.add(kept)
        return self._score_device(
            state, reference, device_id=device_id, model=model, version=version, at=at
        )

    def refused(
        self, device_id: str, model: str, version: int, error: SummaryRejectedError
    ) -> None:
        """Count and log a refused window (:meth:`add`'s own refusals, and those of a
        caller's checks before it)."""
        self._rejected[error.reason] += 1
        logger.warning("device %s, %s v%d: window summary refused: %s", device_id, model,
                       version, error)  # fmt: skip

    def _device(self, device_id: str, model: str, version: int) -> _Device:
        state = self._devices.get((device_id, model))
        if state is not None and state.version != version:
            old = self._fleet.get((model, state.version))
            for kept in state.kept:
                if old is not None:
                    old.add(kept, sign=-1)
            if old is not None and old.windows == 0:
                del self._fleet[(model, state.version)]
            state = None
        if state is None:
            state = _Device(version, collections.deque())
            self._devices[(device_id, model)] = state
        return state

    def expire(self, older_than: float) -> int:
        """Drop the windows taken before ``older_than`` (a device that went quiet stops
        weighing on its fleet's score); devices left without windows are forgotten.

        Returns:
            How many windows were dropped.
        """
        dropped = 0
        for key, state in list(self._devices.items()):
            fleet = self._fleet.get((key[1], state.version))
            while state.kept and state.kept[0].at < older_than:
                old = state.kept.popleft()
                state.pool.add(old, sign=-1)
                if fleet is not None:
                    fleet.add(old, sign=-1)
                dropped += 1
            if not state.kept:
                del self._devices[key]
        for version_key, pool in list(self._fleet.items()):
            if pool.windows == 0:
                del self._fleet[version_key]
        return dropped

    def _forget(self, model: str, version: int) -> None:
        """Drop every window kept for ``model`` ``version``."""
        self._fleet.pop((model, version), None)
        for key, state in list(self._devices.items()):
            if key[1] == model and state.version == version:
                del self._devices[key]

    # ------------------------------------------------------------------ views

    def rejected(self) -> dict[str, int]:
        """Windows refused since start, by reason."""
        return dict(self._rejected)

    def fleet(
        self, model: str, version: int, reference: Reference, *, at: float
    ) -> DriftScore | None:
        """Score the pooled recent windows of every device on ``model`` ``version``.

        Returns:
            The fleet's score, None when no device sent inputs for that version.
        """
        pool = self._fleet.get((model, version))
        if pool is None or pool.windows == 0:
            return None
        drivers = sorted(
            (
                (state.psi_max, device_id)
                for (device_id, name), state in self._devices.items()
                if name == model and state.version == version and state.kept
            ),
            key=lambda item: (-item[0], item[1]),
        )
        score = self._score(
            pool, reference, scope=FLEET, device_id=None, model=model, version=version, at=at
        )
        return dataclasses.replace(score, devices=tuple(d for _psi, d in drivers[: self._top_k]))

    def versions(self) -> list[tuple[str, int]]:
        """The model versions some device sent inputs for, sorted."""
        return sorted(key for key, pool in self._fleet.items() if pool.windows > 0)

    # ------------------------------------------------------------------ scoring

    def _score_device(
        self,
        state: _Device,
        reference: Reference,
        *,
        device_id: str,
        model: str,
        version: int,
        at: float,
    ) -> DriftScore | None:
        if not state.kept:
            return None
        score = self._score(
            state.pool,
            reference,
            scope=DEVICE,
            device_id=device_id,
            model=model,
            version=version,
            at=at,
        )
        state.psi_max = score.psi_max
        return score

    def _score(
        self,
        pool: _Pool,
        reference: Reference,
        *,
        scope: str,
        device_id: str | None,
        model: str,
        version: int,
        at: float,
    ) -> DriftScore:
        if pool.n > 0 and pool.features is not None:
            scores = drift.feature_scores(reference.features, pool.features, checked=True)
        else:  # only refused inputs so far: nothing to compare, the counts still show
            zeros = np.zeros(reference.features.shape[0])
            scores = drift.FeatureScores(psi=zeros, js=zeros, n=0)
        top = tuple(
            FeatureDrift(index, value, float(scores.js[index]))
            for index, value in drift.top_features(scores.psi, self._top_k)
            if pool.n > 0
        )
        confidence_psi = _optional_psi(reference.confidence, pool.confidence)
        classes_psi = _optional_psi(reference.classes, pool.classes)
        severity, signal = _severity(pool, reference, scores.psi_max, confidence_psi,
                                     classes_psi)  # fmt: skip
        return DriftScore(
            scope=scope,
            device_id=device_id,
            model=model,
            version=version,
            at=at,
            windows=pool.windows,
            n=pool.n,
            psi_max=scores.psi_max,
            js_max=scores.js_max,
            severity=severity,
            signal=signal,
            top=top,
            confidence_psi=confidence_psi,
            classes_psi=classes_psi,
            invalid=dict(pool.invalid),
        )


def _severity(
    pool: _Pool,
    reference: Reference,
    features_psi: float,
    confidence_psi: float | None,
    classes_psi: float | None,
) -> tuple[str, str]:
    """``(severity, signal)``: the worst of the feature, confidence and class shifts
    that rest on enough rows (:func:`drift.min_rows`), and which one it is."""
    rows = drift.effective_rows(pool.n, reference.rows)
    if rows < drift.MIN_INPUTS:
        return drift.INSUFFICIENT, FEATURES
    candidates = [(FEATURES, features_psi)]
    if confidence_psi is not None:
        candidates.append((CONFIDENCE, confidence_psi))
    if (
        classes_psi is not None
        and reference.classes is not None
        and rows >= drift.min_rows(reference.classes.size)
    ):
        candidates.append((CLASSES, classes_psi))
    signal, worst = max(candidates, key=lambda candidate: candidate[1])
    severity = drift.severity(worst)
    return severity, signal if severity != "none" else FEATURES


def _optional_psi(shares: npt.NDArray[np.float64] | None, counts: IntArray | None) -> float | None:
    if shares is None or counts is None or counts.sum() == 0:
        return None
    return drift.psi(shares, counts, checked=True)
