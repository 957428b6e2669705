"""The agent's telemetry uplink: windows closed, spooled on disk, published in order.

Every ``telemetry.interval_s`` the agent's worker calls :meth:`TelemetryUplink.close_window`
with the model being served:

1. the serving monitor's window summary of that model is closed (its input and
   output statistics for drift scoring, :mod:`edge_agent.monitoring`);
2. the telemetry collector's window is closed into one record (counts, latency,
   the summary);
3. the record goes out as a :class:`~edge_agent.protocol.TelemetryBatch` with the
   next sequence number, the count of batches the spool had to drop since the last
   one, and whether the device is stale (no fresh fleet statement); the encoded
   batch is appended to the on-disk :class:`~edge_agent.spool.Spool` first, so a
   disconnection or a restart loses nothing the spool can hold;
4. :meth:`TelemetryUplink.drain` publishes what the spool holds, oldest first, each
   one waiting for the broker's acknowledgement, and removes only what was
   acknowledged. The worker also drains after every reconnect.

All of it runs on the agent's worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edge_agent.errors import StateError
from edge_agent.monitoring import ServingMonitor
from edge_agent.protocol import Message, TelemetryBatch
from edge_agent.serving.server import LoadedModel
from edge_agent.serving.telemetry import TelemetryCollector
from edge_agent.spool import Spool
from edge_agent.transport.link import DeviceLink

__all__ = ["PUBLISH_ACK_TIMEOUT_S", "TelemetryUplink"]

logger = logging.getLogger(__name__)

PUBLISH_ACK_TIMEOUT_S = 5.0
"""How long a publish waits for the broker's acknowledgement."""

_DRAIN_BATCH = 16
"""Spooled batches read from disk at a time while draining."""


class TelemetryUplink:
    """Closes telemetry windows into the spool and publishes the spool (see the module
    docstring)."""

    def __init__(
        self,
        spool: Spool,
        collector: TelemetryCollector,
        monitor: ServingMonitor,
        link: DeviceLink,
        *,
        topic: str,
        encode: Callable[[Message], bytes],
        stale: Callable[[], bool],
    ) -> None:
        """Take the parts; nothing is published until a window closes or :meth:`drain`.

        Args:
            spool: Where batches wait for the broker (this uplink closes it).
            collector: The serving telemetry whose windows are closed.
            monitor: The serving monitor whose window summaries ride along.
            link: The device's MQTT link.
            topic: The device's telemetry topic.
            encode: Wraps a message in the device's envelope.
            stale: Whether the device holds no fresh fleet statement.
        """
        self._spool = spool
        self._collector = collector
        self._monitor = monitor
        self._link = link
        self._topic = topic
        self._encode = encode
        self._stale = stale
        self._seq = 0
        self._published = 0

    @property
    def published(self) -> int:
        """Batches the broker has acknowledged since start (one window each)."""
        return self._published

    def close_window(self, active: LoadedModel | None) -> None:
        """Close the current window of ``active`` (the served model, if any), spool its
        batch and drain the spool."""
        summary = None
        if active is not None:
            summary = self._monitor.close(active.name, active.version, active.profile)
        record = self._collector.close_window(
            model=active.name if active else None,
            version=active.version if active else None,
            summary=summary,
        )
        dropped = self._spool.dropped
        batch = TelemetryBatch(
            seq=self._seq, dropped=dropped, records=(record,), stale=self._stale()
        )
        self._seq += 1
        try:
            self._spool.append(self._encode(batch))
            self._spool.take_dropped(up_to=dropped)  # reported by this batch, not before
        except StateError as exc:
            logger.error("telemetry batch lost: %s", exc)
        self.drain()

    def drain(self) -> None:
        """Publish the spooled batches, oldest first, while connected; each is removed
        once the broker acknowledged it."""
        while self._link.connected and len(self._spool):
            for item in self._spool.peek(_DRAIN_BATCH):
                if not self._link.publish_wait(
                    self._topic, item.data, timeout=PUBLISH_ACK_TIMEOUT_S
                ):
                    return
                self._spool.remove(item.seq)
                self._published += 1

    def close(self) -> None:
        """Close the spool (what it holds stays on disk for the next start)."""
        self._spool.close()
