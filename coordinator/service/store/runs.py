"""Store methods for federated runs and their rounds.

Part of :class:`coordinator.service.store.Store` (a mixin; see that package's docstring).

A run is ``running`` from :meth:`RunTables.create_run` until
:meth:`RunTables.finish_run` marks it ``finished`` or ``failed``. Rounds are
recorded as they start and again as they end (the same row, replaced). A run
cannot survive the service: at start-up the service calls
:meth:`RunTables.mark_interrupted_runs`, which turns every run still ``running``
into ``interrupted``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from coordinator.errors import ConflictError, NotFoundError
from coordinator.service.store.database import Database, check_finite, dump_json, load_json
from coordinator.service.store.records import RoundRow, RunRow, RunState

__all__ = ["RunTables"]


def _run(row: sqlite3.Row) -> RunRow:
    return RunRow(
        run_id=row["run_id"],
        config=load_json(row["config_json"]),
        state=RunState(row["state"]),
        created_by=row["created_by"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _round(row: sqlite3.Row) -> RoundRow:
    return RoundRow(
        run_id=row["run_id"],
        round=row["round"],
        status=row["status"],
        reason=row["reason"],
        metrics=load_json(row["metrics_json"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


class RunTables:
    """Runs and rounds (mixed into :class:`~coordinator.service.store.Store`)."""

    _db: Database

    def create_run(
        self, run_id: str, *, config: Mapping[str, Any], created_by: str, at: float
    ) -> RunRow:
        """Record a new run, ``running``.

        Raises:
            ConflictError: A run with this id exists.
            StoreError: ``config`` cannot be stored as JSON, or the database failed.
        """
        check_finite("at", at)
        config_json = dump_json(dict(config), "config")
        with self._db.transaction() as conn:
            if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
                raise ConflictError(f"run {run_id!r} already exists")
            conn.execute(
                "INSERT INTO runs (run_id, config_json, state, created_by, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, config_json, RunState.RUNNING.value, created_by, at, at),
            )
        return RunRow(run_id, dict(config), RunState.RUNNING, created_by, at, at)

    def record_round(
        self,
        run_id: str,
        round_number: int,
        *,
        status: str,
        metrics: Mapping[str, Any],
        started_at: float,
        finished_at: float | None = None,
        reason: str = "",
    ) -> RoundRow:
        """Record a round, replacing an earlier record of the same round.

        Also sets the run's ``updated_at`` to the round's latest time.

        Args:
            run_id: The run.
            round_number: 1-based round number.
            status: ``running``, ``ok`` or ``failed``.
            metrics: The round's figures (``RoundReport`` fields) as a JSON-able dict.
            started_at: Round start, unix seconds.
            finished_at: Round end, or None while it runs.
            reason: Why it failed (empty when ok).

        Raises:
            NotFoundError: No such run.
            StoreError: ``metrics`` cannot be stored as JSON (NaN loss, say: pass
                None instead), a time is not finite, or the database failed.
        """
        check_finite("round times", started_at, finished_at)
        metrics_json = dump_json(dict(metrics), "metrics")
        at = started_at if finished_at is None else max(started_at, finished_at)
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE runs SET updated_at = MAX(updated_at, ?) WHERE run_id = ?", (at, run_id)
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"no run {run_id!r}")
            conn.execute(
                "INSERT OR REPLACE INTO rounds (run_id, round, status, reason, metrics_json, "
                "started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, round_number, status, reason, metrics_json, started_at, finished_at),
            )
        return RoundRow(
            run_id, round_number, status, reason, dict(metrics), started_at, finished_at
        )

    def finish_run(self, run_id: str, *, state: RunState = RunState.FINISHED, at: float) -> RunRow:
        """Mark a run ``finished``, ``failed`` or ``interrupted`` (the service stopping).

        Raises:
            ValueError: ``state`` is ``running``.
            NotFoundError: No such run.
            StoreError: The database failed.
        """
        if state is RunState.RUNNING:
            raise ValueError("a run cannot finish as running")
        check_finite("at", at)
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE runs SET state = ?, updated_at = ? WHERE run_id = ?",
                (state.value, at, run_id),
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"no run {run_id!r}")
            row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _run(row)

    def mark_interrupted_runs(self, at: float) -> list[str]:
        """Mark every ``running`` run ``interrupted`` (at service start-up).

        Returns:
            The ids of the runs marked, sorted.

        Raises:
            StoreError: The database failed.
        """
        check_finite("at", at)
        with self._db.transaction() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT run_id FROM runs WHERE state = ? ORDER BY run_id",
                    (RunState.RUNNING.value,),
                )
            ]
            conn.execute(
                "UPDATE runs SET state = ?, updated_at = ? WHERE state = ?",
                (RunState.INTERRUPTED.value, at, RunState.RUNNING.value),
            )
        return ids

    def run(self, run_id: str) -> RunRow | None:
        """Give a run, or None if unknown.

        Raises:
            StoreError: The database failed.
        """
        row = self._db.one("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return None if row is None else _run(row)

    def runs(self) -> list[RunRow]:
        """Give every run, oldest first.

        Raises:
            StoreError: The database failed.
        """
        rows = self._db.rows("SELECT * FROM runs ORDER BY created_at, run_id")
        return [_run(row) for row in rows]

    def rounds(self, run_id: str) -> list[RoundRow]:
        """Give a run's rounds in order (empty for an unknown run).

        Raises:
            StoreError: The database failed.
        """
        rows = self._db.rows("SELECT * FROM rounds WHERE run_id = ? ORDER BY round", (run_id,))
        return [_round(row) for row in rows]
