"""The agent's one crash-safe log: an ordered table of byte records in SQLite.

The telemetry spool (:mod:`edge_agent.spool`) and the feedback buffer
(:mod:`edge_agent.training.feedback_buffer`) both keep a bounded queue of records on
disk that must survive a crash at any moment. They share this class, so crash
safety is solved once, by stdlib ``sqlite3`` (benchmarks/durable_log.py measured it
against the two file formats it replaced: faster appends, no recovery code).

* One file, ``<name>.db`` (mode 0o600; its ``-wal`` and ``-shm`` companions take the
  same mode), WAL journal. ``durable=True`` (``synchronous=FULL``): a change is on
  the disk when the call returns, and survives a power cut; ``durable=False``
  (``NORMAL``): it survives the process being killed, not necessarily a power cut.
* Records get increasing sequence numbers that are never reused
  (``AUTOINCREMENT``), even after the log was emptied.
* :meth:`change` applies appends and deletions in one transaction: all or none,
  so dropping the oldest records to make room and storing new ones cannot be torn
  apart by a crash. Named integer counters (the spool's ``dropped`` count) live in
  the same file and change in the same transactions.
* A file that is not a readable database (damaged disk, garbage) is moved aside to
  ``<name>.db.damaged`` with an error in the log, and the log starts empty: losing
  the queue beats an agent that cannot start. Any other failure to open (a lock
  held by another process, permissions) is a :class:`~edge_agent.errors.StateError`
  and leaves the file alone.

Errors of the database (disk full, read-only, a directory that vanished) are raised
as :class:`~edge_agent.errors.StateError` naming the file. Thread-safe (one lock);
not multi-process safe: one agent owns its directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from edge_agent.errors import StateError

__all__ = ["DAMAGED_SUFFIX", "DurableLog"]

logger = logging.getLogger(__name__)

DAMAGED_SUFFIX = ".damaged"
"""Appended to the name of a database file that could not be opened."""

WAL_LIMIT_BYTES = 1 << 20
"""The write-ahead log is cut back to this size after each checkpoint (SQLite
checkpoints it into the database every 1000 pages)."""

BUSY_TIMEOUT_S = 5.0
"""How long an operation waits for a lock another connection holds, then fails."""

_DAMAGE = frozenset({"SQLITE_NOTADB", "SQLITE_CORRUPT"})
"""SQLite's names for a file that is not, or no longer, a database."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records ("
    "seq INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)


class DurableLog:
    """An ordered, crash-safe table of byte records in one SQLite file.

    Args:
        path: The database file; its directory must exist.
        durable: Sync every change to the disk before returning (``FULL``).

    Raises:
        StateError: the file cannot be created or opened (after a damaged one was
            moved aside).
    """

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._db = self._open(durable)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # ---------------------------------------------------------------- reading

    def sizes(self) -> list[tuple[int, int]]:
        """``(seq, length)`` of every record, oldest first."""
        with self._reading() as db:
            return [(int(s), int(n)) for s, n in db.execute(
                "SELECT seq, length(data) FROM records ORDER BY seq"
            )]  # fmt: skip

    def records(self, limit: int | None = None) -> list[tuple[int, bytes]]:
        """``(seq, data)`` of the oldest ``limit`` records (all when None)."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT seq, data FROM records ORDER BY seq LIMIT ?",
                (-1 if limit is None else max(0, limit),),
            )
            return [(int(seq), bytes(data)) for seq, data in rows]

    def counter(self, name: str) -> int:
        """The value of counter ``name`` (0 when never set)."""
        with self._reading() as db:
            row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
            return int(row[0]) if row else 0

    # ---------------------------------------------------------------- writing

    def change(
        self,
        *,
        append: Sequence[bytes] = (),
        delete: Iterable[int] = (),
        counters: dict[str, int] | None = None,
    ) -> list[int]:
        """Delete records, append records and set counters, in one transaction.

        Args:
            append: Records to store, in order.
            delete: Sequence numbers to delete (absent ones are ignored).
            counters: Counter values to set.

        Returns:
            The sequence numbers of the appended records.

        Raises:
            StateError: the change could not be written; nothing of it was.
        """
        with self._lock:
            try:
                with self._transaction():
                    self._db.executemany(
                        "DELETE FROM records WHERE seq = ?", ((seq,) for seq in delete)
                    )
                    seqs = [
                        int(self._db.execute(
                            "INSERT INTO records (data) VALUES (?)", (data,)
                        ).lastrowid or 0)
                        for data in append
                    ]  # fmt: skip
                    self._db.executemany(
                        "INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)",
                        (counters or {}).items(),
                    )
            except sqlite3.Error as exc:
                raise StateError(f"{self._path}: cannot write: {exc}") from exc
            return seqs

    def clear(self) -> None:
        """Delete every record (counters stay).

        Raises:
            StateError: the change could not be written.
        """
        with self._lock:
            try:
                with self._transaction():
                    self._db.execute("DELETE FROM records")
            except sqlite3.Error as exc:
                raise StateError(f"{self._path}: cannot write: {exc}") from exc

    def close(self) -> None:
        """Close the database (the log cannot be used afterwards)."""
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------- helpers

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT, or ROLLBACK when the block raises (the lock is held)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise StateError(f"{self._path}: cannot read: {exc}") from exc

    def _open(self, durable: bool) -> sqlite3.Connection:
        """Open (creating with mode 0o600) and check the file; set a damaged one aside.

        Raises:
            StateError: the file cannot be created or opened, for any reason but
                damage (a lock held elsewhere, permissions), or not even once set aside.
        """
        try:
            return self._connect(durable)
        except _DamagedError as exc:
            damaged = self._path.with_name(self._path.name + DAMAGED_SUFFIX)
            logger.error(
                "%s is not a usable database (%s): moved to %s, starting empty",
                self._path,
                exc,
                damaged.name,
            )
            try:
                os.replace(self._path, damaged)
                for companion in ("-wal", "-shm"):
                    self._path.with_name(self._path.name + companion).unlink(missing_ok=True)
            except OSError as move_error:
                raise StateError(f"{self._path}: cannot move aside: {move_error}") from exc
            try:
                return self._connect(durable)
            except _DamagedError as again:
                raise StateError(f"{self._path}: cannot open: {again}") from again

    def _connect(self, durable: bool) -> sqlite3.Connection:
        """Connect, set WAL and durability, create the tables and check the file.

        Raises:
            _DamagedError: the file is not a database, or a damaged one.
            StateError: any other reason it cannot be opened.
        """
        try:
            os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o600))
            db = sqlite3.connect(
                self._path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"{self._path}: cannot open: {exc}") from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            for statement in _SCHEMA:
                db.execute(statement)
            check = db.execute("PRAGMA quick_check").fetchone()
        except sqlite3.Error as exc:
            db.close()
            if getattr(exc, "sqlite_errorname", None) in _DAMAGE:
                raise _DamagedError(str(exc)) from exc
            raise StateError(f"{self._path}: cannot open: {exc}") from exc
        if check is None or check[0] != "ok":
            db.close()
            raise _DamagedError(f"quick_check: {check}")
        return db


class _DamagedError(Exception):
    """The file is not a database, or a damaged one (internal: it is set aside)."""
