"""The :class:`Store`: every table's methods on one object over one :class:`Database`."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Literal

from coordinator.errors import DatabaseInUseError, StoreError
from coordinator.lifecycle import Closeable
from coordinator.service.store.access import AccessTables
from coordinator.service.store.database import MEMORY, Database
from coordinator.service.store.deploy import DeployTables
from coordinator.service.store.drift import DriftTables
from coordinator.service.store.fleet import FleetTables
from coordinator.service.store.owner import OwnerClaim, holder
from coordinator.service.store.policies import PolicyTables
from coordinator.service.store.registry import RegistryTables
from coordinator.service.store.runs import RunTables
from coordinator.service.store.schema import MIGRATIONS, SCHEMA_VERSION

__all__ = ["ARTIFACT_DIR_NAME", "Store"]

logger = logging.getLogger(__name__)

ARTIFACT_DIR_NAME = "artifacts"
"""Default artifact directory, next to the database file."""


class Store(
    FleetTables,
    DeployTables,
    RunTables,
    AccessTables,
    DriftTables,
    RegistryTables,
    PolicyTables,
    Closeable,
):
    """The coordinator's persistent state. Thread-safe; one per process.

    Args:
        database: An open database with the current schema (see :meth:`open`).
        artifact_dir: Where artifact files live (created if missing).

    Raises:
        StoreError: ``artifact_dir`` cannot be created.
    """

    def __init__(
        self, database: Database, artifact_dir: Path, *, claim: OwnerClaim | None = None
    ) -> None:
        self._db = database
        self._claim = claim
        self._artifact_dir = Path(artifact_dir)
        try:
            self._artifact_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create artifact directory {artifact_dir}: {exc}") from exc

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        artifact_dir: Path | None = None,
        busy_timeout_s: float = 5.0,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        owner: bool = False,
    ) -> Store:
        """Open (or create) the database at ``path`` and migrate it to the current schema.

        Args:
            path: Database file, or ``":memory:"``.
            artifact_dir: Artifact files' directory; defaults to ``artifacts/``
                next to the database file. Required for ``":memory:"``.
            busy_timeout_s: See :class:`~coordinator.service.store.database.Database`.
            synchronous: See :class:`~coordinator.service.store.database.Database`.
            owner: Claim the database for this process, the one that runs its
                fleet (:mod:`~coordinator.service.store.owner`), until :meth:`close`.

        Raises:
            ValueError: ``":memory:"`` without ``artifact_dir``.
            DatabaseInUseError: ``owner`` and another process has claimed it; or,
                without ``owner``, the database needs a schema upgrade while a
                process (an older service) holds it.
            SchemaVersionError: The database is newer than this code.
            MigrationError: A migration step failed (rolled back).
            StoreError: The database or the directory cannot be opened.
        """
        if artifact_dir is None:
            if path == MEMORY:
                raise ValueError("an in-memory store needs an artifact_dir")
            artifact_dir = Path(path).parent / ARTIFACT_DIR_NAME
        if not owner and path != MEMORY:
            _refuse_to_migrate_under_a_holder(Path(path))
        claim = OwnerClaim(Path(path)) if owner and path != MEMORY else None
        try:
            database = Database(
                path, migrations=MIGRATIONS, busy_timeout_s=busy_timeout_s, synchronous=synchronous
            )
        except BaseException:
            if claim is not None:
                claim.release()
            raise
        try:
            return cls(database, artifact_dir, claim=claim)
        except BaseException:
            database.close()
            if claim is not None:
                claim.release()
            raise

    @property
    def database(self) -> Database:
        """The underlying database (its lock groups several calls into one unit)."""
        return self._db

    @property
    def artifact_dir(self) -> Path:
        """Where artifact files live."""
        return self._artifact_dir

    def close(self) -> None:
        """Close the database (and give up the owner's claim). Idempotent."""
        self._db.close()
        if self._claim is not None:
            self._claim.release()


def _refuse_to_migrate_under_a_holder(path: Path) -> None:
    """Raise if ``path`` needs a migration while another process runs it.

    A newer fedge (``fedge coordinator token ...``) would change the schema under
    an older service that is still writing the old one.

    Raises:
        DatabaseInUseError: as said.
    """
    if not path.exists():
        return
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return  # Database reports what is wrong with the file
    if version >= SCHEMA_VERSION:
        return
    pid = holder(path)
    if pid is not None:
        who = f"pid {pid}" if pid else "another process"
        raise DatabaseInUseError(
            f"{path} needs a schema upgrade (version {version} to {SCHEMA_VERSION}) but a "
            f"running coordinator ({who}) holds it: stop it, start this fedge's service on "
            "it, then try again"
        )
