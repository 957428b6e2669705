"""Import the stores of an agent that ran before :mod:`edge_agent.durable_log`.

Earlier agents kept the telemetry spool as one file per item and the feedback
buffer as one append-only record file. An agent upgraded in place finds those files
beside the new database; :func:`import_legacy` moves their records into it, so an
upgrade loses nothing:

1. The store lists the old files (:func:`spool_files`, :func:`feedback_files`);
   when there are none, nothing happens.
2. Unless the database says they were imported already, the records are read with
   the old readers' rules (:func:`read_spool_items`, :func:`read_feedback_log`): a
   torn or corrupt record is skipped, logged and counted, the others keep their
   order.
3. One transaction appends the records after those of the database, sets the
   store's counters and marks the import done (counter :data:`IMPORTED`).
4. Only then are the old files deleted, and once all are gone the mark is cleared.
   A crash between the commit and the end of the deletion leaves files that the
   next open recognises by the mark: it deletes them without importing them again,
   so nothing is lost or duplicated. A file that cannot be deleted is logged and
   the mark stays; the next open tries again. Old files found while no mark is set
   (an agent downgraded, run and upgraded again) are imported like the first ones.

One INFO line per import says what was imported, skipped and deleted.

Old formats (byte for byte):

* Spool: ``<seq>.item`` per item, ``seq`` zero-padded to 20 digits; a 16-byte
  header (magic ``FSP1``, data length u64 big-endian, CRC-32 of the data u32
  big-endian) then the data. A ``dropped`` file holds the count of lost items as
  ASCII digits. An item whose header, length or CRC does not check out was dropped
  and counted as lost.
* Feedback: ``feedback.log``, records of magic ``FBK1``, payload length (u32 BE),
  CRC-32 of the payload (u32 BE), then the payload: the label (u32 LE) and the
  features (float32 LE), which is exactly a record of the new buffer. After a
  damaged region the reader resynchronises on the next magic. Of an oversized
  file only the tail was read: 2 x (the bounds plus 16 bytes per example) plus
  2 x the largest record.

Both stores left ``.<name>.<random>.tmp`` files of interrupted atomic writes; they
are deleted with the rest.
"""

from __future__ import annotations

import logging
import re
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_agent.durable_log import DurableLog
from edge_agent.errors import StateError

__all__ = [
    "IMPORTED",
    "LegacyRecords",
    "feedback_files",
    "import_legacy",
    "read_feedback_log",
    "read_spool_items",
    "spool_files",
]

logger = logging.getLogger(__name__)

IMPORTED = "legacy_imported"
"""Counter set by the import's transaction (to the number of records imported, at
least 1) and cleared (0) once every old file is deleted."""

_SPOOL_ITEM_RE = re.compile(r"(\d{20})\.item")
_SPOOL_DROPPED = "dropped"
_SPOOL_TMP_RE = re.compile(r"\.(?:\d{20}\.item|dropped)\..+\.tmp", re.DOTALL)
_SPOOL_HEADER = struct.Struct(">4sQI")
_SPOOL_MAGIC = b"FSP1"
_MAX_DROPPED_FILE = 64

_FEEDBACK_LOG = "feedback.log"
_FEEDBACK_TMP_RE = re.compile(rf"\.{re.escape(_FEEDBACK_LOG)}\..+\.tmp", re.DOTALL)
_FEEDBACK_HEADER = struct.Struct(">4sII")
_FEEDBACK_MAGIC = b"FBK1"
_LABEL_BYTES = 4


@dataclass(frozen=True, slots=True)
class LegacyRecords:
    """What the old files held.

    Attributes:
        records: The valid records, oldest first, in the new store's format.
        skipped: Torn or corrupt records (or damaged regions) skipped.
        dropped: The old store's persisted count of lost items (spool only).
    """

    records: list[bytes]
    skipped: int
    dropped: int = 0


def import_legacy(
    log: DurableLog,
    files: Sequence[Path],
    read: Callable[[Sequence[Path]], LegacyRecords],
    *,
    store: str,
    counters: Callable[[LegacyRecords], dict[str, int]] | None = None,
) -> LegacyRecords | None:
    """Import the old ``files`` into ``log`` once, then delete them.

    Args:
        log: The store's database.
        files: The old files found (when none, only a leftover mark is cleared).
        read: Reads them (called only when they were not imported yet).
        store: The store's name, for the log lines.
        counters: The store's counters to set in the import's transaction.

    Returns:
        What was imported, or None when nothing was (no files, or imported before).

    Raises:
        StateError: The old files cannot be read, or the import cannot be written
            (nothing was, and the old files are left alone); or the mark cannot be
            cleared after the deletion (the import stands).
    """
    marked = log.counter(IMPORTED)
    if not files:
        if marked:  # a crash came after the deletion, before the mark was cleared
            log.change(counters={IMPORTED: 0})
        return None
    if marked:
        logger.info(
            "%s: deleting %d old-format file(s) already imported into %s",
            store,
            len(files),
            log.path.name,
        )
        _delete(log, files, store)
        return None
    legacy = read(files)
    settings = dict(counters(legacy) if counters else {})
    settings[IMPORTED] = max(1, len(legacy.records))
    log.change(append=legacy.records, counters=settings)
    logger.info(
        "%s: imported %d record(s) from the old format into %s (%d torn or corrupt "
        "skipped, %d counted as dropped before); deleting %d old file(s)",
        store,
        len(legacy.records),
        log.path.name,
        legacy.skipped,
        legacy.dropped,
        len(files),
    )
    _delete(log, files, store)
    return legacy


def _delete(log: DurableLog, files: Sequence[Path], store: str) -> None:
    """Delete the imported ``files``; clear the mark once all are gone.

    Raises:
        StateError: The mark cannot be cleared (the next open deletes nothing more
            and clears it).
    """
    left = 0
    for path in files:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # imported: the next open deletes it
            logger.error("%s: cannot delete old-format file %s: %s", store, path, exc)
            left += 1
    if not left:
        log.change(counters={IMPORTED: 0})


def _listing(directory: Path) -> list[Path]:
    """The entries of ``directory``, sorted.

    Raises:
        StateError: It cannot be listed.
    """
    try:
        return sorted(directory.iterdir())
    except OSError as exc:
        raise StateError(f"{directory}: cannot list for old-format files: {exc}") from exc


# ---------------------------------------------------------------------- spool


def spool_files(directory: Path) -> list[Path]:
    """The old spool's files in ``directory``: items (oldest first), leftovers, count.

    Raises:
        StateError: The directory cannot be listed.
    """
    entries = _listing(directory)
    items = [p for p in entries if _SPOOL_ITEM_RE.fullmatch(p.name)]
    leftovers = [p for p in entries if _SPOOL_TMP_RE.fullmatch(p.name)]
    dropped = [p for p in entries if p.name == _SPOOL_DROPPED and p.is_file()]
    return items + leftovers + dropped


def read_spool_items(files: Sequence[Path]) -> LegacyRecords:
    """Read the old spool's items (from :func:`spool_files`), oldest first.

    An item that is unreadable, shorter than its header, not a spool item, of a
    length other than its header says, or failing its CRC is skipped with a
    warning (the old spool dropped it and counted it as lost).
    """
    records: list[bytes] = []
    skipped = 0
    dropped = 0
    items = sorted((int(m.group(1)), p) for p in files if (m := _SPOOL_ITEM_RE.fullmatch(p.name)))
    for _, path in items:
        try:
            records.append(_spool_item(path))
        except ValueError as exc:
            logger.warning("spool: dropping damaged old-format item: %s", exc)
            skipped += 1
    for path in files:
        if path.name == _SPOOL_DROPPED:
            dropped = _dropped_count(path)
    return LegacyRecords(records, skipped, dropped)


def _spool_item(path: Path) -> bytes:
    """The data of one old item file.

    Raises:
        ValueError: The file cannot be read or does not check out.
    """
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if len(blob) < _SPOOL_HEADER.size:
        raise ValueError(f"{path}: truncated header")
    magic, length, crc = _SPOOL_HEADER.unpack_from(blob)
    data = blob[_SPOOL_HEADER.size :]
    if magic != _SPOOL_MAGIC:
        raise ValueError(f"{path}: not a spool item")
    if length != len(data):
        raise ValueError(f"{path}: {len(data)} bytes of data, header says {length}")
    if zlib.crc32(data) != crc:
        raise ValueError(f"{path}: checksum mismatch")
    return data


def _dropped_count(path: Path) -> int:
    try:
        with path.open("rb") as stream:
            text = stream.read(_MAX_DROPPED_FILE + 1)
    except OSError as exc:
        logger.warning("spool: cannot read %s, its dropped count is lost: %s", path, exc)
        return 0
    if len(text) > _MAX_DROPPED_FILE or not text.isdigit():
        logger.warning("spool: %s is damaged, its dropped count is lost", path)
        return 0
    return int(text)


# ------------------------------------------------------------------- feedback


def feedback_files(directory: Path) -> list[Path]:
    """The old feedback buffer's files in ``directory``: the log and leftovers.

    Raises:
        StateError: The directory cannot be listed.
    """
    return [
        p
        for p in _listing(directory)
        if p.name == _FEEDBACK_LOG or _FEEDBACK_TMP_RE.fullmatch(p.name)
    ]


def read_feedback_log(
    files: Sequence[Path],
    *,
    max_examples: int,
    max_bytes: int,
    max_features: int,
    usable: Callable[[bytes], bool],
) -> LegacyRecords:
    """Read the old ``feedback.log`` (among ``files``) with the old reader's rules.

    Args:
        files: From :func:`feedback_files`.
        max_examples: The buffer's bound on examples (limits the bytes read).
        max_bytes: The buffer's bound on feature bytes (limits the bytes read).
        max_features: Most features of one example (larger records are malformed).
        usable: Whether a well-formed payload's content is usable (label in range,
            finite features); an unusable one is skipped.

    Raises:
        StateError: The file cannot be read (it is left alone).
    """
    log = next((p for p in files if p.name == _FEEDBACK_LOG), None)
    if log is None:
        return LegacyRecords([], 0)
    max_payload = _LABEL_BYTES + 4 * max_features
    overhead = _FEEDBACK_HEADER.size + _LABEL_BYTES
    limit = 2 * (max_bytes + max_examples * overhead) + 2 * (_FEEDBACK_HEADER.size + max_payload)
    try:
        with log.open("rb") as stream:
            size = stream.seek(0, 2)
            start = max(0, size - limit)
            if start:
                logger.warning(
                    "feedback: %s is %d bytes, more than its bounds allow; reading the last %d",
                    log,
                    size,
                    limit,
                )
            stream.seek(start)
            blob = stream.read(limit)
    except OSError as exc:
        raise StateError(f"{log}: cannot read old-format feedback: {exc}") from exc
    records, skipped = _feedback_records(blob, max_payload, usable)
    if skipped:
        logger.warning(
            "feedback: skipped %d damaged or truncated region(s) of %s; kept %d examples",
            skipped,
            log,
            len(records),
        )
    return LegacyRecords(records, skipped)


def _feedback_records(
    blob: bytes, max_payload: int, usable: Callable[[bytes], bool]
) -> tuple[list[bytes], int]:
    """The usable payloads of ``blob`` and the number of bad spots."""
    records: list[bytes] = []
    skipped = 0
    pos = 0
    while pos < len(blob):
        end = _feedback_record_end(blob, pos, max_payload)
        if end is None:
            skipped += 1
            found = blob.find(_FEEDBACK_MAGIC, pos + 1)
            if found < 0:
                break
            pos = found
            continue
        payload = blob[pos + _FEEDBACK_HEADER.size : end]
        if usable(payload):
            records.append(payload)
        else:
            skipped += 1
        pos = end
    return records, skipped


def _feedback_record_end(blob: bytes, pos: int, max_payload: int) -> int | None:
    """The offset after the well-formed record at ``pos``, or None if there is none."""
    if len(blob) - pos < _FEEDBACK_HEADER.size:
        return None
    magic, length, crc = _FEEDBACK_HEADER.unpack_from(blob, pos)
    start = pos + _FEEDBACK_HEADER.size
    end: int = start + length
    if (
        magic != _FEEDBACK_MAGIC
        or not _LABEL_BYTES < length <= max_payload
        or (length - _LABEL_BYTES) % 4
        or end > len(blob)
        or zlib.crc32(blob[start:end]) != crc
    ):
        return None
    return end
