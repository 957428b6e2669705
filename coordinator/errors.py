"""The one exception tree of the ``coordinator`` package.

The tree::

    CoordinatorError
    ├── PackagingError              a model could not be packaged as an artifact
    │   └── AccuracyDropError           int8 lost more accuracy than allowed
    └── TargetError                 a device target (all, device:ID, tag:TAG) is malformed

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
