"""Numeric arrays in a message body, as concatenated ``.npy`` blobs.

Each array travels as the exact bytes :func:`numpy.save` writes with
``allow_pickle=False`` (the bytes Flower's ``ArrayRecord`` carries), and the
blobs of one message are concatenated in order. The header's ``data`` carries the
index that splits them again::

    "arrays": [{"name": "fc1.weight", "length": 4224}, {"name": "fc1.bias", ...}]

Workflow:

* Sender: :func:`encode_arrays` turns ``{name: ndarray}`` into ``(index, body)``;
  :func:`index_to_json` gives the JSON list for the header.
* Receiver: :func:`parse_array_index` checks the JSON list, then
  :func:`decode_arrays` checks that the lengths add up to the body and decodes each
  blob with :func:`decode_npy`.

:func:`encode_npy` and :func:`decode_npy` are the strict, allocation-safe codec of
:mod:`compress.npy` bound to this package's :class:`Limits` and error classes. The
decoder does not use numpy's reader (which ``literal_eval``'s the header and can
raise almost anything). It parses the ``.npy`` header itself, accepting exactly the
dict that numpy writes (``descr``, ``fortran_order``, ``shape``; any key order,
optional trailing comma, space padding, final newline), then checks every single
dimension, ``prod(shape) * itemsize`` (and, for zero-size arrays, the product of the
non-zero dimensions) against ``limits.max_array_bytes`` and the blob's data length
BEFORE touching the data. Only plain numeric and bool dtypes are accepted
(:data:`ALLOWED_DTYPES`: float16/32/64, int8-64, uint8-64, bool; both byte orders);
object, structured, string, void, complex and datetime dtypes are refused. Arrays
come back read-only: native-order arrays are zero-copy views of the body, big-endian
ones are converted to native order (a copy) and then frozen. Call ``.copy()`` to get
a writable array. Values are not inspected (an update may legitimately contain NaN;
judging it is the aggregator's job).

Every failure raises a :class:`~edge_agent.errors.ProtocolError` subclass
(:class:`~edge_agent.errors.MessageTooLargeError` for size limits,
:class:`~edge_agent.errors.MalformedMessageError` otherwise); nothing else escapes
for any input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from compress import npy
from edge_agent.errors import MalformedMessageError, MessageTooLargeError
from edge_agent.protocol.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_NPY_HEADER_BYTES",
    "ArrayEntry",
    "arrays_equal",
    "decode_arrays",
    "decode_npy",
    "encode_arrays",
    "encode_npy",
    "index_to_json",
    "parse_array_index",
]

MAX_NPY_HEADER_BYTES = npy.MAX_HEADER_BYTES
"""Longest ``.npy`` header accepted (numpy writes ~118 bytes for small arrays)."""

ALLOWED_DTYPES = npy.ALLOWED_DTYPES
"""The native-order dtypes an array may have (either byte order is accepted)."""

_NPY_PREAMBLE_MIN = npy.PREAMBLE_MIN_BYTES
_MAX_ENTRY_BYTES_OVERHEAD = 12 + MAX_NPY_HEADER_BYTES
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}")


@dataclass(frozen=True, slots=True)
class ArrayEntry:
    """One entry of an array index.

    Attributes:
        name: The array's name (1-128 of ``[A-Za-z0-9_.:/-]``, not starting with
            ``.``, ``:``, ``/`` or ``-``), unique within its index.
        length: Length in bytes of its ``.npy`` blob.
    """

    name: str
    length: int


def encode_npy(array: npt.NDArray[Any], *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Serialise one array as ``.npy`` bytes (``numpy.save``, no pickle).

    Args:
        array: A numpy array with an allowed dtype.
        limits: Bounds on the array's size and dimensions.

    Returns:
        The ``.npy`` bytes.

    Raises:
        MalformedMessageError: Not an ndarray, or its dtype is not allowed.
        MessageTooLargeError: Too many bytes or dimensions, or a dimension over
            ``limits.max_array_bytes``.
    """
    return npy.encode_npy(array, MalformedMessageError, **_npy_bounds(limits))


def decode_npy(blob: bytes | memoryview, *, limits: Limits = DEFAULT_LIMITS) -> npt.NDArray[Any]:
    """Decode one ``.npy`` blob into a read-only array, strictly.

    Args:
        blob: Exactly one ``.npy`` file's bytes (no trailing data).
        limits: Bounds on the array's size and dimensions.

    Returns:
        A read-only array in native byte order.

    Raises:
        MessageTooLargeError: The header, the data, a single dimension or the number
            of dimensions is over its limit.
        MalformedMessageError: Anything else is wrong with the blob.
    """
    return npy.decode_npy(blob, MalformedMessageError, **_npy_bounds(limits))


def _npy_bounds(limits: Limits) -> dict[str, Any]:
    """The :mod:`compress.npy` keyword arguments for these limits."""
    return {
        "over": MessageTooLargeError,
        "max_bytes": limits.max_array_bytes,
        "max_ndim": limits.max_array_ndim,
    }


def encode_arrays(
    arrays: Mapping[str, npt.NDArray[Any]], *, limits: Limits = DEFAULT_LIMITS
) -> tuple[tuple[ArrayEntry, ...], bytes]:
    """Serialise named arrays into an index and a body.

    Args:
        arrays: Arrays by name, in the order they should travel.
        limits: Bounds on the number and size of arrays.

    Returns:
        ``(index, body)``: the index entries and the concatenated ``.npy`` blobs.

    Raises:
        MalformedMessageError: A name or an array is invalid.
        MessageTooLargeError: Too many arrays, or one is too large.
    """
    if len(arrays) > limits.max_arrays:
        raise MessageTooLargeError(f"{len(arrays)} arrays, limit {limits.max_arrays}")
    index: list[ArrayEntry] = []
    blobs: list[bytes] = []
    for name, array in arrays.items():
        _check_name(name, "array name")
        blob = encode_npy(array, limits=limits)
        index.append(ArrayEntry(name, len(blob)))
        blobs.append(blob)
    return tuple(index), b"".join(blobs)


def decode_arrays(
    index: Sequence[ArrayEntry], body: bytes | memoryview, *, limits: Limits = DEFAULT_LIMITS
) -> dict[str, npt.NDArray[Any]]:
    """Split a body along its index and decode every blob.

    Args:
        index: The entries from :func:`parse_array_index`.
        body: The concatenated blobs.
        limits: Bounds on the number and size of arrays.

    Returns:
        Read-only arrays by name, in index order.

    Raises:
        MessageTooLargeError: Too many arrays, or one is over its limits.
        MalformedMessageError: Lengths do not add up to the body, a name repeats,
            or a blob is invalid.
    """
    if len(index) > limits.max_arrays:
        raise MessageTooLargeError(f"{len(index)} arrays, limit {limits.max_arrays}")
    view = npy.byte_view(body, MalformedMessageError)
    if sum(entry.length for entry in index) != view.nbytes:
        raise MalformedMessageError(
            f"array index lengths do not add up to the {view.nbytes}-byte body"
        )
    result: dict[str, npt.NDArray[Any]] = {}
    offset = 0
    for entry in index:
        if entry.name in result:
            raise MalformedMessageError(f"array name {entry.name!r} repeats")
        if entry.length < 0:
            raise MalformedMessageError("negative array length")
        result[entry.name] = decode_npy(view[offset : offset + entry.length], limits=limits)
        offset += entry.length
    return result


def parse_array_index(value: object, *, limits: Limits = DEFAULT_LIMITS) -> tuple[ArrayEntry, ...]:
    """Check the JSON form of an array index.

    Each entry is an object with ``name`` (str) and ``length`` (int); unknown keys
    in an entry are ignored.

    Args:
        value: The decoded JSON value of ``data.arrays``.
        limits: Bounds on the number and size of arrays.

    Returns:
        The entries.

    Raises:
        MessageTooLargeError: Too many entries, or one declares too many bytes.
        MalformedMessageError: Not a list of well-formed entries, or a name repeats.
    """
    if not isinstance(value, list):
        raise MalformedMessageError("data.arrays must be a list")
    if len(value) > limits.max_arrays:
        raise MessageTooLargeError(f"{len(value)} arrays, limit {limits.max_arrays}")
    entries: list[ArrayEntry] = []
    seen: set[str] = set()
    max_length = limits.max_array_bytes + _MAX_ENTRY_BYTES_OVERHEAD
    for position, item in enumerate(value):
        path = f"data.arrays[{position}]"
        if not isinstance(item, dict):
            raise MalformedMessageError(f"{path} must be an object")
        name = _check_name(item.get("name"), f"{path}.name")
        length = item.get("length")
        if type(length) is not int or length < _NPY_PREAMBLE_MIN:
            raise MalformedMessageError(f"{path}.length must be an int >= {_NPY_PREAMBLE_MIN}")
        if length > max_length:
            raise MessageTooLargeError(f"{path}.length {length} exceeds {max_length}")
        if name in seen:
            raise MalformedMessageError(f"{path}.name {name!r} repeats")
        seen.add(name)
        entries.append(ArrayEntry(name, length))
    return tuple(entries)


def index_to_json(index: Sequence[ArrayEntry]) -> list[dict[str, Any]]:
    """Give the JSON form of an array index (the inverse of :func:`parse_array_index`).

    Args:
        index: The entries.

    Returns:
        A list of ``{"name": ..., "length": ...}`` objects.
    """
    return [{"name": entry.name, "length": entry.length} for entry in index]


def arrays_equal(
    left: Mapping[str, npt.NDArray[Any]] | None, right: Mapping[str, npt.NDArray[Any]] | None
) -> bool:
    """Compare two named-array mappings exactly.

    Equal means: same names in the same order, and per array the same shape, the
    same dtype up to byte order, and the same bytes (so NaN equals an identical NaN
    and ``0.0`` differs from ``-0.0``).

    Args:
        left: Arrays by name, or None.
        right: Arrays by name, or None.

    Returns:
        Whether they are equal (two Nones are equal).
    """
    if left is None or right is None:
        return left is right
    if list(left) != list(right):
        return False
    for name, a in left.items():
        b = right[name]
        if a.shape != b.shape or a.dtype.newbyteorder("=") != b.dtype.newbyteorder("="):
            return False
        native = a.dtype.newbyteorder("=")
        if a.astype(native, copy=False).tobytes() != b.astype(native, copy=False).tobytes():
            return False
    return True


def _check_name(name: object, path: str) -> str:
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise MalformedMessageError(
            f"{path} must be 1-128 of [A-Za-z0-9_.:/-], starting with a letter, digit or _"
        )
    return name
