"""Tests for edge_agent.legacy_formats: an agent upgraded in place loses nothing.

The old stores are written here byte for byte as the agents before the durable log
wrote them (the writers follow the old ``edge_agent/spool.py`` and
``edge_agent/training/feedback.py`` exactly), then opened by the new spool and
feedback buffer.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from edge_agent.durable_log import DurableLog
from edge_agent.errors import StateError
from edge_agent.legacy_formats import IMPORTED
from edge_agent.spool import SPOOL_FILE, Spool
from edge_agent.training.feedback_buffer import FEEDBACK_FILE, FeedbackBuffer

# ------------------------------------------------------------ the old formats


def old_spool_item(directory: Path, seq: int, data: bytes) -> Path:
    """An item file of the old spool: ``<seq:020d>.item``, header ``>4sQI``, data."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{seq:020d}.item"
    path.write_bytes(struct.pack(">4sQI", b"FSP1", len(data), zlib.crc32(data)) + data)
    path.chmod(0o600)
    return path


def old_spool_dropped(directory: Path, count: int) -> Path:
    """The old spool's persisted dropped count: ASCII digits in ``dropped``."""
    path = directory / "dropped"
    path.write_bytes(str(count).encode("ascii"))
    return path


def old_feedback_record(label: int, row: list[float]) -> bytes:
    """One record of the old ``feedback.log``: ``>4sII`` header, then the payload."""
    payload = struct.pack("<I", label) + np.asarray(row, dtype="<f4").tobytes()
    return struct.pack(">4sII", b"FBK1", len(payload), zlib.crc32(payload)) + payload


def old_feedback_log(directory: Path, *records: bytes) -> Path:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "feedback.log"
    path.write_bytes(b"".join(records))
    return path


def row(i: int) -> list[float]:
    return [float(10 * i), float(10 * i + 1), float(10 * i + 2)]


def contents(buffer: FeedbackBuffer) -> list[tuple[int, list[float]]]:
    data = buffer.dataset()
    if data is None:
        return []
    return [(int(label), x.tolist()) for x, label in zip(data.x, data.y, strict=True)]


def open_spool(directory: Path, max_items: int = 100) -> Spool:
    return Spool(directory, max_bytes=10_000, max_items=max_items)


def open_buffer(directory: Path) -> FeedbackBuffer:
    return FeedbackBuffer(directory, fsync=False)


class Crash(BaseException):
    """The process dies here."""


def crash_at_second_unlink(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Path.unlink deletes one file, then the process 'dies' at the next delete.

    Returns:
        The files deleted (``monkeypatch.undo()`` brings the real unlink back).
    """
    deleted: list[Path] = []
    real = Path.unlink

    def unlink(path: Path, missing_ok: bool = False) -> None:
        if deleted:
            raise Crash(str(path))
        real(path, missing_ok=missing_ok)
        deleted.append(path)

    monkeypatch.setattr(Path, "unlink", unlink)
    return deleted


# ------------------------------------------------------------------- spool


def test_an_old_spool_comes_back_in_order_and_its_files_go(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    payloads = [b"first", b"", b"\x00\xffbinary", b"fourth" * 50]
    for seq, data in enumerate(payloads, start=7):
        old_spool_item(directory, seq, data)
    old_spool_dropped(directory, 3)
    leftover = directory / f".{8:020d}.item.x1y2.tmp"
    leftover.write_bytes(b"torn write")
    foreign = directory / "README"
    foreign.write_bytes(b"not ours")
    with caplog.at_level(logging.INFO, logger="edge_agent.legacy_formats"):
        spool = open_spool(directory)
    assert [item.data for item in spool.peek(10)] == payloads
    assert spool.dropped == 3
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        n for n in (SPOOL_FILE, f"{SPOOL_FILE}-wal", f"{SPOOL_FILE}-shm", "README")
    )
    assert foreign.read_bytes() == b"not ours"
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1
    assert "imported 4 record(s)" in infos[0]
    assert "0 torn or corrupt" in infos[0]
    assert "3 counted as dropped" in infos[0]
    # New items follow the imported ones; the import happens once.
    seq = spool.append(b"new")
    assert seq > spool.peek(10)[-2].seq
    spool.close()
    reopened = open_spool(directory)
    assert [item.data for item in reopened.peek(10)] == [*payloads, b"new"]
    assert reopened.dropped == 3
    reopened.close()


def test_damaged_old_items_are_skipped_and_counted_as_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    old_spool_item(directory, 1, b"good-1")
    bad_crc = old_spool_item(directory, 2, b"flipped")
    blob = bytearray(bad_crc.read_bytes())
    blob[-1] ^= 0x01
    bad_crc.write_bytes(bytes(blob))
    torn = old_spool_item(directory, 3, b"torn in the header")
    torn.write_bytes(torn.read_bytes()[:9])
    cut = old_spool_item(directory, 4, b"cut short data")
    cut.write_bytes(cut.read_bytes()[:-3])
    foreign = old_spool_item(directory, 5, b"bad magic")
    foreign.write_bytes(b"XXXX" + foreign.read_bytes()[4:])
    old_spool_item(directory, 6, b"good-6")
    old_spool_dropped(directory, 2)
    with caplog.at_level(logging.INFO, logger="edge_agent.legacy_formats"):
        spool = open_spool(directory)
    assert [item.data for item in spool.peek(10)] == [b"good-1", b"good-6"]
    assert spool.dropped == 2 + 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert any("checksum mismatch" in w for w in warnings)
    assert any("truncated header" in w for w in warnings)
    assert any("header says" in w for w in warnings)
    assert any("not a spool item" in w for w in warnings)
    assert "4 torn or corrupt" in next(
        r.getMessage() for r in caplog.records if r.levelno == logging.INFO
    )
    assert not list(directory.glob("*.item"))
    spool.close()


def test_a_damaged_dropped_count_is_lost_but_the_items_are_not(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    old_spool_item(directory, 0, b"kept")
    (directory / "dropped").write_bytes(b"12x")
    spool = open_spool(directory)
    assert [item.data for item in spool.peek(10)] == [b"kept"]
    assert spool.dropped == 0
    assert not (directory / "dropped").exists()
    spool.close()


def test_the_bounds_apply_to_the_imported_items(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    for seq in range(5):
        old_spool_item(directory, seq, bytes([seq]))
    spool = open_spool(directory, max_items=2)
    assert [item.data for item in spool.peek(10)] == [b"\x03", b"\x04"]
    assert spool.dropped == 3
    spool.close()


def test_a_crash_between_commit_and_delete_does_not_duplicate_old_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    payloads = [b"a", b"b", b"c"]
    for seq, data in enumerate(payloads):
        old_spool_item(directory, seq, data)
    old_spool_dropped(directory, 1)
    deleted = crash_at_second_unlink(monkeypatch)
    with pytest.raises(Crash):
        open_spool(directory)
    monkeypatch.undo()
    assert len(deleted) == 1  # one old file went, the others remain
    assert len(list(directory.glob("*.item"))) == 2
    with caplog.at_level(logging.INFO, logger="edge_agent.legacy_formats"):
        spool = open_spool(directory)
    assert [item.data for item in spool.peek(10)] == payloads
    assert spool.dropped == 1
    assert not list(directory.glob("*.item"))
    assert not (directory / "dropped").exists()
    assert any("already imported" in r.getMessage() for r in caplog.records)
    spool.close()


def test_a_failed_import_leaves_the_old_files_for_the_next_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "spool"
    old_spool_item(directory, 0, b"precious")

    def full_disk(self: DurableLog, **_: object) -> list[int]:
        raise StateError(f"{self.path}: cannot write: database or disk is full")

    monkeypatch.setattr(DurableLog, "change", full_disk)
    with pytest.raises(StateError, match="disk is full"):
        open_spool(directory)
    monkeypatch.undo()
    assert (directory / f"{0:020d}.item").exists()
    spool = open_spool(directory)
    assert [item.data for item in spool.peek(10)] == [b"precious"]
    spool.close()


# ------------------------------------------------------------------ feedback


def test_an_old_feedback_log_comes_back_in_order_and_goes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "feedback"
    old_feedback_log(directory, *(old_feedback_record(i % 5, row(i)) for i in range(6)))
    leftover = directory / ".feedback.log.abc123.tmp"
    leftover.write_bytes(b"torn compaction")
    with caplog.at_level(logging.INFO, logger="edge_agent.legacy_formats"):
        buffer = open_buffer(directory)
    assert contents(buffer) == [(i % 5, row(i)) for i in range(6)]
    assert not (directory / "feedback.log").exists()
    assert not leftover.exists()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1
    assert "imported 6 record(s)" in infos[0]
    assert "deleting 2 old file(s)" in infos[0]
    buffer.add(row(6), 1)
    buffer.close()
    reopened = open_buffer(directory)
    assert contents(reopened) == [*((i % 5, row(i)) for i in range(6)), (1, row(6))]
    reopened.close()


def test_damaged_old_feedback_records_are_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "feedback"
    corrupt = bytearray(old_feedback_record(1, row(1)))
    corrupt[-1] ^= 0x40  # a damaged disk block: the CRC no longer matches
    torn = old_feedback_record(4, row(4))[:-5]  # a crash in the middle of an append
    old_feedback_log(
        directory,
        old_feedback_record(0, row(0)),
        bytes(corrupt),
        b"garbage between records",
        old_feedback_record(2, row(2)),
        old_feedback_record(200_000, row(3)),  # well-formed, label out of range
        old_feedback_record(3, row(3)),
        torn,
    )
    with caplog.at_level(logging.INFO, logger="edge_agent.legacy_formats"):
        buffer = open_buffer(directory)
    assert contents(buffer) == [(0, row(0)), (2, row(2)), (3, row(3))]
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # The CRC mismatch and the garbage after it are one region (the reader
    # resynchronises on the next magic), the bad label and the torn tail two more.
    assert "skipped 3 damaged or truncated region(s)" in warning
    info = next(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert "imported 3 record(s)" in info
    assert "3 torn or corrupt" in info
    assert not (directory / "feedback.log").exists()
    buffer.close()


def test_a_crash_between_commit_and_delete_does_not_duplicate_old_feedback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "feedback"
    old_feedback_log(directory, *(old_feedback_record(i, row(i)) for i in range(3)))
    (directory / ".feedback.log.zz.tmp").write_bytes(b"leftover")  # deleted first
    deleted = crash_at_second_unlink(monkeypatch)
    with pytest.raises(Crash):
        open_buffer(directory)
    monkeypatch.undo()
    assert [p.name for p in deleted] == [".feedback.log.zz.tmp"]
    assert (directory / "feedback.log").exists()
    buffer = open_buffer(directory)
    assert contents(buffer) == [(i, row(i)) for i in range(3)]
    assert not (directory / "feedback.log").exists()
    buffer.close()
    reopened = open_buffer(directory)
    assert contents(reopened) == [(i, row(i)) for i in range(3)]
    reopened.close()


def test_the_mark_lives_from_the_commit_until_the_old_files_are_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "feedback"
    old_feedback_log(directory, old_feedback_record(0, row(0)), old_feedback_record(1, row(1)))

    def read_only(path: Path, missing_ok: bool = False) -> None:
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(Path, "unlink", read_only)
    open_buffer(directory).close()
    monkeypatch.undo()
    log = DurableLog(directory / FEEDBACK_FILE, durable=False)
    assert log.counter(IMPORTED) == 2  # imported; the old file could not go
    log.close()
    buffer = open_buffer(directory)
    assert contents(buffer) == [(0, row(0)), (1, row(1))]
    buffer.close()
    assert not (directory / "feedback.log").exists()
    log = DurableLog(directory / FEEDBACK_FILE, durable=False)
    assert log.counter(IMPORTED) == 0
    log.close()


def test_old_files_that_come_back_after_a_downgrade_are_imported_too(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    old_spool_item(directory, 0, b"before the upgrade")
    open_spool(directory).close()
    old_spool_item(directory, 0, b"written by the downgraded agent")
    spool = open_spool(directory)
    assert [item.data for item in spool.peek(10)] == [
        b"before the upgrade",
        b"written by the downgraded agent",
    ]
    spool.close()


def test_only_the_tail_of_an_oversized_old_feedback_log_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The old reader read at most 2 * (bounds + record overheads) + 2 * (largest
    # record) bytes from the end: here about 512 KiB of a 1.4 MB file.
    directory = tmp_path / "feedback"
    count = 50_000
    old_feedback_log(directory, *(old_feedback_record(i % 5, row(i)) for i in range(count)))
    with caplog.at_level(logging.WARNING, logger="edge_agent.legacy_formats"):
        buffer = FeedbackBuffer(directory, max_examples=2, max_bytes=1024, fsync=False)
    assert contents(buffer) == [(i % 5, row(i)) for i in range(count - 2, count)]
    messages = [r.getMessage() for r in caplog.records]
    assert any("more than its bounds allow; reading the last" in m for m in messages)
    # The read starts inside a record: one damaged region, then whole records.
    assert any("skipped 1 damaged or truncated region(s)" in m for m in messages)
    buffer.close()


def test_a_mark_left_by_a_crash_after_the_deletion_is_cleared(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    old_spool_item(directory, 0, b"first")
    open_spool(directory).close()
    log = DurableLog(directory / SPOOL_FILE)
    log.change(counters={IMPORTED: 1})  # the files went, the mark stayed
    log.close()
    open_spool(directory).close()
    old_spool_item(directory, 0, b"after a downgrade")
    spool = open_spool(directory)
    assert [item.data for item in spool.peek(10)] == [b"first", b"after a downgrade"]
    spool.close()
