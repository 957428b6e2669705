"""The in-memory twin of the MQTT hub: :class:`MemoryHub`, for tests.

A real :class:`~coordinator.link.port.Hub`: it keeps the same fleet view, calls the
same listeners and answers chunk requests the same way as
:class:`~coordinator.link.hub.MqttHub` (both are
:class:`~coordinator.link.base.HubBase`); only the wire is a list. A test plays the
devices and reads what the hub published::

    hub = MemoryHub()
    hub.start()                                          # "connects": connect listeners run
    hub.receive("dev1", Status(online=True, agent_version="1"))   # the fleet sees dev1
    manager = RolloutManager(hub, store)                 # any part that takes a Hub
    ...
    [envelope] = hub.commands("dev1")                    # what was sent to dev1
    hub.reconnect()                                      # as after a lost connection

Everything :meth:`receive` gets is encoded and decoded as on the wire (so a test
cannot inject what a device could not send), and everything sent is kept encoded
in :attr:`MemoryHub.published` (``on_publish`` sees each at once, for devices that
answer on the spot). Chunk requests are answered at once, on the caller's thread.
Nothing goes out while the hub is not started (as when disconnected).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from coordinator.link.base import HubBase
from coordinator.link.chunk_sender import ChunkRequestItem, PlannedSend, chunk_message, plan_sends
from edge_agent.protocol import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_LIMITS,
    Channel,
    Chunk,
    Direction,
    Envelope,
    Limits,
    Message,
    broadcast_topic,
    decode,
    device_topic,
    encode,
)

__all__ = ["MemoryHub", "Published"]


@dataclass(frozen=True)
class Published:
    """One message the hub sent: its topic, encoded bytes and whether it is retained."""

    topic: str
    payload: bytes
    retained: bool = False

    def envelope(self, limits: Limits = DEFAULT_LIMITS) -> Envelope:
        """The decoded message."""
        return decode(self.payload, limits)


class MemoryHub(HubBase):
    """A hub whose wire is a list (see the module docstring; thread-safe)."""

    def __init__(
        self,
        *,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        on_publish: Callable[[Published], None] | None = None,
    ) -> None:
        """Prepare a hub with an empty fleet, not started.

        ``on_publish`` sees every message sent, right after it was kept (on the
        sender's thread): devices that answer at once, such as an accept.
        """
        super().__init__(chunk_size=chunk_size, limits=limits, clock=clock)
        self._on_publish = on_publish
        self._wire_lock = threading.Lock()
        self._online = False
        self._published: list[Published] = []
        self._bytes_sent: dict[str, int] = defaultdict(int)

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> None:  # noqa: ARG002 (the Hub signature)
        """Go online and tell the connect listeners (``timeout`` is not needed)."""
        with self._wire_lock:
            self._online = True
        self._connected()

    def stop(self) -> None:
        """Go offline: nothing goes out any more (idempotent)."""
        with self._wire_lock:
            self._online = False

    def sync_fleet(self) -> None:
        """Nothing to wait for: :meth:`receive` applies a status at once."""

    def reconnect(self) -> None:
        """Act as after a lost and restored connection: the connect listeners run."""
        self.start()

    def bytes_sent(self, transfer_id: str) -> int:
        """Encoded bytes of the chunks of ``transfer_id`` published so far."""
        with self._wire_lock:
            return self._bytes_sent.get(transfer_id, 0)

    # ------------------------------------------------------------ playing devices

    def receive(
        self,
        device_id: str,
        message: Message,
        *,
        sent_at: float | None = None,
        msg_id: str | None = None,
        retained: bool = False,
    ) -> None:
        """Take a message as if ``device_id`` had sent it on its channel's topic.

        Args:
            device_id: The sending device.
            message: What it sends (its device-to-coordinator channel names the topic).
            sent_at: The device's clock (default: the hub's clock).
            msg_id: The envelope's id (default: a fresh one).
            retained: Delivered as the broker's retained copy (statuses).
        """
        channel = min(c for c in message.CHANNELS if c.direction is Direction.FROM_DEVICE)
        payload = encode(
            message,
            sender=device_id,
            sent_at=self._clock() if sent_at is None else sent_at,
            msg_id=msg_id,
            limits=self._limits,
        )
        self._receive(device_topic(device_id, channel), payload, retained)

    def receive_raw(self, topic: str, payload: bytes) -> None:
        """Take raw bytes on a topic (malformed input, a cleared retained status)."""
        self._receive(topic, payload)

    # ------------------------------------------------------------- what was sent

    @property
    def published(self) -> list[Published]:
        """Everything sent, oldest first."""
        with self._wire_lock:
            return list(self._published)

    def commands(self, device_id: str) -> list[Envelope]:
        """The commands sent to one device, oldest first."""
        topic = device_topic(device_id, Channel.CMD)
        return [p.envelope(self._limits) for p in self.published if p.topic == topic]

    def chunks(self, device_id: str, transfer_id: str) -> list[Chunk]:
        """The chunks of a transfer a device could hear (its own topic and the
        transfer's broadcast topic), oldest first."""
        topics = {device_topic(device_id, Channel.CHUNKS), broadcast_topic(transfer_id)}
        found = []
        for published in self.published:
            if published.topic in topics:
                message = published.envelope(self._limits).message
                if isinstance(message, Chunk) and message.transfer_id == transfer_id:
                    found.append(message)
        return found

    def clear_published(self) -> None:
        """Forget what was sent so far."""
        with self._wire_lock:
            self._published.clear()

    # ------------------------------------------------------------------- the wire

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        published = Published(topic, payload, retain)
        with self._wire_lock:
            if not self._online:
                return False
            self._published.append(published)
        if self._on_publish is not None:
            self._on_publish(published)
        return True

    def _publish_chunks(self, sends: Iterable[PlannedSend]) -> bool:
        for send in sends:
            payload = self._payload_of(send.transfer_id)
            if payload is None:
                continue
            message = chunk_message(
                payload, send, chunk_size=self._chunk_size, limits=self._limits,
                sent_at=self._clock(),
            )  # fmt: skip
            if not self._publish(send.topic, message):
                return False
            with self._wire_lock:
                self._bytes_sent[send.transfer_id] += len(message)
        return True

    def _request_chunks(self, item: ChunkRequestItem) -> None:
        self._publish_chunks(plan_sends([item]))

    def _forget_transfer(self, transfer_id: str) -> None:
        with self._wire_lock:
            self._bytes_sent.pop(transfer_id, None)
