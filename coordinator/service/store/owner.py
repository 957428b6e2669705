"""One process runs a fleet's state database: an exclusive claim on it.

The process that runs the fleet from a database (``fedge coordinator serve``, or a
CLI command in the in-process ``--broker`` mode) resumes its rollouts, re-sends
their deploys and marks its federated runs interrupted when it starts. A second
such process on the same database would do all of that to a fleet the first one
is running, and both would overwrite each other's rollout state. So the owner
holds an exclusive ``flock`` on ``<database>.owner`` (its pid written inside, for
the message the next one gets) for as long as its store is open. The kernel drops
the lock when the process ends, however it ends, so a killed service leaves
nothing to clean up. Readers that do not run the fleet (``fedge coordinator
token``) open the database without claiming it; SQLite's WAL mode keeps them
apart.

POSIX only (``fcntl``), as is the service.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from coordinator.errors import DatabaseInUseError, StoreError

__all__ = ["OwnerClaim", "holder"]

logger = logging.getLogger(__name__)


class OwnerClaim:
    """An exclusive claim on a database file, held until :meth:`release`."""

    def __init__(self, database: Path) -> None:
        """Claim ``database`` for this process.

        Raises:
            DatabaseInUseError: another process holds the claim.
            StoreError: the claim file cannot be opened.
        """
        self.path = _claim_file(database)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise DatabaseInUseError(
                f"{database} is in use by another fedge coordinator ({who}); while it runs, "
                "talk to it through its HTTP API (--api URL) instead of opening the database"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path}: {exc}") from exc
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot write {self.path}: {exc}") from exc
        self._fd: int | None = fd
        logger.debug("claimed %s", database)

    def release(self) -> None:
        """Give the claim up (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the flock


def holder(database: Path) -> int | None:
    """Tell whether another process has claimed ``database``.

    Returns:
        None if nobody holds the claim; else the holder's pid (0 if unknown).
    """
    path = _claim_file(database)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # never claimed (or unreadable: nothing to protect then)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _claim_file(database: Path) -> Path:
    return database.with_name(database.name + ".owner")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
