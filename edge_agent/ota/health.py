"""The install-time health check: does the new model answer as its manifest promises?

A manifest may carry a :class:`compress.manifest.HealthCheck`: reference inputs, the
outputs they must produce (within ``rtol`` / ``atol``) and a latency bound. Before an
install switches to a freshly loaded model, the agent runs::

    runtime = load_model(manifest.format, payload)
    report = run_health_check(runtime, manifest.health_check)   # or HealthCheckError
    server.activate(LoadedModel(..., runtime=runtime))

:func:`run_health_check`

1. checks that the reference inputs name exactly the model's inputs and that every
   reference output is one the model produces;
2. converts the reference inputs to the model's input dtypes;
3. runs the model once to warm it up (first runs allocate and are slow), then times
   a second run with ``perf_clock``;
4. compares each reference output with ``np.allclose(actual, expected, rtol, atol)``
   after checking that the shapes are equal (``allclose`` would broadcast);
5. checks the timed run against ``max_latency_ms``.

Any failure raises :class:`edge_agent.errors.HealthCheckError` with the precise
reason, and the install keeps the previous model. Runtime failures
(:class:`edge_agent.errors.ModelRuntimeError`) are wrapped, keeping their message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from compress.manifest import HealthCheck
from edge_agent.errors import HealthCheckError, ModelRuntimeError
from edge_agent.runtime.base import ModelRuntime, convert_input

__all__ = ["HealthReport", "run_health_check"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthReport:
    """What a passed health check measured.

    Attributes:
        max_abs_error: The largest absolute difference between an actual and a
            reference output value, over all checked outputs.
        latency_ms: Duration of the timed (second) run.
        outputs_checked: Names of the outputs compared, in the check's order.
    """

    max_abs_error: float
    latency_ms: float
    outputs_checked: tuple[str, ...]


def _feeds(runtime: ModelRuntime, check: HealthCheck) -> dict[str, np.ndarray]:
    """The reference inputs as feeds of the model's input dtypes.

    Raises:
        HealthCheckError: the names do not match the model's inputs, or a reference
            input cannot be converted to its input's dtype.
    """
    inputs = runtime.inputs
    expected = {info.name for info in inputs}
    given = set(check.inputs)
    if given != expected:
        raise HealthCheckError(
            f"reference inputs do not match the model: missing {sorted(expected - given)}, "
            f"unknown {sorted(given - expected)}"
        )
    feeds: dict[str, np.ndarray] = {}
    for info in inputs:
        try:
            feeds[info.name] = convert_input(check.inputs[info.name].array(), info)
        except ModelRuntimeError as exc:
            raise HealthCheckError(f"reference input: {exc}") from exc
    return feeds


def run_health_check(
    runtime: ModelRuntime,
    check: HealthCheck,
    *,
    perf_clock: Callable[[], float] = time.perf_counter,
) -> HealthReport:
    """Run ``check`` against a loaded model.

    Args:
        runtime: The newly loaded model.
        check: The manifest's health check.
        perf_clock: Monotonic clock in seconds used to time the second run.

    Returns:
        The largest error, the latency and the outputs checked.

    Raises:
        HealthCheckError: the reference inputs or outputs do not match the model's
            names; the runtime failed (its message is kept); an output's shape
            differs from the reference, or its values are not within the
            tolerances; or the timed run took longer than ``check.max_latency_ms``.
    """
    produced = [info.name for info in runtime.outputs]
    for name in check.outputs:
        if name not in produced:
            raise HealthCheckError(
                f"the health check expects output {name!r}, which the model does not "
                f"produce (it produces {produced})"
            )
    feeds = _feeds(runtime, check)
    try:
        runtime.run(feeds)  # warm-up: first runs allocate, and are not representative
        start = perf_clock()
        actual = runtime.run(feeds)
        latency_ms = (perf_clock() - start) * 1000.0
    except ModelRuntimeError as exc:
        raise HealthCheckError(f"the model failed on the reference inputs: {exc}") from exc

    max_abs_error = 0.0
    for name, reference in check.outputs.items():
        if name not in actual:
            raise HealthCheckError(f"the runtime returned no output {name!r}")
        got = np.asarray(actual[name], dtype=np.float64)
        want = reference.array().astype(np.float64)
        if got.shape != want.shape:
            raise HealthCheckError(
                f"output {name!r} has shape {got.shape}, the reference has {want.shape}"
            )
        error = float(np.max(np.abs(got - want))) if got.size else 0.0
        if not np.allclose(got, want, rtol=check.rtol, atol=check.atol):
            raise HealthCheckError(
                f"output {name!r} differs from the reference: max abs error {error:.6g} "
                f"(rtol={check.rtol:g}, atol={check.atol:g})"
            )
        max_abs_error = max(max_abs_error, error)

    if latency_ms > check.max_latency_ms:
        raise HealthCheckError(
            f"latency {latency_ms:.1f} ms over the {check.max_latency_ms:g} ms bound"
        )
    report = HealthReport(
        max_abs_error=max_abs_error,
        latency_ms=latency_ms,
        outputs_checked=tuple(check.outputs),
    )
    logger.info(
        "health check passed: %d outputs, max abs error %.3g, latency %.2f ms",
        len(report.outputs_checked),
        report.max_abs_error,
        report.latency_ms,
    )
    return report
