"""edge_agent.durable_log: the agent's one crash-safe log (SQLite), on its own.

The spool (tests/test_spool.py) and the feedback buffer
(tests/test_training_feedback.py) test their bounds on top of it; here are the
guarantees they rely on.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from edge_agent import durable_log
from edge_agent.durable_log import DAMAGED_SUFFIX, DurableLog
from edge_agent.errors import StateError


def open_log(tmp_path: Path, durable: bool = True) -> DurableLog:
    return DurableLog(tmp_path / "log.db", durable=durable)


def test_records_keep_their_order_and_numbers_are_never_reused(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    first = log.change(append=[b"a", b"b", b""])
    assert first == sorted(first)
    assert log.records() == list(zip(first, [b"a", b"b", b""], strict=True))
    assert log.records(1) == [(first[0], b"a")]
    assert log.sizes() == [(first[0], 1), (first[1], 1), (first[2], 0)]
    log.clear()
    log.close()
    reopened = open_log(tmp_path)
    (again,) = reopened.change(append=[b"c"])
    assert again > first[-1]  # even after the log was emptied and reopened


def test_one_change_is_one_transaction(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    old = log.change(append=[b"old"], counters={"dropped": 1})
    db = log._db  # a full disk: the file may not grow any more
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(StateError, match=r"log\.db: cannot write: .*full"):
        log.change(append=[b"x" * 200_000], delete=old, counters={"dropped": 2})
    assert log.records() == [(old[0], b"old")]  # neither the deletion nor the counter
    assert log.counter("dropped") == 1
    db.execute("PRAGMA max_page_count = 1073741823")
    new = log.change(append=[b"new"], delete=old, counters={"dropped": 2})
    assert log.records() == [(new[0], b"new")]
    assert (log.counter("dropped"), log.counter("never set")) == (2, 0)


def test_the_file_is_private_and_durability_is_chosen(tmp_path: Path) -> None:
    full, normal = DurableLog(tmp_path / "f.db"), DurableLog(tmp_path / "n.db", durable=False)
    full.change(append=[b"x"])
    assert stat.S_IMODE((tmp_path / "f.db").stat().st_mode) == 0o600
    assert full._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert normal._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert full._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_damaged_file_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "log.db").write_bytes(b"not a database" * 400)
    with caplog.at_level(logging.ERROR, logger="edge_agent.durable_log"):
        log = open_log(tmp_path)
    assert log.records() == []
    assert "not a usable database" in caplog.text
    assert (tmp_path / f"log.db{DAMAGED_SUFFIX}").read_bytes().startswith(b"not a database")


def test_a_locked_file_is_a_state_error_and_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = open_log(tmp_path)
    first.change(append=[b"kept"])
    first.close()
    monkeypatch.setattr(durable_log, "BUSY_TIMEOUT_S", 0.05)
    with closing(sqlite3.connect(tmp_path / "log.db", isolation_level=None)) as other:
        other.execute("PRAGMA locking_mode=EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")  # another process would hold it like this
        with pytest.raises(StateError, match="locked"):
            open_log(tmp_path)
    assert not (tmp_path / f"log.db{DAMAGED_SUFFIX}").exists()
    assert open_log(tmp_path).records()[0][1] == b"kept"


def test_an_unusable_place_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="missing"):
        DurableLog(tmp_path / "missing" / "log.db")


def test_a_closed_log_refuses_work_with_a_state_error(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.close()
    with pytest.raises(StateError, match=r"log\.db: cannot read"):
        log.records()
    with pytest.raises(StateError, match=r"log\.db: cannot write"):
        log.change(append=[b"x"])


CHILD = """
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from edge_agent.durable_log import DurableLog
log = DurableLog(Path(sys.argv[1]))
i = 0
while True:
    log.change(append=[i.to_bytes(8, "big") * 64], counters={"last": i})
    print(i, flush=True)
    i += 1
"""


def test_a_process_killed_mid_write_loses_nothing_it_was_told_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acknowledged = [int(child.stdout.readline()) for _ in range(50)]
    os.kill(child.pid, signal.SIGKILL)
    rest, _ = child.communicate()
    acknowledged += [int(line) for line in rest.split()]
    log = DurableLog(path)
    numbers = [int.from_bytes(data[:8], "big") for _, data in log.records()]
    assert numbers == list(range(len(numbers)))  # whole records, in order, no gaps
    assert set(acknowledged) <= set(numbers)
    assert log.counter("last") == numbers[-1]  # changed with the record, never apart
