"""The upload spool: devices' chunked uploads are kept on disk while they arrive.

:class:`~coordinator.federated.uploads.UploadReceiver` writes each chunk of an
upload straight into a file here, so the coordinator's memory per upload is one
chunk (while it is written) and an index of which chunks arrived, whatever the
upload's size. The complete file is checked against its sha256 by reading it
back in bounded pieces, then memory-mapped for decoding and deleted.

Workflow::

    spool = UploadSpool.open(root)       # root made (0700) or checked; leftovers removed
    part = spool.create(total)           # a file of ``total`` bytes, space reserved
    part.write(offset, data)             # each chunk, in any order
    if part.sha256() == transfer_id:     # read back in 1 MiB pieces
        payload = part.take()            # read-only memory map; the file is deleted
    part.discard()                       # or: drop it (abandoned, refused, failed)
    spool.close()                        # this spool's directory is removed

Layout: ``root`` (the coordinator's, mode 0700, owned by this user; a root owned
by another user or open to others is refused, so nobody else can read or plant
uploads) holds one session directory per open spool, ``session-<pid>-<random>``,
holding a ``lock`` file that the owning process keeps locked (``flock``) and the
upload files ``<n>.part`` (names never come from what devices send). At
:meth:`UploadSpool.open` every session whose lock is free is a leftover of a
process that died (crash, kill -9) and is removed with its files; sessions of
live processes (another run on the same root) are left alone.

Storage failures (an unwritable root, a full disk) raise
:class:`~coordinator.errors.UploadSpoolError` with the path and the OS's
reason, and are logged; the receiver turns one during an upload into a refusal
of that upload only.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import logging
import mmap
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

from coordinator.errors import UploadSpoolError

__all__ = ["READ_PIECE_BYTES", "SpoolFile", "UploadSpool", "default_spool_root"]

logger = logging.getLogger(__name__)

READ_PIECE_BYTES = 1 << 20
"""Bytes read at a time when a complete upload is hashed."""
_LOCK = "lock"
_SESSION_PREFIX = "session-"
_PART_SUFFIX = ".part"


def default_spool_root() -> Path:
    """``fedge-uploads-<uid>`` in the system's temporary directory."""
    return Path(tempfile.gettempdir()) / f"fedge-uploads-{os.getuid()}"


def _fail(what: str, path: Path, exc: OSError) -> UploadSpoolError:
    """A logged :class:`UploadSpoolError` for an OS failure on ``path``."""
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
    error = UploadSpoolError(f"upload spool: cannot {what} {path}: {reason}")
    logger.error("%s", error)
    return error


class SpoolFile:
    """One upload's file: written chunk by chunk, then taken or discarded."""

    def __init__(self, path: Path, total: int) -> None:
        """Use ``path`` (already created with ``total`` bytes reserved)."""
        self.path = path
        self.total = total

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset``.

        Raises:
            UploadSpoolError: the write failed (disk full, file gone).
        """
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                view = memoryview(data)
                while view:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
            finally:
                os.close(fd)
        except OSError as exc:
            raise _fail("write", self.path, exc) from exc

    def sha256(self) -> str:
        """The file's sha256 (hex), read in :data:`READ_PIECE_BYTES` pieces.

        Raises:
            UploadSpoolError: it cannot be read.
        """
        digest = hashlib.sha256()
        try:
            with self.path.open("rb") as file:
                while piece := file.read(READ_PIECE_BYTES):
                    digest.update(piece)
        except OSError as exc:
            raise _fail("read", self.path, exc) from exc
        return digest.hexdigest()

    def take(self) -> memoryview:
        """The file's bytes as a read-only memory map; the file is deleted.

        The map stays valid while anything refers to it (the deleted file's
        space is freed then).

        Raises:
            UploadSpoolError: it cannot be mapped.
        """
        try:
            if self.total == 0:
                return memoryview(b"")
            with self.path.open("rb") as file:
                mapped = mmap.mmap(file.fileno(), self.total, access=mmap.ACCESS_READ)
            return memoryview(mapped)
        except OSError as exc:
            raise _fail("map", self.path, exc) from exc
        finally:
            self.discard()

    def discard(self) -> None:
        """Delete the file (nothing if it is gone already)."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # the directory became unwritable: logged, kept going
            _fail("delete", self.path, exc)


class UploadSpool:
    """A private session directory under the spool root (see the module docstring)."""

    def __init__(self, directory: Path, lock_fd: int) -> None:
        """Use an open session (call :meth:`open`)."""
        self.directory = directory
        self._lock_fd: int | None = lock_fd
        self._names = itertools.count()

    @classmethod
    def open(cls, root: Path | None = None) -> UploadSpool:
        """Open a new session under ``root`` after removing dead sessions' leftovers.

        Args:
            root: The spool root; None for :func:`default_spool_root`. Made with
                mode 0700 if missing.

        Raises:
            UploadSpoolError: the root cannot be made or written, is not a
                directory, belongs to another user or is open to others.
        """
        root = root if root is not None else default_spool_root()
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = root.lstat()
        except OSError as exc:
            raise _fail("create", root, exc) from exc
        if not stat.S_ISDIR(info.st_mode):
            raise _fail("use", root, OSError(errno.ENOTDIR, "not a directory"))
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise _fail(
                "use",
                root,
                OSError(
                    errno.EPERM,
                    f"owned by uid {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}; "
                    f"it must be this user's (uid {os.getuid()}) with mode 0700",
                ),
            )
        removed = _remove_leftovers(root)
        if removed:
            logger.info("upload spool %s: removed %d leftover session(s)", root, removed)
        directory = root / f"{_SESSION_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            directory.mkdir(mode=0o700)
            fd = os.open(directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise _fail("create a session in", root, exc) from exc
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new file: never held by others
        return cls(directory, fd)

    def create(self, total: int) -> SpoolFile:
        """A new file of ``total`` bytes, its space reserved on disk now.

        Raises:
            UploadSpoolError: the spool was closed, or the file cannot be made or
                the space reserved (disk full); nothing is left behind.
        """
        if self._lock_fd is None:
            raise UploadSpoolError(f"upload spool {self.directory} is closed")
        path = self.directory / f"{next(self._names)}{_PART_SUFFIX}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _reserve(fd, total)
            finally:
                os.close(fd)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise _fail("reserve space for an upload in", path, exc) from exc
        return SpoolFile(path, total)

    def files(self) -> list[Path]:
        """The upload files in this session (for checks and tests)."""
        return sorted(self.directory.glob(f"*{_PART_SUFFIX}"))

    def close(self) -> None:
        """Remove this session's directory and files; the spool is unusable after."""
        if self._lock_fd is None:
            return
        shutil.rmtree(self.directory, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None


def _reserve(fd: int, total: int) -> None:
    """Allocate ``total`` bytes for ``fd`` now (a full disk fails here, not mid-upload).

    A filesystem that cannot preallocate gets a sparse file of that size instead.

    Raises:
        OSError: no space, or the file cannot grow.
    """
    if not total:
        return
    try:
        os.posix_fallocate(fd, 0, total)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        os.ftruncate(fd, total)


def _remove_leftovers(root: Path) -> int:
    """Remove the sessions under ``root`` whose owners died; how many."""
    removed = 0
    for session in root.glob(f"{_SESSION_PREFIX}*"):
        try:
            fd = os.open(session / _LOCK, os.O_RDWR)
        except FileNotFoundError:
            continue  # being created right now, or not ours to judge
        except OSError as exc:
            _fail("inspect", session, exc)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live process holds it
        finally:
            os.close(fd)  # releases the lock we may have taken
        shutil.rmtree(session, ignore_errors=True)
        removed += 1
    return removed
