"""Receiving devices' chunked uploads of large updates, in bounded memory.

A device whose update does not fit in one message sends it as ``chunk`` messages
on its ``events`` topic, then an ``update_report`` naming the transfer (see
:class:`~edge_agent.protocol.UpdateReport`). :class:`UploadReceiver` keeps those
chunks until the report arrives; :class:`~coordinator.federated.grid.MqttGrid`
owns one and calls it on its own thread.

Workflow::

    uploads = UploadReceiver(budget_bytes=None)   # None: 4x the largest update
    uploads.receive("dev1", chunk, limit=limit)   # each chunk (raises on a refusal)
    payload = uploads.take("dev1", transfer_id)   # when the report arrives
    uploads.clear()                               # a new phase

The rules, so that what one device makes the coordinator hold stays close to what
it declared, and that declaration is bounded:

* An upload's first chunk fixes its ``total_size`` and ``chunk_size``; a later
  chunk that says otherwise refuses the whole upload (``upload_chunk_size``).
* ``chunk_size`` must be at least :data:`MIN_UPLOAD_CHUNK_BYTES` (4 KiB) unless
  the upload is one chunk (the last chunk may always be shorter, as the protocol
  says): many tiny chunks cost a message each and defeat the byte accounting
  (``upload_chunk_size``).
* ``total_size`` must not exceed ``limit``, the largest payload the task's codec
  can produce for the model (``oversized``).
* A device's uploads in flight (declared sizes, summed) must stay within its byte
  budget: ``budget_bytes``, or :data:`BUDGET_FACTOR` times ``limit`` when None
  (``upload_budget``).
* The chunks are written into one preallocated ``bytearray`` of the declared size,
  with one byte per chunk recording which arrived, so an upload holds its declared
  size plus ``1/chunk_size`` of it, whatever the sender does. :meth:`held_bytes`
  says how much is held.

A refusal raises :class:`~coordinator.errors.UploadRefusedError` once per upload,
is logged and counted in :attr:`UploadReceiver.refusals` by reason; the upload's
memory is released and its further chunks are dropped quietly. The report that
names a refused upload is rejected with the refusal's reason (:meth:`take`).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass

from coordinator.errors import UpdateRejectedError, UploadRefusedError
from edge_agent.protocol import Chunk, chunk_count, sha256_hex

__all__ = [
    "BUDGET_FACTOR",
    "MIN_UPLOAD_CHUNK_BYTES",
    "UPLOAD_REFUSALS",
    "Upload",
    "UploadReceiver",
]

logger = logging.getLogger(__name__)

MIN_UPLOAD_CHUNK_BYTES = 4 * 1024
"""Smallest chunk size an upload of more than one chunk may use."""
BUDGET_FACTOR = 4
"""A device's default byte budget of uploads in flight, in largest allowed updates."""
UPLOAD_REFUSALS = ("upload_chunk_size", "oversized", "upload_budget")
"""Reasons an upload is refused (also the reasons its report is rejected with)."""
MAX_REFUSED_REMEMBERED = 64
"""Refused uploads remembered (to name the reason when the report comes); oldest go first."""


@dataclass
class Upload:
    """A chunked upload being received: its buffer and which chunks arrived.

    Attributes:
        total: Declared payload size (bytes).
        chunk_size: Bytes per chunk, fixed by the first chunk.
        buffer: The payload, preallocated at ``total`` bytes.
        arrived: One byte per chunk: 1 once that chunk was written.
        missing: Chunks not arrived yet.
    """

    total: int
    chunk_size: int
    buffer: bytearray
    arrived: bytearray
    missing: int

    @classmethod
    def start(cls, total: int, chunk_size: int) -> Upload:
        """An empty upload of ``total`` bytes in chunks of ``chunk_size``."""
        count = chunk_count(total, chunk_size)
        return cls(total, chunk_size, bytearray(total), bytearray(count), count)

    def write(self, chunk: Chunk) -> None:
        """Copy a chunk into the buffer (the protocol checked its offset and length)."""
        self.buffer[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
        if not self.arrived[chunk.index]:
            self.arrived[chunk.index] = 1
            self.missing -= 1

    @property
    def held(self) -> int:
        """Bytes this upload holds (buffer and arrival map)."""
        return len(self.buffer) + len(self.arrived)


class UploadReceiver:
    """The uploads of one phase, by device and transfer (see the module docstring)."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        """Receive uploads within a per-device byte budget.

        Args:
            budget_bytes: Most bytes of uploads one device may have in flight;
                None for :data:`BUDGET_FACTOR` times the largest allowed update.

        Raises:
            ValueError: ``budget_bytes`` is not positive.
        """
        if budget_bytes is not None and budget_bytes < 1:
            raise ValueError(f"the upload budget must be positive, got {budget_bytes}")
        self._budget = budget_bytes
        self._uploads: dict[tuple[str, str], Upload] = {}
        self._refused: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.refusals: Counter[str] = Counter()
        """Refused uploads by reason (since this receiver was made)."""

    def clear(self) -> None:
        """Forget every upload (a new phase begins); :attr:`refusals` stays."""
        self._uploads.clear()
        self._refused.clear()

    def held_bytes(self, device_id: str | None = None) -> int:
        """Bytes held for uploads in flight (of one device, or of all)."""
        return sum(
            upload.held
            for (device, _), upload in self._uploads.items()
            if device_id is None or device == device_id
        )

    def receive(self, device_id: str, chunk: Chunk, *, limit: int) -> None:
        """Keep one chunk of a device's upload.

        Args:
            device_id: The sender.
            chunk: The chunk (decoded, so its offset, length and sha256 are checked).
            limit: Largest payload this device's task allows (bytes).

        Raises:
            UploadRefusedError: the upload breaks a rule (raised for its first
                refused chunk only; later chunks of a refused upload are dropped).
        """
        key = (device_id, chunk.transfer_id)
        if key in self._refused:
            return
        upload = self._uploads.get(key)
        if upload is None:
            self._check_new(device_id, chunk, limit)
            upload = self._uploads[key] = Upload.start(chunk.total_size, chunk.chunk_size)
        elif chunk.total_size != upload.total or chunk.chunk_size != upload.chunk_size:
            self._refuse(
                key,
                "upload_chunk_size",
                f"a chunk of {chunk.chunk_size} bytes of a {chunk.total_size}-byte upload, "
                f"which its first chunk declared as {upload.chunk_size} of {upload.total}",
            )
        upload.write(chunk)

    def _check_new(self, device_id: str, chunk: Chunk, limit: int) -> None:
        """The rules a new upload's first chunk must meet.

        Raises:
            UploadRefusedError: it breaks one.
        """
        key = (device_id, chunk.transfer_id)
        if chunk.count > 1 and chunk.chunk_size < MIN_UPLOAD_CHUNK_BYTES:
            self._refuse(
                key,
                "upload_chunk_size",
                f"chunks of {chunk.chunk_size} bytes (at least {MIN_UPLOAD_CHUNK_BYTES})",
            )
        if chunk.total_size > limit:
            self._refuse(key, "oversized", f"{chunk.total_size} bytes (at most {limit})")
        budget = self._budget if self._budget is not None else BUDGET_FACTOR * limit
        in_flight = sum(u.total for (d, _), u in self._uploads.items() if d == device_id)
        if in_flight + chunk.total_size > budget:
            self._refuse(
                key,
                "upload_budget",
                f"{chunk.total_size} bytes with {in_flight} already in flight "
                f"(budget {budget} per device)",
            )

    def _refuse(self, key: tuple[str, str], reason: str, detail: str) -> None:
        """Drop an upload, remember why, count and log it, and raise.

        Raises:
            UploadRefusedError: always.
        """
        self._uploads.pop(key, None)
        self._refused[key] = reason
        while len(self._refused) > MAX_REFUSED_REMEMBERED:
            self._refused.popitem(last=False)
        self.refusals[reason] += 1
        error = UploadRefusedError(reason, f"upload {key[1][:12]} from {key[0]} refused: {detail}")
        logger.warning("%s", error)
        raise error

    def take(self, device_id: str, transfer_id: str) -> memoryview:
        """The complete payload of an upload, which is forgotten here.

        Returns:
            The payload (its sha256 is ``transfer_id``).

        Raises:
            UploadRefusedError: the upload was refused (its reason).
            UpdateRejectedError: ``malformed``: chunks missing, or the payload
                does not match ``transfer_id``.
        """
        key = (device_id, transfer_id)
        reason = self._refused.pop(key, None)
        if reason is not None:
            raise UploadRefusedError(reason, f"the upload {transfer_id[:12]} was refused")
        upload = self._uploads.pop(key, None)
        if upload is None:
            raise UpdateRejectedError("malformed", "the upload's chunks did not arrive")
        if upload.missing or sha256_hex(upload.buffer) != transfer_id:
            raise UpdateRejectedError("malformed", "the upload is incomplete or does not match")
        return memoryview(upload.buffer)
