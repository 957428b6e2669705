"""Strict, allocation-safe ``.npy`` encoding and decoding (numpy only, no pickles).

One ``.npy`` blob is the exact bytes :func:`numpy.save` writes with
``allow_pickle=False``: a preamble (magic, version, header length), a header dict
literal and the raw data. Both places that read arrays someone else wrote use this
module: the wire protocol (``edge_agent.protocol.arrays``: arrays in message bodies)
and :func:`compress.fileio.load_npz` (the members of an ``.npz`` archive a user
points at).

Workflow:

* Writer: :func:`encode_npy` checks the dtype, the dimensions and the size, then
  calls :func:`numpy.save`.
* Reader: :func:`decode_npy` does not use numpy's reader (which ``literal_eval``'s
  the header, allocates whatever shape the header declares and can raise almost
  anything). It parses the header itself, accepting exactly the dict numpy writes
  (``descr``, ``fortran_order``, ``shape``; any key order, optional trailing comma,
  space padding, final newline). Then, BEFORE touching the data, it checks every
  dimension, ``prod(shape) * itemsize`` and the product of the non-zero dimensions
  against the byte limit (so a zero-size array cannot declare a dimension numpy
  cannot represent) and the data length against the blob. The array is then a
  zero-copy view of the blob, frozen read-only (big-endian data is converted to
  native order first, a copy).

Only plain real-number and bool dtypes are accepted (:data:`ALLOWED_DTYPES`:
float16/32/64, int8-64, uint8-64, bool; both byte orders); object, structured,
string, void, complex and datetime dtypes are refused. Values are not inspected.

Like :mod:`compress.strictjson`, every function takes the error class to raise
(``error``) and, for size overruns, optionally a second one (``over``), so each
package keeps its own exception tree. Nothing else escapes for any input.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_HEADER_BYTES",
    "NPY_MAGIC",
    "NUMPY_MAX_NDIM",
    "PREAMBLE_MIN_BYTES",
    "byte_view",
    "decode_npy",
    "encode_npy",
]

NPY_MAGIC = b"\x93NUMPY"
"""The first six bytes of every ``.npy`` file."""

MAX_HEADER_BYTES = 4096
"""Longest ``.npy`` header accepted (numpy writes ~118 bytes for small arrays)."""

PREAMBLE_MIN_BYTES = 10
"""Shortest possible ``.npy`` blob: magic (6), version (2), uint16 header length (2)."""

NUMPY_MAX_NDIM = 64
"""The most dimensions numpy supports."""

_INTP_MAX = int(np.iinfo(np.intp).max)

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

_DTYPE_RULE = "only real numbers and bool (float16-64, int8-64, uint8-64, bool)"

_ITEM_RE = re.compile(
    r"""\s*(?P<kq>['"])(?P<key>[a-z_]{1,16})(?P=kq)\s*:\s*
    (?:(?P<vq>['"])(?P<str>[<>|=]?[A-Za-z][A-Za-z0-9\[\]]{0,15})(?P=vq)
      |(?P<bool>True|False)
      |\((?P<tuple>[0-9,\s]{0,1024})\)
    )\s*""",
    re.VERBOSE,
)
_DIM_RE = re.compile(r"0|[1-9][0-9]{0,18}")
_NPY_KEYS = frozenset({"descr", "fortran_order", "shape"})


def encode_npy(
    array: npt.NDArray[Any],
    error: type[Exception],
    *,
    over: type[Exception] | None = None,
    max_bytes: int,
    max_ndim: int = NUMPY_MAX_NDIM,
) -> bytes:
    """Serialise one array as ``.npy`` bytes (``numpy.save``, no pickle).

    Args:
        array: A numpy array with an allowed dtype.
        error: Raised when the value is not an array or its dtype is not allowed.
        over: Raised for size overruns (default: ``error``).
        max_bytes: Most bytes of array data.
        max_ndim: Most dimensions.

    Returns:
        The ``.npy`` bytes.

    Raises:
        error: Not an ndarray, or its dtype is not allowed.
        over: Too many bytes or dimensions.
    """
    too_large = over or error
    if not isinstance(array, np.ndarray):
        raise error(f"expected a numpy array, got {type(array).__name__}")
    if array.dtype.str not in _DESCRS:
        raise error(f"dtype {array.dtype} is not allowed: {_DTYPE_RULE}")
    _check_shape(array.shape, array.dtype.itemsize, too_large, max_bytes, max_ndim)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(
    blob: bytes | bytearray | memoryview,
    error: type[Exception],
    *,
    over: type[Exception] | None = None,
    max_bytes: int,
    max_ndim: int = NUMPY_MAX_NDIM,
) -> npt.NDArray[Any]:
    """Decode one ``.npy`` blob into a read-only array, strictly.

    Args:
        blob: Exactly one ``.npy`` file's bytes (no trailing data); any contiguous
            buffer.
        error: Raised for every problem except size overruns.
        over: Raised for size overruns (default: ``error``).
        max_bytes: Most bytes of array data; also bounds every single dimension and
            the product of the non-zero dimensions (times the item size).
        max_ndim: Most dimensions.

    Returns:
        A read-only array in native byte order (a view of ``blob`` when it already
        was in native order).

    Raises:
        over: The header, the data, a dimension or the number of dimensions is over
            its limit.
        error: Anything else is wrong with the blob.
    """
    too_large = over or error
    view = byte_view(blob, error)
    if view.nbytes < PREAMBLE_MIN_BYTES or bytes(view[:6]) != NPY_MAGIC:
        raise error("not a .npy file")
    major, minor = view[6], view[7]
    if (major, minor) == (1, 0):
        header_len = int.from_bytes(view[8:10], "little")
        start = 10
    elif (major, minor) in ((2, 0), (3, 0)):
        if view.nbytes < 12:
            raise error("truncated .npy preamble")
        header_len = int.from_bytes(view[8:12], "little")
        start = 12
    else:
        raise error(f"unsupported .npy format version {major}.{minor}")
    if header_len > MAX_HEADER_BYTES:
        raise too_large(f".npy header of {header_len} bytes, limit {MAX_HEADER_BYTES}")
    data_start = start + header_len
    if data_start > view.nbytes:
        raise error(".npy header runs past the end of the blob")
    try:
        header = bytes(view[start:data_start]).decode("utf-8" if major == 3 else "latin-1")
    except UnicodeDecodeError:
        raise error(".npy header is not valid UTF-8") from None
    dtype, fortran_order, shape = _parse_header(header, error)
    nbytes = _check_shape(shape, dtype.itemsize, too_large, max_bytes, max_ndim)
    if nbytes != view.nbytes - data_start:
        raise error(f"array data is {view.nbytes - data_start} bytes, shape and dtype say {nbytes}")
    try:
        flat = np.frombuffer(view, dtype=dtype, count=nbytes // dtype.itemsize, offset=data_start)
        array = flat.reshape(shape, order="F" if fortran_order else "C")
        if not dtype.isnative:
            array = array.astype(dtype.newbyteorder("="))
    except MemoryError:
        raise too_large(f"not enough memory for a {nbytes}-byte array") from None
    except (ValueError, TypeError, OverflowError) as exc:  # unreachable after the checks
        raise error(f"numpy cannot build an array of shape {shape}: {exc}") from None
    array.flags.writeable = False
    return array


def byte_view(data: object, error: type[Exception]) -> memoryview:
    """View any contiguous buffer as flat bytes.

    Args:
        data: ``bytes``, ``bytearray``, a ``memoryview`` of any shape and format...
        error: Raised when ``data`` is not a contiguous buffer.

    Returns:
        A one-dimensional ``memoryview`` of unsigned bytes.

    Raises:
        error: ``data`` does not support the buffer protocol or is not contiguous.
    """
    try:
        view = memoryview(data)  # type: ignore[arg-type]
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
    except (TypeError, ValueError):
        raise error("array data is not a contiguous byte buffer") from None
    return view


def _check_shape(
    shape: tuple[int, ...],
    itemsize: int,
    over: type[Exception],
    max_bytes: int,
    max_ndim: int,
) -> int:
    """Check a shape against the limits before anything is allocated; return nbytes."""
    ndim_limit = min(max_ndim, NUMPY_MAX_NDIM)
    if len(shape) > ndim_limit:
        raise over(f"array has {len(shape)} dimensions, limit {ndim_limit}")
    dim_limit = min(max_bytes, _INTP_MAX)
    for dim in shape:
        if dim > dim_limit:
            raise over(f"array dimension {dim} exceeds the limit {dim_limit}")
    nbytes = math.prod(shape) * itemsize
    if nbytes > max_bytes:
        raise over(f"array has {nbytes} bytes, limit {max_bytes}")
    nominal = math.prod(dim for dim in shape if dim) * itemsize
    if nominal > max_bytes:
        raise over(
            f"zero-size array of shape {shape}: its non-zero dimensions span {nominal} "
            f"bytes, limit {max_bytes}"
        )
    return nbytes


def _parse_header(
    header: str, error: type[Exception]
) -> tuple[np.dtype[Any], bool, tuple[int, ...]]:
    """Parse numpy's header dict literal without evaluating anything."""
    stripped = header.rstrip(" ")
    if not stripped.endswith("\n"):
        raise error(".npy header does not end with a newline")
    text = stripped[:-1].strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise error(".npy header is not a dict")
    body = text[1:-1]
    values: dict[str, str | bool | tuple[int, ...]] = {}
    pos = 0
    while body[pos:].strip():
        match = _ITEM_RE.match(body, pos)
        if match is None:
            raise error(".npy header has an unexpected entry")
        key = match.group("key")
        if key not in _NPY_KEYS:
            raise error(f".npy header has an unknown key {key!r}")
        if key in values:
            raise error(f".npy header repeats {key!r}")
        values[key] = _item_value(match, error)
        pos = match.end()
        if pos == len(body):
            break
        if body[pos] != ",":
            raise error(".npy header entries are not comma-separated")
        pos += 1
    if set(values) != _NPY_KEYS:
        raise error(".npy header must have exactly descr, fortran_order, shape")
    descr, fortran_order, shape = values["descr"], values["fortran_order"], values["shape"]
    if not isinstance(descr, str) or descr not in _DESCRS:
        raise error(f".npy dtype {str(descr)[:20]!r} is not allowed: {_DTYPE_RULE}")
    if not isinstance(fortran_order, bool):
        raise error(".npy fortran_order is not a bool")
    if not isinstance(shape, tuple):
        raise error(".npy shape is not a tuple")
    return _DESCRS[descr], fortran_order, shape


def _item_value(match: re.Match[str], error: type[Exception]) -> str | bool | tuple[int, ...]:
    if match.group("str") is not None:
        return match.group("str")
    if match.group("bool") is not None:
        return match.group("bool") == "True"
    parts = [part.strip() for part in match.group("tuple").split(",")]
    if len(parts) == 1 and parts[0] == "":
        return ()
    if len(parts) == 1:
        raise error(".npy shape (n) is not a tuple; numpy writes (n,)")
    if parts[-1] == "":
        parts.pop()
    if not all(_DIM_RE.fullmatch(part) for part in parts):
        raise error(".npy shape has an invalid dimension")
    return tuple(int(part) for part in parts)
