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

Storage: each item is its own file ``<seq>.item`` (``seq`` zero-padded to 20 digits,
so names sort in order), written with :func:`compress.fileio.atomic_write` (mode
0o600), so a crash leaves whole items or none. A file holds a 16-byte header (magic
``FSP1``, the data length as 8 bytes big-endian, its CRC-32 as 4 bytes) and the
data; the header detects truncated or damaged files. The ``dropped`` file holds the
persisted count of lost items as ASCII digits.

Recovery on open: leftover temporary files of an interrupted write are deleted;
files that are not the spool's are logged and left alone; items are indexed by
their file sizes (contents are checked when read) and numbering continues after
the highest sequence number present. Sequence numbers are unique among the items
present and increase for the life of a process; after the spool was emptied, a
restart may reuse numbers of items already removed.

Bounds (``max_bytes`` counts item data, not headers or filesystem blocks;
``max_items`` counts files): when an append would exceed one, the oldest items are
deleted first and counted as dropped. An item larger than ``max_bytes`` on its own
is dropped (and counted) instead of stored. An item file found damaged when read is
deleted and counted as dropped too. Nothing else is ever lost: an OS error while
writing raises :class:`~edge_agent.errors.StateError`.

The spool is thread-safe (one lock) but not multi-process safe: one agent owns its
directory.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from compress.fileio import atomic_write
from edge_agent.errors import ConfigError, StateError

__all__ = ["HEADER_BYTES", "ITEM_SUFFIX", "Spool", "SpoolItem"]

logger = logging.getLogger(__name__)

ITEM_SUFFIX = ".item"
"""The file name suffix of an item file."""

_SEQ_DIGITS = 20  # as in the two patterns below
_ITEM_RE = re.compile(r"(\d{20})\.item")
_DROPPED_NAME = "dropped"
# atomic_write's temporary files: ".<final name>.<random>.tmp".
_TMP_RE = re.compile(r"\.(?:\d{20}\.item|dropped)\..+\.tmp", re.DOTALL)
_MAGIC = b"FSP1"
_HEADER = struct.Struct(">4sQI")
HEADER_BYTES = _HEADER.size
"""Bytes of the header in front of each item's data."""
_MAX_DROPPED_FILE = 64


@dataclass(frozen=True, slots=True)
class SpoolItem:
    """One spooled item.

    Attributes:
        seq: Its sequence number (pass it to :meth:`Spool.remove`).
        data: The bytes given to :meth:`Spool.append`.
    """

    seq: int
    data: bytes


class _CorruptItemError(Exception):
    """An item file cannot be read back (internal; the item is dropped)."""


class Spool:
    """A bounded, crash-safe FIFO of byte items in one directory.

    Args:
        directory: Where the items live; created with mode 0o700 (and its parents)
            if missing.
        max_bytes: Most bytes of item data held at once (>= 1).
        max_items: Most items held at once (>= 1).

    Raises:
        ConfigError: ``max_bytes`` or ``max_items`` is below 1.
        StateError: The directory cannot be created, listed or written, or a
            leftover temporary file cannot be deleted.
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
        self._index: OrderedDict[int, int] = OrderedDict()  # seq -> data length
        self._size = 0
        self._next_seq = 0
        self._dropped = 0
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{self._dir}: cannot create spool directory: {exc}") from exc
        self._recover()

    # ------------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """Clean crash leftovers, index the items present, load the dropped count."""
        try:
            entries = sorted(self._dir.iterdir())
        except OSError as exc:
            raise StateError(f"{self._dir}: cannot list spool directory: {exc}") from exc
        found: list[tuple[int, Path]] = []
        damaged = 0
        for path in entries:
            name = path.name
            if _TMP_RE.fullmatch(name):
                logger.info("spool: deleting %s, left over from an interrupted write", path)
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    raise StateError(f"{path}: cannot delete leftover file: {exc}") from exc
            elif match := _ITEM_RE.fullmatch(name):
                found.append((int(match.group(1)), path))
            elif name != _DROPPED_NAME:
                logger.warning("spool: ignoring %s, not a spool file", path)
        for seq, path in found:  # sorted by name, hence by seq
            self._next_seq = seq + 1
            try:
                size = path.stat().st_size - HEADER_BYTES
            except OSError as exc:
                logger.warning("spool: dropping unreadable item %s: %s", path, exc)
                self._discard_file(path)
                damaged += 1
                continue
            if size < 0:
                logger.warning("spool: dropping truncated item %s", path)
                self._discard_file(path)
                damaged += 1
                continue
            self._index[seq] = size
            self._size += size
        self._dropped = self._load_dropped()
        if damaged:
            self._add_dropped(damaged)
        if self._index:
            logger.info(
                "spool: recovered %d items (%d bytes) from %s",
                len(self._index),
                self._size,
                self._dir,
            )
        # Bounds may have shrunk since the last run: enforce them now.
        self._make_room(0, 0)

    def _load_dropped(self) -> int:
        path = self._dir / _DROPPED_NAME
        try:
            with path.open("rb") as stream:
                text = stream.read(_MAX_DROPPED_FILE + 1)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            logger.warning("spool: cannot read %s, dropped count restarts at 0: %s", path, exc)
            return 0
        if len(text) > _MAX_DROPPED_FILE or not text.isdigit():
            logger.warning("spool: %s is damaged, dropped count restarts at 0", path)
            return 0
        return int(text)

    # ---------------------------------------------------------------- properties

    @property
    def directory(self) -> Path:
        """The spool's directory."""
        return self._dir

    @property
    def size_bytes(self) -> int:
        """Bytes of item data held (headers not included)."""
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
        dropped and logged, and its sequence number is used up all the same.

        Args:
            item: The bytes to store.

        Returns:
            The item's sequence number.

        Raises:
            StateError: The item or the dropped count cannot be written or an old
                item cannot be deleted (disk full, read-only filesystem...); the
                message names the path.
        """
        data = bytes(item)
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            if len(data) > self._max_bytes:
                logger.warning(
                    "spool: dropping a %d-byte item, larger than the %d-byte spool",
                    len(data),
                    self._max_bytes,
                )
                self._add_dropped(1)
                return seq
            self._make_room(len(data), 1)
            path = self._path(seq)
            header = _HEADER.pack(_MAGIC, len(data), zlib.crc32(data))
            try:
                atomic_write(path, header + data, mode=0o600)
            except OSError as exc:
                raise StateError(f"{path}: cannot write spool item: {exc}") from exc
            self._index[seq] = len(data)
            self._size += len(data)
            return seq

    def peek(self, limit: int = 1) -> list[SpoolItem]:
        """Read up to ``limit`` items, oldest first, without removing them.

        Item files that turn out damaged or unreadable are logged, deleted and
        counted as dropped, and the next items are read in their place.

        Args:
            limit: Most items to return (none if below 1).

        Returns:
            The items.
        """
        items: list[SpoolItem] = []
        damaged: list[int] = []
        with self._lock:
            for seq in self._index:
                if len(items) >= limit:
                    break
                try:
                    items.append(SpoolItem(seq=seq, data=self._read(seq)))
                except _CorruptItemError as exc:
                    logger.warning("spool: dropping damaged item: %s", exc)
                    damaged.append(seq)
            for seq in damaged:
                self._forget(seq)
                self._discard_file(self._path(seq))
            if damaged:
                try:
                    self._add_dropped(len(damaged))
                except StateError as exc:  # still counted in memory
                    logger.error("spool: %s", exc)
        return items

    def remove(self, seq: int) -> None:
        """Delete item ``seq`` (once delivered). Removing an absent item does nothing.

        Raises:
            StateError: The item's file exists but cannot be deleted.
        """
        with self._lock:
            path = self._path(seq)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise StateError(f"{path}: cannot delete spool item: {exc}") from exc
            self._forget(seq)

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
                self._dropped -= count
                try:
                    self._save_dropped()
                except StateError:
                    self._dropped += count
                    raise
            return count

    # ------------------------------------------------------------------- helpers

    def _path(self, seq: int) -> Path:
        return self._dir / f"{seq:0{_SEQ_DIGITS}d}{ITEM_SUFFIX}"

    def _read(self, seq: int) -> bytes:
        path = self._path(seq)
        expected = self._index[seq]
        try:
            with path.open("rb") as stream:
                blob = stream.read(HEADER_BYTES + expected + 1)
        except OSError as exc:
            raise _CorruptItemError(f"{path}: {exc}") from exc
        if len(blob) < HEADER_BYTES:
            raise _CorruptItemError(f"{path}: truncated header")
        magic, length, crc = _HEADER.unpack_from(blob)
        data = blob[HEADER_BYTES:]
        if magic != _MAGIC:
            raise _CorruptItemError(f"{path}: not a spool item")
        if length != len(data) or length != expected:
            raise _CorruptItemError(f"{path}: {len(data)} bytes of data, header says {length}")
        if zlib.crc32(data) != crc:
            raise _CorruptItemError(f"{path}: checksum mismatch")
        return data

    def _forget(self, seq: int) -> None:
        size = self._index.pop(seq, None)
        if size is not None:
            self._size -= size

    def _discard_file(self, path: Path) -> None:
        """Delete a damaged file; if even that fails, log it (it is out of the index)."""
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            logger.error("spool: cannot delete damaged item %s: %s", path, exc)

    def _make_room(self, incoming: int, extra_items: int) -> None:
        """Drop the oldest items until ``incoming`` more bytes and ``extra_items`` fit.

        Raises:
            StateError: An item or the dropped count cannot be deleted or written.
        """
        dropped = 0
        dropped_bytes = 0
        while self._index and (
            self._size + incoming > self._max_bytes
            or len(self._index) + extra_items > self._max_items
        ):
            seq, size = next(iter(self._index.items()))
            path = self._path(seq)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                if dropped:
                    self._add_dropped(dropped)
                raise StateError(f"{path}: cannot delete spool item: {exc}") from exc
            self._forget(seq)
            dropped += 1
            dropped_bytes += size
        if dropped:
            logger.warning(
                "spool full (max %d bytes, %d items): dropped the %d oldest items (%d bytes)",
                self._max_bytes,
                self._max_items,
                dropped,
                dropped_bytes,
            )
            self._add_dropped(dropped)

    def _add_dropped(self, count: int) -> None:
        self._dropped += count
        self._save_dropped()

    def _save_dropped(self) -> None:
        path = self._dir / _DROPPED_NAME
        try:
            atomic_write(path, str(self._dropped).encode("ascii"), mode=0o600)
        except OSError as exc:
            raise StateError(f"{path}: cannot write the dropped count: {exc}") from exc
