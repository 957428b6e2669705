"""Input validation: is a prediction's input one the served model was packaged for?

:class:`~edge_agent.serving.server.ModelServer` converts each input to its
declared dtype and then calls :func:`check_input` on it, before the model runs. A
problem is refused with :func:`refusal`, an
:class:`~edge_agent.errors.InvalidInputError` whose ``reason`` is one of
:data:`~edge_agent.protocol.messages_summary.INVALID_REASONS`:

* ``dtype``: the value cannot be converted to the input's dtype without loss (not
  numbers, ragged lists, a value that overflows it such as ``1e39`` for float32);
* ``shape``: a different rank, a fixed dimension that differs (the batch dimension
  is free), or input names that are not the model's;
* ``nan``: a float input holds NaN or an infinity;
* ``out_of_range``: a value of the profiled input (the manifest's first) is outside
  the reference profile's ``value_range`` (only when the manifest has a profile).

The checks are vectorised: one ``min`` and one ``max`` over the input answer both
``nan`` (NaN propagates through them) and ``out_of_range``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge_agent.errors import InvalidInputError

__all__ = ["InputProblem", "TensorShape", "check_input", "refusal"]

logger = logging.getLogger(__name__)


class TensorShape(Protocol):
    """What validation needs of an input spec (a manifest ``TensorSpec`` or a
    runtime ``TensorInfo``)."""

    @property
    def name(self) -> str:
        """The input's name."""
        ...

    @property
    def shape(self) -> tuple[int | None, ...]:
        """Its dimensions, None for a dynamic one."""
        ...


@dataclass(frozen=True, slots=True)
class InputProblem:
    """Why an input is refused.

    Attributes:
        reason: ``shape``, ``dtype``, ``nan`` or ``out_of_range``.
        detail: A one-line explanation for the caller and the log.
    """

    reason: str
    detail: str


def check_input(
    x: npt.NDArray[np.generic],
    spec: TensorShape,
    value_range: tuple[float, float] | None = None,
) -> InputProblem | None:
    """Check one converted input against its spec and, optionally, a value range.

    Returns:
        The first problem found (shape, then NaN/inf, then range), or None.
    """
    fits = x.ndim == len(spec.shape) and all(
        d is None or d == n for d, n in zip(spec.shape, x.shape, strict=True)
    )
    if not fits:
        shown = tuple("?" if d is None else d for d in spec.shape)
        return InputProblem(
            "shape", f"input {spec.name!r} must have shape {shown}, got {tuple(x.shape)}"
        )
    if x.size == 0 or x.dtype.kind not in "fiu":
        return None
    lo, hi = float(x.min()), float(x.max())
    if x.dtype.kind == "f" and not (math.isfinite(lo) and math.isfinite(hi)):
        return InputProblem("nan", f"input {spec.name!r} holds NaN or infinite values")
    if value_range is not None and (lo < value_range[0] or hi > value_range[1]):
        return InputProblem(
            "out_of_range",
            f"input {spec.name!r} has values in [{lo:.6g}, {hi:.6g}], outside the "
            f"reference range [{value_range[0]:.6g}, {value_range[1]:.6g}]",
        )
    return None


def refusal(problem: InputProblem, model: str) -> InvalidInputError:
    """The typed error for ``problem`` (logged here, once per refused request)."""
    logger.warning("refused an input to %s (%s): %s", model, problem.reason, problem.detail)
    return InvalidInputError(
        f"invalid input ({problem.reason}): {problem.detail}", reason=problem.reason
    )
