"""What every hub does whatever carries the bytes: the fleet view, the listeners,
the served payloads, and the routing of device messages.

:class:`HubBase` implements the wire-independent part of the
:class:`~coordinator.link.port.Hub` protocol; a concrete hub supplies how bytes go
out (:meth:`HubBase._publish`, :meth:`HubBase._publish_chunks`) and how a chunk
request is answered (:meth:`HubBase._request_chunks`), and feeds what arrives to
:meth:`HubBase._receive`. For each device message:

1. the topic and the message are decoded strictly and checked against each other
   (what fails is logged and dropped; an empty payload on a status topic means the
   device's retained status was cleared: it leaves the fleet);
2. a :class:`~edge_agent.protocol.Status` updates the
   :class:`~coordinator.link.fleet.Fleet` (a retained one is as old as it says,
   bounded by now); any other message marks the device as heard from; a
   :class:`~edge_agent.protocol.ChunkRequest` for a served payload is answered
   (at most :data:`MAX_CHUNKS_PER_REQUEST` chunks);
3. every listener sees the message, in the order they were added, outside the lock.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

from coordinator.link.chunk_sender import ChunkRequestItem, PlannedSend
from coordinator.link.fleet import DeviceRecord, Fleet
from coordinator.link.port import ConnectListener, Listener
from edge_agent.errors import ProtocolError
from edge_agent.protocol import (
    COORDINATOR_SENDER,
    Channel,
    ChunkRequest,
    DeviceTopic,
    Limits,
    Message,
    Status,
    broadcast_topic,
    check_route,
    chunk_count,
    decode,
    device_topic,
    encode,
    parse_topic,
    sha256_hex,
)

__all__ = ["MAX_CHUNKS_PER_REQUEST", "HubBase"]

logger = logging.getLogger(__name__)

MAX_CHUNKS_PER_REQUEST = 64
"""Chunks served for one chunk request (bounds what one device can make us queue)."""


class HubBase(ABC):
    """The wire-independent part of a hub (see the module docstring; thread-safe)."""

    def __init__(self, *, chunk_size: int, limits: Limits, clock: Callable[[], float]) -> None:
        """Start with an empty fleet, no listeners and no served payload."""
        self._chunk_size = chunk_size
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._fleet = Fleet()
        self._payloads: dict[str, bytes] = {}
        self._listeners: list[Listener] = []
        self._connect_listeners: list[ConnectListener] = []

    # ------------------------------------------------------- what a sub-class does

    @abstractmethod
    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Send one message (``retain``: the broker keeps it for later subscribers);
        False when disconnected."""

    @abstractmethod
    def _publish_chunks(self, sends: Iterable[PlannedSend]) -> bool:
        """Send planned chunks of served payloads; False when disconnected."""

    @abstractmethod
    def _request_chunks(self, item: ChunkRequestItem) -> None:
        """Answer a device's (checked) chunk request."""

    @abstractmethod
    def _forget_transfer(self, transfer_id: str) -> None:
        """A payload is withdrawn: drop what is kept about it (bytes sent)."""

    # --------------------------------------------------------------- the Hub API

    @property
    def chunk_size(self) -> int:
        """Bytes per chunk of a served payload."""
        return self._chunk_size

    @property
    def limits(self) -> Limits:
        """The protocol limits messages are encoded and decoded with."""
        return self._limits

    def fleet(self) -> list[DeviceRecord]:
        """Every device seen, sorted by id."""
        with self._lock:
            return self._fleet.records()

    def device(self, device_id: str) -> DeviceRecord | None:
        """One device's record, or None if no status of it was seen."""
        with self._lock:
            return self._fleet.get(device_id)

    def add_listener(self, listener: Listener) -> None:
        """Let ``listener`` see every decoded device message (see :data:`Listener`)."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        self._discard(self._listeners, listener)

    def add_connect_listener(self, listener: ConnectListener) -> None:
        """Call ``listener`` after every (re)connection."""
        with self._lock:
            self._connect_listeners.append(listener)

    def remove_connect_listener(self, listener: ConnectListener) -> None:
        """Stop calling ``listener`` (no error if it was not added)."""
        self._discard(self._connect_listeners, listener)

    def _discard(self, listeners: list[Any], listener: object) -> None:
        with self._lock:
            if listener in listeners:
                listeners.remove(listener)

    def send(self, device_id: str, message: Message, *, msg_id: str | None = None) -> int:
        """Send a command to one device's ``cmd`` topic.

        Args:
            device_id: The device.
            message: The command.
            msg_id: The envelope's id (default: a fresh one).

        Returns:
            The encoded message's size in bytes, or 0 if it could not go out
            (disconnected).
        """
        payload = encode(
            message,
            sender=COORDINATOR_SENDER,
            sent_at=self._clock(),
            msg_id=msg_id,
            limits=self._limits,
        )
        if not self._publish(device_topic(device_id, Channel.CMD), payload):
            logger.warning("could not send %s to %s (disconnected)", message.TYPE, device_id)
            return 0
        return len(payload)

    def publish_retained(self, name: str, message: Message) -> int:
        """Publish a message on the broadcast topic ``name``, retained by the broker.

        Every device subscribed to the broadcast gets it, and so does every device
        that subscribes later (the broker keeps the last one per topic): the fleet
        statement and the key set travel this way.

        Returns:
            The encoded message's size in bytes, or 0 if it could not go out
            (disconnected).
        """
        payload = encode(
            message, sender=COORDINATOR_SENDER, sent_at=self._clock(), limits=self._limits
        )
        if not self._publish(broadcast_topic(name), payload, retain=True):
            logger.warning("could not publish %s on %s (disconnected)", message.TYPE, name)
            return 0
        return len(payload)

    def serve_payload(self, payload: bytes) -> str:
        """Answer chunk requests for ``payload`` until :meth:`withdraw_payload`.

        Returns:
            The transfer id (the payload's sha256).
        """
        transfer_id = sha256_hex(payload)
        with self._lock:
            self._payloads[transfer_id] = payload
        return transfer_id

    def withdraw_payload(self, transfer_id: str) -> None:
        """Stop serving a payload given to :meth:`serve_payload`."""
        with self._lock:
            self._payloads.pop(transfer_id, None)
        self._forget_transfer(transfer_id)

    def push_payload(self, transfer_id: str, device_ids: list[str]) -> bool:
        """Publish every chunk of a served payload once: on its broadcast topic for
        two or more devices, on the device's ``chunks`` topic for one.

        Returns:
            False if the connection was lost before everything went out.
        """
        payload = self._payload_of(transfer_id)
        if payload is None or not device_ids:
            return True
        topic = (
            broadcast_topic(transfer_id)
            if len(device_ids) > 1
            else device_topic(device_ids[0], Channel.CHUNKS)
        )
        count = chunk_count(len(payload), self._chunk_size)
        return self._publish_chunks(PlannedSend(topic, transfer_id, i) for i in range(count))

    # --------------------------------------------------------- for the sub-classes

    def _payload_of(self, transfer_id: str) -> bytes | None:
        with self._lock:
            return self._payloads.get(transfer_id)

    def _connected(self) -> None:
        """Tell the connect listeners (after every (re)connection)."""
        with self._lock:
            listeners = list(self._connect_listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:
                logger.exception("a connect listener failed (continuing)")

    def _receive(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """Route one message from a device topic (see the module docstring)."""
        try:
            where = parse_topic(topic)
            if not isinstance(where, DeviceTopic):
                raise ProtocolError(f"unexpected topic {topic[:80]!r}")
            if where.channel is Channel.STATUS and not payload:
                with self._lock:
                    self._fleet.clear(where.device_id)
                return
            envelope = decode(payload, self._limits)
            check_route(envelope, topic)
        except ProtocolError as exc:
            logger.warning("dropped a message on %s: %s: %s", topic[:120], exc.code, exc)
            return
        device_id, message, now = where.device_id, envelope.message, self._clock()
        with self._lock:
            if isinstance(message, Status):
                # A retained status is as old as it says (bounded by now), not "just seen".
                seen = min(now, envelope.sent_at) if retained else now
                self._fleet.update_status(device_id, message, sent_at=envelope.sent_at, now=seen)
            else:
                self._fleet.touch(device_id, now)
            listeners = list(self._listeners)
        if isinstance(message, ChunkRequest):
            self._on_chunk_request(device_id, message)
        for listener in listeners:
            try:
                listener(device_id, envelope, len(payload))
            except Exception:
                logger.exception("a message listener failed (continuing)")

    def _on_chunk_request(self, device_id: str, request: ChunkRequest) -> None:
        payload = self._payload_of(request.transfer_id)
        if payload is None:
            logger.info("%s asked for chunks of unknown transfer %s", device_id,
                        request.transfer_id[:12])  # fmt: skip
            return
        count = chunk_count(len(payload), self._chunk_size)
        indices = sorted({i for i in request.indices if 0 <= i < count})[:MAX_CHUNKS_PER_REQUEST]
        self._request_chunks(ChunkRequestItem(device_id, request.transfer_id, tuple(indices)))
