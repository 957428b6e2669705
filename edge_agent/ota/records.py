"""Flat records of the OTA state files, to and from JSON objects.

The model store's :class:`~edge_agent.ota.model_store.InstalledModel` (an entry of
``state.json``) and the staging area's
:class:`~edge_agent.ota.staging.TransferInfo` (``deploy.json``) are frozen
dataclasses whose fields are all ``str``, ``int`` or ``float``. They share one
codec:

* :func:`record_to_json` gives ``{field: value}`` in field order;
* :func:`record_from_json` builds the record back, converting each value with its
  field's declared type (``str(...)``, ``int(...)``, ``float(...)``); a missing
  key, or a value that does not convert, is a :class:`~edge_agent.errors.StateError`
  whose message starts with the caller's ``what``.

Each caller keeps its own consistency checks (a slot name, chunk sizes) after the
fields parsed. :func:`write_state_file` replaces such a file atomically (mode
0o600), an OS error becoming a :class:`~edge_agent.errors.StateError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_type_hints

from compress.fileio import atomic_write
from edge_agent.errors import StateError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["record_from_json", "record_to_json", "write_state_file"]

R = TypeVar("R", bound="DataclassInstance")

_CONVERTERS: dict[object, Callable[[Any], Any]] = {str: str, int: int, float: float}


def record_to_json(record: DataclassInstance) -> dict[str, Any]:
    """``{field: value}`` of a flat record, in field order."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


def record_from_json(cls: type[R], obj: Any, what: str) -> R:
    """A flat record of type ``cls`` from the JSON object ``obj``.

    Args:
        cls: A dataclass whose fields are all ``str``, ``int`` or ``float``.
        obj: The parsed JSON (anything: a non-object is refused).
        what: The start of the error message, e.g. ``"unreadable deploy.json"``.

    Raises:
        StateError: A field is missing or its value does not convert.
        TypeError: ``cls`` has a field of another type (a programming error).
    """
    hints = get_type_hints(cls)
    converters: dict[str, Callable[[Any], Any]] = {}
    for f in fields(cls):
        converter = _CONVERTERS.get(hints[f.name])
        if converter is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not a str, int or float field")
        converters[f.name] = converter
    try:
        return cls(**{name: convert(obj[name]) for name, convert in converters.items()})
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{what}: {exc}") from exc


def write_state_file(path: Path, data: bytes, *, verb: str) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, rename; 0o600).

    Raises:
        StateError: ``cannot <verb> <path>: <reason>``; the old file stays as it was.
    """
    try:
        atomic_write(path, data, mode=0o600)
    except OSError as exc:
        raise StateError(f"cannot {verb} {path}: {exc}") from exc
