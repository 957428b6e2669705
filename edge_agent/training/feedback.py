"""Labelled feedback: learn from predictions whose true label arrives later.

An application asks the agent for a prediction, acts on it, and later learns what
the right answer was (the user corrected it, the event happened or did not). It
posts that label with the prediction's id, and the example becomes local training
data for the next federated round. Three pieces:

1. :class:`PredictionLog` remembers the inputs of the last ``capacity``
   predictions (default 1024, bounded in bytes too), in memory only: the agent
   calls :meth:`PredictionLog.record` after each successful prediction, from
   whichever HTTP thread served it. Inputs are a batch ``(n, *example_shape)`` of
   any example shape the served model takes (rows, images, sensor windows); a
   1-D input is one row.
2. :class:`~edge_agent.training.feedback_buffer.FeedbackBuffer` keeps labelled
   examples on disk (default at most 10,000
   and 64 MiB; the oldest are dropped beyond either bound) and hands
   them to :class:`~edge_agent.training.data.LocalData` as a
   :class:`~edge_agent.training.trainer.Dataset`.
3. :class:`FeedbackCollector` joins them: :meth:`FeedbackCollector.record_feedback`
   looks the prediction up, checks the class label(s) or float target(s), stores
   the labelled examples and forgets the prediction (each prediction is labelled at
   most once). An unknown, expired or already labelled id raises
   :class:`~edge_agent.errors.UnknownPredictionError` (logged); a label that is not an
   integer in ``[0, num_classes)``, a target that is not a finite number, or a count
   that does not match the prediction's examples, raises
   :class:`~edge_agent.errors.InvalidLabelError`.

Prediction ids are made by :class:`edge_agent.serving.server.ModelServer`: 128
random bits each (``secrets.token_urlsafe``), so only the client that got a
prediction can label it; a guessed id is refused as unknown.

A classifier's feedback is a class label (``label``); an anomaly detector's is a
label too (0 normal, 1 anomaly; only normal examples train the autoencoder); a
regression model's is its true value (``target``: one number per example, or a list
of its outputs).

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
    as_examples,
    check_labels,
    check_targets,
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
"""Bytes of inputs :class:`PredictionLog` holds by default."""

MAX_ROWS_PER_PREDICTION = 256
"""Default most examples of one prediction the log keeps (bigger batches are not kept)."""

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
    """The inputs of the most recent predictions, by prediction id (in memory).

    Args:
        capacity: Most predictions remembered (>= 1); the oldest are forgotten.
        max_bytes: Most bytes of inputs held (>= 1); the oldest are forgotten.
        max_rows: Predictions of more examples than this are not remembered.

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
        """Bytes of inputs held."""
        with self._lock:
            return self._bytes

    def record(self, prediction_id: str, inputs: npt.ArrayLike) -> bool:
        """Remember the inputs of prediction ``prediction_id`` (a copy, float32).

        The first axis counts examples and the rest is one example's shape, as the
        model was given it (see
        :func:`~edge_agent.training.feedback_buffer.as_examples`); a 1-D input is
        one row. Inputs that could never become training examples (non-finite,
        non-numeric, too many examples, values or bytes) are not kept, which is
        logged at debug level: recording never fails a prediction. Recording an id
        again replaces its inputs.

        Args:
            prediction_id: The prediction's id (1-128 of ``[A-Za-z0-9_.:-]``).
            inputs: The batch the model was given.

        Returns:
            Whether the rows were kept.

        Raises:
            UnknownPredictionError: ``prediction_id`` is not a valid id.
        """
        _check_id(prediction_id)
        try:
            rows = as_examples(inputs)
        except DataSourceError as exc:
            logger.debug("prediction log: not keeping %s: %s", prediction_id, exc)
            return False
        if rows.shape[0] > self._max_rows or rows.nbytes > self._max_bytes:
            logger.debug(
                "prediction log: not keeping %s: %d examples, %d bytes is over the bounds",
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
        """The inputs of ``prediction_id`` (read-only), or None if not remembered."""
        with self._lock:
            return self._rows.get(prediction_id)

    def pop(self, prediction_id: str) -> FloatArray | None:
        """Forget ``prediction_id``; return its inputs, or None if not remembered."""
        with self._lock:
            return self._discard(prediction_id)

    def _discard(self, prediction_id: str) -> FloatArray | None:
        rows = self._rows.pop(prediction_id, None)
        if rows is not None:
            self._bytes -= rows.nbytes
        return rows


# ------------------------------------------------------------------ labels, collector


class FeedbackCollector:
    """Turns (prediction id, true label or target) reports into stored training examples.

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
        label: int | np.integer[Any] | Sequence[int | np.integer[Any]] | None = None,
        *,
        target: object = None,
        num_classes: int | None = None,
    ) -> int:
        """Store the true label(s) or target(s) of prediction ``prediction_id``.

        Give exactly one of ``label`` (class indices: a classifier's or an anomaly
        detector's feedback) and ``target`` (float values: a regression model's).
        A one-example prediction takes one label (an int, or a list of one) or one
        target (a number, a list of one, or a list of one list of its outputs); a
        prediction of several examples takes a list with one entry per example.
        Once stored, the prediction is forgotten, so a second report for the same
        id is refused; when storing fails, it stays in the log and the report can be
        retried.

        Args:
            prediction_id: The id the prediction was answered with.
            label: The true class index, or one per example.
            target: The true value(s) (see
                :func:`~edge_agent.training.feedback_buffer.check_targets`).
            num_classes: Labels must be below this (default: the collector's).

        Returns:
            The number of examples stored.

        Raises:
            UnknownPredictionError: The id is malformed, was never recorded, has been
                forgotten (the log keeps only recent predictions), or was already
                labelled.
            InvalidLabelError: Neither or both of ``label`` and ``target``; a label is
                not an integer in ``[0, num_classes)``; a target is not a finite
                number; or their count does not match the prediction's examples.
            DataSourceError: The examples do not fit those already stored (another
                shape, or the other kind of label).
            StateError: The examples cannot be written.
        """
        _check_id(prediction_id)
        if (label is None) == (target is None):
            raise InvalidLabelError("give exactly one of a label (class index) and a target")
        bound = self._num_classes if num_classes is None else num_classes
        if isinstance(bound, bool) or not isinstance(bound, int) or not 1 <= bound <= MAX_CLASSES:
            raise TrainingError(f"num_classes must be in [1, {MAX_CLASSES}], got {bound!r}")
        with self._lock:
            examples = self._log.get(prediction_id)
            if examples is None:
                logger.info("feedback: refused for unknown prediction id %s", prediction_id)
                raise UnknownPredictionError(
                    f"prediction {prediction_id} is unknown, too old (only the last "
                    "predictions are remembered) or already labelled"
                )
            count = int(examples.shape[0])
            if target is not None:
                self._buffer.add_targets(examples, check_targets(target, count))
            else:
                self._buffer.add_many(examples, _labels(prediction_id, label, count, bound))
            self._log.pop(prediction_id)
        logger.debug("feedback: stored %d example(s) from %s", count, prediction_id)
        return count


def _labels(prediction_id: str, label: object, count: int, bound: int) -> list[int]:
    """One checked class label per example of a prediction.

    Raises:
        InvalidLabelError: See :meth:`FeedbackCollector.record_feedback`.
    """
    if isinstance(label, int | np.integer) and not isinstance(label, bool | np.bool_):
        if count != 1:
            raise InvalidLabelError(
                f"prediction {prediction_id} has {count} rows: give a list of "
                f"{count} labels, one per row"
            )
        return check_labels([label], bound)
    labels = check_labels(label, bound)
    if len(labels) != count:
        raise InvalidLabelError(
            f"prediction {prediction_id} has {count} row(s) but {len(labels)} label(s) were given"
        )
    return labels
