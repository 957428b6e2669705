"""Labelled feedback on the agent's predictions: remember inputs, record true labels.

With ``training.feedback_max_examples > 0`` the agent opens a
:class:`~edge_agent.training.feedback.FeedbackCollector` (:func:`open_feedback`):

1. every prediction the model server makes is remembered with its inputs
   (:func:`remember`, on the caller's thread; multi-input models give no feedback);
2. a caller (``Agent.feedback``, ``POST /v1/feedback``) later sends the true
   label(s) or regression target(s) of a prediction by its id, and
   :func:`record_feedback` stores them as training examples, checking class labels
   against the served classifier's class count (:func:`class_count`);
3. the examples' buffer is part of the device's :class:`~edge_agent.training.data.LocalData`,
   so the next federated round trains on them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_agent.config.sections import TrainingConfig
from edge_agent.errors import TrainingError
from edge_agent.serving.server import LoadedModel, Prediction
from edge_agent.training.feedback import FeedbackBuffer, FeedbackCollector, PredictionLog

__all__ = ["class_count", "open_feedback", "record_feedback", "remember"]


def open_feedback(training: TrainingConfig, data_dir: Path) -> FeedbackCollector | None:
    """The feedback collector of ``training`` (its buffer under ``data_dir/feedback``),
    or None when feedback is off.

    Raises:
        StateError: the buffer cannot be opened.
    """
    if training.feedback_max_examples <= 0:
        return None
    return FeedbackCollector(
        PredictionLog(training.prediction_log),
        FeedbackBuffer(data_dir / "feedback", max_examples=training.feedback_max_examples),
    )


def remember(collector: FeedbackCollector, prediction: Prediction, inputs: Any) -> None:
    """Keep a prediction's inputs so that feedback can label them (HTTP threads)."""
    if isinstance(inputs, Mapping):
        if len(inputs) != 1:
            return  # multi-input models: no feedback
        inputs = next(iter(inputs.values()))
    collector.remember(prediction.id, inputs)


def record_feedback(
    collector: FeedbackCollector | None,
    model: LoadedModel | None,
    prediction_id: str,
    label: int | Sequence[int] | None,
    *,
    target: float | Sequence[float] | Sequence[Sequence[float]] | None,
) -> int:
    """Store the true label(s) or target(s) of an earlier prediction of ``model``.

    Returns:
        The number of examples stored.

    Raises:
        TrainingError: feedback is off, or the collector refused (see
            :meth:`~edge_agent.training.feedback.FeedbackCollector.record_feedback`).
        StateError: the examples cannot be written.
    """
    if collector is None:
        raise TrainingError("labelled feedback is off (training.feedback_max_examples = 0)")
    return collector.record_feedback(
        prediction_id, label, target=target, num_classes=class_count(model)
    )


def class_count(model: LoadedModel | None) -> int | None:
    """Classes of a served classifier (its first output's last dimension), if known."""
    if model is None or not model.runtime.outputs:
        return None
    shape = model.runtime.outputs[0].shape
    last = shape[-1] if shape else None
    return last if isinstance(last, int) and last > 0 else None
