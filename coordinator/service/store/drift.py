"""Store methods for drift scores (:class:`~coordinator.monitoring.scores.DriftScore`).

Part of :class:`coordinator.service.store.Store` (a mixin; see that package's docstring).

The service's drift monitor (:mod:`coordinator.service.drift`) writes the scores it
computed from a flush of telemetry in one transaction
(:meth:`DriftTables.add_drift_scores`); ``fedge drift`` and ``GET /v1/drift`` read
the latest score of each subject (a device, or the fleet, on one model version) with
:meth:`DriftTables.drift_scores`, and one subject's history with
:meth:`DriftTables.drift_history`. Retention follows the telemetry's limits, by age
and by row count (:meth:`DriftTables.prune_drift`).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence

from coordinator.monitoring.scores import DEVICE, FLEET, DriftScore
from coordinator.service.store.database import Database, check_finite, dump_json, load_json

__all__ = ["DriftTables"]

logger = logging.getLogger(__name__)


def _score(row: sqlite3.Row) -> DriftScore:
    return DriftScore.from_dict(load_json(row["score_json"]))


class DriftTables:
    """Drift scores (mixed into :class:`~coordinator.service.store.Store`)."""

    _db: Database

    def add_drift_scores(self, scores: Sequence[DriftScore]) -> None:
        """Append scores in one transaction (all or nothing).

        Raises:
            StoreError: A score holds a non-finite number, or the database failed.
        """
        params = []
        for score in scores:
            check_finite("drift score", score.at, score.psi_max, score.js_max)
            document = dump_json(score.to_dict(), "drift score")
            subject = (score.scope, score.device_id or "", score.model, score.version)
            params.append((*subject, score.at, score.psi_max, document))
        if not params:
            return
        with self._db.transaction() as conn:
            conn.executemany(
                "INSERT INTO drift_scores (scope, device_id, model, version, at, psi_max, "
                "score_json) VALUES (?, ?, ?, ?, ?, ?, ?)",
                params,
            )

    def drift_scores(
        self, *, device_id: str | None = None, model: str | None = None
    ) -> list[DriftScore]:
        """The latest score of every subject: the fleet's first, then devices; by model,
        version (newest first) and device id.

        Args:
            device_id: Only this device's scores (and no fleet score).
            model: Only this model's.

        Raises:
            StoreError: The database failed.
        """
        rows = self._db.rows(
            "SELECT d.* FROM drift_scores d JOIN (SELECT MAX(id) AS id FROM drift_scores "
            "WHERE (? IS NULL OR (scope = ? AND device_id = ?)) AND (? IS NULL OR model = ?) "
            "GROUP BY scope, device_id, model, version) latest ON d.id = latest.id "
            "ORDER BY d.scope = ?, d.model, d.version DESC, d.device_id",
            (device_id, DEVICE, device_id, model, model, DEVICE),
        )
        return [_score(row) for row in rows]

    def drift_history(
        self, *, model: str, version: int, device_id: str | None = None, limit: int = 100
    ) -> list[DriftScore]:
        """One subject's scores, newest first: a device's, or the fleet's (``device_id`` None).

        Raises:
            ValueError: ``limit`` is negative.
            StoreError: The database failed.
        """
        scope = FLEET if device_id is None else DEVICE
        rows = self._db.latest(
            "SELECT * FROM drift_scores WHERE scope = ? AND device_id = ? AND model = ? "
            "AND version = ? ORDER BY id DESC LIMIT ?",
            (scope, device_id or "", model, version),
            limit,
        )
        return [_score(row) for row in rows]

    def prune_drift(self, *, older_than: float | None = None, max_rows: int | None = None) -> int:
        """Delete old scores, for retention; each subject's latest always stays.

        Args:
            older_than: Delete scores computed before this time.
            max_rows: Keep at most this many rows (besides the latest ones), the
                most recent.

        Returns:
            The number of rows deleted.

        Raises:
            ValueError: ``max_rows`` is negative.
            StoreError: The database failed.
        """
        if max_rows is not None and max_rows < 0:
            raise ValueError(f"max_rows must be >= 0, got {max_rows}")
        latest = (
            "id NOT IN (SELECT MAX(id) FROM drift_scores GROUP BY scope, device_id, model, version)"
        )
        deleted = 0
        with self._db.transaction() as conn:
            if older_than is not None:
                cursor = conn.execute(
                    f"DELETE FROM drift_scores WHERE at < ? AND {latest}",  # noqa: S608 - constant
                    (older_than,),
                )
                deleted += cursor.rowcount
            if max_rows is not None:
                cursor = conn.execute(
                    f"DELETE FROM drift_scores WHERE {latest} AND id <= "  # noqa: S608 - constant
                    "(SELECT id FROM drift_scores ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (max_rows,),
                )
                deleted += cursor.rowcount
        if deleted:
            logger.debug("pruned %d drift scores", deleted)
        return deleted
