"""Update codecs: compact, strictly decoded encodings of federated model updates.

In a federated round a device trains on the round's global weights and sends back
its *update* ``delta = new_weights - global_weights``, a mapping of tensor name to
float array. A codec turns that mapping into one compact ``bytes`` payload; the
coordinator decodes it knowing the :data:`Layout` (tensor names in order, and
shapes), which it builds from the global weights it sent with :func:`layout_of`.
Both sides use the mapping's **insertion order**, so the coordinator must build the
layout from the same mapping (same order) it sent to the devices.

Codec specs, as typed on the command line (:func:`parse_codec`):

* ``fp32``: every value as little-endian float32 (lossless).
* ``fp16``: every value as float16; values outside the fp16 range (``|x| >= 65520``,
  which would round to infinity) are refused, never silently sent as ``inf``.
* ``int8``: one float32 scale per tensor (``max|x| / 127``) and int8 values with
  *stochastic* rounding, so the decoded update is unbiased: ``E[decoded] == delta``.
* ``topk:D`` (``0 < D <= 1``): only the ``k = max(1, ceil(D * n))`` entries of
  largest magnitude over the whole update (all tensors together, ``n`` parameters)
  are sent, as float32, with their positions. ``D`` is read as the decimal the user
  typed, so ``topk:0.07`` over 100 parameters keeps exactly 7.
* ``topk:D+int8``, ``topk:D+fp16``: top-k selection, then the kept values quantized
  (int8: one scale per tensor over that tensor's kept values).

Top-k uses **error feedback**: what a round does not send is carried into the next.
:func:`encode_update` takes the device's previous residual (or ``None``), selects
the top-k of ``acc = delta + residual`` and returns the new residual
``acc - decoded(payload)`` in :class:`EncodedUpdate`; quantization error of a
composed codec therefore feeds back too. The codec is pure: the caller persists the
residual between rounds (and drops it when the model's layout changes).

Payload format (all integers little-endian)::

    byte 0      PAYLOAD_MAGIC (0xC1: codec payload, format version 1)
    byte 1      codec id: 1 fp32, 2 fp16, 3 int8, 4 topk, 5 topk+fp16, 6 topk+int8
    dense codecs (fp32, fp16, int8):
                the values section for all n values, in layout order
    top-k codecs:
    uint32      k, the number of kept entries
    byte        position coding: 0xFF bitmap, or 0..30 the Rice parameter r
    positions   bitmap: ceil(n / 8) bytes, bit i (LSB first) set iff flat
                position i is kept; padding bits are zero.
                Rice: the sorted positions as gaps g_j = p_j - p_{j-1} - 1
                (p_{-1} = -1), Golomb-Rice coded with parameter r, remainders and
                quotients in two sections: first the k remainders, r bits each
                (LSB first), then the quotients in unary (g >> r zeros, then a
                one); each section is a bit stream packed LSB first and padded
                with zero bits to a whole byte.
    values      the values section for the k kept values, in position order
    values section: fp32: float32 each; fp16: float16 each; int8: one float32
                scale for each tensor that has at least one value in the payload
                (layout order), then the int8 values (-127..127).

Flat positions index the concatenation of the flattened (C order) tensors in layout
order. The encoder codes positions both ways and keeps the shorter (the bitmap wins
for dense ``D``, Rice for sparse ``D``; a tie goes to the bitmap). The Rice
parameter is ``floor(log2(mean gap))`` or a neighbour, whichever codes shortest.

The position codings live in :mod:`compress.codec_positions`, the values sections in
:mod:`compress.codec_values`; this module holds the specs, layouts and the payload.

Decoding is strict and allocation-safe: the payload's length is checked against
:func:`max_payload_bytes` before anything is allocated, every section's length is
checked before it is read, positions must be in range (both position codings can
only express strictly increasing positions), padding bits must be zero, the count
must be the ``k`` the spec implies, scales and values must be finite, and no input
makes :func:`decode_update` raise anything but :class:`CodecError`. Layouts are
limited to :data:`MAX_UPDATE_PARAMS` parameters.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Final, Literal, get_args

import numpy as np
import numpy.typing as npt

from compress.codec_positions import (
    POSITIONS_BITMAP,
    PayloadReader,
    ceil8,
    decode_positions,
    encode_positions,
)
from compress.codec_values import decode_values, encode_values, values_nbytes
from compress.errors import CodecError, NonFiniteUpdateError

__all__ = [
    "MAX_UPDATE_PARAMS",
    "PAYLOAD_MAGIC",
    "VALUE_FORMATS",
    "CodecSpec",
    "EncodedUpdate",
    "Layout",
    "ValueFormat",
    "decode_update",
    "encode_update",
    "kept_entries",
    "layout_of",
    "max_payload_bytes",
    "parse_codec",
    "update_nbytes_fp32",
]

logger = logging.getLogger(__name__)

ValueFormat = Literal["fp32", "fp16", "int8"]
"""How values travel: float32, float16, or int8 with a float32 scale per tensor."""

VALUE_FORMATS: tuple[str, ...] = get_args(ValueFormat)

Layout = tuple[tuple[str, tuple[int, ...]], ...]
"""Tensor names, in order, with their shapes: what a decoder must know."""

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

MAX_UPDATE_PARAMS: Final = 2**28
"""Most parameters a layout may have (1 GiB of float32)."""

MAX_NDIM: Final = 32
"""Most dimensions a tensor of a layout may have."""

PAYLOAD_MAGIC: Final = 0xC1
"""First byte of every payload: a codec payload, format version 1."""

_HEADER = 2
_TOPK_HEADER = _HEADER + 4 + 1
_CODEC_IDS: dict[tuple[bool, str], int] = {
    (False, "fp32"): 1,
    (False, "fp16"): 2,
    (False, "int8"): 3,
    (True, "fp32"): 4,
    (True, "fp16"): 5,
    (True, "int8"): 6,
}
_CODEC_NAMES = {
    1: "fp32",
    2: "fp16",
    3: "int8",
    4: "topk:D",
    5: "topk:D+fp16",
    6: "topk:D+int8",
}
_ACCEPTED = "accepted: fp32, fp16, int8, topk:D, topk:D+int8, topk:D+fp16 with 0 < D <= 1"
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_SPEC_RE = re.compile(rf"(fp32|fp16|int8)|topk:({_NUMBER})(?:\+(int8|fp16))?")
_MAX_SPEC_CHARS = 128


def _value_format(name: str) -> ValueFormat:
    if name == "fp32":
        return "fp32"
    if name == "fp16":
        return "fp16"
    if name == "int8":
        return "int8"
    raise CodecError(f"unknown value format {name!r}; expected one of {', '.join(VALUE_FORMATS)}")


@dataclass(frozen=True)
class CodecSpec:
    """A parsed update codec: how values travel and, for top-k, which fraction.

    ``str(spec)`` is the canonical spec string and :func:`parse_codec` reads it back
    to an equal spec.

    Attributes:
        values: The value format.
        density: For top-k codecs the fraction ``D`` of entries kept
            (``0 < D <= 1``); ``None`` for dense codecs.

    Raises:
        CodecError: On construction, an unknown value format or a density that is
            not a finite number in ``(0, 1]``.
    """

    values: ValueFormat = "fp32"
    density: float | None = None

    def __post_init__(self) -> None:
        values: object = self.values
        if not isinstance(values, str) or values not in VALUE_FORMATS:
            raise CodecError(f"unknown value format {values!r}; {_ACCEPTED}")
        density: object = self.density
        if density is None:
            return
        if isinstance(density, bool) or not isinstance(density, int | float):
            raise CodecError(f"top-k density must be a number, got {density!r}")
        number = float(density)
        if not (math.isfinite(number) and 0.0 < number <= 1.0):
            raise CodecError(f"top-k density must be in (0, 1], got {density!r}")
        object.__setattr__(self, "density", number)

    @property
    def is_topk(self) -> bool:
        """Whether this is a top-k codec (sparse, with error feedback)."""
        return self.density is not None

    def __str__(self) -> str:
        if self.density is None:
            return self.values
        suffix = "" if self.values == "fp32" else f"+{self.values}"
        return f"topk:{self.density!r}{suffix}"


@dataclass(frozen=True)
class EncodedUpdate:
    """The result of :func:`encode_update`.

    Attributes:
        payload: The encoded update.
        residual: For top-k codecs, the new error-feedback residual
            (``acc - decoded(payload)``, float32, same names and shapes as the
            delta) that the caller passes to the next round's encoding; ``None``
            for dense codecs.
    """

    payload: bytes
    residual: dict[str, FloatArray] | None


def parse_codec(spec: str) -> CodecSpec:
    """Parse a codec spec string such as ``int8`` or ``topk:0.01+int8``.

    Raises:
        CodecError: ``spec`` is not one of ``fp32``, ``fp16``, ``int8``,
            ``topk:D``, ``topk:D+int8``, ``topk:D+fp16`` with ``D`` a decimal
            number in ``(0, 1]`` (no spaces, lower case).
    """
    text: object = spec
    if not isinstance(text, str):
        raise CodecError(f"a codec spec must be a string, got {type(text).__name__}")
    if len(text) > _MAX_SPEC_CHARS:
        raise CodecError(f"codec spec too long ({len(text)} characters); {_ACCEPTED}")
    match = _SPEC_RE.fullmatch(text)
    if match is None:
        raise CodecError(f"unknown codec {text!r}; {_ACCEPTED}")
    dense, number, quantizer = match.groups()
    if dense is not None:
        return CodecSpec(values=_value_format(dense))
    density = float(number)
    if not (math.isfinite(density) and 0.0 < density <= 1.0):
        raise CodecError(f"top-k density in {text!r} must be in (0, 1]; {_ACCEPTED}")
    return CodecSpec(values=_value_format(quantizer or "fp32"), density=density)


# --------------------------------------------------------------------------- layouts


def _layout_sizes(layout: object) -> list[int]:
    """Validate a layout and return the number of parameters of each tensor."""
    if not isinstance(layout, tuple):
        raise CodecError(f"a layout must be a tuple, got {type(layout).__name__}")
    seen: set[str] = set()
    sizes: list[int] = []
    total = 0
    for entry in layout:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise CodecError(f"layout entries must be (name, shape) pairs, got {entry!r}")
        name, shape = entry
        if not isinstance(name, str) or name in seen:
            raise CodecError(f"layout names must be distinct strings, got {name!r}")
        seen.add(name)
        if not (
            isinstance(shape, tuple)
            and len(shape) <= MAX_NDIM
            and all(
                isinstance(dim, int) and not isinstance(dim, bool) and 0 <= dim <= MAX_UPDATE_PARAMS
                for dim in shape
            )
        ):
            raise CodecError(f"tensor {name!r}: bad shape {shape!r} in layout")
        size = math.prod(shape)
        total += size
        if total > MAX_UPDATE_PARAMS:
            raise CodecError(f"layout has over {MAX_UPDATE_PARAMS} parameters; refusing it")
        sizes.append(size)
    return sizes


def layout_of(weights: Mapping[str, npt.ArrayLike]) -> Layout:
    """The layout of a weights (or delta) mapping, in the mapping's insertion order.

    Raises:
        CodecError: A name is not a string, a value is not an array, an array has
            too many dimensions, or the total exceeds :data:`MAX_UPDATE_PARAMS`.
    """
    entries: list[tuple[str, tuple[int, ...]]] = []
    for name, value in weights.items():
        key: object = name
        if not isinstance(key, str):
            raise CodecError(f"tensor names must be strings, got {key!r}")
        try:
            shape = np.shape(value)
        except (TypeError, ValueError) as exc:
            raise CodecError(f"tensor {key!r} is not an array: {exc}") from exc
        entries.append((key, tuple(int(dim) for dim in shape)))
    layout = tuple(entries)
    _layout_sizes(layout)
    return layout


def kept_entries(spec: CodecSpec, layout: Layout) -> int:
    """How many values a payload of ``spec`` for ``layout`` carries.

    All parameters for dense codecs; for ``topk:D``, ``k = max(1, ceil(D * n))``
    (at most ``n``; 0 for an empty layout), with ``D`` read as the decimal
    ``str(spec)`` shows.

    Raises:
        CodecError: ``spec`` or ``layout`` is invalid.
    """
    _check_spec(spec)
    return _kept(spec, sum(_layout_sizes(layout)))


def update_nbytes_fp32(layout: Layout) -> int:
    """Bytes of the layout's values as plain float32 (the uncompressed baseline).

    Raises:
        CodecError: ``layout`` is invalid.
    """
    return 4 * sum(_layout_sizes(layout))


def max_payload_bytes(spec: CodecSpec, layout: Layout) -> int:
    """An upper bound on the size of any payload :func:`decode_update` accepts.

    The coordinator refuses larger uploads before buffering or decoding them.

    Raises:
        CodecError: ``spec`` or ``layout`` is invalid.
    """
    _check_spec(spec)
    sizes = _layout_sizes(layout)
    total = sum(sizes)
    tensors = sum(1 for size in sizes if size)
    if not spec.is_topk:
        return _HEADER + values_nbytes(spec.values, total, tensors)
    k = _kept(spec, total)
    return _TOPK_HEADER + ceil8(total) + values_nbytes(spec.values, k, min(k, tensors))


def _check_spec(spec: object) -> CodecSpec:
    if not isinstance(spec, CodecSpec):
        raise CodecError(f"expected a CodecSpec, got {type(spec).__name__}")
    return spec


def _kept(spec: CodecSpec, total: int) -> int:
    if spec.density is None:
        return total
    if total == 0:
        return 0
    wanted = math.ceil(Fraction(repr(spec.density)) * total)
    return min(total, max(1, wanted))


# --------------------------------------------------------------------------- encoding


def encode_update(
    delta: Mapping[str, npt.ArrayLike],
    spec: CodecSpec,
    *,
    rng: np.random.Generator,
    residual: Mapping[str, npt.ArrayLike] | None = None,
) -> EncodedUpdate:
    """Encode a model update into one payload.

    Args:
        delta: Tensor name -> real-valued array (converted to float32). Its
            insertion order is the layout order (see :func:`layout_of`).
        spec: The codec.
        rng: Randomness for int8 stochastic rounding (unused by other codecs).
        residual: Top-k codecs only: the residual returned by the previous round's
            encoding for this device, or ``None`` for the first round. Must have
            the delta's names and shapes.

    Returns:
        The payload and, for top-k codecs, the new residual.

    Raises:
        CodecError: A value is not a finite real number (also after adding the
            residual), fp16 values out of range, a residual given to a dense codec
            or not matching the delta, or a layout over the size limit.
    """
    _check_spec(spec)
    names, arrays = _float32_tensors(delta, "delta")
    layout = tuple((name, array.shape) for name, array in zip(names, arrays, strict=True))
    sizes = _layout_sizes(layout)
    flat = _concat(arrays)
    if spec.density is None:
        if residual is not None:
            raise CodecError(f"codec {spec} has no error feedback; pass residual=None")
        values, _ = encode_values(flat, spec.values, sizes, names, rng)
        payload = bytes((PAYLOAD_MAGIC, _CODEC_IDS[False, spec.values])) + values
        logger.debug("encoded %s update: %d params, %d bytes", spec, flat.size, len(payload))
        return EncodedUpdate(payload=payload, residual=None)
    acc = flat if residual is None else _accumulate(flat, residual, names, arrays)
    payload, decoded = _encode_topk(acc, spec, sizes, names, rng)
    with np.errstate(over="ignore", invalid="ignore"):
        new_residual = acc - decoded
    return EncodedUpdate(payload=payload, residual=_split(new_residual, layout))


def _float32_tensors(
    tensors: Mapping[str, npt.ArrayLike], what: str
) -> tuple[list[str], list[FloatArray]]:
    names: list[str] = []
    arrays: list[FloatArray] = []
    for name, value in tensors.items():
        key: object = name
        if not isinstance(key, str):
            raise CodecError(f"{what}: tensor names must be strings, got {key!r}")
        try:
            raw = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise CodecError(f"{what} {key!r} is not an array: {exc}") from exc
        if raw.dtype.kind not in "fiub":
            raise CodecError(f"{what} {key!r} must hold real numbers, got dtype {raw.dtype}")
        if raw.ndim > MAX_NDIM:
            raise CodecError(f"{what} {key!r} has {raw.ndim} dimensions, at most {MAX_NDIM}")
        with np.errstate(over="ignore", invalid="ignore"):
            array = np.ascontiguousarray(raw, dtype=np.float32)
        if not np.isfinite(array).all():
            raise NonFiniteUpdateError(f"{what} {key!r} contains NaN or infinity (as float32)")
        names.append(key)
        arrays.append(array)
    return names, arrays


def _concat(arrays: Sequence[FloatArray]) -> FloatArray:
    if not arrays:
        return np.zeros(0, np.float32)
    return np.concatenate([array.reshape(-1) for array in arrays])


def _split(flat: FloatArray, layout: Layout) -> dict[str, FloatArray]:
    out: dict[str, FloatArray] = {}
    start = 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = flat[start : start + size].reshape(shape)
        start += size
    return out


def _accumulate(
    flat: FloatArray,
    residual: Mapping[str, npt.ArrayLike],
    names: list[str],
    arrays: list[FloatArray],
) -> FloatArray:
    res_names, res_arrays = _float32_tensors(residual, "residual")
    by_name = dict(zip(res_names, res_arrays, strict=True))
    if set(by_name) != set(names):
        raise CodecError(
            f"residual tensors {sorted(by_name)} do not match the delta's {sorted(names)}"
        )
    for name, array in zip(names, arrays, strict=True):
        if by_name[name].shape != array.shape:
            raise CodecError(
                f"residual {name!r} has shape {by_name[name].shape}, the delta has {array.shape}"
            )
    with np.errstate(over="ignore", invalid="ignore"):
        acc = flat + _concat([by_name[name] for name in names])
    if not np.isfinite(acc).all():
        raise CodecError("delta + residual overflows float32")
    return acc


def _encode_topk(
    acc: FloatArray,
    spec: CodecSpec,
    sizes: list[int],
    names: list[str],
    rng: np.random.Generator,
) -> tuple[bytes, FloatArray]:
    total = acc.size
    k = _kept(spec, total)
    if k == total:
        positions = np.arange(total, dtype=np.int64)
    else:
        chosen = np.argpartition(np.abs(acc), total - k)[total - k :]
        positions = np.sort(chosen).astype(np.int64)
    counts = _counts_per_tensor(positions, sizes)
    kept = acc[positions]
    values, decoded_kept = encode_values(kept, spec.values, counts, names, rng)
    mode, position_bytes = encode_positions(positions, total)
    header = bytes((PAYLOAD_MAGIC, _CODEC_IDS[True, spec.values]))
    payload = header + struct.pack("<IB", k, mode) + position_bytes + values
    decoded = np.zeros(total, np.float32)
    decoded[positions] = decoded_kept
    logger.debug(
        "encoded %s update: %d of %d params, %d bytes (positions %d bytes, %s)",
        spec,
        k,
        total,
        len(payload),
        len(position_bytes),
        "bitmap" if mode == POSITIONS_BITMAP else f"rice r={mode}",
    )
    return payload, decoded


def _counts_per_tensor(positions: IntArray, sizes: list[int]) -> list[int]:
    bounds = np.cumsum(np.asarray([0, *sizes], dtype=np.int64))
    return [int(n) for n in np.diff(np.searchsorted(positions, bounds))]


def decode_update(
    payload: bytes | bytearray, spec: CodecSpec, layout: Layout
) -> dict[str, FloatArray]:
    """Decode a payload made by :func:`encode_update` with ``spec``.

    Args:
        payload: The encoded update (bytes or bytearray).
        spec: The codec the round asked for.
        layout: Names (in order) and shapes of the round's global weights.

    Returns:
        Tensor name -> float32 array of the layout's shape, in layout order, all
        values finite (entries top-k did not send are zero).

    Raises:
        CodecError: For any payload that is not a valid ``spec`` payload for
            ``layout`` (too long, truncated, trailing bytes, wrong magic or codec,
            wrong count, bad position coding or out-of-range positions, non-finite
            scales or values), and for an invalid spec or layout. Nothing else is
            raised for any input.
    """
    _check_spec(spec)
    sizes = _layout_sizes(layout)
    data: object = payload
    if not isinstance(data, bytes | bytearray):
        raise CodecError(f"a payload must be bytes, got {type(data).__name__}")
    _check_header(bytes(data[:_HEADER]), spec)
    limit = max_payload_bytes(spec, layout)
    if len(data) > limit:
        raise CodecError(
            f"payload is {len(data)} bytes, more than the {limit} a {spec} update "
            "of this layout can take"
        )
    reader = PayloadReader(bytes(data))
    reader.take(_HEADER, "header")
    total = sum(sizes)
    if spec.density is None:
        flat = decode_values(reader, spec.values, total, sizes)
    else:
        flat = _decode_topk(reader, spec, total, sizes)
    reader.finish()
    return _split(flat, layout)


def _check_header(header: bytes, spec: CodecSpec) -> None:
    if len(header) < _HEADER:
        raise CodecError(f"payload truncated: {len(header)} bytes, no room for the header")
    magic, codec_id = header
    if magic != PAYLOAD_MAGIC:
        raise CodecError(f"not an update payload (first byte 0x{magic:02x})")
    if codec_id != _CODEC_IDS[spec.is_topk, spec.values]:
        found = _CODEC_NAMES.get(codec_id, f"unknown codec id {codec_id}")
        raise CodecError(f"payload was encoded with {found}, expected {spec}")


def _decode_topk(
    reader: PayloadReader, spec: CodecSpec, total: int, sizes: list[int]
) -> FloatArray:
    k = _kept(spec, total)
    count, mode = struct.unpack("<IB", reader.take(5, "top-k header"))
    if count != k:
        raise CodecError(f"payload holds {count} entries, {spec} over {total} params keeps {k}")
    positions = decode_positions(reader, mode, k, total)
    counts = _counts_per_tensor(positions, sizes)
    values = decode_values(reader, spec.values, k, counts)
    flat = np.zeros(total, np.float32)
    flat[positions] = values
    return flat
