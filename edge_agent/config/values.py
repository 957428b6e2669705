"""Typed readers for values read from a TOML config file.

A TOML file gives back plain Python values of whatever type the user wrote; these
functions turn one of them into the type a config field needs, or say exactly what is
wrong with it. The agent's config (:mod:`edge_agent.config.agent`) and the coordinator's
service config use the same readers, so both read and word their files alike.

Workflow:

1. The schema machinery (:mod:`edge_agent.config.schema`) flattens the file (and the
   command-line overrides) into dotted keys such as ``broker.keepalive_s`` or
   ``trust.keys[0]``, reading paths with :func:`to_path` and arrays with
   :func:`to_array`.
2. The config dataclasses check each field with the matching reader, given the key
   and the value: :func:`want_int`, :func:`want_seconds`, :func:`want_str`,
   :func:`want_optional_path`; the config builders call :func:`read_password` for
   ``broker.password_file``.
3. A reader returns the checked (sometimes converted) value, or raises
   :class:`FieldError`: a :class:`~edge_agent.errors.ConfigError` whose one-line
   message names the key and whose :attr:`FieldError.key` holds it, so the caller
   can prefix the file or the flag the value came from. (:func:`read_password`
   takes that prefix as an argument and raises a plain ``ConfigError``.)

Messages describe a wrong value by its TOML type (:func:`kind_of`: "a string", "an
integer") rather than echoing it, because a value may be a secret. Only values that
cannot be secret are shown: out-of-range numbers, and strings with control characters
when the caller did not mark them ``secret``. A password file's contents never are.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

from compress.fileio import read_bounded
from edge_agent.errors import ConfigError

__all__ = [
    "MAX_PASSWORD_FILE_BYTES",
    "MIN_TOKEN_CHARS",
    "FieldError",
    "kind_of",
    "read_password",
    "to_array",
    "to_path",
    "want_int",
    "want_optional_path",
    "want_seconds",
    "want_str",
    "want_token",
]

MAX_PASSWORD_FILE_BYTES = 4096
"""Largest ``broker.password_file`` :func:`read_password` reads."""


MIN_TOKEN_CHARS = 16
"""Shortest bearer token :func:`want_token` accepts (``openssl rand -hex 32`` gives 64)."""

# RFC 6750 b64token: what may follow "Bearer " in an Authorization header.
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")


class FieldError(ConfigError):
    """A :class:`ConfigError` about one dotted key, so callers can say where it came from.

    Args:
        key: The dotted key (``broker.port``, ``trust.keys[0]``).
        message: The one-line message; it names the key too.

    Attributes:
        key: The dotted key the message is about.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


_KINDS: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (bool, "a boolean"),  # before int: bool is a subclass of int
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    ((list, tuple), "an array"),
    (Mapping, "a table"),
)


def kind_of(value: object) -> str:
    """A value's type in TOML words, for messages (never the value: it may be secret).

    Args:
        value: Any value.

    Returns:
        ``"a boolean"``, ``"an integer"``, ``"a float"``, ``"a string"``,
        ``"an array"``, ``"a table"``, or the Python type's name for anything else.
    """
    for kind, words in _KINDS:
        if isinstance(value, kind):
            return words
    return type(value).__name__


def want_int(key: str, value: object, *, low: int, high: int | None = None) -> int:
    """An integer in ``[low, high]`` (``high`` None: no upper bound); not a boolean.

    Args:
        key: The dotted key, for the message.
        value: The value to check.
        low: Smallest value accepted.
        high: Largest value accepted, or None.

    Returns:
        The value.

    Raises:
        FieldError: not an integer (``true`` and ``16.0`` are not), or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(key, f"{key} must be an integer, got {kind_of(value)}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise FieldError(key, f"{key} must be {bounds}, got {value}")
    return value


def want_seconds(key: str, value: object) -> float:
    """A positive, finite number of seconds (an integer is fine, a boolean is not).

    Args:
        key: The dotted key, for the message.
        value: The value to check.

    Returns:
        The value as a float.

    Raises:
        FieldError: not a number, or not finite and > 0.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FieldError(key, f"{key} must be a number of seconds, got {kind_of(value)}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise FieldError(key, f"{key} must be a finite number > 0, got {value}")
    return seconds


def want_str(key: str, value: object, *, secret: bool = False) -> str:
    """A non-empty string without control characters (any characters when ``secret``).

    Args:
        key: The dotted key, for the message.
        value: The value to check.
        secret: The value is a secret (a password): control characters are allowed,
            and no message shows any of it.

    Returns:
        The value.

    Raises:
        FieldError: not a string, empty, or (unless ``secret``) holding control
            characters.
    """
    if not isinstance(value, str):
        raise FieldError(key, f"{key} must be a string, got {kind_of(value)}")
    if not value:
        raise FieldError(key, f"{key} must not be empty")
    if not secret and any(ord(c) < 32 or c == "\x7f" for c in value):
        raise FieldError(key, f"{key} contains control characters: {value[:80]!r}")
    return value


def want_token(key: str, value: object) -> str:
    """A bearer token: at least :data:`MIN_TOKEN_CHARS` of RFC 6750's ``A-Za-z0-9._~+/-``.

    Messages never show the token.

    Raises:
        FieldError: not a string, too short, or holding other characters (spaces,
            quotes, non-ASCII: what an ``Authorization`` header cannot carry as is).
    """
    if not isinstance(value, str):
        raise FieldError(key, f"{key} must be a string, got {kind_of(value)}")
    if len(value) < MIN_TOKEN_CHARS or _TOKEN_RE.fullmatch(value) is None:
        raise FieldError(
            key,
            f"{key}: the token must be at least {MIN_TOKEN_CHARS} characters of "
            "A-Za-z0-9._~+/- (e.g. the output of `openssl rand -hex 32`)",
        )
    return value


def want_optional_path(key: str, value: object) -> Path | None:
    """A :class:`~pathlib.Path` or None (a field already resolved by :func:`to_path`).

    Args:
        key: The dotted key, for the message.
        value: The value to check.

    Returns:
        The value.

    Raises:
        FieldError: neither a Path nor None.
    """
    if value is not None and not isinstance(value, Path):
        raise FieldError(key, f"{key} must be a Path, got {kind_of(value)}")
    return value


def to_path(key: str, value: object, base: Path) -> Path:
    """A path string (or ``os.PathLike``) as an absolute Path, relative ones under ``base``.

    Args:
        key: The dotted key, for the message.
        value: The value from the file or a flag.
        base: Directory relative paths are relative to (the config file's directory
            for values from the file, the working directory for flags).

    Returns:
        The absolute path (not resolved: symbolic links are kept).

    Raises:
        FieldError: not a path string, empty, or holding a NUL character.
    """
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        if not isinstance(text, str) or not text or "\x00" in text:
            raise FieldError(key, f"{key} must be a non-empty path")
        path = Path(text)
        return path if path.is_absolute() else (base / path).absolute()
    raise FieldError(key, f"{key} must be a path string, got {kind_of(value)}")


def to_array(key: str, value: object) -> list[object]:
    """A TOML array (a list or tuple) as a list; its items are not checked.

    Args:
        key: The dotted key, for the message.
        value: The value to check.

    Returns:
        A new list of the items.

    Raises:
        FieldError: not a list or tuple.
    """
    if not isinstance(value, list | tuple):
        raise FieldError(key, f"{key} must be an array, got {kind_of(value)}")
    return list(value)


def read_password(path: Path, where: str, key: str = "broker.password_file") -> str:
    """The secret in a password or token file, stripped of surrounding whitespace.

    The file must be a regular file of at most :data:`MAX_PASSWORD_FILE_BYTES`.
    Messages name the key and the file, never the contents.

    Args:
        path: The password file.
        where: Prefix of every message, naming where the key came from (such as
            ``"agent.toml: "``), or ``""``.
        key: The dotted key that named the file (``broker.password_file``,
            ``http_token_file``), for messages.

    Returns:
        The secret, non-empty.

    Raises:
        ConfigError: the file is missing, not a regular file, unreadable, too large,
            not UTF-8, or empty (whitespace only); the message starts with
            ``where`` and ``key``.
    """
    try:
        data = read_bounded(
            path,
            max_bytes=MAX_PASSWORD_FILE_BYTES,
            error=ConfigError,
            what=key.rpartition(".")[2].replace("_", " "),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}{key}: {exc}") from None
    try:
        password = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}{key}: {path}: not UTF-8 text") from None
    if not password:
        raise ConfigError(f"{where}{key}: {path} is empty")
    return password
