"""File I/O shared by every package: atomic writes, bounded reads, safe ``.npz`` loads.

:func:`atomic_write`: a crash leaves either the old file or the new one, never half.
:func:`read_bounded` and :func:`load_npz` read files a user points at (keys, models,
weights, data sets) with a size limit checked before reading and every failure turned
into the caller's own error type, with the path in the message.

The pattern is python-tuf's ``Updater._persist_metadata``: write to a temporary file
in the destination's directory (same filesystem), flush and ``fsync`` it, set its mode,
then ``os.replace`` it over the destination and ``fsync`` the directory so the rename
itself survives a power cut. Used for keys, artifacts, and (on the agent) every piece
of state.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


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


def read_bounded(path: Path, *, max_bytes: int, error: type[Exception], what: str) -> bytes:
    """Read a whole regular file that must not be larger than ``max_bytes``.

    Devices, pipes and ``/proc`` files are refused before they are opened (their size
    says nothing and reading them may never end); the read itself stops one byte past
    the limit, so a file that grows after the check is refused too.

    Raises:
        error: the file is missing, not a regular file, unreadable, or too large; the
            message starts with the path and names ``what`` the file was meant to be.
    """
    path = Path(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise error(f"{path}: is a directory, not a {what}")
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: not a regular file, cannot be a {what}")
        if info.st_size > max_bytes:
            raise error(f"{path}: {info.st_size} bytes is too large for a {what} (max {max_bytes})")
        with path.open("rb") as stream:
            data = stream.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise error(f"{path}: no such {what}") from exc
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise error(f"{path}: too large for a {what} (max {max_bytes} bytes)")
    return data


def load_npz(
    path: Path, *, max_bytes: int, error: type[Exception], what: str
) -> dict[str, npt.NDArray[Any]]:
    """Load every array of an ``.npz`` archive, refusing pickled objects.

    Raises:
        error: missing or oversized file, not an ``.npz`` archive, or unreadable
            arrays (object arrays included, since pickles are refused).
    """
    data = read_bounded(path, max_bytes=max_bytes, error=error, what=what)
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise error(f"{path}: not an .npz archive (save it with numpy.savez)")
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, error):
            raise
        raise error(f"{path}: cannot read {what}: not a readable .npz file ({exc})") from exc
