"""Receiving devices' chunked uploads of large updates, on disk, in bounded memory.

A device whose update does not fit in one message sends it as ``chunk`` messages
on its ``events`` topic, then an ``update_report`` naming the transfer (see
:class:`~edge_agent.protocol.UpdateReport`). :class:`UploadReceiver` keeps those
chunks until the report arrives; :class:`~coordinator.federated.grid.MqttGrid`
owns one and calls it on its own thread.

Workflow::

    uploads = UploadReceiver(budget_bytes=None, spool_dir=None)  # opens the spool
    uploads.receive("dev1", chunk, limit=limit)   # each chunk (raises on a refusal)
    payload = uploads.take("dev1", transfer_id)   # when the report arrives
    uploads.clear()                               # a new phase
    uploads.close()                               # the run is over: spool removed

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
* Chunks are written straight into one file per upload in the spool
  (:mod:`coordinator.federated.spool`; ``spool_dir``, or a per-user directory in
  the system's temporary directory), whose declared size is reserved on disk by
  the first chunk. In memory an upload is only its index: one byte per chunk
  recording which arrived, ``1/chunk_size`` of its size (:meth:`memory_bytes`);
  :meth:`held_bytes` counts the disk too. When the report comes, the file is
  read back in bounded pieces to check its sha256 (the transfer id), then
  memory-mapped for decoding and deleted. A refused, abandoned (a new phase,
  :meth:`clear`) or failed upload's file is deleted at once; files a crashed
  process left are removed when the next spool opens on the same directory.
* The disk failing (full, unwritable) refuses the upload it happened to
  (``upload_storage``, an :class:`~coordinator.errors.UploadSpoolError` logged
  by the spool); the receiver and the run go on.

A refusal raises :class:`~coordinator.errors.UploadRefusedError` once per upload,
is logged and counted in :attr:`UploadReceiver.refusals` by reason; the upload's
file is deleted and its further chunks are dropped quietly. The report that
names a refused upload is rejected with the refusal's reason (:meth:`take`).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from coordinator.errors import UpdateRejectedError, UploadRefusedError, UploadSpoolError
from coordinator.federated.spool import SpoolFile, UploadSpool
from edge_agent.protocol import Chunk, chunk_count

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
UPLOAD_REFUSALS = ("upload_chunk_size", "oversized", "upload_budget", "upload_storage")
"""Reasons an upload is refused (also the reasons its report is rejected with)."""
MAX_REFUSED_REMEMBERED = 64
"""Refused uploads remembered (to name the reason when the report comes); oldest go first."""


@dataclass
class Upload:
    """A chunked upload being received: its file in the spool and which chunks arrived.

    Attributes:
        total: Declared payload size (bytes).
        chunk_size: Bytes per chunk, fixed by the first chunk.
        file: Where the chunks are written (``total`` bytes reserved).
        arrived: One byte per chunk: 1 once that chunk was written (the index,
            the only part of the upload held in memory).
        missing: Chunks not arrived yet.
    """

    total: int
    chunk_size: int
    file: SpoolFile
    arrived: bytearray
    missing: int

    @classmethod
    def start(cls, spool: UploadSpool, total: int, chunk_size: int) -> Upload:
        """An empty upload of ``total`` bytes in chunks of ``chunk_size``.

        Raises:
            UploadSpoolError: its file cannot be made (disk full, unwritable).
        """
        count = chunk_count(total, chunk_size)
        return cls(total, chunk_size, spool.create(total), bytearray(count), count)

    def write(self, chunk: Chunk) -> None:
        """Write a chunk into the file (the protocol checked its offset and length).

        Raises:
            UploadSpoolError: the write failed.
        """
        self.file.write(chunk.offset, chunk.data)
        if not self.arrived[chunk.index]:
            self.arrived[chunk.index] = 1
            self.missing -= 1

    @property
    def memory(self) -> int:
        """Bytes this upload holds in memory (its index)."""
        return len(self.arrived)

    @property
    def held(self) -> int:
        """Bytes this upload holds: its file on disk and its index."""
        return self.total + self.memory


class UploadReceiver:
    """The uploads of one run, by device and transfer (see the module docstring)."""

    def __init__(self, budget_bytes: int | None = None, spool_dir: Path | None = None) -> None:
        """Receive uploads within a per-device byte budget, into a spool on disk.

        Args:
            budget_bytes: Most bytes of uploads one device may have in flight;
                None for :data:`BUDGET_FACTOR` times the largest allowed update.
            spool_dir: The spool's root directory (made with mode 0700); None
                for :func:`~coordinator.federated.spool.default_spool_root`.

        Raises:
            ValueError: ``budget_bytes`` is not positive.
            UploadSpoolError: the spool cannot be used (logged).
        """
        if budget_bytes is not None and budget_bytes < 1:
            raise ValueError(f"the upload budget must be positive, got {budget_bytes}")
        self._budget = budget_bytes
        self.spool = UploadSpool.open(spool_dir)
        """Where the uploads' files are (:mod:`coordinator.federated.spool`)."""
        self._uploads: dict[tuple[str, str], Upload] = {}
        self._refused: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.refusals: Counter[str] = Counter()
        """Refused uploads by reason (since this receiver was made)."""

    def clear(self) -> None:
        """Forget every upload and delete its file (a new phase begins); :attr:`refusals` stays."""
        for upload in self._uploads.values():
            upload.file.discard()
        self._uploads.clear()
        self._refused.clear()

    def close(self) -> None:
        """Forget every upload and remove the spool (the receiver is unusable after)."""
        self.clear()
        self.spool.close()

    def held_bytes(self, device_id: str | None = None) -> int:
        """Bytes held for uploads in flight, on disk and in memory (of one device, or of all)."""
        return sum(
            upload.held
            for (device, _), upload in self._uploads.items()
            if device_id is None or device == device_id
        )

    def memory_bytes(self) -> int:
        """Bytes held in memory for uploads in flight (their indexes)."""
        return sum(upload.memory for upload in self._uploads.values())

    def receive(self, device_id: str, chunk: Chunk, *, limit: int) -> None:
        """Keep one chunk of a device's upload.

        Args:
            device_id: The sender.
            chunk: The chunk (decoded, so its offset, length and sha256 are checked).
            limit: Largest payload this device's task allows (bytes).

        Raises:
            UploadRefusedError: the upload breaks a rule, or the disk failed
                (raised for its first refused chunk only; later chunks of a
                refused upload are dropped).
        """
        key = (device_id, chunk.transfer_id)
        if key in self._refused:
            return
        try:
            upload = self._uploads.get(key)
            if upload is None:
                self._check_new(device_id, chunk, limit)
                upload = self._uploads[key] = Upload.start(
                    self.spool, chunk.total_size, chunk.chunk_size
                )
            elif chunk.total_size != upload.total or chunk.chunk_size != upload.chunk_size:
                self._refuse(
                    key,
                    "upload_chunk_size",
                    f"a chunk of {chunk.chunk_size} bytes of a {chunk.total_size}-byte upload, "
                    f"which its first chunk declared as {upload.chunk_size} of {upload.total}",
                )
            upload.write(chunk)
        except UploadSpoolError as exc:
            self._refuse(key, "upload_storage", str(exc))

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
        """Drop an upload and its file, remember why, count and log it, and raise.

        Raises:
            UploadRefusedError: always.
        """
        upload = self._uploads.pop(key, None)
        if upload is not None:
            upload.file.discard()
        self._refused[key] = reason
        while len(self._refused) > MAX_REFUSED_REMEMBERED:
            self._refused.popitem(last=False)
        self.refusals[reason] += 1
        error = UploadRefusedError(reason, f"upload {key[1][:12]} from {key[0]} refused: {detail}")
        logger.warning("%s", error)
        raise error

    def take(self, device_id: str, transfer_id: str) -> memoryview:
        """The complete payload of an upload, which is forgotten here (its file deleted).

        Returns:
            The payload (its sha256 is ``transfer_id``), a read-only memory map.

        Raises:
            UploadRefusedError: the upload was refused (its reason), or its file
                could not be read back (``upload_storage``).
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
        try:
            if upload.missing or upload.file.sha256() != transfer_id:
                raise UpdateRejectedError("malformed", "the upload is incomplete or does not match")
            return upload.file.take()
        except UploadSpoolError as exc:
            self.refusals["upload_storage"] += 1
            raise UploadRefusedError("upload_storage", str(exc)) from exc
        finally:
            upload.file.discard()
