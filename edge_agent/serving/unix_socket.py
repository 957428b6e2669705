"""The local endpoint's Unix socket: owner-only, stale files replaced, removed on stop.

:class:`~edge_agent.serving.http_api.LocalHttpServer` can serve its API on an
``AF_UNIX`` socket (``http_socket`` in the agent's config) instead of, or
besides, TCP. There the file's permission is the access control: only the user
the agent runs as (and root) can connect, and a web page cannot reach it at all,
so the Host check (against DNS rebinding) does not apply; a bearer token, when
configured, is still required.

Workflow (run by the server as it binds and closes)::

    claim_path(path)                        # parent made 0700 if missing; stale file removed
    identity = bind_owner_only(sock, path)  # bind, chmod 0600, then the caller listens
    label = peer_label(connection)          # "unix:uid=1000" for the log lines
    release_path(path, identity)            # at stop: unlink it if it is still ours

Binding and setting the mode happen before ``listen()``, and nobody can connect
to a socket that is not listening, so there is no moment when the file is open
to others. A file left by a crashed agent is replaced when nothing answers on it;
a socket that answers (another agent) or a path that is not a socket is refused
with a :class:`~edge_agent.errors.ConfigError`, logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
from pathlib import Path

from edge_agent.errors import ConfigError

__all__ = [
    "MAX_SOCKET_PATH_BYTES",
    "SOCKET_MODE",
    "bind_owner_only",
    "check_socket_path",
    "claim_path",
    "peer_label",
    "release_path",
]

logger = logging.getLogger(__name__)

SOCKET_MODE = 0o600
"""The socket file's mode: only its owner may connect."""
MAX_SOCKET_PATH_BYTES = 107
"""Longest socket path Linux accepts (``sun_path`` is 108 bytes with its NUL)."""
_UCRED = struct.Struct("3i")  # pid, uid, gid


def _refuse(message: str) -> ConfigError:
    error = ConfigError(message)
    logger.error("%s", error)
    return error


def check_socket_path(path: Path) -> None:
    """Refuse a socket path the kernel cannot bind.

    Raises:
        ConfigError: not a Path, empty, or longer than :data:`MAX_SOCKET_PATH_BYTES`.
    """
    if not isinstance(path, Path) or not str(path):
        raise ConfigError(f"http socket must be a path, got {path!r}")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            f"http socket path {str(path)[:60]!r}... is longer than "
            f"{MAX_SOCKET_PATH_BYTES} bytes; choose a shorter one (e.g. under /run)"
        )


def claim_path(path: Path) -> None:
    """Make ``path`` free to bind: its directory exists, a stale socket is removed.

    Raises:
        ConfigError: the directory cannot be made, the path exists and is not a
            socket, or another process answers on it.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _refuse(f"cannot use http socket {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISSOCK(info.st_mode):
        raise _refuse(f"http socket {path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: a crashed agent's leftover
    except OSError as exc:
        raise _refuse(f"cannot check http socket {path}: {exc.strerror or exc}") from exc
    else:
        raise _refuse(f"http socket {path} is in use by another process")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    logger.info("replaced a stale http socket at %s", path)


def bind_owner_only(sock: socket.socket, path: Path) -> tuple[int, int]:
    """Bind ``sock`` to ``path`` and make the file owner-only (before ``listen``).

    Returns:
        The file's ``(st_dev, st_ino)``, for :func:`release_path`.

    Raises:
        OSError: the bind or chmod failed (the file is removed).
    """
    sock.bind(str(path))
    try:
        os.chmod(path, SOCKET_MODE)
        info = path.lstat()
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return info.st_dev, info.st_ino


def release_path(path: Path, identity: tuple[int, int]) -> None:
    """Remove the socket file if it is still the one bound (not a newer agent's)."""
    try:
        info = path.lstat()
        if (info.st_dev, info.st_ino) == identity:
            path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        logger.warning("could not remove http socket %s: %s", path, exc.strerror or exc)


def peer_label(connection: socket.socket) -> str:
    """``unix:uid=N`` for the connecting process's user (``unix`` if unknown)."""
    try:
        raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except (OSError, AttributeError):
        return "unix"
    _, uid, _ = _UCRED.unpack(raw)
    return f"unix:uid={uid}"
