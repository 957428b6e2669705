"""Store methods for deployment: artifacts (files + rows) and rollouts.

Part of :class:`coordinator.service.store.Store` (a mixin; see that package's docstring).

Artifact bytes live in ``<artifact_dir>/<sha256>.fedge``, not in SQLite: the file
is written atomically (temporary file in the same directory, fsync, rename, fsync
of the directory) *before* its row is inserted, so a row always has its file. A
crash between the two leaves an orphan file that the next upload of the same
bytes overwrites. Every read hashes the file again: a file altered on disk raises
:class:`~coordinator.errors.ArtifactCorruptError` instead of being pushed to devices
(they would refuse it anyway, after downloading it).

A rollout's row holds the rollout engine's whole serialized state (``snapshot``)
and ``rollout_devices`` one row per targeted device. :meth:`DeployTables.save_rollout`
replaces both in one transaction, so after a SIGKILL at any moment the service
restarts from one consistent save.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from compress.fileio import atomic_write
from coordinator.errors import ArtifactCorruptError, ConflictError, NotFoundError, StoreError
from coordinator.service.store.database import Database, check_finite, dump_json, load_json
from coordinator.service.store.records import ArtifactRow, RolloutDevice, RolloutRow

__all__ = ["ARTIFACT_SUFFIX", "DeployTables"]

logger = logging.getLogger(__name__)

ARTIFACT_SUFFIX = ".fedge"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _artifact(row: sqlite3.Row) -> ArtifactRow:
    return ArtifactRow(
        sha256=row["sha256"],
        name=row["name"],
        version=row["version"],
        size=row["size"],
        manifest=load_json(row["manifest_json"]),
        uploaded_by=row["uploaded_by"],
        uploaded_at=row["uploaded_at"],
    )


def _rollout(row: sqlite3.Row) -> RolloutRow:
    return RolloutRow(
        rollout_id=row["id"],
        artifact_sha256=row["artifact_sha256"],
        target=row["target"],
        policy=load_json(row["policy_json"]),
        state=row["state"],
        snapshot=load_json(row["snapshot_json"]),
        created_by=row["created_by"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


class DeployTables:
    """Artifacts and rollouts (mixed into :class:`~coordinator.service.store.Store`)."""

    _db: Database
    _artifact_dir: Path

    def _blob_path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            # Also what keeps "../x" out of the path.
            raise NotFoundError(f"no artifact {sha256[:80]!r} (not a sha256 hex digest)")
        return self._artifact_dir / f"{sha256}{ARTIFACT_SUFFIX}"

    def _read_blob(self, sha256: str, size: int) -> bytes:
        path = self._blob_path(sha256)
        try:
            with path.open("rb") as stream:
                data = stream.read(size + 1)
        except OSError as exc:
            raise ArtifactCorruptError(f"artifact {sha256}: cannot read {path}: {exc}") from exc
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise ArtifactCorruptError(f"artifact {sha256}: {path} no longer matches its sha256")
        return data

    def put_artifact(
        self,
        data: bytes,
        *,
        name: str,
        version: int,
        manifest: Mapping[str, Any],
        uploaded_by: str,
        at: float,
    ) -> ArtifactRow:
        """Store an artifact once by its sha256; storing the same bytes again is a no-op.

        Args:
            data: The artifact's bytes.
            name: Model name.
            version: Model version.
            manifest: The artifact's manifest as a JSON-able dict.
            uploaded_by: Token id or ``cli:<login>``.
            at: Upload time, unix seconds.

        Returns:
            The new row; for bytes already stored, the existing row unchanged (its
            name, manifest, uploader and time are the first upload's). If that
            row's file was missing or damaged, it is rewritten from ``data``.

        Raises:
            StoreError: The manifest cannot be stored as JSON, the file cannot be
                written (disk full, permissions), or the database failed.
        """
        check_finite("at", at)
        manifest_json = dump_json(dict(manifest), "manifest")
        sha256 = hashlib.sha256(data).hexdigest()
        existing = self.artifact(sha256)
        if existing is not None:
            try:
                self._read_blob(sha256, existing.size)
            except ArtifactCorruptError:
                logger.warning("artifact %s: file missing or damaged, rewriting it", sha256)
            else:
                return existing
        path = self._blob_path(sha256)
        # Outside the lock: a big fsync must not stall telemetry; two threads
        # writing the same bytes each rename a complete file over the other's.
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise StoreError(f"artifact {sha256}: cannot write {path}: {exc}") from exc
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO artifacts (sha256, name, version, size, manifest_json, "
                "uploaded_by, uploaded_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (sha256) DO NOTHING",
                (sha256, name, version, len(data), manifest_json, uploaded_by, at),
            )
            row = conn.execute("SELECT * FROM artifacts WHERE sha256 = ?", (sha256,)).fetchone()
        logger.info("stored artifact %s (%s v%d, %d bytes)", sha256, name, version, len(data))
        return _artifact(row)

    def artifact(self, sha256: str) -> ArtifactRow | None:
        """Give an artifact's row, or None if unknown.

        Raises:
            StoreError: The database failed.
        """
        row = self._db.one("SELECT * FROM artifacts WHERE sha256 = ?", (sha256,))
        return None if row is None else _artifact(row)

    def artifacts(self) -> list[ArtifactRow]:
        """Give every artifact, oldest upload first.

        Raises:
            StoreError: The database failed.
        """
        rows = self._db.rows("SELECT * FROM artifacts ORDER BY uploaded_at, sha256")
        return [_artifact(row) for row in rows]

    def artifact_bytes(self, sha256: str) -> bytes:
        """Give an artifact's bytes, checked against its sha256.

        Raises:
            NotFoundError: No such artifact.
            ArtifactCorruptError: Its file is missing, unreadable, or altered.
            StoreError: The database failed.
        """
        row = self.artifact(sha256)
        if row is None:
            raise NotFoundError(f"no artifact {sha256[:80]!r}")
        return self._read_blob(sha256, row.size)

    def create_rollout(
        self,
        rollout_id: str,
        *,
        artifact_sha256: str,
        target: str,
        policy: Mapping[str, Any],
        state: str,
        snapshot: Mapping[str, Any],
        created_by: str,
        at: float,
    ) -> RolloutRow:
        """Record a new rollout (no devices yet; :meth:`save_rollout` adds them).

        Args:
            rollout_id: The new rollout's id (the caller generates it).
            artifact_sha256: The stored artifact to roll out.
            target: ``all``, ``tag:T`` or ``device:ID[,ID...]``.
            policy: The rollout policy as a JSON-able dict.
            state: The engine's initial state name.
            snapshot: The engine's initial serialized state.
            created_by: Token id or ``cli:<login>``.
            at: Creation time, unix seconds.

        Raises:
            NotFoundError: No such artifact.
            ConflictError: A rollout with this id exists.
            StoreError: ``policy`` or ``snapshot`` cannot be stored as JSON, or the
                database failed.
        """
        check_finite("at", at)
        policy_json = dump_json(dict(policy), "policy")
        snapshot_json = dump_json(dict(snapshot), "snapshot")
        with self._db.transaction() as conn:
            if (
                conn.execute(
                    "SELECT 1 FROM artifacts WHERE sha256 = ?", (artifact_sha256,)
                ).fetchone()
                is None
            ):
                raise NotFoundError(f"no artifact {artifact_sha256[:80]!r}")
            if conn.execute("SELECT 1 FROM rollouts WHERE id = ?", (rollout_id,)).fetchone():
                raise ConflictError(f"rollout {rollout_id!r} already exists")
            conn.execute(
                "INSERT INTO rollouts (id, artifact_sha256, target, policy_json, state, "
                "snapshot_json, created_by, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rollout_id,
                    artifact_sha256,
                    target,
                    policy_json,
                    state,
                    snapshot_json,
                    created_by,
                    at,
                    at,
                ),
            )
            row = conn.execute("SELECT * FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        return _rollout(row)

    def save_rollout(
        self,
        rollout_id: str,
        *,
        state: str,
        snapshot: Mapping[str, Any],
        devices: Iterable[RolloutDevice],
        at: float,
    ) -> None:
        """Replace a rollout's state, snapshot and device rows in one transaction.

        Devices not in ``devices`` are removed from the rollout. Either the whole
        save is stored or, on any error, none of it.

        Raises:
            NotFoundError: No such rollout.
            StoreError: A value cannot be stored (JSON, non-finite time, a device
                listed twice), or the database failed.
        """
        check_finite("at", at)
        snapshot_json = dump_json(dict(snapshot), "snapshot")
        rows = []
        for device in devices:
            check_finite(f"updated_at of {device.device_id!r}", device.updated_at)
            rows.append(
                (
                    rollout_id,
                    device.device_id,
                    device.stage,
                    device.state,
                    dump_json(device.detail, f"detail of {device.device_id!r}"),
                    device.updated_at,
                )
            )
        with self._db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE rollouts SET state = ?, snapshot_json = ?, updated_at = ? WHERE id = ?",
                (state, snapshot_json, at, rollout_id),
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"no rollout {rollout_id!r}")
            conn.execute("DELETE FROM rollout_devices WHERE rollout_id = ?", (rollout_id,))
            conn.executemany(
                "INSERT INTO rollout_devices (rollout_id, device_id, stage, state, "
                "detail_json, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    def rollout(self, rollout_id: str) -> RolloutRow | None:
        """Give a rollout, or None if unknown.

        Raises:
            StoreError: The database failed.
        """
        row = self._db.one("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        return None if row is None else _rollout(row)

    def rollouts(self, states: Collection[str] | None = None) -> list[RolloutRow]:
        """Give rollouts, oldest first; only those in ``states`` if given.

        Raises:
            StoreError: The database failed.
        """
        query = "SELECT * FROM rollouts"
        params: tuple[str, ...] = ()
        if states is not None:
            params = tuple(states)
            if not params:
                return []
            query += f" WHERE state IN ({', '.join('?' * len(params))})"
        rows = self._db.rows(f"{query} ORDER BY created_at, id", params)
        return [_rollout(row) for row in rows]

    def rollout_devices(self, rollout_id: str) -> list[RolloutDevice]:
        """Give a rollout's devices as last saved, by stage then device id.

        Raises:
            StoreError: The database failed.
        """
        rows = self._db.rows(
            "SELECT * FROM rollout_devices WHERE rollout_id = ? ORDER BY stage, device_id",
            (rollout_id,),
        )
        return [
            RolloutDevice(
                device_id=row["device_id"],
                stage=row["stage"],
                state=row["state"],
                updated_at=row["updated_at"],
                detail=load_json(row["detail_json"]),
            )
            for row in rows
        ]
