"""How an update's values travel: the values section of a codec payload.

:mod:`compress.codecs` sends values in one of three formats, grouped by tensor in
layout order (``counts`` values of each tensor, tensors with none skipped):

* ``fp32``: little-endian float32 each (lossless);
* ``fp16``: float16 each; a value that would round to infinity (``|x| >= 65520``) is
  refused, never sent as ``inf``;
* ``int8``: one float32 scale per tensor with values (the smallest ``s`` with
  ``127 * s >= max|x|``), then int8 values in ``-127..127`` rounded
  *stochastically*, so the decoded values are unbiased.

:func:`encode_values` returns the bytes and the values a decoder will see (so the
caller's error feedback includes the quantization error); :func:`decode_values` reads
them back strictly through a :class:`~compress.codec_positions.PayloadReader`: finite
scales and values, no ``-128``, no scale whose ``127 * s`` overflows float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from compress.codec_positions import PayloadReader
from compress.errors import CodecError, NonFiniteUpdateError

__all__ = ["decode_values", "encode_values", "values_nbytes"]

FloatArray = npt.NDArray[np.float32]

_FP16_OVERFLOW = 65520.0  # the smallest magnitude float16 rounds to infinity
_F32_MAX = float(np.finfo(np.float32).max)


def values_nbytes(values: str, count: int, scales: int) -> int:
    """Bytes of a values section: ``count`` values, ``scales`` int8 scales."""
    if values == "fp32":
        return 4 * count
    if values == "fp16":
        return 2 * count
    return 4 * scales + count


def encode_values(
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


# --------------------------------------------------------------------------- decoding


def decode_values(reader: PayloadReader, fmt: str, count: int, counts: Sequence[int]) -> FloatArray:
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


def _decode_int8(reader: PayloadReader, count: int, counts: Sequence[int]) -> FloatArray:
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
