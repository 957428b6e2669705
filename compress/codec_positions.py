"""Where a top-k update's kept entries are: position coding, and the payload cursor.

:mod:`compress.codecs` sends the positions of a top-k update's kept entries (sorted
flat indices into the update) in whichever of two codings is shorter
(:func:`encode_positions`):

* a **bitmap**: ``ceil(n / 8)`` bytes, bit ``i`` (LSB first) set iff position ``i`` is
  kept; padding bits are zero. Coding byte :data:`POSITIONS_BITMAP`.
* **Rice-coded gaps** ``g_j = p_j - p_{j-1} - 1`` (``p_{-1} = -1``) with parameter
  ``r`` (the coding byte, ``0..``:data:`MAX_RICE_PARAMETER`): first the ``k``
  remainders, ``r`` bits each, then the quotients in unary (``g >> r`` zeros, then a
  one); each section packed LSB first and padded with zero bits to a whole byte.

:func:`decode_positions` reads them back through a :class:`PayloadReader`, a cursor
that never reads past the payload's end, checking every padding bit and range: both
codings can only express strictly increasing positions, and anything else raises
:class:`~compress.errors.CodecError`. Pure functions over bytes and numpy arrays.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from compress.errors import CodecError

__all__ = [
    "MAX_RICE_PARAMETER",
    "POSITIONS_BITMAP",
    "PayloadReader",
    "ceil8",
    "decode_positions",
    "encode_positions",
]

IntArray = npt.NDArray[np.int64]


POSITIONS_BITMAP: Final = 0xFF
"""Position-coding byte of a top-k payload whose positions are a bitmap."""

MAX_RICE_PARAMETER: Final = 30
"""Largest Rice parameter a payload may declare (also bounded by the layout size)."""


def ceil8(bits: int) -> int:
    return -(-bits // 8)


def encode_positions(positions: IntArray, total: int) -> tuple[int, bytes]:
    """Code sorted positions as a bitmap or Rice-coded gaps, whichever is shorter."""
    k = positions.size
    best_mode, best_size = POSITIONS_BITMAP, ceil8(total)
    gaps = np.diff(positions, prepend=-1) - 1
    if k:
        mean = float(gaps.mean())
        center = math.floor(math.log2(mean)) if mean >= 1.0 else 0
        for r in (center - 1, center, center + 1):
            if 0 <= r <= _max_rice(total):
                size = ceil8(k * r) + ceil8(int((gaps >> r).sum()) + k)
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


class PayloadReader:
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


def decode_positions(reader: PayloadReader, mode: int, k: int, total: int) -> IntArray:
    """Read ``k`` strictly increasing positions in ``[0, total)`` coded as ``mode``.

    Raises:
        CodecError: an unknown coding byte, a truncated section, set padding bits,
            a position out of range, or not ``k`` positions.
    """
    if mode == POSITIONS_BITMAP:
        return _decode_bitmap(reader, k, total)
    if mode <= _max_rice(total):
        return _decode_rice(reader, k, total, mode)
    raise CodecError(f"bad position coding byte {mode} (Rice parameter too large)")


def _decode_bitmap(reader: PayloadReader, k: int, total: int) -> IntArray:
    raw = reader.array(ceil8(total), "u1", "position bitmap")
    bits = np.unpackbits(raw, bitorder="little")
    if bits[total:].any():
        raise CodecError("position out of range (bitmap padding bit set)")
    positions = np.flatnonzero(bits).astype(np.int64)
    if positions.size != k:
        raise CodecError(f"position bitmap marks {positions.size} entries, expected {k}")
    return positions


def _decode_rice(reader: PayloadReader, k: int, total: int, r: int) -> IntArray:
    if k == 0:
        return np.zeros(0, np.int64)
    rem_raw = reader.array(ceil8(k * r), "u1", "Rice remainders")
    rem_bits = np.unpackbits(rem_raw, bitorder="little")
    if rem_bits[k * r :].any():
        raise CodecError("Rice remainders: padding bits set")
    weights = np.left_shift(np.int64(1), np.arange(r, dtype=np.int64))
    remainders = rem_bits[: k * r].reshape(k, r).astype(np.int64) @ weights
    # Quotients add up to at most (sum of gaps) >> r <= (total - k) >> r.
    scan = min(reader.remaining, ceil8(k + ((total - k) >> r)))
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
