"""Inference telemetry: counters, a latency histogram and quantiles, per time window.

Workflow on the agent:

1. Build one :class:`TelemetryCollector` at start-up with the wall clock
   (``TelemetryCollector(clock=time.time)``); its first window starts then.
2. Every inference call, from any thread (HTTP handlers, the MQTT thread), reports
   itself with :meth:`TelemetryCollector.record`: its latency in seconds and whether
   it succeeded.
3. Every N seconds the agent calls :meth:`TelemetryCollector.close_window`, which
   returns a :class:`~edge_agent.protocol.TelemetryRecord` for the window that just
   ended (counts, latency quantiles and histogram, the agent's CPU, memory and
   uptime from a :class:`ProcessSampler`, and the window summary of the served
   model's inputs when the agent passes one, see :mod:`edge_agent.monitoring`) and
   starts the next window. The record
   goes into a :class:`~edge_agent.protocol.TelemetryBatch`, is encoded and published
   (or spooled while the broker is unreachable, see :mod:`edge_agent.spool`).
4. :attr:`TelemetryCollector.totals` gives lifetime counts, for ``GET /v1/health``.

Explanations (``POST /v1/explain``) are counted apart, by
:meth:`TelemetryCollector.record_explanation`, in the record's ``explanations``:
they are neither predictions nor in the latency histogram.

Latency histogram: bucket ``i`` counts latencies ``v`` (milliseconds) with
``bounds[i-1] < v <= bounds[i]`` (the first bucket starts at 0), and one extra
bucket counts values above the last bound, as :class:`~edge_agent.protocol.Histogram`
describes. :data:`DEFAULT_BOUNDS_MS` is log-spaced from 0.05 ms to 10 s (round
values, six per decade): between those two a quantile estimate is within the
bucket of the true value, a factor of at most 1.67, and one record costs a few
hundred bytes whatever the traffic.

Quantiles are estimated from the histogram alone (:func:`estimate_quantile`, the
estimator Prometheus' ``histogram_quantile`` uses), so the coordinator can compute
the same figures from histograms it sums over a fleet.

The collector is pure logic apart from its :class:`ProcessSampler`: time comes from
the injected ``clock``, and the sampler's CPU-time and memory readers are injectable
too, so tests are deterministic.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edge_agent.errors import ConfigError
from edge_agent.protocol import Histogram, LatencyQuantiles, TelemetryRecord, WindowSummary

__all__ = [
    "DEFAULT_BOUNDS_MS",
    "ProcessSample",
    "ProcessSampler",
    "TelemetryCollector",
    "TelemetryTotals",
    "estimate_quantile",
    "read_rss_bytes",
]

logger = logging.getLogger(__name__)


def _log_spaced(lo: float, hi: float) -> tuple[float, ...]:
    """Round values ``m * 10**e`` (``m`` in 1, 1.5, 2, 3, 5, 7) from ``lo`` to ``hi``."""
    values = (round(m * 10.0**e, 6) for e in range(-3, 6) for m in (1, 1.5, 2, 3, 5, 7))
    return tuple(v for v in values if lo <= v <= hi)


DEFAULT_BOUNDS_MS: tuple[float, ...] = _log_spaced(0.05, 10_000.0)
"""Default latency bucket upper bounds in ms: 33 round, log-spaced values, 0.05 ms .. 10 s.

Six per decade (``1, 1.5, 2, 3, 5, 7`` times a power of ten); consecutive bounds
differ by a factor of 1.33 to 1.67.
"""

_MAX_BUCKETS = 1023
"""Most bounds: a record's ``counts`` list (bounds + 1) must fit the protocol's
default ``max_list_items`` (1024)."""

_QUANTILES = (0.5, 0.95, 0.99)


# ---------------------------------------------------------------------- quantiles


def estimate_quantile(histogram: Histogram, q: float) -> float:
    """Estimate the ``q``-quantile of the values counted in ``histogram``.

    The estimator: with ``n`` values in total, the target rank is ``q * n``. The
    bucket where the cumulative count first reaches that rank holds the quantile,
    and the value is interpolated linearly between the bucket's lower bound (the
    previous bound, or 0 for the first bucket) and its upper bound, as if the
    bucket's values were spread evenly. A quantile that falls in the overflow
    bucket (above the last bound) is reported as the last bound, a lower bound of
    the truth. The error is at most the width of one bucket.

    Args:
        histogram: Bounds in ms (strictly increasing, positive) and counts
            (``len(bounds) + 1`` of them).
        q: The quantile, in ``(0, 1]``.

    Returns:
        The estimate in the histogram's unit, or 0.0 when it counts no values.

    Raises:
        ValueError: ``q`` is outside ``(0, 1]``, or the counts do not match the
            bounds.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {q}")
    bounds, counts = histogram.bounds, histogram.counts
    if len(counts) != len(bounds) + 1:
        raise ValueError(f"{len(counts)} counts for {len(bounds)} bounds (need bounds + 1)")
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = q * total
    cumulative = 0
    for index, count in enumerate(counts):
        if count and cumulative + count >= rank:
            if index == len(bounds):
                return bounds[-1]
            lower = bounds[index - 1] if index else 0.0
            upper = bounds[index]
            return lower + (upper - lower) * (rank - cumulative) / count
        cumulative += count
    return bounds[-1]  # not reached: rank <= total


# ------------------------------------------------------------------ process sampler


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """The agent process's resource use at one moment.

    Attributes:
        cpu_percent: CPU time used since the previous sample, as a percentage of
            the wall time that passed (may exceed 100 with several busy threads on
            several cores); never negative.
        memory_bytes: Resident memory (see :func:`read_rss_bytes`).
        uptime_s: Seconds since the sampler was built; never negative.
    """

    cpu_percent: float
    memory_bytes: int
    uptime_s: float


def read_rss_bytes() -> int:
    """This process's resident memory in bytes; 0 when no source is available.

    Linux: the second field of ``/proc/self/statm`` (resident pages) times the
    page size, the current figure. Elsewhere: ``getrusage(RUSAGE_SELF).ru_maxrss``,
    the *peak* resident size (KiB on Linux, bytes on macOS). Never raises.
    """
    try:
        with open("/proc/self/statm", "rb") as statm:
            fields = statm.read(512).split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource  # noqa: PLC0415 - POSIX only; absent on Windows

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError, ValueError):
        return 0
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class ProcessSampler:
    """Samples the agent process's CPU use, resident memory and uptime.

    CPU use is process CPU time (user + system, all threads) spent since the
    previous :meth:`sample` (or since construction, for the first one), divided by
    the wall time that passed, times 100. Thread-safe.

    Args:
        clock: Wall clock, unix seconds (``time.time``).
        cpu_time: Process CPU time in seconds; defaults to ``time.process_time``.
        rss: Resident memory in bytes; defaults to :func:`read_rss_bytes`.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        cpu_time: Callable[[], float] = time.process_time,
        rss: Callable[[], int] = read_rss_bytes,
    ) -> None:
        self._clock = clock
        self._cpu_time = cpu_time
        self._rss = rss
        self._lock = threading.Lock()
        self._started = clock()
        self._last_wall = self._started
        self._last_cpu = cpu_time()

    def sample(self) -> ProcessSample:
        """Measure now and make this the reference point of the next sample.

        When no wall time has passed (or the wall clock stepped backwards), the CPU
        figure is 0.0 rather than a division by zero or a negative number.

        Returns:
            The sample.
        """
        with self._lock:
            wall = self._clock()
            cpu = self._cpu_time()
            wall_delta = wall - self._last_wall
            cpu_delta = cpu - self._last_cpu
            self._last_wall, self._last_cpu = wall, cpu
            uptime = wall - self._started
        percent = 100.0 * cpu_delta / wall_delta if wall_delta > 0 else 0.0
        return ProcessSample(
            cpu_percent=_finite_non_negative(percent),
            memory_bytes=max(0, int(self._rss())),
            uptime_s=_finite_non_negative(uptime),
        )


def _finite_non_negative(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


# ------------------------------------------------------------------------ collector


@dataclass(frozen=True, slots=True)
class TelemetryTotals:
    """Lifetime counts of a :class:`TelemetryCollector`.

    Attributes:
        predictions: Successful inference calls since start-up.
        errors: Failed inference calls since start-up.
        explanations: Explanations served since start-up.
    """

    predictions: int
    errors: int
    explanations: int = 0


class TelemetryCollector:
    """Counts inference calls and their latencies, and closes them into windows.

    Thread-safe: :meth:`record` may be called from any thread while another one
    calls :meth:`close_window`; one lock guards all counters.

    Args:
        clock: Wall clock, unix seconds (``time.time``). The first window starts
            at construction.
        bounds_ms: Histogram bucket upper bounds in milliseconds.
        process: The resource sampler; None builds one with ``clock``.

    Raises:
        ConfigError: ``bounds_ms`` is empty, has more than 1023 entries, or is not
            strictly increasing, positive and finite.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        bounds_ms: Sequence[float] = DEFAULT_BOUNDS_MS,
        process: ProcessSampler | None = None,
    ) -> None:
        bounds = tuple(float(b) for b in bounds_ms)
        if not bounds or len(bounds) > _MAX_BUCKETS:
            raise ConfigError(f"histogram needs 1 to {_MAX_BUCKETS} bounds, got {len(bounds)}")
        if not all(math.isfinite(b) and b > 0 for b in bounds):
            raise ConfigError("histogram bounds must be positive and finite")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ConfigError("histogram bounds must be strictly increasing")
        self._clock = clock
        self._bounds = bounds
        self._process = process if process is not None else ProcessSampler(clock=clock)
        self._lock = threading.Lock()
        self._window_start = clock()
        self._counts = [0] * (len(bounds) + 1)
        self._predictions = 0
        self._errors = 0
        self._total_predictions = 0
        self._total_errors = 0
        self._explanations = 0
        self._total_explanations = 0

    @property
    def bounds_ms(self) -> tuple[float, ...]:
        """The histogram's bucket upper bounds in milliseconds."""
        return self._bounds

    def record(self, latency_s: float, *, ok: bool) -> None:
        """Count one inference call.

        A successful call (``ok``) counts in ``predictions`` and its latency goes
        into the histogram; a failed one counts in ``errors`` only (failures are
        often fast and would flatter the quantiles). Odd latencies: a negative one
        (a clock stepped backwards) counts as 0; NaN still counts the call but
        leaves the histogram alone, so the histogram may hold fewer values than
        ``predictions``; +inf lands in the overflow bucket.

        Args:
            latency_s: The call's duration in seconds.
            ok: Whether the call produced a prediction.
        """
        if ok and not math.isnan(latency_s):
            bucket = bisect.bisect_left(self._bounds, max(0.0, latency_s) * 1000.0)
        else:
            bucket = -1
        with self._lock:
            if ok:
                self._predictions += 1
                self._total_predictions += 1
                if bucket >= 0:
                    self._counts[bucket] += 1
            else:
                self._errors += 1
                self._total_errors += 1

    def record_explanation(self) -> None:
        """Count one explanation served (not a prediction, not in the histogram)."""
        with self._lock:
            self._explanations += 1
            self._total_explanations += 1

    @property
    def totals(self) -> TelemetryTotals:
        """Lifetime counts (never reset by :meth:`close_window`)."""
        with self._lock:
            return TelemetryTotals(
                predictions=self._total_predictions,
                errors=self._total_errors,
                explanations=self._total_explanations,
            )

    def close_window(
        self, *, model: str | None, version: int | None, summary: WindowSummary | None = None
    ) -> TelemetryRecord:
        """Close the current window into a record and start the next one now.

        The record covers ``[window_start, now]``; the window counters and the
        histogram are reset, lifetime totals are not. If the wall clock stepped
        backwards past the window's start, the window ends at its start (a record
        never has ``window_end < window_start``) and the next one starts now.

        Args:
            model: The model being served, or None (with ``version`` None).
            version: Its version.
            summary: The window summary of its inputs (closed by the caller at the
                same time), carried in the record.

        Returns:
            The record; quantiles are :func:`estimate_quantile` of the window's
            histogram in ms (all 0.0 without successful predictions).

        Raises:
            ValueError: Exactly one of ``model`` and ``version`` is None.
        """
        if (model is None) != (version is None):
            raise ValueError("model and version must both be set or both be None")
        with self._lock:
            now = self._clock()
            start = self._window_start
            counts = tuple(self._counts)
            predictions, errors = self._predictions, self._errors
            explanations, self._explanations = self._explanations, 0
            self._window_start = now
            self._counts = [0] * (len(self._bounds) + 1)
            self._predictions = self._errors = 0
        if now < start:
            logger.warning("wall clock stepped back %.3f s during a telemetry window", start - now)
        histogram = Histogram(bounds=self._bounds, counts=counts)
        p50, p95, p99 = (estimate_quantile(histogram, q) for q in _QUANTILES)
        sample = self._process.sample()
        return TelemetryRecord(
            window_start=start,
            window_end=max(start, now),
            model=model,
            version=version,
            predictions=predictions,
            errors=errors,
            latency_ms=LatencyQuantiles(p50=p50, p95=p95, p99=p99),
            histogram=histogram,
            cpu_percent=sample.cpu_percent,
            memory_bytes=sample.memory_bytes,
            uptime_s=sample.uptime_s,
            summary=summary if model is not None else None,
            explanations=explanations,
        )
