"""Per-window summaries of what the served model receives and answers.

Workflow:

1. The agent builds one :class:`ServingMonitor`; the model server reports to it
   every valid prediction (:meth:`ServingMonitor.observe`: the profiled input and
   the model's first output) and every refused one (:meth:`ServingMonitor.refused`,
   by reason).
2. The monitor keeps one :class:`SummaryWindow` for the model being served, if its
   manifest carries a reference profile (:mod:`compress.profile`). A window
   counts, vectorised over a buffer of up to :data:`BUFFER_ROWS` rows (binning one
   row at a time would cost numpy's per-call overhead for every prediction): the
   examples' features in the profile's ten bins each
   (:func:`compress.profile.bin_counts`), the predicted class of each example
   (classification), and the confidence bin of each (max probability, or anomaly
   score); and refused requests by reason.
3. When the telemetry window closes, :meth:`ServingMonitor.close` returns the
   :class:`~edge_agent.protocol.WindowSummary` of the model the record names and
   starts a fresh window; the summary rides in the record (``summary``).

A new model being served starts a new window: counts never mix two models (the
previous model's partial window is dropped, with a log line). Without a profile no
summary is kept (refusals still fail the request and count as errors).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from compress.profile import (
    BINS,
    ReferenceProfile,
    bin_counts,
    class_probabilities,
    confidence_values,
    features,
)
from edge_agent.protocol.messages_summary import INVALID_REASONS, InvalidCounts, WindowSummary

__all__ = ["ServingMonitor", "SummaryWindow"]

logger = logging.getLogger(__name__)


#: Rows a window buffers before binning them all at once (amortises numpy's per-call
#: overhead: binning one row costs about as much as binning a hundred).
BUFFER_ROWS = 256


@dataclass(frozen=True, slots=True)
class _Rows:
    """What one batch adds to a window: per row its features, predicted class and
    confidence value, before binning."""

    n: int
    features: npt.NDArray[np.float32]
    classes: npt.NDArray[np.intp] | None
    confidence: npt.NDArray[np.float32] | None


class SummaryWindow:
    """Counts of one window against ``profile`` (not thread-safe: see ServingMonitor).

    Rows are buffered (:data:`BUFFER_ROWS`) and binned in one vectorised pass when the
    buffer fills and when the window closes.
    """

    def __init__(self, profile: ReferenceProfile) -> None:
        self._profile = profile
        self._edges = profile.edge_array()
        conf = profile.confidence
        self._conf_edges = None if conf is None else np.asarray([conf.edges], dtype=np.float64)
        self._classes = None if profile.classes is None else len(profile.classes)
        self._logits = conf is not None and conf.logits  # recorded at packaging
        self._buf_features = np.empty((BUFFER_ROWS, profile.feature_count), dtype=np.float32)
        self._buf_classes = np.empty(BUFFER_ROWS, dtype=np.intp)
        self._buf_confidence = np.empty(BUFFER_ROWS, dtype=np.float32)
        self._reset()

    def _reset(self) -> None:
        self._n = 0
        self._fill = 0
        self._features = np.zeros((self._profile.feature_count, BINS), dtype=np.int64)
        self._confidence = None if self._conf_edges is None else np.zeros(BINS, dtype=np.int64)
        self._class_counts = None if self._classes is None else np.zeros(self._classes, np.int64)
        self._invalid = dict.fromkeys(INVALID_REASONS, 0)

    @property
    def n(self) -> int:
        """Examples counted so far in this window."""
        return self._n

    def measure(self, x: npt.ArrayLike, outputs: npt.ArrayLike) -> _Rows | None:
        """What a batch of valid inputs ``x`` ``(n, *input_shape)`` and the model's first
        output for them add to the window (reads only the profile: safe without a lock).

        Raises:
            compress.errors.ProfileError: outputs that do not fit the profile's task.
        """
        batch = np.asarray(x, dtype=np.float32)
        if batch.ndim == 0 or batch.shape[0] == 0:
            return None
        classes = values = None
        if self._classes is not None:
            probs = class_probabilities(outputs, logits=self._logits)
            classes = probs.argmax(axis=1)
            values = probs.max(axis=1)
        elif self._conf_edges is not None:
            values = confidence_values(batch, outputs, self._profile.task)
        return _Rows(batch.shape[0], features(batch), classes, values)

    def merge(self, rows: _Rows) -> None:
        """Add what :meth:`measure` found to the window."""
        if self._fill + rows.n > BUFFER_ROWS:
            self._flush()
        if rows.n > BUFFER_ROWS:  # a large batch: bin it directly
            self._bin(rows.features, rows.classes, rows.confidence)
        else:
            end = self._fill + rows.n
            self._buf_features[self._fill : end] = rows.features
            if rows.classes is not None:
                self._buf_classes[self._fill : end] = rows.classes
            if rows.confidence is not None:
                self._buf_confidence[self._fill : end] = rows.confidence
            self._fill = end
        self._n += rows.n

    def _flush(self) -> None:
        if self._fill:
            fill = self._fill
            self._bin(
                self._buf_features[:fill],
                self._buf_classes[:fill] if self._class_counts is not None else None,
                self._buf_confidence[:fill] if self._confidence is not None else None,
            )
            self._fill = 0

    def _bin(
        self,
        feats: npt.NDArray[np.float32],
        classes: npt.NDArray[np.intp] | None,
        confidence: npt.NDArray[np.float32] | None,
    ) -> None:
        self._features += bin_counts(self._edges, feats)
        if self._class_counts is not None and classes is not None:
            size = self._class_counts.size
            self._class_counts += np.bincount(classes, minlength=size)[:size]
        if self._confidence is not None and self._conf_edges is not None and confidence is not None:
            self._confidence += bin_counts(self._conf_edges, confidence.reshape(-1, 1))[0]

    def add(self, x: npt.ArrayLike, outputs: npt.ArrayLike) -> None:
        """:meth:`measure` and :meth:`merge` a batch."""
        rows = self.measure(x, outputs)
        if rows is not None:
            self.merge(rows)

    def refuse(self, reason: str) -> None:
        """Count one refused request (``reason`` one of ``INVALID_REASONS``)."""
        self._invalid[reason] = self._invalid.get(reason, 0) + 1

    def close(self) -> WindowSummary:
        """The window's summary (cells saturated for the wire); the window restarts."""
        self._flush()
        summary = WindowSummary.from_arrays(
            n=self._n,
            features=self._features,
            confidence=self._confidence,
            classes=self._class_counts,
            invalid=InvalidCounts(
                **{r: min(c, 2**32 - 1) for r, c in self._invalid.items() if r in INVALID_REASONS}
            ),
        )
        self._reset()
        return summary


@dataclass(frozen=True, slots=True)
class _Served:
    name: str
    version: int


class ServingMonitor:
    """One :class:`SummaryWindow` for the model being served; thread-safe.

    Prediction threads call :meth:`observe` and :meth:`refused`; the agent's worker
    calls :meth:`close` with each telemetry window. The features are computed outside
    the lock; only the additions hold it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._served: _Served | None = None
        self._window: SummaryWindow | None = None

    def _window_for(
        self, name: str, version: int, profile: ReferenceProfile | None
    ) -> SummaryWindow | None:
        """The window of ``name`` v``version`` (a new one when the model changed).

        Call with the lock held.
        """
        served = _Served(name, version)
        if served != self._served:
            if self._window is not None and self._window.n:
                logger.info("dropping the partial summary window of %s v%d (%d examples)",
                            self._served.name if self._served else "?",
                            self._served.version if self._served else 0,
                            self._window.n)  # fmt: skip
            self._served = served
            self._window = None if profile is None else SummaryWindow(profile)
        return self._window

    def observe(
        self,
        name: str,
        version: int,
        profile: ReferenceProfile | None,
        x: npt.ArrayLike,
        outputs: npt.ArrayLike,
    ) -> None:
        """Count one valid prediction of ``name`` v``version`` (no-op without a profile).

        Raises:
            compress.errors.ProfileError: outputs that do not fit the profile's task.
        """
        if profile is None:
            return
        with self._lock:
            window = self._window_for(name, version, profile)
        if window is None:
            return
        rows = window.measure(x, outputs)  # outside the lock: the expensive part
        if rows is None:
            return
        with self._lock:
            if self._window is window:  # not replaced for another model meanwhile
                window.merge(rows)

    def refused(
        self, name: str, version: int, profile: ReferenceProfile | None, reason: str
    ) -> None:
        """Count one refused request to ``name`` v``version``."""
        if profile is None:
            return
        with self._lock:
            window = self._window_for(name, version, profile)
            if window is not None:
                window.refuse(reason)

    def close(
        self, name: str, version: int, profile: ReferenceProfile | None
    ) -> WindowSummary | None:
        """The summary of ``name`` v``version``'s window (empty when nothing was
        counted), which restarts; None when that model has no profile."""
        if profile is None:
            return None
        with self._lock:
            window = self._window_for(name, version, profile)
            return None if window is None else window.close()
