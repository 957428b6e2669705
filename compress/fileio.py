"""File I/O shared by every package: atomic writes, bounded reads, safe ``.npz`` loads.

:func:`atomic_write`: a crash leaves either the old file or the new one, never half.
:func:`read_bounded` and :func:`load_npz` read files a user points at (keys, models,
weights, data sets) with a size limit checked before reading and every failure turned
into the caller's own error type, with the path in the message. :func:`load_npz` also
bounds what the archive unpacks to and decodes each array with the strict
:mod:`compress.npy` reader instead of numpy's, which trusts the declared shapes.

The pattern is python-tuf's ``Updater._persist_metadata``: write to a temporary file
in the destination's directory (same filesystem), flush and ``fsync`` it, set its mode,
then ``os.replace`` it over the destination and ``fsync`` the directory so the rename
itself survives a power cut. Used for keys, artifacts, and (on the agent) every piece
of state.
"""

from __future__ import annotations

import contextlib
import io
import lzma
import os
import stat
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy.typing as npt

from compress import npy
from compress.errors import one_line


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
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
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


def open_regular(path: Path, *, error: type[Exception], what: str) -> tuple[BinaryIO, int]:
    """Open a regular file for reading; return the stream and the file's size.

    Devices, pipes and ``/proc`` files are refused before they are opened: their size
    says nothing, opening a pipe blocks, and reading them may never end.

    Raises:
        error: the file is missing, a directory, not a regular file, or unreadable; the
            message starts with the path and names ``what`` the file was meant to be.
    """
    path = Path(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise error(f"{path}: is a directory, not a {what}")
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: not a regular file, cannot be a {what}")
        return path.open("rb"), info.st_size
    except FileNotFoundError as exc:
        raise error(f"{path}: no such {what}") from exc
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc


def read_bounded(path: Path, *, max_bytes: int, error: type[Exception], what: str) -> bytes:
    """Read a whole regular file (see :func:`open_regular`) of at most ``max_bytes``.

    The read stops one byte past the limit, so a file that grows after the size
    check is refused too.

    Raises:
        error: as :func:`open_regular`, or the file is too large.
    """
    stream, size = open_regular(path, error=error, what=what)
    with stream:
        if size > max_bytes:
            raise error(f"{path}: {size} bytes is too large for a {what} (max {max_bytes})")
        try:
            data = stream.read(max_bytes + 1)
        except OSError as exc:
            raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise error(f"{path}: too large for a {what} (max {max_bytes} bytes)")
    return data


def load_npz(
    path: Path, *, max_bytes: int, error: type[Exception], what: str
) -> dict[str, npt.NDArray[Any]]:
    """Load every array of an ``.npz`` archive without trusting its headers.

    ``max_bytes`` bounds the file and, separately, the arrays it unpacks to: each
    member's declared uncompressed size is checked before it is read, the running
    total of all members may not exceed ``max_bytes`` either, and a member is read
    at most one byte past what is left, so neither a zip bomb nor a lying size
    field can inflate past the limit. Each member must be ``NAME.npy`` and is
    decoded with :func:`compress.npy.decode_npy` (real-number and bool dtypes only,
    the declared shape checked against the bytes actually present before anything
    is allocated; pickles are never involved).

    Args:
        path: The ``.npz`` file (as written by ``numpy.savez`` or
            ``numpy.savez_compressed``).
        max_bytes: Most bytes of the file, and of all its arrays together.
        error: The exception class to raise.
        what: What the file is meant to be (``"weights file"``), for messages.

    Returns:
        Writable arrays (copies), by member name without ``.npy``, in archive order.

    Raises:
        error: missing, oversized or unreadable file, not an ``.npz`` archive, a
            member that is not ``.npy`` or is too large once unpacked, or an array
            that is malformed or has a refused dtype (object arrays included). The
            message is one line naming the path and ``what``.
    """
    data = read_bounded(path, max_bytes=max_bytes, error=error, what=what)
    if data.startswith(npy.NPY_MAGIC):
        raise error(f"{path}: not an .npz archive (save it with numpy.savez)")
    try:
        return _unpack_npz(data, max_bytes)
    except _NpzError as exc:
        raise error(f"{path}: cannot read {what}: {exc}") from exc
    except _ZIP_ERRORS as exc:
        raise error(
            f"{path}: cannot read {what}: not a readable .npz file ({one_line(exc, limit=200)})"
        ) from exc


class _NpzError(Exception):
    """A problem :func:`load_npz` found itself (translated to the caller's error)."""


# What zipfile and its decompressors raise for damaged or hostile archives.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    OSError,
    EOFError,
    ValueError,
    RuntimeError,  # encrypted members; NotImplementedError: unknown compression
    MemoryError,
    OverflowError,
    struct.error,
)


def _unpack_npz(data: bytes, max_bytes: int) -> dict[str, npt.NDArray[Any]]:
    """Decode every member of an in-memory ``.npz``; see :func:`load_npz`."""
    arrays: dict[str, npt.NDArray[Any]] = {}
    total = 0
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name = info.filename
            if not name.endswith(".npy") or name == ".npy" or info.is_dir():
                raise _NpzError(f"member {name[:80]!r} is not an .npy array")
            key = name.removesuffix(".npy")
            if key in arrays:
                raise _NpzError(f"member {name[:80]!r} appears twice")
            left = max_bytes - total
            if info.file_size > left:
                raise _NpzError(
                    f"member {name[:80]!r} unpacks to {info.file_size} bytes, "
                    f"more than the {left} left of the {max_bytes}-byte limit"
                )
            with archive.open(info) as member:
                blob = member.read(left + 1)
            if len(blob) > left:
                raise _NpzError(
                    f"member {name[:80]!r} unpacks to more than its declared size, "
                    f"past the {max_bytes}-byte limit"
                )
            total += len(blob)
            try:
                array = npy.decode_npy(blob, _NpzError, max_bytes=left)
            except _NpzError as exc:
                raise _NpzError(f"member {name[:80]!r}: {exc}") from exc
            arrays[key] = array.copy(order="K")
    return arrays
