"""Screening a phase's updates together, so that no one device owns the aggregate (pure).

:func:`~coordinator.federated.update_check.check_update` looks at one update alone.
What it cannot see is how an update compares with the others of its round, nor
whether the example count that weighs it in FedAvg is believable. The grid
(:class:`~coordinator.federated.grid.MqttGrid`) therefore holds each checked update
back until every task of the phase has an outcome (or the deadline passed) and
then:

1. **Bounds its weight** (as soon as it arrives): the ``num-examples`` a strategy
   sees is :func:`bounded_examples`, the smallest of the count the device reported,
   the count it announced in its status when it was sampled
   (``DeviceRecord.train_examples``) and the run's ``max_examples_per_update``. A
   report above the bound is clipped (never trusted beyond it), logged naming the
   device and counted in the round's ``clipped_examples``.
2. **Rejects norm outliers** (:func:`norm_outliers`): with at least
   :data:`MIN_UPDATES_FOR_OUTLIERS` updates, an update whose L2 norm exceeds
   ``norm_multiple`` times the median norm of the phase's updates is rejected
   (reason ``norm_outlier``). The absolute ``max_update_norm`` still applies to
   each update on its own; this bound scales with the model and the round.
3. **Robust mode** (``--robust``, :func:`screen_updates` with ``robust=True``):
   every remaining update is clipped to the median norm (scaled down, direction
   kept) and its weight to the median of the remaining example counts. One device
   then moves a weighted average by at most ``median weight x median norm``
   divided by the total weight: no more than an honest median device.

The functions here take plain lists of norms and counts, so each rule is tested
without a broker.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_EXAMPLES_PER_UPDATE",
    "DEFAULT_NORM_MULTIPLE",
    "MIN_UPDATES_FOR_OUTLIERS",
    "Admission",
    "bounded_examples",
    "norm_outliers",
    "screen_updates",
]

DEFAULT_MAX_EXAMPLES_PER_UPDATE = 100_000
"""Default cap on the example count that weighs one update."""
DEFAULT_NORM_MULTIPLE = 10.0
"""Default: an update more than this many times the round's median norm is rejected."""
MIN_UPDATES_FOR_OUTLIERS = 3
"""Fewest updates in a phase for the median to say what an outlier is."""


def bounded_examples(reported: int, announced: int | None, cap: int) -> int:
    """The example count an update is weighted by.

    Args:
        reported: What the device's report claims.
        announced: What the device announced in its status when it was sampled
            (None: no announcement known, only the cap applies).
        cap: The run's ``max_examples_per_update``.

    Returns:
        ``min(reported, announced, cap)``, at least 1 (a device that announced no
        data is never sampled; should one answer anyway, it weighs one example).
    """
    bound = cap if announced is None else min(announced, cap)
    return max(1, min(reported, bound))


def norm_outliers(norms: Sequence[float], multiple: float) -> frozenset[int]:
    """The positions of updates whose norm exceeds ``multiple`` x the median norm.

    Args:
        norms: The L2 norms of a phase's updates (finite, non-negative).
        multiple: How far above the median an update may be (``inf``: never an outlier).

    Returns:
        Indexes into ``norms``; empty with fewer than :data:`MIN_UPDATES_FOR_OUTLIERS`.
    """
    if len(norms) < MIN_UPDATES_FOR_OUTLIERS or math.isinf(multiple):
        return frozenset()
    limit = multiple * statistics.median(norms)
    return frozenset(i for i, norm in enumerate(norms) if norm > limit)


@dataclass(frozen=True)
class Admission:
    """What becomes of one update of the phase.

    Attributes:
        outlier: Rejected as a norm outlier (the other fields do not apply).
        scale: Factor applied to the update (1.0: unchanged; below 1: clipped to
            the median norm in robust mode).
        weight: The ``num-examples`` the strategy sees.
    """

    outlier: bool
    scale: float
    weight: int


def screen_updates(
    norms: Sequence[float],
    weights: Sequence[int],
    *,
    multiple: float,
    robust: bool,
) -> list[Admission]:
    """Screen a phase's updates together (see the module docstring).

    Args:
        norms: Each update's L2 norm.
        weights: Each update's bounded example count (:func:`bounded_examples`).
        multiple: The run's ``norm_multiple``.
        robust: Clip the remaining updates to the median norm and their weights to
            the median weight.

    Returns:
        One :class:`Admission` per update, in order.
    """
    outliers = norm_outliers(norms, multiple)
    kept = [i for i in range(len(norms)) if i not in outliers]
    norm_cap = statistics.median(norms) if norms else 0.0
    weight_cap = max(1, int(statistics.median(weights[i] for i in kept))) if kept else 1
    admissions = []
    for i, (norm, weight) in enumerate(zip(norms, weights, strict=True)):
        scale, bounded = 1.0, weight
        if robust:
            bounded = min(weight, weight_cap)
            if norm > norm_cap:
                scale = norm_cap / norm
        admissions.append(Admission(i in outliers, scale, bounded))
    return admissions
