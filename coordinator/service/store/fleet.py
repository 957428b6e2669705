"""Store methods for the fleet: devices, their presence history, telemetry, health.

Part of :class:`coordinator.service.store.Store` (a mixin; see that package's docstring).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Collection, Mapping, Sequence
from enum import Enum
from typing import Any, Final

from coordinator.service.store.database import Database, check_finite, dump_json, load_json
from coordinator.service.store.records import DeviceRow, PresenceRow, TelemetryRow

__all__ = ["KEEP", "FleetTables", "Keep"]

logger = logging.getLogger(__name__)


class Keep(Enum):
    """Type of :data:`KEEP`."""

    KEEP = "keep"


KEEP: Final = Keep.KEEP
"""Default of :meth:`FleetTables.upsert_device` fields: keep the stored value."""


def _device(row: sqlite3.Row) -> DeviceRow:
    status = row["status_json"]
    return DeviceRow(
        device_id=row["device_id"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        online=bool(row["online"]),
        status=None if status is None else load_json(status),
        tags=tuple(load_json(row["tags_json"])),
        model=row["model"],
        version=row["version"],
    )


def _telemetry(row: sqlite3.Row) -> TelemetryRow:
    return TelemetryRow(
        device_id=row["device_id"],
        received_at=row["received_at"],
        window_start=row["window_start"],
        window_end=row["window_end"],
        model=row["model"],
        version=row["version"],
        predictions=row["predictions"],
        errors=row["errors"],
        p50=row["p50"],
        p95=row["p95"],
        p99=row["p99"],
        cpu_percent=row["cpu_percent"],
        memory_bytes=row["memory_bytes"],
        seq=row["seq"],
        row_id=row["id"],
    )


_IN_SLICE = 500
"""Device ids per ``IN (...)`` list (SQLite allows 32,766 variables a statement)."""


def _telemetry_params(row: TelemetryRow) -> tuple[Any, ...]:
    check_finite(
        f"telemetry of {row.device_id!r}",
        row.received_at,
        row.window_start,
        row.window_end,
        row.p50,
        row.p95,
        row.p99,
        row.cpu_percent,
    )
    return (
        row.device_id,
        row.received_at,
        row.window_start,
        row.window_end,
        row.model,
        row.version,
        row.predictions,
        row.errors,
        row.p50,
        row.p95,
        row.p99,
        row.cpu_percent,
        row.memory_bytes,
        row.seq,
    )


class FleetTables:
    """Devices, presence, telemetry (mixed into :class:`~coordinator.service.store.Store`)."""

    _db: Database

    def upsert_device(
        self,
        device_id: str,
        *,
        online: bool,
        at: float,
        status: Mapping[str, Any] | Keep | None = KEEP,
        tags: Sequence[str] | Keep = KEEP,
        model: str | Keep | None = KEEP,
        version: int | Keep | None = KEEP,
    ) -> DeviceRow:
        """Record that a device was heard from (its status message, or its Last Will).

        A new device gets ``first_seen = at``. ``last_seen`` becomes ``at`` and
        ``online`` is set; a presence row is appended when ``online`` differs from
        the stored value, and on first sight. Fields left at :data:`KEEP` keep their
        stored value (NULL / no tags for a new device); given values, None
        included, replace it.

        Args:
            device_id: The device.
            online: Whether it is connected.
            at: Coordinator time, unix seconds.
            status: The status message as a JSON-able dict, or None to clear it.
            tags: Its tags.
            model: The model it serves, or None.
            version: That model's version, or None.

        Returns:
            The device as stored now.

        Raises:
            StoreError: ``at`` is not finite, ``status`` or ``tags`` cannot be
                stored as JSON, or the database failed.
        """
        check_finite("at", at)

        def keep_flag(value: object) -> int:
            return int(isinstance(value, Keep))

        def or_null(value: Any) -> Any:
            return None if isinstance(value, Keep) else value

        status_json = (
            None if isinstance(status, Keep) or status is None else dump_json(status, "status")
        )
        tags_json = None if isinstance(tags, Keep) else dump_json(list(tags), "tags")
        with self._db.transaction() as conn:
            before = conn.execute(
                "SELECT online FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if before is None:
                conn.execute(
                    "INSERT INTO devices (device_id, first_seen, last_seen, online, "
                    "status_json, tags_json, model, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        device_id,
                        at,
                        at,
                        int(online),
                        status_json,
                        tags_json or "[]",
                        or_null(model),
                        or_null(version),
                    ),
                )
            else:
                conn.execute(
                    "UPDATE devices SET last_seen = ?, online = ?, "
                    "status_json = CASE WHEN ? THEN status_json ELSE ? END, "
                    "tags_json = CASE WHEN ? THEN tags_json ELSE ? END, "
                    "model = CASE WHEN ? THEN model ELSE ? END, "
                    "version = CASE WHEN ? THEN version ELSE ? END "
                    "WHERE device_id = ?",
                    (
                        at,
                        int(online),
                        keep_flag(status),
                        status_json,
                        keep_flag(tags),
                        tags_json,
                        keep_flag(model),
                        or_null(model),
                        keep_flag(version),
                        or_null(version),
                        device_id,
                    ),
                )
            if before is None or bool(before["online"]) != online:
                conn.execute(
                    "INSERT INTO presence (device_id, online, at) VALUES (?, ?, ?)",
                    (device_id, int(online), at),
                )
            row = conn.execute("SELECT * FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return _device(row)

    def device(self, device_id: str) -> DeviceRow | None:
        """Give one device, or None if never seen.

        Raises:
            StoreError: The database failed.
        """
        row = self._db.one("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        return None if row is None else _device(row)

    def devices(self) -> list[DeviceRow]:
        """Give every device ever seen, sorted by id.

        Raises:
            StoreError: The database failed.
        """
        rows = self._db.rows("SELECT * FROM devices ORDER BY device_id")
        return [_device(row) for row in rows]

    def presence_history(self, device_id: str, limit: int = 100) -> list[PresenceRow]:
        """Give a device's latest presence changes, newest first.

        Raises:
            ValueError: ``limit`` is negative.
            StoreError: The database failed.
        """
        rows = self._db.latest(
            "SELECT device_id, online, at FROM presence WHERE device_id = ? "
            "ORDER BY at DESC, id DESC LIMIT ?",
            (device_id,),
            limit,
        )
        return [PresenceRow(r["device_id"], bool(r["online"]), r["at"]) for r in rows]

    def add_telemetry(self, rows: Sequence[TelemetryRow]) -> int:
        """Insert a batch of telemetry windows in one transaction (all or nothing).

        The service buffers telemetry from MQTT and flushes it here every fraction
        of a second: one ``executemany`` and one commit per flush, whatever the
        number of devices. ``row_id`` of the given rows is ignored. A window
        already stored (same device, batch ``seq``, start, end and model:
        delivered twice) is skipped.

        Returns:
            The number of windows inserted (the rest were duplicates).

        Raises:
            StoreError: A row holds a non-finite number (nothing is inserted), or
                the database failed.
        """
        params = [_telemetry_params(row) for row in rows]
        if not params:
            return 0
        with self._db.transaction() as conn:
            cursor = conn.executemany(  # only the window index may skip a row
                "INSERT INTO telemetry (device_id, received_at, window_start, "
                "window_end, model, version, predictions, errors, p50, p95, p99, cpu_percent, "
                "memory_bytes, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                params,
            )
            return int(cursor.rowcount)

    def telemetry(
        self, device_id: str, limit: int = 100, since: float | None = None
    ) -> list[TelemetryRow]:
        """Give a device's latest telemetry windows, newest ``window_end`` first.

        Args:
            device_id: The device.
            limit: Most rows to give.
            since: Only windows ending at or after this time (device clock).

        Raises:
            ValueError: ``limit`` is negative.
            StoreError: The database failed.
        """
        rows = self._db.latest(
            "SELECT * FROM telemetry WHERE device_id = ? AND (? IS NULL OR window_end >= ?) "
            "ORDER BY window_end DESC, id DESC LIMIT ?",
            (device_id, since, since),
            limit,
        )
        return [_telemetry(row) for row in rows]

    def telemetry_count(self) -> int:
        """Give the number of telemetry rows stored.

        Raises:
            StoreError: The database failed.
        """
        with self._db.read() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0])

    def prune_telemetry(
        self, *, max_rows: int | None = None, older_than: float | None = None
    ) -> int:
        """Delete old telemetry, for retention; both limits may be given.

        Args:
            max_rows: Keep at most this many rows, the most recently inserted.
            older_than: Delete rows received (coordinator clock) before this time.

        Returns:
            The number of rows deleted.

        Raises:
            ValueError: ``max_rows`` is negative.
            StoreError: The database failed.
        """
        if max_rows is not None and max_rows < 0:
            raise ValueError(f"max_rows must be >= 0, got {max_rows}")
        deleted = 0
        with self._db.transaction() as conn:
            if older_than is not None:
                cursor = conn.execute("DELETE FROM telemetry WHERE received_at < ?", (older_than,))
                deleted += cursor.rowcount
            if max_rows is not None:
                # The id of the newest row to delete; NULL (nothing) if few enough rows.
                cursor = conn.execute(
                    "DELETE FROM telemetry WHERE id <= "
                    "(SELECT id FROM telemetry ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (max_rows,),
                )
                deleted += cursor.rowcount
        if deleted:
            logger.debug("pruned %d telemetry rows", deleted)
        return deleted

    def prune_presence(self, *, older_than: float) -> int:
        """Delete presence changes from before ``older_than``, for retention.

        Each device's latest change stays, however old: it says since when the
        device has been in its current state.

        Returns:
            The number of rows deleted.

        Raises:
            StoreError: The database failed.
        """
        with self._db.transaction() as conn:
            deleted = conn.execute(
                "DELETE FROM presence WHERE at < ? AND id NOT IN "
                "(SELECT MAX(id) FROM presence GROUP BY device_id)",
                (older_than,),
            ).rowcount
        if deleted:
            logger.debug("pruned %d presence rows", deleted)
        return int(deleted)

    def baselines(
        self,
        model: str,
        *,
        other_than: int,
        min_calls: int,
        since: float,
        windows: int = 5,
        device_ids: Collection[str] | None = None,
    ) -> dict[str, list[TelemetryRow]]:
        """Give each device's recent telemetry on another version of a model.

        A staged rollout judges a device's health on the new version against what
        the same device measured before it (its *baseline*). Telemetry arrives
        every few seconds, so the baseline of a device that installs at once must
        come from what is stored already.

        Args:
            model: The model rolled out.
            other_than: The version rolled out (its windows are not baselines).
            min_calls: Fewest inference calls (``predictions + errors``) a window
                needs to count.
            since: Only windows received at or after this time (coordinator clock).
            windows: At most this many of a device's newest qualifying windows
                (by ``window_end``), those of the version the newest one served.
            device_ids: Only these devices; None for every device.

        Returns:
            Device id -> its windows, oldest first; devices without a qualifying
            window are absent.

        Raises:
            ValueError: ``windows`` is below 1.
            StoreError: The database failed.
        """
        if windows < 1:
            raise ValueError(f"windows must be at least 1, got {windows}")
        base = (
            "SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY device_id "
            "ORDER BY window_end DESC, id DESC) AS newest FROM telemetry "
            "WHERE model = ? AND version IS NOT NULL AND version != ? "
            "AND predictions + errors >= ? AND received_at >= ?{}"
            ") WHERE newest <= ? ORDER BY device_id, newest DESC"
        )
        params: list[Any] = [model, other_than, min_calls, since]
        if device_ids is None:
            queries = [(base.format(""), [*params, windows])]
        else:  # in slices: SQLite limits the variables of one statement
            wanted = sorted(set(device_ids))
            slices = [wanted[i : i + _IN_SLICE] for i in range(0, len(wanted), _IN_SLICE)]
            queries = [
                (
                    base.format(f" AND device_id IN ({', '.join('?' * len(part))})"),
                    [*params, *part, windows],
                )
                for part in slices
            ]
        found: dict[str, list[TelemetryRow]] = {}
        with self._db.read() as conn:
            for query, values in queries:
                for row in conn.execute(query, values).fetchall():
                    found.setdefault(row["device_id"], []).append(_telemetry(row))
        # Oldest first, only those of the version the newest window served.
        return {
            device_id: [r for r in taken if r.version == taken[-1].version]
            for device_id, taken in found.items()
        }
