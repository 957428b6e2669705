"""Tests for the strict .npy codec (compress.npy) with caller-chosen error classes.

The protocol-level behaviour (every header variant, every refused dtype) is covered
through ``edge_agent.protocol`` in ``test_protocol_arrays.py``; here: the error-class
parameters, the limits, and the zero-size-array corner that numpy itself refuses.
"""

from __future__ import annotations

import contextlib
import io
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from compress import npy


class MalformedError(Exception):
    """Stands in for a package's "malformed" error."""


class TooLargeError(Exception):
    """Stands in for a package's "too large" error."""


LIMIT = 1024


def header_blob(shape: str, descr: str = "<f8", data: bytes = b"") -> bytes:
    raw = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    raw += b" " * (-(10 + len(raw) + 1) % 64) + b"\n"
    return npy.NPY_MAGIC + b"\x01\x00" + struct.pack("<H", len(raw)) + raw + data


def decode(blob: bytes, **kwargs: Any) -> npt.NDArray[Any]:
    return npy.decode_npy(
        blob, MalformedError, over=TooLargeError, max_bytes=kwargs.pop("max_bytes", LIMIT), **kwargs
    )


def save(array: npt.NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_round_trip_with_custom_errors() -> None:
    array = np.arange(6, dtype="<i4").reshape(2, 3)
    blob = npy.encode_npy(array, MalformedError, over=TooLargeError, max_bytes=LIMIT)
    assert blob == save(array)
    decoded = decode(blob)
    assert np.array_equal(decoded, array)
    assert not decoded.flags.writeable


@pytest.mark.parametrize(
    "shape",
    [
        "(0, 9999999999999999999)",  # > intp max: numpy's reshape raised ValueError
        "(9999999999999999999, 0)",
        "(0, 9223372036854775807)",
        f"(0, {LIMIT + 1})",
        "(0, 1000, 1000, 1000)",  # every dim fits, their product does not
    ],
)
def test_zero_size_array_with_huge_dimension_is_too_large(shape: str) -> None:
    with pytest.raises(TooLargeError):
        decode(header_blob(shape))


def test_zero_size_arrays_within_limits_decode() -> None:
    assert decode(header_blob(f"(0, {LIMIT // 8})")).shape == (0, LIMIT // 8)
    assert decode(header_blob("(0, 0, 0)")).shape == (0, 0, 0)
    for array in (np.zeros((0, 3), np.float32), np.zeros((5, 0), bool)):
        assert decode(save(array)).shape == array.shape


def test_encoder_refuses_what_the_decoder_refuses() -> None:
    with pytest.raises(TooLargeError):
        npy.encode_npy(
            np.zeros((0, LIMIT + 1)), MalformedError, over=TooLargeError, max_bytes=LIMIT
        )
    with pytest.raises(TooLargeError):
        npy.encode_npy(np.zeros((0, 100, 100)), MalformedError, over=TooLargeError, max_bytes=LIMIT)
    with pytest.raises(TooLargeError):
        npy.encode_npy(
            np.zeros((1,) * 5), MalformedError, over=TooLargeError, max_bytes=LIMIT, max_ndim=4
        )
    with pytest.raises(MalformedError):
        npy.encode_npy(np.array(["a"]), MalformedError, over=TooLargeError, max_bytes=LIMIT)
    with pytest.raises(MalformedError):
        npy.encode_npy([1.0], MalformedError, max_bytes=LIMIT)  # type: ignore[arg-type]


def test_over_defaults_to_error() -> None:
    with pytest.raises(MalformedError):
        npy.decode_npy(header_blob("(0, 9999999999999999999)"), MalformedError, max_bytes=LIMIT)
    with pytest.raises(MalformedError):
        npy.encode_npy(np.zeros(LIMIT), MalformedError, max_bytes=LIMIT)


def test_limits() -> None:
    blob = save(np.zeros(128))  # 1024 bytes of data
    assert decode(blob).shape == (128,)
    with pytest.raises(TooLargeError):
        decode(blob, max_bytes=LIMIT - 1)
    with pytest.raises(TooLargeError):
        decode(save(np.zeros((1,) * 5)), max_ndim=4)
    with pytest.raises(TooLargeError):
        decode(header_blob("(" + "1, " * 65 + ")"), max_ndim=99)  # numpy's ceiling applies


@pytest.mark.parametrize("descr", ["|O", "<U1", "|S1", "<c8", "<M8[D]", "|V4"])
def test_refused_dtypes_name_the_rule(descr: str) -> None:
    with pytest.raises(MalformedError, match="only real numbers and bool"):
        decode(header_blob("(1,)", descr, b"\0" * 16))


def test_byte_view() -> None:
    assert npy.byte_view(memoryview(b"abcd").cast("B", (2, 2)), MalformedError).tobytes() == b"abcd"
    with pytest.raises(MalformedError):
        npy.byte_view("text", MalformedError)


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from(sorted(npy.ALLOWED_DTYPES, key=str)),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4),
    )
)
def test_property_round_trip_including_zero_size(array: npt.NDArray[Any]) -> None:
    blob = npy.encode_npy(array, MalformedError, over=TooLargeError, max_bytes=1 << 16)
    decoded = decode(blob, max_bytes=1 << 16)
    assert decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.integers(0, 3) | st.integers(2**62, 10**19 - 1) | st.integers(LIMIT, 2**40),
        max_size=6,
    )
)
def test_property_any_declared_shape_only_raises_our_errors(dims: list[int]) -> None:
    shape = "(" + "".join(f"{d}," for d in dims) + ")"
    with contextlib.suppress(MalformedError, TooLargeError):
        decode(header_blob(shape, "|u1", b"\0" * 4))
