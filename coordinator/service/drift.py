"""The service's drift monitor: telemetry summaries in, drift scores in the store.

:class:`~coordinator.service.ingest.Ingest` buffers every telemetry window that carries
a :class:`~edge_agent.protocol.WindowSummary` and, at each flush (on its writer
thread, never the network thread), hands them to :meth:`DriftMonitor.add_windows`:

1. the reference of the model version a window names comes from the manifest of the
   artifact the service stored for it (``artifacts`` table, ``manifest.reference``,
   parsed with :meth:`compress.profile.ReferenceProfile.from_dict`); it is cached per
   version, and a version without an artifact or a profile is looked up again after
   :data:`MISS_RETRY_S` (its artifact may be uploaded later). Windows of such a
   version are skipped and counted (``no_reference``);
2. the summary must fit the profile (:meth:`WindowSummary.check_fits`: as many
   features and classes, a confidence signal exactly when the profile has one), and
   the pure :class:`~coordinator.monitoring.tracker.DriftTracker` checks its counts
   against the reference; a window that fails either is refused, logged and counted
   by reason (other devices are unaffected); the tracker scores the device over its
   recent windows;
3. each model version that got a window is scored fleet-wide (windows older than
   :data:`WINDOW_MAX_AGE_S` have left the tracker: a device gone quiet stops counting);
4. the scores are appended to the store in one transaction: every device score (one
   per window, as telemetry), and a version's fleet score at most every
   ``fleet_every_s`` unless its severity changed (flushes come every fraction of a
   second)
   (:meth:`~coordinator.service.store.Store.add_drift_scores`); a store failure is
   logged and those scores are lost (the next flush computes fresh ones).

Views: :meth:`DriftMonitor.scores` (the store's latest score per device and per
fleet, what ``GET /v1/drift`` and ``fedge drift`` show), :meth:`DriftMonitor.figures`
and :meth:`DriftMonitor.rejected` (refused windows by reason) for ``/metrics``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from compress.errors import ProfileError
from compress.profile import ReferenceProfile
from coordinator.errors import StoreError, SummaryRejectedError
from coordinator.monitoring.scores import FLEET, DriftScore
from coordinator.monitoring.tracker import DriftTracker, Reference, WindowCounts
from coordinator.service.store import Store
from edge_agent.errors import SummaryError
from edge_agent.protocol import TelemetryRecord, WindowSummary

__all__ = ["MISS_RETRY_S", "DriftMonitor", "reference_of", "window_counts"]

logger = logging.getLogger(__name__)

_Known = tuple[ReferenceProfile, Reference]
"""A model version's profile and the tracker's view of it."""

MISS_RETRY_S = 60.0
"""Seconds before a model version without a stored reference is looked up again."""
WINDOW_MAX_AGE_S = 86400.0
"""Windows older than this leave the tracker (a device that went away stops counting)."""
EXPIRE_EVERY_S = 60.0
"""Seconds between two expiry passes over the tracker's windows."""
FLEET_EVERY_S = 30.0
"""Seconds between two stored fleet scores of a version whose severity is unchanged."""


def reference_of(profile: ReferenceProfile) -> Reference:
    """The tracker's view of a manifest's reference profile.

    Raises:
        SummaryRejectedError: ``bad_reference`` (shares that are not distributions).
    """
    return Reference(
        features=np.asarray(profile.reference, dtype=np.float64),
        classes=None if profile.classes is None else np.asarray(profile.classes, np.float64),
        confidence=(
            None
            if profile.confidence is None
            else np.asarray(profile.confidence.reference, dtype=np.float64)
        ),
        rows=profile.rows,
    )


def _check_fits(summary: WindowSummary, profile: ReferenceProfile) -> None:
    """The protocol's rule (:meth:`WindowSummary.check_fits`), as the tracker's refusal.

    Raises:
        SummaryRejectedError: ``wrong_features`` or ``wrong_shape``.
    """
    try:
        summary.check_fits(profile)
    except SummaryError as exc:
        reason = (
            "wrong_features" if len(summary.features) != profile.feature_count else "wrong_shape"
        )
        raise SummaryRejectedError(reason, str(exc)) from exc


def window_counts(summary: WindowSummary) -> WindowCounts:
    """The tracker's view of a device's window summary."""
    return WindowCounts(
        n=summary.n,
        features=summary.feature_counts(),
        classes=summary.classes,
        confidence=summary.confidence,
        invalid=summary.invalid.to_json(),
    )


class DriftMonitor:
    """Scores telemetry summaries against the deployed versions' references (thread-safe).

    Args:
        store: Where artifacts are read and scores written.
        tracker: The tracker (a default one if None).
        clock: The service's clock (scores' ``at``).
        fleet_every_s: Least time between two stored fleet scores of a version
            (one whose severity changed is stored at once).
    """

    def __init__(
        self,
        store: Store,
        tracker: DriftTracker | None = None,
        *,
        clock: Callable[[], float] = time.time,
        fleet_every_s: float = FLEET_EVERY_S,
    ) -> None:
        """Start with no windows and an empty reference cache."""
        self._store = store
        self._fleet_every_s = fleet_every_s
        self._fleet_saved: dict[tuple[str, int], DriftScore] = {}
        self._expired_at = clock()
        self._tracker = tracker or DriftTracker()
        self._clock = clock
        self._lock = threading.Lock()
        self._references: dict[tuple[str, int], tuple[_Known | None, float]] = {}
        self._skipped: collections.Counter[str] = collections.Counter()

    def add_windows(self, windows: Sequence[tuple[str, TelemetryRecord]]) -> list[DriftScore]:
        """Score a flush's windows (``(device_id, record)``) and store the scores.

        Records without a summary or a model are ignored.

        Returns:
            The scores stored (devices first, then the fleet scores due).
        """
        now = self._clock()
        scores: list[DriftScore] = []
        with self._lock:
            if now - self._expired_at >= EXPIRE_EVERY_S:
                self._expired_at = now
                self._tracker.expire(now - WINDOW_MAX_AGE_S)
            touched: dict[tuple[str, int], Reference] = {}
            for device_id, record in windows:
                if record.summary is None or record.model is None or record.version is None:
                    continue
                known = self._reference(record.model, record.version, now)
                if known is None:
                    self._skipped["no_reference"] += 1
                    continue
                profile, reference = known
                try:
                    _check_fits(record.summary, profile)
                    score = self._tracker.add(device_id, record.model, record.version,
                                              reference, window_counts(record.summary),
                                              at=now)  # fmt: skip
                except SummaryRejectedError as exc:
                    self._tracker.refused(device_id, record.model, record.version, exc)
                    continue
                touched[(record.model, record.version)] = reference
                if score is not None:
                    scores.append(score)
            for (model, version), reference in sorted(touched.items()):
                fleet = self._tracker.fleet(model, version, reference, at=now)
                if fleet is not None and self._fleet_due(fleet):
                    self._fleet_saved[(model, version)] = fleet
                    scores.append(fleet)
        if scores:
            try:
                self._store.add_drift_scores(scores)
            except StoreError as exc:
                logger.error("%d drift score(s) not stored: %s", len(scores), exc)
        return scores

    def _fleet_due(self, score: DriftScore) -> bool:
        last = self._fleet_saved.get((score.model, score.version))
        return (
            last is None
            or last.severity != score.severity
            or score.at - last.at >= self._fleet_every_s
        )

    def _reference(self, model: str, version: int, now: float) -> _Known | None:
        """The version's profile from its stored manifest (cached; call with the lock)."""
        cached = self._references.get((model, version))
        if cached is not None and (cached[0] is not None or now - cached[1] < MISS_RETRY_S):
            return cached[0]
        known = None
        try:
            artifacts = self._store.artifacts()
        except StoreError as exc:
            logger.error("drift: cannot read the artifacts: %s", exc)
            return None
        for row in artifacts:
            raw = row.manifest.get("reference")
            if row.name != model or row.version != version or not isinstance(raw, dict):
                continue
            try:
                profile = ReferenceProfile.from_dict(raw)
                known = (profile, reference_of(profile))
            except (ProfileError, SummaryRejectedError) as exc:
                logger.error("drift: artifact %s (%s v%d) has an unusable reference: %s",
                             row.sha256, model, version, exc)  # fmt: skip
                continue
            break
        if known is None:
            logger.info("drift: no reference profile stored for %s v%d; its windows are "
                        "not scored", model, version)  # fmt: skip
        self._references[(model, version)] = (known, now)
        return known

    def scores(self, *, device_id: str | None = None, model: str | None = None) -> list[DriftScore]:
        """The latest stored score of each subject (see :meth:`Store.drift_scores`)."""
        return self._store.drift_scores(device_id=device_id, model=model)

    def figures(self) -> tuple[dict[tuple[str, int], float], dict[tuple[str, int, str], int]]:
        """For ``/metrics``: the latest fleet PSI per ``(model, version)``, and devices
        per ``(model, version, severity)`` of their latest score."""
        fleet_psi: dict[tuple[str, int], float] = {}
        severities: collections.Counter[tuple[str, int, str]] = collections.Counter()
        for score in self.scores():
            if score.scope == FLEET:
                fleet_psi[(score.model, score.version)] = score.psi_max
            else:
                severities[(score.model, score.version, score.severity)] += 1
        return fleet_psi, dict(severities)

    def rejected(self) -> dict[str, int]:
        """Windows refused or skipped since start, by reason."""
        with self._lock:
            return dict(self._tracker.rejected()) | dict(self._skipped)
