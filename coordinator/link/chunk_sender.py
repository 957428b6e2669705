"""Serving devices' chunk requests from one sender thread, coalesced.

Devices ask for the chunks they miss (after a broker restart, an agent restart, a
late accept). Answering on the link's network thread would stall every other message
while megabytes are encoded, and after a broker restart a whole fleet asks for the
same chunks at once. So :class:`ChunkSender`:

1. queues requests (bounded: beyond :data:`MAX_PENDING_REQUESTS` a request is
   dropped and logged; the device asks again after its stall timeout);
2. on its own thread, takes everything queued at that moment and plans it with the
   pure :func:`plan_sends`: a chunk wanted by two or more devices goes out once on
   the transfer's broadcast topic (every device downloading that transfer listens
   there), a chunk wanted by one device goes to that device's ``chunks`` topic;
3. publishes the plan with :meth:`ChunkSender.publish`, at most
   :data:`PUBLISH_WINDOW` messages ahead of the broker's acknowledgements, so memory
   stays bounded however large the backlog. The coordinator's first push of a
   payload goes through the same method, on the caller's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edge_agent.protocol import (
    COORDINATOR_SENDER,
    Channel,
    Chunk,
    Limits,
    broadcast_topic,
    device_topic,
    encode,
)
from edge_agent.transport.mqtt import MqttLink

__all__ = ["ChunkRequestItem", "ChunkSender", "PlannedSend", "chunk_message", "plan_sends"]

logger = logging.getLogger(__name__)

MAX_PENDING_REQUESTS = 10_000
PUBLISH_WINDOW = 64
"""Chunks published before waiting for the broker's acknowledgements."""
ACK_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ChunkRequestItem:
    """One device's request: which chunks of which payload.

    Attributes:
        device_id: The requesting device.
        transfer_id: sha256 of the payload.
        indices: Chunk indices wanted (already checked against the chunk count).
    """

    device_id: str
    transfer_id: str
    indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PlannedSend:
    """One chunk to publish on one topic."""

    topic: str
    transfer_id: str
    index: int


def plan_sends(requests: Iterable[ChunkRequestItem]) -> list[PlannedSend]:
    """Turn queued requests into publications, one per chunk and audience.

    A chunk that two or more devices asked for goes out once on the transfer's
    broadcast topic; one wanted by a single device goes to that device's ``chunks``
    topic. Duplicates (the same device asking twice) count once. The order is by
    transfer, then chunk index.

    Returns:
        The publications.
    """
    wanted: dict[tuple[str, int], set[str]] = defaultdict(set)
    for request in requests:
        for index in request.indices:
            wanted[(request.transfer_id, index)].add(request.device_id)
    plan = []
    for (transfer_id, index), devices in sorted(wanted.items()):
        if len(devices) > 1:
            plan.append(PlannedSend(broadcast_topic(transfer_id), transfer_id, index))
        else:
            (device_id,) = devices
            plan.append(PlannedSend(device_topic(device_id, Channel.CHUNKS), transfer_id, index))
    return plan


def chunk_message(
    payload: bytes, send: PlannedSend, *, chunk_size: int, limits: Limits, sent_at: float
) -> bytes:
    """The encoded ``chunk`` message of one planned send of ``payload``."""
    chunk = Chunk.from_payload(
        payload, send.index, chunk_size=chunk_size, transfer_id=send.transfer_id
    )
    return encode(chunk, sender=COORDINATOR_SENDER, sent_at=sent_at, limits=limits)


class ChunkSender:
    """Answers chunk requests on its own thread (see the module docstring)."""

    def __init__(
        self,
        link: MqttLink,
        payloads: Callable[[str], bytes | None],
        *,
        chunk_size: int,
        limits: Limits,
        clock: Callable[[], float],
    ) -> None:
        """Prepare the sender; :meth:`start` runs it.

        Args:
            link: The coordinator's connection.
            payloads: Gives the payload of a transfer id, or None once forgotten.
            chunk_size: Bytes per chunk.
            limits: Protocol limits for encoding.
            clock: Unix seconds, for the messages' ``sent_at``.
        """
        self._link = link
        self._payloads = payloads
        self._chunk_size = chunk_size
        self._limits = limits
        self._clock = clock
        self._queue: queue.Queue[ChunkRequestItem | None] = queue.Queue(MAX_PENDING_REQUESTS)
        self._thread: threading.Thread | None = None
        self._sent_lock = threading.Lock()
        self._sent: dict[str, int] = defaultdict(int)

    def bytes_sent(self, transfer_id: str) -> int:
        """MQTT payload bytes of ``transfer_id``'s chunks published so far (both the
        first push and answers to requests)."""
        with self._sent_lock:
            return self._sent.get(transfer_id, 0)

    def forget(self, transfer_id: str) -> None:
        """Drop the byte count of a transfer that is no longer served."""
        with self._sent_lock:
            self._sent.pop(transfer_id, None)

    def start(self) -> None:
        """Start the sender thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chunk-sender", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the sender thread after the request being served (idempotent)."""
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=1.0)
            except queue.Full:
                logger.warning("chunk sender queue full while stopping")
            self._thread.join(timeout=10)
            self._thread = None

    def request(self, item: ChunkRequestItem) -> None:
        """Queue a device's request (never blocks; dropped when the queue is full)."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            logger.warning("chunk requests backlog full: dropped %s's request", item.device_id)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._serve(batch)
                    return
                batch.append(item)
            try:
                self._serve(batch)
            except Exception:
                logger.exception("chunk sender: unexpected error (continuing)")

    def _serve(self, batch: list[ChunkRequestItem]) -> None:
        plan = plan_sends(batch)
        logger.debug("serving %d chunk request(s) with %d message(s)", len(batch), len(plan))
        if not self.publish(plan):
            logger.info("not connected: the devices will ask again for what they miss")

    def publish(self, sends: Iterable[PlannedSend]) -> bool:
        """Publish chunks on the caller's thread, paced by the broker's acknowledgements.

        Chunks of transfers no longer known are skipped.

        Returns:
            False if the connection was lost before everything went out.
        """
        pending = []
        for send in sends:
            payload = self._payloads(send.transfer_id)
            if payload is None:
                continue
            message = chunk_message(
                payload,
                send,
                chunk_size=self._chunk_size,
                limits=self._limits,
                sent_at=self._clock(),
            )
            info = self._link.publish_info(send.topic, message)
            if info is None:
                return False
            with self._sent_lock:
                self._sent[send.transfer_id] += len(message)
            pending.append(info)
            if len(pending) >= PUBLISH_WINDOW:
                pending.pop(0).wait_for_publish(ACK_TIMEOUT_S)
        return True
