"""What the fleet says, written into the store in batches, off the network thread.

The coordinator's MQTT listener runs on its network loop, which must never wait
for SQLite. :class:`Ingest` takes presence changes (status messages and Last
Wills) and telemetry batches from that thread into memory, and a writer thread
flushes them every ``flush_s`` seconds: all buffered device upserts, then all
telemetry windows in one transaction (:meth:`~coordinator.service.store.Store.add_telemetry`).
Every ``prune_every_s`` it applies the telemetry retention limits to the telemetry
and to the drift scores (each subject's latest score stays), and the age limit to
the presence history too (each device's latest change stays).

Workflow::

    ingest = Ingest(store, IngestSettings(flush_s=0.5))
    coordinator.add_listener(ingest.on_message)
    ingest.start()
    ...
    ingest.counts()      # received / stored / pending / dropped / duplicate windows
    ingest.latency_ms()  # fleet latency quantiles from recent histograms
    ingest.stop()        # flushes what is left

Nothing received is lost while the store works: a failed flush (disk full,
database locked) keeps the rows buffered and retries at the next flush, and
:meth:`Ingest.stop` retries for ``stop_retry_s`` before it gives up (and says how
much it could not write). Only when the buffer passes ``max_pending`` rows (the
store has been failing for a long time) are the oldest windows dropped, counted
and logged. What arrived in the last ``flush_s`` before the process was killed is
lost with it. Presence keeps every online/offline change (a device that drops and
comes back between two flushes leaves both changes in the history); repeated
statuses of the same state keep only the latest, and a device flapping more than
:data:`MAX_CHANGES` times between two flushes loses its oldest changes (logged).
A change is dated when it arrives: changes the broker kept while the service was
down all carry the time it came back (a Last Will's own timestamp is when the
device connected, not when it went away).

Windows that carry a summary (:class:`~edge_agent.protocol.WindowSummary`) are also
buffered for the drift monitor given as ``drift`` (:mod:`coordinator.service.drift`):
each flush hands them over, on the writer thread, before writing telemetry. That
buffer is bounded by ``max_pending`` too (the oldest are dropped and logged).

Fleet latency quantiles come from the latency histograms of the windows received
in the last ``latency_window_s`` seconds, summed bucket by bucket (agents share
the default bucket bounds; windows with other bounds are left out of the sum).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coordinator.errors import StoreError
from coordinator.service.store import Store, TelemetryRow
from edge_agent.protocol import Envelope, Histogram, Status, TelemetryBatch, TelemetryRecord
from edge_agent.serving.telemetry import estimate_quantile

__all__ = ["QUANTILES", "Ingest", "IngestCounts", "IngestSettings", "status_document"]

logger = logging.getLogger(__name__)

QUANTILES = (0.5, 0.95, 0.99)
"""Fleet latency quantiles :meth:`Ingest.latency_ms` gives."""

MAX_CHANGES = 16
"""Most presence changes buffered per device between two flushes."""

DriftSink = Callable[[list[tuple[str, TelemetryRecord]]], object]
"""What takes a flush's summarised windows (``DriftMonitor.add_windows``)."""


@dataclass(frozen=True)
class IngestSettings:
    """How the fleet's messages are written.

    Attributes:
        flush_s: Seconds between flushes.
        max_pending: Most telemetry windows held while the store fails.
        max_rows: Telemetry retention by row count (None: no limit).
        max_age_s: Telemetry retention by age, seconds (None: no limit).
        prune_every_s: Seconds between retention passes.
        latency_window_s: Telemetry age the fleet latency quantiles cover.
        stop_retry_s: How long :meth:`Ingest.stop` keeps retrying a failing store.

    Raises:
        ValueError: A value out of range.
    """

    flush_s: float = 0.5
    max_pending: int = 1_000_000
    max_rows: int | None = 1_000_000
    max_age_s: float | None = 7 * 86400.0
    prune_every_s: float = 60.0
    latency_window_s: float = 300.0
    stop_retry_s: float = 5.0

    def __post_init__(self) -> None:
        """Check the values."""
        if not self.stop_retry_s >= 0:
            raise ValueError(f"stop_retry_s must be >= 0, got {self.stop_retry_s}")
        for name in ("flush_s", "prune_every_s", "latency_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        if self.max_rows is not None and self.max_rows < 0:
            raise ValueError("max_rows must be >= 0")
        if self.max_age_s is not None and not self.max_age_s > 0:
            raise ValueError("max_age_s must be positive")


@dataclass(frozen=True)
class IngestCounts:
    """Telemetry windows since start: received from MQTT, stored, waiting, dropped,
    and received again after they were stored (skipped)."""

    received: int
    stored: int
    pending: int
    dropped: int
    duplicates: int = 0


@dataclass(frozen=True)
class _Presence:
    online: bool
    at: float
    status: dict[str, Any] | None
    tags: tuple[str, ...] | None
    model: str | None
    version: int | None


def _add_change(changes: list[_Presence], presence: _Presence) -> int:
    """Append a presence change, or replace the last entry of the same state.

    Returns:
        How many old changes were dropped to stay within :data:`MAX_CHANGES`.
    """
    if changes and changes[-1].online == presence.online:
        changes[-1] = presence
        return 0
    changes.append(presence)
    excess = len(changes) - MAX_CHANGES
    if excess <= 0:
        return 0
    excess += excess % 2  # whole off/on pairs: the states keep alternating
    del changes[:excess]
    return excess


def status_document(status: Status) -> dict[str, Any]:
    """A status message as the JSON dict the store keeps for a device."""
    return {
        "online": status.online,
        "agent_version": status.agent_version,
        "hardware": dict(status.hardware),
        "runtimes": list(status.runtimes),
        "tags": list(status.tags),
        "models": [
            {"name": m.name, "version": m.version, "sha256": m.sha256} for m in status.models
        ],
        "train_examples": status.train_examples,
        "train_models": list(status.train_models),
        "keyset_version": status.keyset_version,
        "stale": status.stale,
    }


class Ingest:
    """Buffers presence and telemetry and writes them in batches (thread-safe)."""

    def __init__(
        self,
        store: Store,
        settings: IngestSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        drift: DriftSink | None = None,
    ) -> None:
        """Prepare (no thread runs until :meth:`start`)."""
        self._store = store
        self._drift = drift
        self._summaries: collections.deque[tuple[str, TelemetryRecord]] = collections.deque()
        self._settings = settings or IngestSettings()
        self._clock = clock
        self._lock = threading.Lock()
        self._telemetry: collections.deque[TelemetryRow] = collections.deque()
        self._presence: dict[str, list[_Presence]] = {}
        self._histograms: collections.deque[tuple[float, Histogram]] = collections.deque()
        self._received = 0
        self._stored = 0
        self._duplicates = 0
        self._dropped = 0
        self._flush_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the writer thread."""
        self._stopping.clear()
        self._last_prune = self._clock()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the writer and write what is buffered (idempotent).

        A failing store is retried for ``stop_retry_s``; what is still not written
        then is logged as lost.
        """
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30.0)
            self._thread = None
        deadline = time.monotonic() + self._settings.stop_retry_s
        self.flush()
        while self._unwritten() != (0, 0) and time.monotonic() < deadline:
            time.sleep(min(0.25, self._settings.flush_s))
            self.flush()
        windows, changes = self._unwritten()
        if windows or changes:
            logger.error("stopping with %d telemetry window(s) and %d presence change(s) "
                         "not stored: the database kept failing", windows, changes)  # fmt: skip

    def _unwritten(self) -> tuple[int, int]:
        with self._lock:
            return len(self._telemetry), sum(len(c) for c in self._presence.values())

    # ------------------------------------------------------------------- intake

    def on_message(self, device_id: str, envelope: Envelope, _size: int) -> None:
        """Coordinator listener: buffer a status or a telemetry batch."""
        message = envelope.message
        if isinstance(message, Status):
            self.add_status(device_id, message)
        elif isinstance(message, TelemetryBatch):
            self.add_telemetry(device_id, message)

    def add_status(self, device_id: str, status: Status) -> None:
        """Buffer a device's presence: a change, or the latest status of its state."""
        model = status.models[0] if status.models else None
        presence = _Presence(
            online=status.online,
            at=self._clock(),
            status=status_document(status),
            tags=tuple(status.tags),
            model=model.name if model else None,
            version=model.version if model else None,
        )
        with self._lock:
            dropped = _add_change(self._presence.setdefault(device_id, []), presence)
        if dropped:
            logger.warning("device %s flaps: %d presence change(s) not recorded", device_id,
                           dropped)  # fmt: skip

    def add_telemetry(self, device_id: str, batch: TelemetryBatch) -> None:
        """Buffer a telemetry batch's windows."""
        now = self._clock()
        rows = [
            TelemetryRow(
                device_id=device_id,
                received_at=now,
                window_start=r.window_start,
                window_end=r.window_end,
                model=r.model,
                version=r.version,
                predictions=r.predictions,
                errors=r.errors,
                p50=r.latency_ms.p50,
                p95=r.latency_ms.p95,
                p99=r.latency_ms.p99,
                cpu_percent=r.cpu_percent,
                memory_bytes=r.memory_bytes,
                seq=batch.seq,
            )
            for r in batch.records
        ]
        overflow = 0
        with self._lock:
            self._received += len(rows)
            self._telemetry.extend(rows)
            for record in batch.records:
                if record.predictions:
                    self._histograms.append((now, record.histogram))
                if record.summary is not None and self._drift is not None:
                    self._summaries.append((device_id, record))
            lost_summaries = max(0, len(self._summaries) - self._settings.max_pending)
            for _ in range(lost_summaries):
                self._summaries.popleft()
            while len(self._telemetry) > self._settings.max_pending:
                self._telemetry.popleft()
                overflow += 1
            self._dropped += overflow
            self._trim_histograms(now)
        if overflow:
            logger.error("telemetry buffer full (the store keeps failing): dropped %d window(s)",
                         overflow)  # fmt: skip
        if lost_summaries:
            logger.error("drift buffer full: %d window summary(ies) not scored", lost_summaries)

    # -------------------------------------------------------------------- views

    def counts(self) -> IngestCounts:
        """Telemetry windows received, stored, pending and dropped since start."""
        with self._lock:
            return IngestCounts(self._received, self._stored, len(self._telemetry), self._dropped,
                                self._duplicates)  # fmt: skip

    def latency_ms(self) -> dict[str, float]:
        """Fleet latency quantiles (``{"0.5": ms, ...}``) over recent windows; {} if none."""
        with self._lock:
            self._trim_histograms(self._clock())
            histograms = [h for _at, h in self._histograms]
        merged = _merge(histograms)
        if merged is None:
            return {}
        return {str(q): estimate_quantile(merged, q) for q in QUANTILES}

    # ------------------------------------------------------------------ writing

    def flush(self) -> None:
        """Write what is buffered now (called by the writer thread, and on stop).

        A store failure is logged and the rows stay buffered for the next flush.
        """
        with self._flush_lock:
            with self._lock:
                presence, self._presence = self._presence, {}
                rows = list(self._telemetry)
                self._telemetry.clear()
                summaries = list(self._summaries)
                self._summaries.clear()
            if summaries and self._drift is not None:
                self._drift(summaries)
            for device_id, changes in presence.items():
                for index, p in enumerate(changes):
                    try:
                        self._store.upsert_device(device_id, online=p.online, at=p.at,
                                                  status=p.status, tags=p.tags or (),
                                                  model=p.model, version=p.version)  # fmt: skip
                    except StoreError as exc:
                        logger.error("device %s: presence not stored (will retry): %s",
                                     device_id, exc)  # fmt: skip
                        with self._lock:  # back in front of what arrived meanwhile
                            later = self._presence.get(device_id, [])
                            self._presence[device_id] = changes[index:]
                            for change in later:
                                _add_change(self._presence[device_id], change)
                        break
            if not rows:
                return
            try:
                inserted = self._store.add_telemetry(rows)
            except StoreError as exc:
                logger.error("%d telemetry window(s) not stored (will retry): %s", len(rows), exc)
                with self._lock:  # back in front of what arrived meanwhile, oldest first
                    self._telemetry.extendleft(reversed(rows))
                    overflow = max(0, len(self._telemetry) - self._settings.max_pending)
                    for _ in range(overflow):
                        self._telemetry.popleft()
                    self._dropped += overflow
                if overflow:
                    logger.error("telemetry buffer full: dropped %d window(s)", overflow)
                return
            with self._lock:
                self._stored += inserted
                self._duplicates += len(rows) - inserted
            if inserted < len(rows):
                logger.info("%d telemetry window(s) delivered twice, stored once",
                            len(rows) - inserted)  # fmt: skip

    def _run(self) -> None:
        while not self._stopping.wait(self._settings.flush_s):
            self.flush()
            now = self._clock()
            if now - self._last_prune >= self._settings.prune_every_s:
                self._last_prune = now
                self._prune(now)

    def _prune(self, now: float) -> None:
        settings = self._settings
        older_than = None if settings.max_age_s is None else now - settings.max_age_s
        try:
            self._store.prune_telemetry(max_rows=settings.max_rows, older_than=older_than)
            self._store.prune_drift(max_rows=settings.max_rows, older_than=older_than)
            if older_than is not None:
                self._store.prune_presence(older_than=older_than)
        except StoreError as exc:
            logger.error("telemetry retention failed (will retry): %s", exc)

    def _trim_histograms(self, now: float) -> None:
        """Forget histograms older than the latency window (call with the lock held)."""
        horizon = now - self._settings.latency_window_s
        while self._histograms and self._histograms[0][0] < horizon:
            self._histograms.popleft()


def _merge(histograms: list[Histogram]) -> Histogram | None:
    """Sum histograms sharing the most common bounds; None without any count."""
    by_bounds: dict[tuple[float, ...], list[int]] = {}
    for histogram in histograms:
        counts = by_bounds.setdefault(histogram.bounds, [0] * len(histogram.counts))
        for i, count in enumerate(histogram.counts):
            counts[i] += count
    if not by_bounds:
        return None
    bounds, counts = max(by_bounds.items(), key=lambda item: sum(item[1]))
    if not sum(counts):
        return None
    return Histogram(bounds, tuple(counts))
