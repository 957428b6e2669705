"""Labelled feedback: learn from predictions whose true label arrives later.

An application asks the agent for a prediction, acts on it, and later learns what
the right answer was (the user corrected it, the event happened or did not). It
posts that label with the prediction's id, and the example becomes local training
data for the next federated round. Three pieces:

1. :class:`PredictionLog` remembers the input rows of the last ``capacity``
   predictions (default 1024, bounded in bytes too), in memory only: the agent
   calls :meth:`PredictionLog.record` after each successful prediction, from
   whichever HTTP thread served it.
2. :class:`~edge_agent.training.feedback_buffer.FeedbackBuffer` keeps labelled
   examples on disk (default at most 10,000
   and 64 MiB of features; the oldest are dropped beyond either bound) and hands
   them to :class:`~edge_agent.training.data.LocalData` as a
   :class:`~edge_agent.training.trainer.Dataset`.
3. :class:`FeedbackCollector` joins them: :meth:`FeedbackCollector.record_feedback`
   looks the prediction up, checks the label(s), stores the labelled rows and
   forgets the prediction (each prediction is labelled at most once). An unknown,
   expired or already labelled id raises
   :class:`~edge_agent.errors.UnknownPredictionError`; a label that is not an
   integer in ``[0, num_classes)``, or a label count that does not match the
   prediction's rows, raises :class:`~edge_agent.errors.InvalidLabelError`.

The buffer lives in :mod:`edge_agent.training.feedback_buffer` (its storage is the
agent's one crash-safe log); this module re-exports it.

All three classes are thread-safe (one lock each); the buffer is not
multi-process safe: one agent owns its directory.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.errors import (
    ConfigError,
    DataSourceError,
    InvalidLabelError,
    TrainingError,
    UnknownPredictionError,
)
from edge_agent.training.feedback_buffer import (
    DEFAULT_FEEDBACK_MAX_BYTES,
    DEFAULT_FEEDBACK_MAX_EXAMPLES,
    FEEDBACK_FILE,
    MAX_FEATURES,
    FeedbackBuffer,
    as_rows,
    check_labels,
)
from edge_agent.training.trainer import MAX_CLASSES, FloatArray

__all__ = [
    "DEFAULT_FEEDBACK_MAX_BYTES",
    "DEFAULT_FEEDBACK_MAX_EXAMPLES",
    "DEFAULT_LOG_CAPACITY",
    "DEFAULT_LOG_MAX_BYTES",
    "FEEDBACK_FILE",
    "MAX_FEATURES",
    "MAX_ROWS_PER_PREDICTION",
    "FeedbackBuffer",
    "FeedbackCollector",
    "PredictionLog",
]

logger = logging.getLogger(__name__)

DEFAULT_LOG_CAPACITY = 1024
"""Predictions :class:`PredictionLog` remembers by default."""

DEFAULT_LOG_MAX_BYTES = 16 * 1024 * 1024
"""Bytes of input rows :class:`PredictionLog` holds by default."""

MAX_ROWS_PER_PREDICTION = 256
"""Default most rows of one prediction the log keeps (bigger batches are not kept)."""

_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def _check_id(prediction_id: object) -> str:
    if not isinstance(prediction_id, str) or not _ID_RE.fullmatch(prediction_id):
        shown = prediction_id[:80] if isinstance(prediction_id, str) else prediction_id
        raise UnknownPredictionError(
            f"invalid prediction id {shown!r}: expected 1-128 of [A-Za-z0-9_.:-]"
        )
    return prediction_id


# ------------------------------------------------------------------ prediction log


class PredictionLog:
    """The input rows of the most recent predictions, by prediction id (in memory).

    Args:
        capacity: Most predictions remembered (>= 1); the oldest are forgotten.
        max_bytes: Most bytes of rows held (>= 1); the oldest are forgotten.
        max_rows: Predictions with more rows than this are not remembered.

    Raises:
        ConfigError: A bound is below 1.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_LOG_CAPACITY,
        *,
        max_bytes: int = DEFAULT_LOG_MAX_BYTES,
        max_rows: int = MAX_ROWS_PER_PREDICTION,
    ) -> None:
        if capacity < 1 or max_bytes < 1 or max_rows < 1:
            raise ConfigError(
                f"prediction log bounds must be >= 1, got capacity={capacity} "
                f"max_bytes={max_bytes} max_rows={max_rows}"
            )
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._max_rows = max_rows
        self._lock = threading.Lock()
        self._rows: OrderedDict[str, FloatArray] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        """The number of predictions remembered."""
        with self._lock:
            return len(self._rows)

    def __contains__(self, prediction_id: object) -> bool:
        """Whether ``prediction_id`` is remembered."""
        with self._lock:
            return prediction_id in self._rows

    @property
    def size_bytes(self) -> int:
        """Bytes of rows held."""
        with self._lock:
            return self._bytes

    def record(self, prediction_id: str, inputs: npt.ArrayLike) -> bool:
        """Remember the inputs of prediction ``prediction_id`` (a copy, float32).

        A 1-D input is one row; an input of more dimensions is flattened to one
        row per entry of its first axis. Inputs that could never become training
        examples (non-finite, non-numeric, too many rows or bytes) are not kept,
        which is logged at debug level: recording never fails a prediction.
        Recording an id again replaces its rows.

        Args:
            prediction_id: The prediction's id (1-128 of ``[A-Za-z0-9_.:-]``).
            inputs: The rows the model was given.

        Returns:
            Whether the rows were kept.

        Raises:
            UnknownPredictionError: ``prediction_id`` is not a valid id.
        """
        _check_id(prediction_id)
        try:
            rows = as_rows(inputs)
        except DataSourceError as exc:
            logger.debug("prediction log: not keeping %s: %s", prediction_id, exc)
            return False
        if rows.shape[0] > self._max_rows or rows.nbytes > self._max_bytes:
            logger.debug(
                "prediction log: not keeping %s: %d rows, %d bytes is over the bounds",
                prediction_id,
                rows.shape[0],
                rows.nbytes,
            )
            return False
        with self._lock:
            self._discard(prediction_id)
            while self._rows and (
                len(self._rows) >= self._capacity or self._bytes + rows.nbytes > self._max_bytes
            ):
                oldest = next(iter(self._rows))
                self._discard(oldest)
            self._rows[prediction_id] = rows
            self._bytes += rows.nbytes
        return True

    def get(self, prediction_id: str) -> FloatArray | None:
        """The rows of ``prediction_id`` (read-only), or None if not remembered."""
        with self._lock:
            return self._rows.get(prediction_id)

    def pop(self, prediction_id: str) -> FloatArray | None:
        """Forget ``prediction_id``; return its rows, or None if not remembered."""
        with self._lock:
            return self._discard(prediction_id)

    def _discard(self, prediction_id: str) -> FloatArray | None:
        rows = self._rows.pop(prediction_id, None)
        if rows is not None:
            self._bytes -= rows.nbytes
        return rows


# ------------------------------------------------------------------ labels, collector


class FeedbackCollector:
    """Turns (prediction id, true label) reports into stored training examples.

    Args:
        log: Where the agent records each prediction's inputs.
        buffer: Where labelled examples are stored.
        num_classes: Labels must be below this (default :data:`MAX_CLASSES`);
            :meth:`record_feedback` can narrow it per call (the installed model's
            class count).

    Raises:
        ConfigError: ``num_classes`` is not in ``[1, MAX_CLASSES]``.
    """

    def __init__(
        self, log: PredictionLog, buffer: FeedbackBuffer, *, num_classes: int = MAX_CLASSES
    ) -> None:
        if not 1 <= num_classes <= MAX_CLASSES:
            raise ConfigError(f"num_classes must be in [1, {MAX_CLASSES}], got {num_classes}")
        self._log = log
        self._buffer = buffer
        self._num_classes = num_classes
        self._lock = threading.Lock()

    @property
    def log(self) -> PredictionLog:
        """The prediction log."""
        return self._log

    @property
    def buffer(self) -> FeedbackBuffer:
        """The labelled-example buffer."""
        return self._buffer

    def remember(self, prediction_id: str, inputs: npt.ArrayLike) -> bool:
        """Record a prediction's inputs (see :meth:`PredictionLog.record`).

        Returns:
            Whether they were kept.

        Raises:
            UnknownPredictionError: ``prediction_id`` is not a valid id.
        """
        return self._log.record(prediction_id, inputs)

    def record_feedback(
        self,
        prediction_id: str,
        label: int | np.integer[Any] | Sequence[int | np.integer[Any]],
        *,
        num_classes: int | None = None,
    ) -> int:
        """Store the true label(s) of prediction ``prediction_id`` as training examples.

        A one-row prediction takes one label (an int, or a list of one); a
        prediction of several rows takes a list with one label per row. Once
        stored, the prediction is forgotten, so a second report for the same id is
        refused; when storing fails, it stays in the log and the report can be
        retried.

        Args:
            prediction_id: The id the prediction was answered with.
            label: The true class index, or one per row.
            num_classes: Labels must be below this (default: the collector's).

        Returns:
            The number of examples stored.

        Raises:
            UnknownPredictionError: The id is malformed, was never recorded, has been
                forgotten (the log keeps only recent predictions), or was already
                labelled.
            InvalidLabelError: A label is not an integer in ``[0, num_classes)``, or
                the number of labels does not match the prediction's rows.
            DataSourceError: The rows do not fit the examples already stored (a
                different feature count).
            StateError: The examples cannot be written.
        """
        _check_id(prediction_id)
        bound = self._num_classes if num_classes is None else num_classes
        if isinstance(bound, bool) or not isinstance(bound, int) or not 1 <= bound <= MAX_CLASSES:
            raise TrainingError(f"num_classes must be in [1, {MAX_CLASSES}], got {bound!r}")
        with self._lock:
            rows = self._log.get(prediction_id)
            if rows is None:
                raise UnknownPredictionError(
                    f"prediction {prediction_id} is unknown, too old (only the last "
                    "predictions are remembered) or already labelled"
                )
            n_rows = int(rows.shape[0])
            if isinstance(label, int | np.integer) and not isinstance(label, bool | np.bool_):
                if n_rows != 1:
                    raise InvalidLabelError(
                        f"prediction {prediction_id} has {n_rows} rows: give a list of "
                        f"{n_rows} labels, one per row"
                    )
                labels = check_labels([label], bound)
            else:
                labels = check_labels(label, bound)
                if len(labels) != n_rows:
                    raise InvalidLabelError(
                        f"prediction {prediction_id} has {n_rows} row(s) but "
                        f"{len(labels)} label(s) were given"
                    )
            self._buffer.add_many(rows, labels)
            self._log.pop(prediction_id)
        logger.debug("feedback: stored %d example(s) from %s", n_rows, prediction_id)
        return n_rows
