"""The one exception tree of the ``coordinator`` package.

The tree::

    CoordinatorError
    ├── PackagingError              a model could not be packaged as an artifact
    │   └── AccuracyDropError           int8 lost more accuracy than allowed
    ├── TargetError                 a device target (all, device:ID, tag:TAG) is malformed
    ├── UpdateRejectedError         a device's update failed validation (never aggregated)
    └── TrainingError               a federated run cannot start or go on
        └── StrategyError               an unknown strategy, or bad strategy arguments

Errors from :mod:`compress` and :mod:`edge_agent` pass through unchanged; the CLI
turns any of the three trees into a one-line message and a non-zero exit.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class of every error raised by :mod:`coordinator`."""

    code = "coordinator_error"


class PackagingError(CoordinatorError):
    """A model could not be packaged (bad inputs, evaluation data, model file)."""

    code = "packaging_failed"


class AccuracyDropError(PackagingError):
    """The quantized model lost more accuracy than ``--max-accuracy-drop`` allows."""

    code = "accuracy_drop"


class TargetError(CoordinatorError):
    """A device target is not ``all``, ``device:ID[,ID...]`` or ``tag:TAG``."""

    code = "bad_target"


class UpdateRejectedError(CoordinatorError):
    """A device's update failed validation; it is counted, never aggregated.

    Attributes:
        reason: One of :data:`coordinator.update_check.REJECT_REASONS`.
    """

    code = "update_rejected"

    def __init__(self, reason: str, detail: str) -> None:
        """Keep the machine-readable reason with the message."""
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class TrainingError(CoordinatorError):
    """A federated run cannot start or go on (bad settings, no eligible devices)."""

    code = "training_failed"


class StrategyError(TrainingError):
    """An unknown strategy name, an unloadable ``module:Class`` or bad arguments."""

    code = "bad_strategy"
