"""A bounded on-disk FIFO of opaque byte items that survives crashes and restarts.

The agent spools encoded telemetry batches while the broker is unreachable and sends
them, oldest first, once it reconnects:

1. ``spool = Spool(data_dir / "spool", max_bytes=..., max_items=...)`` at start-up
   recovers whatever a previous run left behind.
2. To send: ``seq = spool.append(payload)``.
3. While connected: ``for item in spool.peek(16)``, publish ``item.data`` and, once
   the broker acknowledged it, ``spool.remove(item.seq)``. A crash between publish
   and remove sends the item again after restart (at-least-once delivery).
4. ``spool.take_dropped()`` says how many items were lost since it was last asked,
   for the ``dropped`` field of the next batch.

Storage: :class:`~edge_agent.durable_log.DurableLog`, the agent's one crash-safe
log (``spool.db`` in the directory, durable at every change). The persisted count
of lost items is a counter in the same file, changed in the same transaction as the
items it counts. Sequence numbers increase and are never reused.

An agent upgraded in place finds the spool of its earlier version (one file per
item): on open, :mod:`edge_agent.legacy_formats` imports those items in their
order, adds the old dropped count and the damaged items to the dropped count, and
deletes the old files once the import committed.

Bounds (``max_bytes`` counts item data; ``max_items`` counts items): when an append
would exceed one, the oldest items are deleted first and counted as dropped, in the
transaction that stores the new item. An item larger than ``max_bytes`` on its own
is dropped (and counted) instead of stored. Nothing else is ever lost: an error
while writing raises :class:`~edge_agent.errors.StateError` and changes nothing.

The spool is thread-safe (one lock) but not multi-process safe: one agent owns its
directory.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from edge_agent.durable_log import DurableLog
from edge_agent.errors import ConfigError, StateError
from edge_agent.legacy_formats import LegacyRecords, import_legacy, read_spool_items, spool_files

__all__ = ["SPOOL_FILE", "Spool", "SpoolItem"]

logger = logging.getLogger(__name__)

SPOOL_FILE = "spool.db"
"""The spool's database file in its directory."""

_DROPPED = "dropped"


@dataclass(frozen=True, slots=True)
class SpoolItem:
    """One spooled item.

    Attributes:
        seq: Its sequence number (pass it to :meth:`Spool.remove`).
        data: The bytes given to :meth:`Spool.append`.
    """

    seq: int
    data: bytes


class Spool:
    """A bounded, crash-safe FIFO of byte items in one directory.

    Args:
        directory: Where the items live; created with mode 0o700 (and its parents)
            if missing.
        max_bytes: Most bytes of item data held at once (>= 1).
        max_items: Most items held at once (>= 1).

    Raises:
        ConfigError: ``max_bytes`` or ``max_items`` is below 1.
        StateError: The directory or its database cannot be created or read.
    """

    def __init__(self, directory: Path, *, max_bytes: int, max_items: int = 10_000) -> None:
        if max_bytes < 1 or max_items < 1:
            raise ConfigError(
                f"spool bounds must be >= 1, got max_bytes={max_bytes} max_items={max_items}"
            )
        self._dir = Path(directory)
        self._max_bytes = max_bytes
        self._max_items = max_items
        self._lock = threading.Lock()
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{self._dir}: cannot create spool directory: {exc}") from exc
        self._log = DurableLog(self._dir / SPOOL_FILE)
        try:
            import_legacy(
                self._log,
                spool_files(self._dir),
                read_spool_items,
                store="spool",
                counters=self._imported_drops,
            )
        except BaseException:
            self._log.close()
            raise
        self._index: OrderedDict[int, int] = OrderedDict(self._log.sizes())  # seq -> bytes
        self._size = sum(self._index.values())
        self._dropped = self._log.counter(_DROPPED)
        if self._index:
            logger.info(
                "spool: recovered %d items (%d bytes) from %s",
                len(self._index),
                self._size,
                self._dir,
            )
        # Bounds may have shrunk since the last run: enforce them now.
        with self._lock:
            self._store(None)

    # ---------------------------------------------------------------- properties

    @property
    def directory(self) -> Path:
        """The spool's directory."""
        return self._dir

    @property
    def size_bytes(self) -> int:
        """Bytes of item data held."""
        with self._lock:
            return self._size

    @property
    def dropped(self) -> int:
        """Items lost since :meth:`take_dropped` last reset the count (persisted)."""
        with self._lock:
            return self._dropped

    def __len__(self) -> int:
        """The number of items held."""
        with self._lock:
            return len(self._index)

    # ---------------------------------------------------------------- operations

    def append(self, item: bytes) -> int:
        """Store ``item`` at the end of the queue, dropping the oldest items if needed.

        An item larger than ``max_bytes`` by itself is not stored: it is counted as
        dropped and logged.

        Args:
            item: The bytes to store.

        Returns:
            The item's sequence number (0 for an item too large to store).

        Raises:
            StateError: The item cannot be written (disk full, read-only
                filesystem...); nothing changed. The message names the file.
        """
        data = bytes(item)
        with self._lock:
            if len(data) > self._max_bytes:
                logger.warning(
                    "spool: dropping a %d-byte item, larger than the %d-byte spool",
                    len(data),
                    self._max_bytes,
                )
                self._log.change(counters={_DROPPED: self._dropped + 1})
                self._dropped += 1
                return 0
            return self._store(data)

    def peek(self, limit: int = 1) -> list[SpoolItem]:
        """Read up to ``limit`` items, oldest first, without removing them.

        Raises:
            StateError: The database cannot be read.
        """
        with self._lock:
            return [SpoolItem(seq, data) for seq, data in self._log.records(limit)]

    def remove(self, seq: int) -> None:
        """Delete item ``seq`` (once delivered). Removing an absent item does nothing.

        Raises:
            StateError: The deletion cannot be written.
        """
        with self._lock:
            if seq not in self._index:
                return
            self._log.change(delete=[seq])
            self._size -= self._index.pop(seq)

    def take_dropped(self, up_to: int | None = None) -> int:
        """Take items off the dropped count (persisted) and return how many.

        Args:
            up_to: Take at most this many (the number already reported); None
                takes the whole count. Drops counted meanwhile stay counted.

        Raises:
            StateError: The new count cannot be written; the count is kept.
        """
        with self._lock:
            count = self._dropped if up_to is None else max(0, min(up_to, self._dropped))
            if count:
                self._log.change(counters={_DROPPED: self._dropped - count})
                self._dropped -= count
            return count

    def close(self) -> None:
        """Close the database (the spool cannot be used afterwards)."""
        with self._lock:
            self._log.close()

    # ------------------------------------------------------------------- helpers

    def _imported_drops(self, legacy: LegacyRecords) -> dict[str, int]:
        """The dropped count after importing an old spool: its count and its
        damaged items (which the old spool counted as lost) are added."""
        return {_DROPPED: self._log.counter(_DROPPED) + legacy.dropped + legacy.skipped}

    def _store(self, data: bytes | None) -> int:
        """Append ``data`` (None: nothing) after dropping the oldest items beyond the
        bounds, in one transaction; return its sequence number (0 for None).

        Raises:
            StateError: The change cannot be written; nothing changed.
        """
        incoming, extra = (0, 0) if data is None else (len(data), 1)
        victims: list[int] = []
        size, count = self._size, len(self._index)
        for seq, length in self._index.items():
            if size + incoming <= self._max_bytes and count + extra <= self._max_items:
                break
            victims.append(seq)
            size -= length
            count -= 1
        if data is None and not victims:
            return 0
        counters = {_DROPPED: self._dropped + len(victims)} if victims else None
        seqs = self._log.change(
            append=[data] if data is not None else [], delete=victims, counters=counters
        )
        if victims:
            logger.warning(
                "spool full (max %d bytes, %d items): dropped the %d oldest items (%d bytes)",
                self._max_bytes,
                self._max_items,
                len(victims),
                self._size - size,
            )
            self._dropped += len(victims)
        for seq in victims:
            del self._index[seq]
        self._size = size
        if data is None:
            return 0
        self._index[seqs[0]] = len(data)
        self._size += len(data)
        return seqs[0]
