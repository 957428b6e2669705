"""Tests for edge_agent.spool: a bounded, crash-safe on-disk FIFO."""

from __future__ import annotations

import logging
import sqlite3
import stat
import threading
from contextlib import closing
from pathlib import Path

import pytest

from edge_agent.durable_log import DAMAGED_SUFFIX
from edge_agent.errors import ConfigError, StateError
from edge_agent.spool import SPOOL_FILE, Spool, SpoolItem


def open_spool(tmp_path: Path, max_bytes: int = 1000, max_items: int = 100) -> Spool:
    return Spool(tmp_path / "spool", max_bytes=max_bytes, max_items=max_items)


def on_disk(directory: Path) -> list[bytes]:
    """The items in the spool's database, read by another connection."""
    with closing(sqlite3.connect(directory / SPOOL_FILE)) as db:
        return [bytes(row[0]) for row in db.execute("SELECT data FROM records ORDER BY seq")]


def datas(items: list[SpoolItem]) -> list[bytes]:
    return [item.data for item in items]


def test_creates_a_private_directory(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "a" / "spool", max_bytes=10)
    assert spool.directory.is_dir()
    assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o700
    assert len(spool) == 0
    assert spool.size_bytes == 0
    assert spool.peek() == []


@pytest.mark.parametrize(("max_bytes", "max_items"), [(0, 1), (1, 0), (-5, 10)])
def test_bounds_must_be_positive(tmp_path: Path, max_bytes: int, max_items: int) -> None:
    with pytest.raises(ConfigError):
        Spool(tmp_path, max_bytes=max_bytes, max_items=max_items)


def test_unusable_directory_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StateError, match=str(blocker)):
        Spool(blocker / "spool", max_bytes=10)


def test_fifo_order_and_sequence_numbers(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    seqs = [spool.append(b"item-%d" % i) for i in range(5)]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 5
    assert len(spool) == 5
    assert spool.size_bytes == 5 * 6
    assert spool.peek() == [SpoolItem(seq=seqs[0], data=b"item-0")]
    assert datas(spool.peek(3)) == [b"item-0", b"item-1", b"item-2"]
    assert datas(spool.peek(100)) == [b"item-%d" % i for i in range(5)]
    assert spool.peek(0) == []
    spool.remove(seqs[0])
    spool.remove(seqs[2])
    assert datas(spool.peek(10)) == [b"item-1", b"item-3", b"item-4"]
    assert len(spool) == 3
    assert spool.size_bytes == 3 * 6


def test_items_live_in_one_private_database(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    spool.append(b"x")
    path = spool.directory / SPOOL_FILE
    assert on_disk(spool.directory) == [b"x"]  # committed when append returned
    for file in spool.directory.iterdir():  # the database and its WAL companions
        assert file.name.startswith(SPOOL_FILE)
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert path.exists()


def test_empty_and_binary_items(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, max_items=2)
    spool.append(b"")
    spool.append(bytes(range(256)))
    spool.append(b"\x00")  # the item bound applies to empty items too
    assert datas(spool.peek(5)) == [bytes(range(256)), b"\x00"]


def test_remove_is_idempotent(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    seq = spool.append(b"abc")
    spool.remove(seq)
    spool.remove(seq)
    spool.remove(12345)
    assert len(spool) == 0
    assert spool.size_bytes == 0
    assert on_disk(spool.directory) == []


def test_byte_bound_drops_oldest_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = open_spool(tmp_path, max_bytes=25)
    for i in range(5):
        spool.append(b"%09d" % i)  # 9 bytes each: two fit
    assert datas(spool.peek(10)) == [b"000000003", b"000000004"]
    assert spool.size_bytes == 18
    assert spool.dropped == 3
    assert len(on_disk(spool.directory)) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings
    assert "dropped the 1 oldest" in warnings[-1].getMessage()


def test_item_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, max_items=3)
    for i in range(7):
        spool.append(b"%d" % i)
    assert datas(spool.peek(10)) == [b"4", b"5", b"6"]
    assert spool.dropped == 4
    assert len(on_disk(spool.directory)) == 3


def test_one_append_may_drop_several(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, max_bytes=10)
    for _ in range(5):
        spool.append(b"ab")
    spool.append(b"0123456789")
    assert datas(spool.peek(10)) == [b"0123456789"]
    assert spool.dropped == 5


def test_oversized_item_is_dropped_not_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = open_spool(tmp_path, max_bytes=10)
    first = spool.append(b"keep")
    big = spool.append(b"x" * 11)
    after = spool.append(b"next")
    assert big == 0  # not stored: no sequence number
    assert first < after
    assert datas(spool.peek(10)) == [b"keep", b"next"]
    assert spool.dropped == 1
    assert "larger than the 10-byte spool" in caplog.text
    assert len(on_disk(spool.directory)) == 2


def test_take_dropped_resets_and_persists(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, max_items=1)
    spool.append(b"a")
    spool.append(b"b")
    spool.append(b"c")
    assert spool.dropped == 2
    assert spool.dropped == 2  # reading does not reset
    assert open_spool(tmp_path, max_items=1).dropped == 2  # survives reopening
    assert spool.take_dropped() == 2
    assert spool.dropped == 0
    assert spool.take_dropped() == 0
    assert open_spool(tmp_path, max_items=1).dropped == 0


def test_reopen_recovers_items_and_continues_the_sequence(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    seqs = [spool.append(b"%d" % i) for i in range(4)]
    spool.remove(seqs[0])
    del spool
    reopened = open_spool(tmp_path)
    assert len(reopened) == 3
    assert reopened.size_bytes == 3
    assert reopened.peek(10) == [SpoolItem(seq=s, data=b"%d" % i) for i, s in enumerate(seqs) if i]
    new = reopened.append(b"new")
    assert new > seqs[-1]
    assert datas(reopened.peek(10))[-1] == b"new"


def test_reopen_with_smaller_bounds_drops_oldest(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    for i in range(5):
        spool.append(b"%d" % i)
    smaller = open_spool(tmp_path, max_items=2)
    assert datas(smaller.peek(10)) == [b"3", b"4"]
    assert smaller.dropped == 3


def test_foreign_files_are_left_alone(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    seq = spool.append(b"whole")
    foreign = spool.directory / "README"
    foreign.write_bytes(b"not ours")
    (spool.directory / "subdir").mkdir()
    reopened = open_spool(tmp_path)
    assert foreign.read_bytes() == b"not ours"
    assert reopened.peek(10) == [SpoolItem(seq=seq, data=b"whole")]
    assert reopened.dropped == 0


def test_a_damaged_database_is_set_aside_and_the_spool_starts_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = open_spool(tmp_path)
    spool.append(b"lost")
    spool.close()
    path = tmp_path / "spool" / SPOOL_FILE
    for companion in ("-wal", "-shm"):
        path.with_name(SPOOL_FILE + companion).unlink(missing_ok=True)
    path.write_bytes(b"garbage, not SQLite" * 300)
    reopened = open_spool(tmp_path)
    assert len(reopened) == 0
    assert "not a usable database" in caplog.text
    assert path.with_name(SPOOL_FILE + DAMAGED_SUFFIX).read_bytes().startswith(b"garbage")
    reopened.append(b"new")
    assert datas(open_spool(tmp_path).peek(5)) == [b"new"]


def test_a_failed_write_changes_nothing(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, max_bytes=1 << 20, max_items=2)
    spool.append(b"a")
    spool.append(b"b")
    db = spool._log._db  # a full disk: the file may not grow any more
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StateError, match=rf"{SPOOL_FILE}.*full"):
        spool.append(b"x" * 100_000)  # would drop "a" in the same transaction
    assert datas(spool.peek(5)) == [b"a", b"b"]
    assert (len(spool), spool.size_bytes, spool.dropped) == (2, 2, 0)
    assert on_disk(spool.directory) == [b"a", b"b"]
    assert open_spool(tmp_path, max_items=2).dropped == 0


def test_concurrent_appends_keep_every_item(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, max_bytes=1 << 20, max_items=10_000)
    results: list[int] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        for i in range(25):
            seq = spool.append(b"%d-%d" % (n, i))
            with lock:
                results.append(seq)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 100
    items = spool.peek(200)
    assert [item.seq for item in items] == sorted(results)
    for n in range(4):  # each thread's items keep their order
        mine = [item.data for item in items if item.data.startswith(b"%d-" % n)]
        assert mine == [b"%d-%d" % (n, i) for i in range(25)]


def test_take_dropped_up_to_keeps_drops_counted_meanwhile(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=10, max_items=1)
    spool.append(b"a")
    spool.append(b"b")  # drops "a"
    reported = spool.dropped
    spool.append(b"c")  # drops "b" after the report was made
    assert spool.take_dropped(up_to=reported) == 1
    assert spool.dropped == 1
    assert Spool(tmp_path / "s", max_bytes=10, max_items=1).dropped == 1  # persisted
