"""Atomic file writes: a crash leaves either the old file or the new one, never half.

The pattern is python-tuf's ``Updater._persist_metadata``: write to a temporary file
in the destination's directory (same filesystem), flush and ``fsync`` it, set its mode,
then ``os.replace`` it over the destination and ``fsync`` the directory so the rename
itself survives a power cut. Used for keys, artifacts, and (on the agent) every piece
of state.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically with permission bits ``mode``.

    The temporary file is created with ``mode`` from the start, so a private key is
    never readable by others, not even for a moment.

    Raises:
        FileExistsError: ``overwrite`` is false and ``path`` exists.
        OSError: the directory is missing or not writable, or the disk is full.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        if overwrite:
            os.replace(tmp_name, path)
        else:
            # link() fails if the destination appeared meanwhile: no silent clobbering.
            os.link(tmp_name, path)
            os.unlink(tmp_name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Flush a directory entry (the rename) to disk; a no-op where unsupported."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
