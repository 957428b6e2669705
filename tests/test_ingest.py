"""Ingest: presence and telemetry buffered and written in batches (in-memory store)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from coordinator.errors import StoreError
from coordinator.monitoring.scores import DriftScore
from coordinator.service.ingest import MAX_CHANGES, Ingest, IngestCounts, IngestSettings
from coordinator.service.store import MEMORY, DeviceRow, Store, TelemetryRow
from edge_agent.protocol import (
    Envelope,
    Histogram,
    InvalidCounts,
    LatencyQuantiles,
    ModelInfo,
    Status,
    TelemetryBatch,
    TelemetryRecord,
    WindowSummary,
)
from tests.clock_support import ManualClock
from tests.fleet_support import wait_for

BOUNDS = (1.0, 2.0, 5.0, 10.0)


class FailingStore(Store):
    """A store whose telemetry (and, with ``presence_failing``, presence) writes fail."""

    failing = False
    presence_failing = False
    failures = 0
    """Telemetry writes refused so far."""

    def add_telemetry(self, rows: Sequence[TelemetryRow]) -> int:
        if self.failing:
            self.failures += 1
            raise StoreError("disk full")
        return super().add_telemetry(rows)

    def upsert_device(self, device_id: str, **kwargs: Any) -> DeviceRow:
        if self.presence_failing:
            raise StoreError("database is locked")
        return super().upsert_device(device_id, **kwargs)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FailingStore]:
    instance = FailingStore.open(MEMORY, artifact_dir=tmp_path)
    assert isinstance(instance, FailingStore)
    yield instance
    instance.close()


def record(
    *, counts: tuple[int, ...] = (0, 10, 0, 0, 0), errors: int = 0, start: float = 1.0
) -> TelemetryRecord:
    return TelemetryRecord(
        window_start=start, window_end=2.0, model="digits", version=2,
        predictions=sum(counts), errors=errors, latency_ms=LatencyQuantiles(1.5, 1.9, 2.0),
        histogram=Histogram(BOUNDS, counts), cpu_percent=3.0, memory_bytes=1 << 20, uptime_s=5.0,
    )  # fmt: skip


def batch(seq: int, *records: TelemetryRecord) -> TelemetryBatch:
    return TelemetryBatch(seq=seq, records=records or (record(),))


def status(online: bool, version: int = 1) -> Status:
    model = ModelInfo(name="digits", version=version, sha256="ab" * 32)
    return Status(online=online, agent_version="0.1", tags=("lab",), models=(model,))


def test_windows_are_buffered_and_written_in_one_flush(store: FailingStore) -> None:
    ingest = Ingest(store)
    for seq in range(5):
        ingest.add_telemetry("d1", batch(seq, record(), record(start=0.0)))
    assert store.telemetry_count() == 0
    assert ingest.counts().pending == 10
    ingest.flush()
    assert store.telemetry_count() == 10
    assert ingest.counts() == ingest.counts().__class__(received=10, stored=10, pending=0,
                                                         dropped=0)  # fmt: skip
    rows = store.telemetry("d1", limit=100)
    assert {r.seq for r in rows} == {0, 1, 2, 3, 4}
    assert all(isinstance(r, TelemetryRow) and r.model == "digits" for r in rows)


def test_a_window_delivered_twice_is_stored_once(store: FailingStore) -> None:
    ingest = Ingest(store)
    ingest.add_telemetry("d1", batch(1, record(), record(start=0.0)))
    ingest.flush()
    ingest.add_telemetry("d1", batch(1, record()))  # QoS 1 redelivery after a reconnect
    ingest.add_telemetry("d1", batch(2, record()))  # the next batch: same window, new seq
    ingest.add_telemetry("d2", batch(1, record()))  # another device
    ingest.flush()
    assert store.telemetry_count() == 4
    assert ingest.counts() == IngestCounts(received=5, stored=4, pending=0, dropped=0,
                                           duplicates=1)  # fmt: skip


def test_a_failed_flush_keeps_the_rows_and_the_next_one_writes_them_in_order(
    store: FailingStore,
) -> None:
    ingest = Ingest(store)
    ingest.add_telemetry("d1", batch(1))
    store.failing = True
    ingest.flush()
    assert ingest.counts().pending == 1
    ingest.add_telemetry("d1", batch(2))
    store.failing = False
    ingest.flush()
    assert ingest.counts().stored == 2
    assert [r.seq for r in reversed(store.telemetry("d1"))] == [1, 2]


def test_past_max_pending_the_oldest_windows_are_dropped_and_counted(store: FailingStore) -> None:
    ingest = Ingest(store, IngestSettings(max_pending=3))
    store.failing = True
    for seq in range(5):
        ingest.add_telemetry("d1", batch(seq))
        ingest.flush()
    assert ingest.counts().dropped == 2
    store.failing = False
    ingest.flush()
    assert [r.seq for r in reversed(store.telemetry("d1"))] == [2, 3, 4]


def envelope(message: Status) -> Envelope:
    return Envelope("a" * 32, "d1", 1.0, 1, message)


def test_presence_keeps_every_change_and_the_latest_status(store: FailingStore) -> None:
    clock = ManualClock(1000.0)
    ingest = Ingest(store, clock=clock)
    ingest.on_message("d1", envelope(status(True)), 100)
    clock.now += 1
    ingest.on_message("d1", envelope(status(True, version=2)), 100)  # same state: replaces
    clock.now += 1
    ingest.on_message("d1", envelope(status(False, version=2)), 100)  # a flap, then back
    clock.now += 1
    ingest.on_message("d1", envelope(status(True, version=3)), 100)
    ingest.flush()
    row = store.device("d1")
    assert row is not None
    assert (row.online, row.model, row.version, row.tags) == (True, "digits", 3, ("lab",))
    assert row.status is not None
    assert row.status["agent_version"] == "0.1"
    history = [(p.online, p.at) for p in store.presence_history("d1")]
    assert history == [(True, 1003.0), (False, 1002.0), (True, 1001.0)]  # newest first


def test_a_flapping_device_keeps_its_latest_changes(
    store: FailingStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock(1000.0)
    ingest = Ingest(store, clock=clock)
    flaps = MAX_CHANGES + 5
    for index in range(flaps):
        clock.now += 1
        ingest.add_status("d1", status(index % 2 == 0))
    ingest.flush()
    history = store.presence_history("d1", limit=1000)
    assert len(history) <= MAX_CHANGES
    assert history[0].at == clock.now
    assert history[0].online is ((flaps - 1) % 2 == 0)
    assert all(a.online != b.online for a, b in itertools.pairwise(history))
    assert "flaps" in caplog.text


def test_presence_that_failed_to_store_is_written_later_in_order(store: FailingStore) -> None:
    clock = ManualClock(1000.0)
    ingest = Ingest(store, clock=clock)
    ingest.add_status("d1", status(True))
    clock.now += 1
    ingest.add_status("d1", status(False))
    store.presence_failing = True
    ingest.flush()
    assert store.device("d1") is None
    clock.now += 1
    ingest.add_status("d1", status(True))  # arrived while the store failed
    store.presence_failing = False
    ingest.flush()
    assert [(p.online, p.at) for p in store.presence_history("d1")] == [
        (True, 1002.0),
        (False, 1001.0),
        (True, 1000.0),
    ]


def test_stop_retries_a_failing_store_then_says_what_it_could_not_write(
    store: FailingStore, caplog: pytest.LogCaptureFixture
) -> None:
    ingest = Ingest(store, IngestSettings(flush_s=0.05, stop_retry_s=10.0))
    ingest.add_telemetry("d1", batch(1))
    ingest.add_status("d1", status(True))
    store.failing = store.presence_failing = True

    def recover() -> None:  # once stop has tried, and tried again
        wait_for(lambda: store.failures >= 2, what="stop to retry the failing store")
        store.failing = store.presence_failing = False

    healer = threading.Thread(target=recover)
    healer.start()
    ingest.stop()  # retries until the store recovers
    healer.join()
    assert store.telemetry_count() == 1
    assert store.device("d1") is not None
    assert "not stored:" not in caplog.text

    stuck = Ingest(store, IngestSettings(flush_s=0.05, stop_retry_s=0.3))
    stuck.add_telemetry("d2", batch(1, record(), record()))
    stuck.add_status("d2", status(False))
    store.failing = store.presence_failing = True
    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        stuck.stop()
    assert time.monotonic() - started < 5.0
    assert "2 telemetry window(s) and 1 presence change(s) not stored" in caplog.text


def test_fleet_latency_quantiles_merge_the_recent_histograms(store: FailingStore) -> None:
    clock = ManualClock(1000.0)
    ingest = Ingest(store, IngestSettings(latency_window_s=60.0), clock=clock)
    assert ingest.latency_ms() == {}
    ingest.add_telemetry("d1", batch(1, record(counts=(90, 0, 0, 0, 0))))
    ingest.add_telemetry("d2", batch(1, record(counts=(0, 0, 0, 10, 0))))
    figures = ingest.latency_ms()
    assert set(figures) == {"0.5", "0.95", "0.99"}
    assert figures["0.5"] <= 1.0 < figures["0.95"] <= 10.0
    clock.now += 61  # both windows leave the latency window
    assert ingest.latency_ms() == {}


def test_the_writer_thread_flushes_and_stop_writes_the_rest(store: FailingStore) -> None:
    ingest = Ingest(store, IngestSettings(flush_s=0.05))
    ingest.start()
    ingest.add_telemetry("d1", batch(1))
    wait_for(lambda: store.telemetry_count() == 1)
    ingest.add_telemetry("d1", batch(2))
    ingest.stop()
    assert store.telemetry_count() == 2


@pytest.mark.parametrize(
    ("limits", "kept"),
    [({"max_rows": 2, "max_age_s": None}, [3, 4]), ({"max_rows": None, "max_age_s": 80.0}, [4])],
)
def test_the_writer_applies_retention_every_prune_interval(
    store: FailingStore, limits: dict[str, float | None], kept: list[int]
) -> None:
    clock = ManualClock(1000.0)
    settings = IngestSettings(flush_s=0.01, prune_every_s=60.0, **limits)  # type: ignore[arg-type]
    ingest = Ingest(store, settings, clock=clock)
    for seq in range(4):
        ingest.add_telemetry("d1", batch(seq))
    ingest.add_status("d1", status(True))
    clock.now += 1
    ingest.add_status("d1", status(False))
    clock.now += 39  # the last window arrives 40 s after the first ones
    ingest.add_telemetry("d1", batch(4))
    store.add_drift_scores([_drift_score(at=1000.0), _drift_score(at=clock.now)])
    ingest.start()
    try:
        wait_for(lambda: store.telemetry_count() == 5)
        clock.now += 60  # a prune interval after the start
        wait_for(lambda: store.telemetry_count() == len(kept))
        if limits["max_age_s"] is not None:  # the older presence change is past the age
            wait_for(lambda: len(store.presence_history("d1")) == 1)
    finally:
        ingest.stop()
    assert [r.seq for r in reversed(store.telemetry("d1"))] == kept
    assert store.presence_history("d1")[0].online is False
    expected = 2 if limits["max_age_s"] is None else 1
    assert len(store.presence_history("d1")) == expected
    drift = store.drift_history(model="digits", version=2, device_id="d1")
    assert len(drift) == expected  # the score past the age goes, the latest stays


def _drift_score(*, at: float) -> DriftScore:
    return DriftScore(scope="device", device_id="d1", model="digits", version=2, at=at,
                      windows=1, n=10, psi_max=0.0, js_max=0.0, severity="none")  # fmt: skip


def test_summarised_windows_go_to_the_drift_sink_at_flush(
    store: FailingStore, caplog: pytest.LogCaptureFixture
) -> None:
    handed: list[list[tuple[str, TelemetryRecord]]] = []
    ingest = Ingest(store, IngestSettings(max_pending=2), drift=handed.append)
    summary = WindowSummary.from_arrays(10, [[1] * 10], None, None, InvalidCounts())
    summarised = [replace(record(start=float(i)), summary=summary) for i in range(3)]
    with caplog.at_level(logging.ERROR):
        ingest.add_telemetry("d1", batch(0, record(), *summarised))
    assert "drift buffer full: 1 window summary(ies) not scored" in caplog.text
    assert handed == []  # nothing is scored on the network thread
    ingest.flush()
    assert handed == [[("d1", summarised[1]), ("d1", summarised[2])]]
    ingest.flush()
    assert len(handed) == 1  # an empty flush calls nothing


@pytest.mark.parametrize(
    "bad",
    [{"flush_s": 0.0}, {"max_pending": 0}, {"max_rows": -1}, {"max_age_s": 0.0}],
)
def test_settings_refuse_values_out_of_range(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        IngestSettings(**bad)  # type: ignore[arg-type]
