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

:func:`decode_npy` does not use numpy's reader (which ``literal_eval``'s the
header and can raise almost anything). It parses the ``.npy`` header itself,
accepting exactly the dict that numpy writes (``descr``, ``fortran_order``,
``shape``; any key order, optional trailing comma, space padding, final newline),
then checks ``prod(shape) * itemsize`` against the blob's data length and
``limits.max_array_bytes`` BEFORE touching the data. Only plain numeric and bool
dtypes are accepted (:data:`ALLOWED_DTYPES`: float16/32/64, int8-64, uint8-64,
bool; both byte orders); object, structured, string, void, complex and datetime
dtypes are refused. Arrays come back read-only: native-order arrays are zero-copy
views of the body, big-endian ones are converted to native order (a copy) and
then frozen. Call ``.copy()`` to get a writable array. Values are not inspected
(an update may legitimately contain NaN; judging it is the aggregator's job).

Every failure raises a :class:`~edge_agent.errors.ProtocolError` subclass
(:class:`~edge_agent.errors.MessageTooLargeError` for size limits,
:class:`~edge_agent.errors.MalformedMessageError` otherwise); nothing else escapes
for any input.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

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

NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER_BYTES = 4096
"""Longest ``.npy`` header accepted (numpy writes ~118 bytes for small arrays)."""

_NPY_PREAMBLE_MIN = 10  # magic (6) + version (2) + uint16 header length (2)
_MAX_ENTRY_BYTES_OVERHEAD = 12 + MAX_NPY_HEADER_BYTES

_CODES = ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1")
_DESCRS: dict[str, np.dtype[Any]] = {}
for _code in _CODES:
    if _code.endswith("1"):
        _DESCRS["|" + _code] = np.dtype(_code)
    else:
        _DESCRS["<" + _code] = np.dtype("<" + _code)
        _DESCRS[">" + _code] = np.dtype(">" + _code)

ALLOWED_DTYPES: frozenset[np.dtype[Any]] = frozenset(np.dtype(code) for code in _CODES)
"""The native-order dtypes an array may have (either byte order is accepted)."""

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}")
_ITEM_RE = re.compile(
    r"""\s*(?P<kq>['"])(?P<key>[a-z_]{1,16})(?P=kq)\s*:\s*
    (?:(?P<vq>['"])(?P<str>[<>|=]?[a-z][0-9]{1,2})(?P=vq)
      |(?P<bool>True|False)
      |\((?P<tuple>[0-9,\s]{0,1024})\)
    )\s*""",
    re.VERBOSE,
)
_DIM_RE = re.compile(r"0|[1-9][0-9]{0,18}")
_NPY_KEYS = frozenset({"descr", "fortran_order", "shape"})


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
        MessageTooLargeError: Too many bytes or dimensions.
    """
    if not isinstance(array, np.ndarray):
        raise MalformedMessageError(f"expected a numpy array, got {type(array).__name__}")
    if array.dtype.str not in _DESCRS:
        raise MalformedMessageError(f"dtype {array.dtype} is not allowed on the wire")
    if array.ndim > limits.max_array_ndim:
        raise MessageTooLargeError(
            f"array has {array.ndim} dimensions, limit {limits.max_array_ndim}"
        )
    if array.nbytes > limits.max_array_bytes:
        raise MessageTooLargeError(
            f"array has {array.nbytes} bytes, limit {limits.max_array_bytes}"
        )
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(blob: bytes | memoryview, *, limits: Limits = DEFAULT_LIMITS) -> npt.NDArray[Any]:
    """Decode one ``.npy`` blob into a read-only array, strictly.

    Args:
        blob: Exactly one ``.npy`` file's bytes (no trailing data).
        limits: Bounds on the array's size and dimensions.

    Returns:
        A read-only array in native byte order.

    Raises:
        MessageTooLargeError: The header, the data or the number of dimensions is
            over its limit.
        MalformedMessageError: Anything else is wrong with the blob.
    """
    view = _byte_view(blob)
    if view.nbytes < _NPY_PREAMBLE_MIN or bytes(view[:6]) != NPY_MAGIC:
        raise MalformedMessageError("array blob is not a .npy file")
    major, minor = view[6], view[7]
    if (major, minor) == (1, 0):
        header_len = int.from_bytes(view[8:10], "little")
        start = 10
    elif (major, minor) in ((2, 0), (3, 0)):
        if view.nbytes < 12:
            raise MalformedMessageError("truncated .npy preamble")
        header_len = int.from_bytes(view[8:12], "little")
        start = 12
    else:
        raise MalformedMessageError(f"unsupported .npy format version {major}.{minor}")
    if header_len > MAX_NPY_HEADER_BYTES:
        raise MessageTooLargeError(
            f".npy header of {header_len} bytes, limit {MAX_NPY_HEADER_BYTES}"
        )
    data_start = start + header_len
    if data_start > view.nbytes:
        raise MalformedMessageError(".npy header runs past the end of the blob")
    try:
        header = bytes(view[start:data_start]).decode("utf-8" if major == 3 else "latin-1")
    except UnicodeDecodeError:
        raise MalformedMessageError(".npy header is not valid UTF-8") from None
    dtype, fortran_order, shape = _parse_npy_header(header)
    if len(shape) > limits.max_array_ndim:
        raise MessageTooLargeError(
            f"array has {len(shape)} dimensions, limit {limits.max_array_ndim}"
        )
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes > limits.max_array_bytes:
        raise MessageTooLargeError(f"array has {nbytes} bytes, limit {limits.max_array_bytes}")
    if nbytes != view.nbytes - data_start:
        raise MalformedMessageError(
            f"array data is {view.nbytes - data_start} bytes, shape and dtype say {nbytes}"
        )
    flat = np.frombuffer(view, dtype=dtype, count=count, offset=data_start)
    array = flat.reshape(shape, order="F" if fortran_order else "C")
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    array.flags.writeable = False
    return array


def _parse_npy_header(header: str) -> tuple[np.dtype[Any], bool, tuple[int, ...]]:
    """Parse numpy's header dict literal without evaluating anything."""
    stripped = header.rstrip(" ")
    if not stripped.endswith("\n"):
        raise MalformedMessageError(".npy header does not end with a newline")
    text = stripped[:-1].strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise MalformedMessageError(".npy header is not a dict")
    body = text[1:-1]
    values: dict[str, str | bool | tuple[int, ...]] = {}
    pos = 0
    while True:
        if not body[pos:].strip():
            break
        match = _ITEM_RE.match(body, pos)
        if match is None:
            raise MalformedMessageError(".npy header has an unexpected entry")
        key = match.group("key")
        if key not in _NPY_KEYS:
            raise MalformedMessageError(f".npy header has an unknown key {key!r}")
        if key in values:
            raise MalformedMessageError(f".npy header repeats {key!r}")
        values[key] = _item_value(match)
        pos = match.end()
        if pos == len(body):
            break
        if body[pos] != ",":
            raise MalformedMessageError(".npy header entries are not comma-separated")
        pos += 1
    return _npy_header_values(values)


def _npy_header_values(
    values: dict[str, str | bool | tuple[int, ...]],
) -> tuple[np.dtype[Any], bool, tuple[int, ...]]:
    """Check the parsed header entries' presence and types."""
    if set(values) != _NPY_KEYS:
        raise MalformedMessageError(".npy header must have exactly descr, fortran_order, shape")
    descr, fortran_order, shape = values["descr"], values["fortran_order"], values["shape"]
    if not isinstance(descr, str) or descr not in _DESCRS:
        raise MalformedMessageError(f".npy dtype {str(descr)[:20]!r} is not allowed")
    if not isinstance(fortran_order, bool):
        raise MalformedMessageError(".npy fortran_order is not a bool")
    if not isinstance(shape, tuple):
        raise MalformedMessageError(".npy shape is not a tuple")
    return _DESCRS[descr], fortran_order, shape


def _item_value(match: re.Match[str]) -> str | bool | tuple[int, ...]:
    if match.group("str") is not None:
        return match.group("str")
    if match.group("bool") is not None:
        return match.group("bool") == "True"
    parts = [part.strip() for part in match.group("tuple").split(",")]
    if len(parts) == 1 and parts[0] == "":
        return ()
    if len(parts) == 1:
        raise MalformedMessageError(".npy shape (n) is not a tuple; numpy writes (n,)")
    if parts[-1] == "":
        parts.pop()
    if not all(_DIM_RE.fullmatch(part) for part in parts):
        raise MalformedMessageError(".npy shape has an invalid dimension")
    return tuple(int(part) for part in parts)


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
    view = _byte_view(body)
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


def _byte_view(data: object) -> memoryview:
    """View any contiguous buffer as flat bytes, or raise MalformedMessageError."""
    try:
        view = memoryview(data)  # type: ignore[arg-type]
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
    except (TypeError, ValueError):
        raise MalformedMessageError("array data is not a contiguous byte buffer") from None
    return view


def _check_name(name: object, path: str) -> str:
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise MalformedMessageError(
            f"{path} must be 1-128 of [A-Za-z0-9_.:/-], starting with a letter, digit or _"
        )
    return name
