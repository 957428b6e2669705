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
from typing import Any, Final, Literal, get_args

import numpy as np
import numpy.typing as npt

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

POSITIONS_BITMAP: Final = 0xFF
"""Position-coding byte of a top-k payload whose positions are a bitmap."""

MAX_RICE_PARAMETER: Final = 30
"""Largest Rice parameter a payload may declare (also bounded by the layout size)."""

_HEADER = 2
_TOPK_HEADER = _HEADER + 4 + 1
_FP16_OVERFLOW = 65520.0  # the smallest magnitude float16 rounds to infinity
_F32_MAX = float(np.finfo(np.float32).max)
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
        return _HEADER + _values_nbytes(spec.values, total, tensors)
    k = _kept(spec, total)
    return _TOPK_HEADER + _ceil8(total) + _values_nbytes(spec.values, k, min(k, tensors))


def _values_nbytes(values: str, count: int, scales: int) -> int:
    if values == "fp32":
        return 4 * count
    if values == "fp16":
        return 2 * count
    return 4 * scales + count


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


def _ceil8(bits: int) -> int:
    return -(-bits // 8)


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
        values, _ = _encode_values(flat, spec.values, sizes, names, rng)
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
    values, decoded_kept = _encode_values(kept, spec.values, counts, names, rng)
    mode, position_bytes = _encode_positions(positions, total)
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


def _encode_values(
    values: FloatArray,
    fmt: str,
    counts: Sequence[int],
    names: Sequence[str],
    rng: np.random.Generator,
) -> tuple[bytes, FloatArray]:
    """Encode values grouped by tensor; return the bytes and the decoded values."""
    if fmt == "fp32":
        return values.astype("<f4").tobytes(), values
    if fmt == "fp16":
        too_big = np.flatnonzero(np.abs(values) >= _FP16_OVERFLOW)
        if too_big.size:
            index = int(too_big[0])
            tensor = names[int(np.searchsorted(np.cumsum(counts), index, side="right"))]
            raise CodecError(
                f"tensor {tensor!r}: value {float(values[index])!r} is outside the fp16 "
                "range (max 65504); use fp32 or int8"
            )
        half = values.astype("<f2")
        return half.tobytes(), half.astype(np.float32)
    scales: list[np.float32] = []
    quantized = np.empty(values.size, np.int8)
    decoded = np.empty(values.size, np.float32)
    start = 0
    for count in counts:
        if count == 0:
            continue
        part = values[start : start + count]
        scale = _int8_scale(part)
        q = _stochastic_round(part, scale, rng)
        quantized[start : start + count] = q
        decoded[start : start + count] = _dequantize(q, scale)
        scales.append(scale)
        start += count
    scale_bytes = np.asarray(scales, dtype="<f4").tobytes()
    return scale_bytes + quantized.tobytes(), decoded


def _int8_scale(values: FloatArray) -> np.float32:
    """The smallest float32 ``s`` with ``127 * s >= max|values|`` (and finite)."""
    peak = float(np.max(np.abs(values)))
    if peak == 0.0:
        return np.float32(0.0)
    scale = np.float32(peak / 127.0)
    if float(scale) * 127.0 < peak:
        scale = np.float32(np.nextafter(scale, np.float32(np.inf)))
    if float(scale) * 127.0 > _F32_MAX:
        scale = np.float32(np.nextafter(scale, np.float32(0.0)))
    return scale


def _stochastic_round(
    values: FloatArray, scale: np.float32, rng: np.random.Generator
) -> npt.NDArray[np.int8]:
    if scale == 0.0:
        return np.zeros(values.size, np.int8)
    scaled = values.astype(np.float64) / float(scale)
    low = np.floor(scaled)
    up = rng.random(scaled.size) < (scaled - low)
    quantized: npt.NDArray[np.int8] = np.clip(low + up, -127, 127).astype(np.int8)
    return quantized


def _dequantize(q: npt.NDArray[np.int8], scale: np.float32) -> FloatArray:
    out: FloatArray = q.astype(np.float32) * scale
    return out


def _encode_positions(positions: IntArray, total: int) -> tuple[int, bytes]:
    """Code sorted positions as a bitmap or Rice-coded gaps, whichever is shorter."""
    k = positions.size
    best_mode, best_size = POSITIONS_BITMAP, _ceil8(total)
    gaps = np.diff(positions, prepend=-1) - 1
    if k:
        mean = float(gaps.mean())
        center = math.floor(math.log2(mean)) if mean >= 1.0 else 0
        for r in (center - 1, center, center + 1):
            if 0 <= r <= _max_rice(total):
                size = _ceil8(k * r) + _ceil8(int((gaps >> r).sum()) + k)
                if size < best_size:
                    best_mode, best_size = r, size
    if best_mode == POSITIONS_BITMAP:
        bits = np.zeros(best_size * 8, np.uint8)
        bits[positions] = 1
        return best_mode, np.packbits(bits, bitorder="little").tobytes()
    r = best_mode
    remainders = gaps & ((1 << r) - 1)
    rem_bits = (remainders[:, None] >> np.arange(r, dtype=np.int64)) & 1
    rem_bytes = np.packbits(rem_bits.astype(np.uint8).reshape(-1), bitorder="little")
    ends = np.cumsum((gaps >> r) + 1) - 1
    unary = np.zeros(int(ends[-1]) + 1, np.uint8)
    unary[ends] = 1
    unary_bytes = np.packbits(unary, bitorder="little")
    return r, rem_bytes.tobytes() + unary_bytes.tobytes()


def _max_rice(total: int) -> int:
    return min(MAX_RICE_PARAMETER, total.bit_length())


# --------------------------------------------------------------------------- decoding


class _Reader:
    """A cursor over the payload that refuses to read past its end."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self.offset = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self.offset

    def peek(self, size: int) -> memoryview:
        return self._data[self.offset : self.offset + size]

    def take(self, size: int, what: str) -> memoryview:
        if size > self.remaining:
            raise CodecError(f"payload truncated: {what} needs {size} bytes, {self.remaining} left")
        chunk = self._data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def array(self, size: int, dtype: str, what: str) -> npt.NDArray[Any]:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(size * itemsize, what), dtype=dtype)

    def finish(self) -> None:
        if self.remaining:
            raise CodecError(f"payload has {self.remaining} trailing bytes")


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
    reader = _Reader(bytes(data))
    reader.take(_HEADER, "header")
    total = sum(sizes)
    if spec.density is None:
        flat = _decode_values(reader, spec.values, total, sizes)
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


def _decode_topk(reader: _Reader, spec: CodecSpec, total: int, sizes: list[int]) -> FloatArray:
    k = _kept(spec, total)
    count, mode = struct.unpack("<IB", reader.take(5, "top-k header"))
    if count != k:
        raise CodecError(f"payload holds {count} entries, {spec} over {total} params keeps {k}")
    if mode == POSITIONS_BITMAP:
        positions = _decode_bitmap(reader, k, total)
    elif mode <= _max_rice(total):
        positions = _decode_rice(reader, k, total, mode)
    else:
        raise CodecError(f"bad position coding byte {mode} (Rice parameter too large)")
    counts = _counts_per_tensor(positions, sizes)
    values = _decode_values(reader, spec.values, k, counts)
    flat = np.zeros(total, np.float32)
    flat[positions] = values
    return flat


def _decode_bitmap(reader: _Reader, k: int, total: int) -> IntArray:
    raw = reader.array(_ceil8(total), "u1", "position bitmap")
    bits = np.unpackbits(raw, bitorder="little")
    if bits[total:].any():
        raise CodecError("position out of range (bitmap padding bit set)")
    positions = np.flatnonzero(bits).astype(np.int64)
    if positions.size != k:
        raise CodecError(f"position bitmap marks {positions.size} entries, expected {k}")
    return positions


def _decode_rice(reader: _Reader, k: int, total: int, r: int) -> IntArray:
    if k == 0:
        return np.zeros(0, np.int64)
    rem_raw = reader.array(_ceil8(k * r), "u1", "Rice remainders")
    rem_bits = np.unpackbits(rem_raw, bitorder="little")
    if rem_bits[k * r :].any():
        raise CodecError("Rice remainders: padding bits set")
    weights = np.left_shift(np.int64(1), np.arange(r, dtype=np.int64))
    remainders = rem_bits[: k * r].reshape(k, r).astype(np.int64) @ weights
    # Quotients add up to at most (sum of gaps) >> r <= (total - k) >> r.
    scan = min(reader.remaining, _ceil8(k + ((total - k) >> r)))
    unary = np.unpackbits(np.frombuffer(reader.peek(scan), dtype=np.uint8), bitorder="little")
    ones = np.flatnonzero(unary)[:k]
    if ones.size < k:
        raise CodecError("Rice quotients truncated or out of range")
    last = int(ones[-1])
    used = last // 8 + 1
    if unary[last + 1 : used * 8].any():
        raise CodecError("Rice quotients: padding bits set")
    reader.take(used, "Rice quotients")
    ends = ones.astype(np.int64)
    quotients: IntArray = ends - np.concatenate((np.array([-1], np.int64), ends[:-1])) - 1
    if int(quotients.max()) > (total >> r):
        raise CodecError("position out of range (Rice gap too large)")
    positions = np.cumsum(((quotients << r) | remainders) + 1) - 1
    if int(positions[-1]) >= total:
        raise CodecError(f"position {int(positions[-1])} out of range (update has {total})")
    return positions


def _decode_values(reader: _Reader, fmt: str, count: int, counts: Sequence[int]) -> FloatArray:
    """Read ``count`` values grouped by tensor (``counts``); check they are finite."""
    if fmt == "fp32":
        values = reader.array(count, "<f4", "fp32 values").astype(np.float32)
    elif fmt == "fp16":
        values = reader.array(count, "<f2", "fp16 values").astype(np.float32)
    else:
        values = _decode_int8(reader, count, counts)
    if not np.isfinite(values).all():
        raise NonFiniteUpdateError("payload values contain NaN or infinity")
    out: FloatArray = values
    return out


def _decode_int8(reader: _Reader, count: int, counts: Sequence[int]) -> FloatArray:
    nonempty = [n for n in counts if n]
    scales = reader.array(len(nonempty), "<f4", "int8 scales").astype(np.float32)
    if not np.isfinite(scales).all():
        raise NonFiniteUpdateError("int8 scales must be finite")
    if not (scales >= 0).all():
        raise CodecError("int8 scales must be non-negative")
    if scales.size and float(scales.max()) * 127.0 > _F32_MAX:
        raise CodecError("int8 scale too large (127 * scale overflows float32)")
    quantized = reader.array(count, "i1", "int8 values")
    if (quantized == -128).any():
        raise CodecError("int8 value -128 is out of range (-127..127)")
    values = np.empty(count, np.float32)
    start = 0
    for n, scale in zip(nonempty, scales, strict=True):
        values[start : start + n] = _dequantize(quantized[start : start + n], scale)
        start += n
    return values
