"""Opening the coordinator's SQLite database: pragmas, locking, transactions, migrations.

Workflow:

1. :class:`Database` opens a file (or ``":memory:"``), sets the pragmas below and
   brings the schema up to date with the given :class:`Migration` steps.
2. Writers use :meth:`Database.transaction` (``BEGIN IMMEDIATE`` ... ``COMMIT``, or
   ``ROLLBACK`` if the block raises); readers use :meth:`Database.read`, or for one
   query :meth:`Database.one`, :meth:`Database.rows` and :meth:`Database.latest` (a
   query with a ``LIMIT``). Both hold
   one :class:`threading.RLock`, because the service shares the one connection
   between the MQTT thread, the API's thread pool and a scheduler thread. A
   transaction opened inside another one becomes a ``SAVEPOINT``: if the inner
   block raises, only its writes are undone.
3. :meth:`Database.close` at shutdown (WAL is checkpointed and removed).

Pragmas:

* ``journal_mode=WAL``: readers in other processes (the CLI) never block the
  service's writer and vice versa. ``":memory:"`` stays in memory mode.
* ``synchronous=NORMAL`` by default: in WAL mode a commit is written to the WAL
  but fsynced only at checkpoints. That survives any crash of the *process*
  (SIGKILL, OOM killer, an exception) with every committed transaction intact;
  only a power cut or kernel panic can lose the last commits, and even then the
  database stays consistent. The coordinator's state tolerates that (devices
  re-announce themselves, telemetry is a sample, the rollout engine resumes from
  its last snapshot), and it saves an fsync per telemetry flush. Pass
  ``synchronous="FULL"`` to fsync every commit: the service does
  (:func:`coordinator.service.local.open_store`), so that what its API acknowledged
  survives a power cut too.
* ``busy_timeout``: another process holding the write lock is waited for this long
  before :class:`~coordinator.errors.StoreError` ("database is locked").
* ``foreign_keys=ON``: SQLite leaves them off unless asked, per connection.

Migrations: the schema version is ``PRAGMA user_version``. Step *n* (1-based)
moves the schema from version *n - 1* to *n*, in its own transaction together
with the version bump, so a failing step leaves the database at *n - 1*
(:class:`~coordinator.errors.MigrationError`). A database whose version is newer
than the steps known here is refused (:class:`~coordinator.errors.SchemaVersionError`)
rather than written to by code that does not understand it. The version is read
again inside each step's write transaction, so two processes opening the same
file at once do not apply a step twice.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from coordinator.errors import MigrationError, SchemaVersionError, StoreError

__all__ = ["MEMORY", "Database", "Migration", "check_finite", "dump_json", "load_json"]

logger = logging.getLogger(__name__)

MEMORY = ":memory:"
"""Path of a private in-memory database (tests, simulation)."""


@dataclass(frozen=True)
class Migration:
    """One schema step.

    Attributes:
        version: The schema version after this step (1 for the first).
        description: What it does, for the log.
        statements: SQL statements, run in order in one transaction (no
            ``BEGIN``/``COMMIT`` of their own).
    """

    version: int
    description: str
    statements: tuple[str, ...]


def dump_json(value: Any, what: str) -> str:
    """Serialize a value for a JSON column: sorted keys, compact, finite numbers only.

    Raises:
        StoreError: ``value`` holds NaN or infinity, or something JSON cannot hold.
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (ValueError, TypeError) as exc:
        raise StoreError(f"{what} cannot be stored as JSON: {exc}") from exc


def load_json(text: str) -> Any:
    """Parse a JSON column written by :func:`dump_json`."""
    return json.loads(text)


def check_finite(what: str, *values: float | None) -> None:
    """Refuse NaN and infinity in a REAL column (SQLite would store them silently).

    Raises:
        StoreError: One of ``values`` is not finite.
    """
    for value in values:
        if value is not None and not math.isfinite(value):
            raise StoreError(f"{what} must be finite, got {value!r}")


class Database:
    """One SQLite connection shared by every thread, behind an :class:`~threading.RLock`.

    Args:
        path: Database file (created with its parent directory if missing), or
            :data:`MEMORY`.
        migrations: The schema steps, versions 1, 2, ... in order.
        busy_timeout_s: How long to wait for another process's write lock.
        synchronous: ``NORMAL`` (default) or ``FULL``; see the module docstring.

    Raises:
        SchemaVersionError: The database's version is newer than ``migrations``.
        MigrationError: A migration step failed (it was rolled back).
        StoreError: The file cannot be opened or is not a database.
        ValueError: ``migrations`` are not numbered 1, 2, ... in order.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        migrations: Sequence[Migration],
        busy_timeout_s: float = 5.0,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        for number, step in enumerate(migrations, start=1):
            if step.version != number:
                raise ValueError(f"migration #{number} is numbered {step.version}")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        self.path = path if path == MEMORY else Path(path)
        self._name = str(path)
        self._lock = threading.RLock()
        self._depth = 0
        try:
            if isinstance(self.path, Path):
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: the module never opens transactions behind our
            # back; transaction() issues BEGIN IMMEDIATE itself.
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{self._name}: cannot open database: {exc}") from exc
        self._conn.row_factory = sqlite3.Row
        try:
            self._configure(busy_timeout_s, synchronous)
            self._migrate(migrations)
        except BaseException:
            self._conn.close()
            raise

    def _configure(self, busy_timeout_s: float, synchronous: str) -> None:
        with self.read() as conn:
            conn.execute(f"PRAGMA busy_timeout = {max(0, int(busy_timeout_s * 1000)):d}")
            conn.execute("PRAGMA foreign_keys = ON")
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            if mode != "wal" and self.path != MEMORY:
                logger.warning("%s: journal mode is %s, not WAL", self._name, mode)
            conn.execute(f"PRAGMA synchronous = {synchronous}")

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        known = len(migrations)
        while True:
            with self.transaction() as conn:
                current = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if current > known:
                    raise SchemaVersionError(current, known)
                if current == known:
                    return
                step = migrations[current]
                logger.info(
                    "%s: migrating schema to version %d (%s)",
                    self._name,
                    step.version,
                    step.description,
                )
                try:
                    for statement in step.statements:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {step.version:d}")
                except sqlite3.Error as exc:
                    raise MigrationError(
                        f"{self._name}: migration to schema version {step.version} "
                        f"({step.description}) failed: {exc}"
                    ) from exc

    @property
    def lock(self) -> threading.RLock:
        """The lock every access holds; take it to make several calls one unit."""
        return self._lock

    @property
    def user_version(self) -> int:
        """The schema version (``PRAGMA user_version``)."""
        with self.read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    @property
    def journal_mode(self) -> str:
        """The journal mode in effect (``wal`` for files, ``memory`` for ``:memory:``)."""
        with self.read() as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and give the connection for queries (autocommit).

        Raises:
            StoreError: A :class:`sqlite3.Error` raised in the block (the database
                is closed, the schema is broken, the disk failed).
        """
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise StoreError(f"{self._name}: {exc}") from exc

    def latest(self, sql: str, params: Sequence[object], limit: int) -> list[sqlite3.Row]:
        """Give the rows of a query that ends in ``LIMIT ?`` (``limit`` fills it, after
        ``params``).

        Raises:
            ValueError: ``limit`` is negative.
            StoreError: The database failed.
        """
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return self.rows(sql, (*params, limit))

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        """Give every row of a query.

        Raises:
            StoreError: The database failed.
        """
        with self.read() as conn:
            return conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Row | None:
        """Give the first row of a query, or None when it has none.

        Raises:
            StoreError: The database failed.
        """
        with self.read() as conn:
            row: sqlite3.Row | None = conn.execute(sql, params).fetchone()
            return row

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run the block as one write transaction.

        The outermost block runs ``BEGIN IMMEDIATE`` (taking SQLite's write lock
        up front, so it cannot fail half-way with "database is locked") and
        ``COMMIT`` on normal exit; if the block raises, ``ROLLBACK`` and the
        exception propagates. A nested block becomes a ``SAVEPOINT`` that is
        rolled back alone if the nested block raises.

        Raises:
            StoreError: A :class:`sqlite3.Error` in the block, at ``BEGIN`` or at
                ``COMMIT`` (everything is rolled back). Other exceptions raised in
                the block propagate unchanged, after the rollback.
        """
        with self._lock:
            depth = self._depth
            begin, commit, undo = (
                ("BEGIN IMMEDIATE", "COMMIT", "ROLLBACK")
                if depth == 0
                else (f"SAVEPOINT sp{depth}", f"RELEASE sp{depth}", f"ROLLBACK TO sp{depth}")
            )
            try:
                self._conn.execute(begin)
            except sqlite3.Error as exc:
                raise StoreError(f"{self._name}: cannot begin a transaction: {exc}") from exc
            self._depth = depth + 1
            try:
                yield self._conn
                self._conn.execute(commit)
            except BaseException as exc:
                self._undo(undo, commit)
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"{self._name}: {exc}") from exc
                raise
            finally:
                self._depth = depth

    def _undo(self, undo: str, release: str) -> None:
        """Roll back after a failure; a savepoint must also be released."""
        try:
            if self._conn.in_transaction:
                self._conn.execute(undo)
                if undo.startswith("ROLLBACK TO"):
                    self._conn.execute(release)
        except sqlite3.Error:
            logger.exception("%s: rollback failed", self._name)

    def close(self) -> None:
        """Close the connection; later calls raise :class:`StoreError`. Idempotent."""
        with self._lock:
            self._conn.close()
