"""Tests for edge_agent.serving.telemetry: counters, histogram, quantiles, windows, sampler."""

from __future__ import annotations

import itertools
import math
import sys
import threading

import pytest

import edge_agent.serving.telemetry as telemetry
from edge_agent.errors import ConfigError
from edge_agent.protocol import Histogram, TelemetryBatch, TelemetryRecord, decode, encode
from edge_agent.serving.telemetry import (
    DEFAULT_BOUNDS_MS,
    ProcessSample,
    ProcessSampler,
    TelemetryCollector,
    TelemetryTotals,
    estimate_quantile,
    read_rss_bytes,
)
from tests.clock_support import ManualClock

T0 = 1_800_000_000.0


class FakeCpu:
    """A settable process CPU-time reader (seconds)."""

    def __init__(self) -> None:
        self.seconds = 10.0

    def __call__(self) -> float:
        return self.seconds


def make_collector(
    clock: ManualClock, bounds_ms: tuple[float, ...] = DEFAULT_BOUNDS_MS, rss: int = 50_000_000
) -> tuple[TelemetryCollector, FakeCpu]:
    cpu = FakeCpu()
    sampler = ProcessSampler(clock=clock, cpu_time=cpu, rss=lambda: rss)
    return TelemetryCollector(clock=clock, bounds_ms=bounds_ms, process=sampler), cpu


def close(collector: TelemetryCollector) -> TelemetryRecord:
    return collector.close_window(model="digits", version=3)


# ------------------------------------------------------------------------ bounds


def test_default_bounds_are_log_spaced_from_50us_to_10s() -> None:
    bounds = DEFAULT_BOUNDS_MS
    assert 30 <= len(bounds) <= 40
    assert bounds[0] == 0.05
    assert bounds[-1] == 10_000.0
    assert all(math.isfinite(b) for b in bounds)
    ratios = [b / a for a, b in itertools.pairwise(bounds)]
    assert all(1.3 <= r <= 1.7 for r in ratios)


@pytest.mark.parametrize(
    "bounds",
    [(), (1.0, 1.0), (2.0, 1.0), (0.0, 1.0), (-1.0, 1.0), (1.0, math.inf), (math.nan,)],
)
def test_invalid_bounds_are_refused(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError):
        TelemetryCollector(clock=ManualClock(T0), bounds_ms=bounds)


def test_too_many_bounds_are_refused() -> None:
    with pytest.raises(ConfigError, match="1023"):
        TelemetryCollector(clock=ManualClock(T0), bounds_ms=[float(i + 1) for i in range(1024)])
    TelemetryCollector(clock=ManualClock(T0), bounds_ms=[float(i + 1) for i in range(1023)])


# --------------------------------------------------------------------- recording


def test_counts_predictions_and_errors_and_keeps_error_latency_out() -> None:
    collector, _ = make_collector(ManualClock(T0), bounds_ms=(1.0, 2.0, 4.0))
    collector.record(0.0015, ok=True)
    collector.record(0.0015, ok=True)
    collector.record(3.0, ok=False)
    record = close(collector)
    assert record.predictions == 2
    assert record.errors == 1
    assert record.histogram.counts == (0, 2, 0, 0)
    assert record.histogram.bounds == (1.0, 2.0, 4.0)


def test_bucket_upper_bounds_are_inclusive() -> None:
    collector, _ = make_collector(ManualClock(T0), bounds_ms=(1.0, 2.0))
    collector.record(0.001, ok=True)  # exactly 1 ms
    collector.record(0.0010001, ok=True)
    collector.record(0.002, ok=True)
    collector.record(0.0025, ok=True)
    assert close(collector).histogram.counts == (1, 2, 1)


def test_odd_latencies() -> None:
    collector, _ = make_collector(ManualClock(T0), bounds_ms=(1.0, 2.0))
    collector.record(-0.5, ok=True)  # clamped to 0: first bucket
    collector.record(math.nan, ok=True)  # counted, not in the histogram
    collector.record(math.inf, ok=True)  # overflow bucket
    collector.record(math.nan, ok=False)
    record = close(collector)
    assert record.predictions == 3
    assert record.errors == 1
    assert record.histogram.counts == (1, 0, 1)


# --------------------------------------------------------------------- quantiles


def test_quantiles_interpolate_inside_the_bucket() -> None:
    collector, _ = make_collector(ManualClock(T0), bounds_ms=(1.0, 2.0, 4.0))
    for _ in range(10):
        collector.record(0.0015, ok=True)
    q = close(collector).latency_ms
    assert q.p50 == pytest.approx(1.5)
    assert q.p95 == pytest.approx(1.95)
    assert q.p99 == pytest.approx(1.99)


def test_first_bucket_starts_at_zero() -> None:
    histogram = Histogram(bounds=(2.0, 4.0), counts=(4, 0, 0))
    assert estimate_quantile(histogram, 0.5) == pytest.approx(1.0)
    assert estimate_quantile(histogram, 1.0) == pytest.approx(2.0)


def test_quantiles_across_buckets() -> None:
    # 50 values in (0, 1], 40 in (1, 2], 10 in (2, 4].
    histogram = Histogram(bounds=(1.0, 2.0, 4.0), counts=(50, 40, 10, 0))
    assert estimate_quantile(histogram, 0.5) == pytest.approx(1.0)
    assert estimate_quantile(histogram, 0.7) == pytest.approx(1.5)
    assert estimate_quantile(histogram, 0.95) == pytest.approx(3.0)


def test_quantile_in_overflow_reports_last_bound() -> None:
    collector, _ = make_collector(ManualClock(T0), bounds_ms=(1.0, 2.0))
    collector.record(0.0005, ok=True)
    for _ in range(99):
        collector.record(30.0, ok=True)
    q = close(collector).latency_ms
    assert (q.p50, q.p95, q.p99) == (2.0, 2.0, 2.0)


def test_quantiles_are_zero_without_successful_predictions() -> None:
    collector, _ = make_collector(ManualClock(T0))
    collector.record(0.5, ok=False)
    q = close(collector).latency_ms
    assert (q.p50, q.p95, q.p99) == (0.0, 0.0, 0.0)


def test_default_bounds_estimate_within_one_bucket() -> None:
    collector, _ = make_collector(ManualClock(T0))
    latencies_ms = [0.1 * 1.05**i for i in range(200)]  # 0.1 ms .. ~1.6 s
    for ms in latencies_ms:
        collector.record(ms / 1000.0, ok=True)
    q = close(collector).latency_ms
    ordered = sorted(latencies_ms)
    for estimate, frac in ((q.p50, 0.5), (q.p95, 0.95), (q.p99, 0.99)):
        truth = ordered[math.ceil(frac * len(ordered)) - 1]
        assert truth / 1.67 <= estimate <= truth * 1.67


@pytest.mark.parametrize("q", [0.0, -0.1, 1.01, math.nan])
def test_estimate_quantile_refuses_bad_q(q: float) -> None:
    with pytest.raises(ValueError, match="quantile"):
        estimate_quantile(Histogram(bounds=(1.0,), counts=(1, 0)), q)


def test_estimate_quantile_refuses_mismatched_counts() -> None:
    with pytest.raises(ValueError, match="counts"):
        estimate_quantile(Histogram(bounds=(1.0, 2.0), counts=(1, 0)), 0.5)


# ----------------------------------------------------------------------- windows


def test_close_window_covers_the_window_and_resets_it() -> None:
    clock = ManualClock(T0)
    collector, _ = make_collector(clock, bounds_ms=(1.0, 2.0))
    clock.advance(30.0)
    collector.record(0.0015, ok=True)
    collector.record(0.0015, ok=False)
    first = close(collector)
    assert (first.window_start, first.window_end) == (T0, T0 + 30.0)
    assert (first.model, first.version) == ("digits", 3)
    clock.advance(30.0)
    second = collector.close_window(model=None, version=None)
    assert (second.window_start, second.window_end) == (T0 + 30.0, T0 + 60.0)
    assert (second.predictions, second.errors) == (0, 0)
    assert second.histogram.counts == (0, 0, 0)
    assert (second.model, second.version) == (None, None)


def test_totals_survive_windows() -> None:
    collector, _ = make_collector(ManualClock(T0))
    assert collector.totals == TelemetryTotals(predictions=0, errors=0)
    collector.record(0.001, ok=True)
    collector.record(0.001, ok=False)
    close(collector)
    collector.record(0.001, ok=True)
    assert collector.totals == TelemetryTotals(predictions=2, errors=1)


def test_clock_stepping_back_never_ends_a_window_before_it_starts() -> None:
    clock = ManualClock(T0)
    collector, _ = make_collector(clock)
    clock.advance(-100.0)
    record = close(collector)
    assert record.window_end == record.window_start == T0
    clock.advance(10.0)
    assert close(collector).window_start == T0 - 100.0


@pytest.mark.parametrize(("model", "version"), [("digits", None), (None, 3)])
def test_model_and_version_go_together(model: str | None, version: int | None) -> None:
    collector, _ = make_collector(ManualClock(T0))
    collector.record(0.001, ok=True)
    with pytest.raises(ValueError, match="both"):
        collector.close_window(model=model, version=version)
    assert close(collector).predictions == 1  # nothing was reset


def test_record_carries_process_figures() -> None:
    clock = ManualClock(T0)
    collector, cpu = make_collector(clock, rss=123_456)
    clock.advance(10.0)
    cpu.seconds += 2.5
    record = close(collector)
    assert record.cpu_percent == pytest.approx(25.0)
    assert record.memory_bytes == 123_456
    assert record.uptime_s == pytest.approx(10.0)


def test_default_sampler_uses_the_clock() -> None:
    clock = ManualClock(T0)
    collector = TelemetryCollector(clock=clock)
    clock.advance(5.0)
    record = close(collector)
    assert record.uptime_s == pytest.approx(5.0)
    assert record.memory_bytes >= 0
    assert record.cpu_percent >= 0.0


def test_record_encodes_and_decodes() -> None:
    clock = ManualClock(T0)
    collector, _ = make_collector(clock)
    for i in range(100):
        collector.record(0.0001 * (i + 1), ok=i % 10 != 0)
    collector.record(60.0, ok=True)  # overflow
    clock.advance(60.0)
    record = close(collector)
    payload = encode(TelemetryBatch(seq=0, records=(record,)), sender="dev-1", sent_at=clock())
    message = decode(payload).message
    assert isinstance(message, TelemetryBatch)
    assert message.records == (record,)
    empty = TelemetryCollector(clock=clock).close_window(model=None, version=None)
    payload = encode(TelemetryBatch(seq=1, records=(empty,)), sender="dev-1", sent_at=clock())
    assert decode(payload).message == TelemetryBatch(seq=1, records=(empty,))


def test_concurrent_records_are_all_counted() -> None:
    collector, _ = make_collector(ManualClock(T0))
    threads_n, per_thread = 8, 2000
    windows: list[TelemetryRecord] = []
    stop = threading.Event()

    def work(ok: bool) -> None:
        for _ in range(per_thread):
            collector.record(0.001, ok=ok)

    def closer() -> None:
        while not stop.is_set():
            windows.append(close(collector))

    closing = threading.Thread(target=closer)
    workers = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(threads_n)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        closing.start()
        for t in workers:
            t.start()
        for t in workers:
            t.join()
    finally:
        stop.set()
        closing.join()
        sys.setswitchinterval(interval)
    windows.append(close(collector))
    half = threads_n // 2 * per_thread
    assert sum(w.predictions for w in windows) == half
    assert sum(w.errors for w in windows) == half
    assert sum(sum(w.histogram.counts) for w in windows) == half
    assert collector.totals == TelemetryTotals(predictions=half, errors=half)


# ----------------------------------------------------------------------- sampler


def test_sampler_measures_cpu_since_previous_sample() -> None:
    clock, cpu = ManualClock(T0), FakeCpu()
    sampler = ProcessSampler(clock=clock, cpu_time=cpu, rss=lambda: 4096)
    clock.advance(2.0)
    cpu.seconds += 3.0  # two cores busy, then some
    assert sampler.sample() == ProcessSample(cpu_percent=150.0, memory_bytes=4096, uptime_s=2.0)
    clock.advance(4.0)
    cpu.seconds += 1.0
    assert sampler.sample() == ProcessSample(cpu_percent=25.0, memory_bytes=4096, uptime_s=6.0)


def test_sampler_without_elapsed_time_reports_zero_cpu() -> None:
    clock, cpu = ManualClock(T0), FakeCpu()
    sampler = ProcessSampler(clock=clock, cpu_time=cpu, rss=lambda: 1)
    cpu.seconds += 1.0
    assert sampler.sample().cpu_percent == 0.0
    clock.advance(-5.0)  # wall clock stepped back
    cpu.seconds += 1.0
    sample = sampler.sample()
    assert sample.cpu_percent == 0.0
    assert sample.uptime_s == 0.0


def test_sampler_clamps_negative_values() -> None:
    clock, cpu = ManualClock(T0), FakeCpu()
    sampler = ProcessSampler(clock=clock, cpu_time=cpu, rss=lambda: -1)
    clock.advance(1.0)
    cpu.seconds -= 1.0
    assert sampler.sample() == ProcessSample(cpu_percent=0.0, memory_bytes=0, uptime_s=1.0)


def test_default_readers_measure_this_process() -> None:
    rss = read_rss_bytes()
    assert rss > 1_000_000  # a Python interpreter with numpy loaded
    clock = ManualClock(T0)
    sampler = ProcessSampler(clock=clock)
    clock.advance(1.0)
    sample = sampler.sample()
    assert sample.memory_bytes > 1_000_000
    assert sample.cpu_percent >= 0.0


def test_rss_falls_back_to_peak_rss_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_proc(*_args: object, **_kwargs: object) -> None:
        raise FileNotFoundError("/proc/self/statm")

    monkeypatch.setattr(telemetry, "open", no_proc, raising=False)
    peak = read_rss_bytes()
    monkeypatch.undo()
    assert peak >= 0.9 * read_rss_bytes() > 0  # the peak is at least the current size (bytes)
