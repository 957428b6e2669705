"""Health samples and baselines: how a device's telemetry judges a new version.

The rollout engine keeps, per device, the telemetry windows of the version it
served before (its *baseline*) and the latest window of the rollout's version, as
:class:`HealthSample` values. Pure values and functions: no I/O.

Health (:meth:`~coordinator.rollout.engine.Rollout.on_health`): telemetry windows
of another version of the model update the device's baseline (its last
:data:`BASELINE_WINDOWS` windows with enough calls, combined by
:func:`combine_baseline`); windows of the rollout's version from an installed
device are judged against it (see
:class:`~coordinator.rollout.policy.HealthPolicy`).

A window of the new version fails (:func:`health_problem`) when its error rate is
above the baseline's by more than ``max_error_rate``, or its p95 latency above the
baseline's times ``max_p95_ratio`` (when both have successful calls) and above
:data:`P95_NOISE_MS`: sub-millisecond latencies are timer and scheduling noise (a
50 µs model's p95 varies 2x from window to window on a busy device), not a
regression a rollout should halt on.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.rollout.policy import HealthPolicy

__all__ = [
    "BASELINE_WINDOWS",
    "P95_NOISE_MS",
    "HealthSample",
    "combine_baseline",
    "exceeds",
    "health_problem",
    "samples_from_json",
]

_EPS = 1e-9
P95_NOISE_MS = 1.0
"""A p95 latency at or below this (ms) never fails the latency check."""


def exceeds(value: float, limit: float) -> bool:
    """Tell whether ``value`` is above ``limit`` (float-noise safe)."""
    return value > limit + _EPS


@dataclass(frozen=True)
class HealthSample:
    """One telemetry window, as kept for a device.

    Attributes:
        version: Model version served.
        predictions: Successful inference calls.
        errors: Failed inference calls.
        p95_ms: p95 latency of the successful calls, milliseconds.
        at: Coordinator clock when it arrived.
    """

    version: int
    predictions: int
    errors: int
    p95_ms: float
    at: float

    @property
    def calls(self) -> int:
        """Successful and failed calls."""
        return self.predictions + self.errors

    @property
    def error_rate(self) -> float:
        """Failed calls over all calls (0 without calls)."""
        return self.errors / self.calls if self.calls else 0.0

    def to_json(self) -> dict[str, Any]:
        """Give a JSON-able dict of every field."""
        return {
            "version": self.version,
            "predictions": self.predictions,
            "errors": self.errors,
            "p95_ms": self.p95_ms,
            "at": self.at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> HealthSample | None:
        """Rebuild from :meth:`to_json` (None stays None)."""
        if data is None:
            return None
        return cls(
            version=int(data["version"]),
            predictions=int(data["predictions"]),
            errors=int(data["errors"]),
            p95_ms=float(data["p95_ms"]),
            at=float(data["at"]),
        )


BASELINE_WINDOWS = 5
"""Windows of the previous version a device's baseline combines."""


def combine_baseline(windows: Sequence[HealthSample]) -> HealthSample:
    """One device's recent windows of a version as one baseline.

    Calls are summed; the p95 is the median of the windows' p95s (those with a
    successful call), so one noisy window does not make or break the gate.

    Args:
        windows: At least one window, oldest first, all of one version.
    """
    latencies = [w.p95_ms for w in windows if w.predictions > 0]
    return HealthSample(
        version=windows[-1].version,
        predictions=sum(w.predictions for w in windows),
        errors=sum(w.errors for w in windows),
        p95_ms=float(statistics.median(latencies)) if latencies else 0.0,
        at=windows[-1].at,
    )


def samples_from_json(items: Iterable[Mapping[str, Any]]) -> Iterable[HealthSample]:
    """The samples of a JSON list (None items skipped)."""
    for item in items:
        sample = HealthSample.from_json(item)
        if sample is not None:
            yield sample


def health_problem(
    sample: HealthSample, baseline: HealthSample | None, health: HealthPolicy
) -> str | None:
    """Why a window of the new version fails ``health`` against the device's
    baseline, or None if it passes (module docstring)."""
    base_rate = 0.0 if baseline is None else baseline.error_rate
    if exceeds(sample.error_rate, base_rate + health.max_error_rate):
        return (
            f"unhealthy: error rate {sample.error_rate:.1%} "
            f"(baseline {base_rate:.1%}, allowed +{health.max_error_rate:.1%})"
        )
    if (
        baseline is not None
        and baseline.predictions > 0
        and sample.predictions > 0
        and baseline.p95_ms > 0
        and exceeds(sample.p95_ms, max(baseline.p95_ms * health.max_p95_ratio, P95_NOISE_MS))
    ):
        return (
            f"unhealthy: p95 latency {sample.p95_ms:g} ms "
            f"(baseline {baseline.p95_ms:g} ms, allowed x{health.max_p95_ratio:g})"
        )
    return None
