"""Tests for .npy arrays in message bodies (edge_agent.protocol.arrays)."""

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

from edge_agent.errors import MalformedMessageError, MessageTooLargeError, ProtocolError
from edge_agent.protocol import (
    ALLOWED_DTYPES,
    ArrayEntry,
    Limits,
    UpdateReport,
    arrays_equal,
    decode,
    decode_arrays,
    decode_npy,
    encode,
    encode_arrays,
    encode_npy,
    index_to_json,
    parse_array_index,
)

ALLOWED = [
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
]


def npy(header: str, data: bytes = b"", version: tuple[int, int] = (1, 0)) -> bytes:
    """Build a .npy blob with an arbitrary header text (padded like numpy)."""
    raw = header.encode("latin-1")
    preamble = 10 if version == (1, 0) else 12
    pad = -(preamble + len(raw) + 1) % 64
    raw = raw + b" " * pad + b"\n"
    size = struct.pack("<H", len(raw)) if version == (1, 0) else struct.pack("<I", len(raw))
    return b"\x93NUMPY" + bytes(version) + size + raw + data


def numpy_save(array: npt.NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_allowed_dtypes() -> None:
    assert frozenset(np.dtype(name) for name in ALLOWED) == ALLOWED_DTYPES


@pytest.mark.parametrize("dtype", ALLOWED)
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 1, 1, 2)])
def test_npy_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    array = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    blob = encode_npy(array)
    assert blob == numpy_save(array)  # the exact bytes Flower's ArrayRecord carries
    decoded = decode_npy(blob)
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    assert np.array_equal(decoded, array)
    assert not decoded.flags.writeable


def test_fortran_order_and_big_endian() -> None:
    fortran = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert np.array_equal(decode_npy(encode_npy(fortran)), fortran)
    big = np.arange(5, dtype=">i4")
    decoded = decode_npy(encode_npy(big))
    assert decoded.dtype == np.dtype("int32")
    assert decoded.dtype.isnative
    assert np.array_equal(decoded, big)
    assert not decoded.flags.writeable


def test_non_contiguous_input() -> None:
    array = np.arange(20, dtype=np.int16).reshape(4, 5)[:, ::2]
    assert np.array_equal(decode_npy(encode_npy(array)), array)


def test_decoded_arrays_are_read_only_views() -> None:
    decoded = decode_npy(encode_npy(np.ones(4)))
    with pytest.raises(ValueError, match="read-only"):
        decoded[0] = 2.0
    writable = decoded.copy()
    writable[0] = 2.0


def test_decode_npy_accepts_version_2_and_3() -> None:
    data = np.arange(3, dtype="<f4").tobytes()
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }"
    for version in ((2, 0), (3, 0)):
        decoded = decode_npy(npy(header, data, version))
        assert np.array_equal(decoded, np.arange(3, dtype=np.float32))


@pytest.mark.parametrize(
    "header",
    [
        "{'shape': (3,), 'fortran_order': False, 'descr': '<f4'}",
        '{"descr": "<f4", "fortran_order": False, "shape": (3,)}',
        "{ 'descr' : '<f4' , 'fortran_order' : False , 'shape' : ( 3 , ) , }",
    ],
)
def test_decode_npy_header_variants(header: str) -> None:
    decoded = decode_npy(npy(header, np.zeros(3, "<f4").tobytes()))
    assert decoded.shape == (3,)


@pytest.mark.parametrize(
    "array",
    [
        np.array(["a", "b"]),
        np.array([b"a"]),
        np.array([1 + 2j]),
        np.zeros(2, dtype=[("a", "<f4")]),
        np.zeros(2, dtype="V4"),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
        np.zeros(2, dtype=np.longdouble)
        if np.dtype(np.longdouble).itemsize > 8
        else np.zeros(2, dtype="m8[s]"),
        np.array([None], dtype=object),
    ],
)
def test_encode_npy_rejects_dtypes(array: npt.NDArray[Any]) -> None:
    with pytest.raises(MalformedMessageError):
        encode_npy(array)


def test_encode_npy_rejects_non_arrays_and_limits() -> None:
    with pytest.raises(MalformedMessageError):
        encode_npy([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(MessageTooLargeError):
        encode_npy(np.zeros(1000), limits=Limits(max_array_bytes=100))
    with pytest.raises(MessageTooLargeError):
        encode_npy(np.zeros((1,) * 5), limits=Limits(max_array_ndim=4))


@pytest.mark.parametrize(
    "descr",
    ["|O", "<U1", "|S1", "|V4", "<c8", "<M8[D]", "<f16", "<u1", "=f4", "f4", "<b1", "<f3"],
)
def test_decode_npy_rejects_dtypes(descr: str) -> None:
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': (1,), }}"
    with pytest.raises(MalformedMessageError):
        decode_npy(npy(header, b"\x00" * 8))


def test_decode_npy_rejects_numpy_object_and_structured_files() -> None:
    obj = io.BytesIO()
    np.save(obj, np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(MalformedMessageError):
        decode_npy(obj.getvalue())
    with pytest.raises(MalformedMessageError):
        decode_npy(numpy_save(np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")])))


@pytest.mark.parametrize(
    "header",
    [
        "",
        "{}",
        "[]",
        "{'descr': '<f4', 'fortran_order': False}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 1}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'descr': '<f4'}",
        "{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}",
        "{'descr': '<f4', 'fortran_order': 'False', 'shape': (1,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': 1}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': [1]}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (01,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1.0,)}",
        "{'descr': True, 'fortran_order': False, 'shape': (1,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} trailing",
        "{'descr': '<f4' 'fortran_order': False, 'shape': (1,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,),,}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,)",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (" + "1," * 600 + ")}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), '__class__': 1}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': True}",
        "{'descr': '<f4', 'fortran_order': 'f4', 'shape': (1,)}",
        "{'descr': '<f4', 'fortran_order': False, 'shape': True}",
        "{'descr': (1,), 'fortran_order': False, 'shape': (1,)}",
        "{'descr': '<f4', 'fortran_order': __import__('os'), 'shape': (1,)}",
    ],
)
def test_decode_npy_rejects_bad_headers(header: str) -> None:
    with pytest.raises(ProtocolError):
        decode_npy(npy(header, b"\x00" * 4))


def test_decode_npy_requires_final_newline() -> None:
    blob = bytearray(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", b"\0" * 4))
    blob[blob.index(b"\n")] = ord(" ")
    with pytest.raises(MalformedMessageError):
        decode_npy(bytes(blob))


def test_decode_npy_data_length_must_match() -> None:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"
    assert decode_npy(npy(header, b"\x00" * 24)).shape == (2, 3)
    with pytest.raises(MalformedMessageError):
        decode_npy(npy(header, b"\x00" * 23))
    with pytest.raises(MalformedMessageError):
        decode_npy(npy(header, b"\x00" * 25))


def test_decode_npy_huge_shape_rejected_before_allocating() -> None:
    header = (
        "{'descr': '<f8', 'fortran_order': False, 'shape': (9999999999999999999, 9999999999), }"
    )
    with pytest.raises(MessageTooLargeError):
        decode_npy(npy(header, b"\x00" * 8))


@pytest.mark.parametrize(
    "shape",
    [
        "(0, 9999999999999999999)",
        "(9999999999999999999, 0)",
        "(0, 9223372036854775807)",
        "(0, 67108865)",
        "(0, 4096, 4096, 4096)",
    ],
)
def test_decode_npy_zero_size_array_with_huge_dimension(shape: str) -> None:
    # Regression: 0 bytes passed the size checks, then reshape raised
    # "ValueError: Maximum allowed dimension exceeded" (or "array is too big").
    header = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}"
    with pytest.raises(MessageTooLargeError):
        decode_npy(npy(header))


def test_decode_npy_dimension_beyond_intp_even_with_huge_limits() -> None:
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (0, 9999999999999999999), }"
    with pytest.raises(MessageTooLargeError):
        decode_npy(npy(header), limits=Limits(max_array_bytes=10**20))


def test_decode_message_with_zero_size_huge_dimension_array() -> None:
    # Regression: any device could make decode() raise ValueError this way.
    original = encode_npy(np.zeros((0, 1)))
    report = UpdateReport(
        round_id="r1", task_id="1" * 32, num_examples=0, codec="npy", arrays={"w": np.zeros((0, 1))}
    )
    payload = encode(report, sender="pi-7", sent_at=1.0)
    forged = npy("{'descr': '<f8', 'fortran_order': False, 'shape': (0, 9999999999999999999), }")
    assert len(forged) == len(original)
    assert payload.endswith(original)
    with pytest.raises(MessageTooLargeError, match="dimension"):
        decode(payload[: -len(original)] + forged)


def test_zero_size_arrays_within_limits_round_trip() -> None:
    for array in (np.zeros((0, 8)), np.zeros((3, 0, 2), np.int8), np.zeros((0,), bool)):
        assert decode_npy(encode_npy(array)).shape == array.shape
    limits = Limits(max_array_bytes=1024)
    assert decode_npy(encode_npy(np.zeros((0, 128))), limits=limits).shape == (0, 128)
    with pytest.raises(MessageTooLargeError):
        encode_npy(np.zeros((0, 1025), np.uint8), limits=limits)


def test_decode_npy_limits() -> None:
    blob = encode_npy(np.zeros(100))
    with pytest.raises(MessageTooLargeError):
        decode_npy(blob, limits=Limits(max_array_bytes=799))
    assert decode_npy(blob, limits=Limits(max_array_bytes=800)).shape == (100,)
    blob = encode_npy(np.zeros((1,) * 5))
    with pytest.raises(MessageTooLargeError):
        decode_npy(blob, limits=Limits(max_array_ndim=4))


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x93NUMPY",
        b"\x93NUMPY\x01\x00",
        b"\x93NUMPX\x01\x00\x00\x00",
        b"\x93NUMPY\x04\x00\x00\x00",
        b"\x93NUMPY\x02\x00\x00\x00",
        b"\x93NUMPY\x01\x00\xff\x00{",
        b"\x93NUMPY\x02\x00\xff\xff\xff\xff{",
    ],
)
def test_decode_npy_rejects_bad_preambles(blob: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_npy(blob)


def test_decode_npy_header_size_limit() -> None:
    blob = b"\x93NUMPY\x02\x00" + struct.pack("<I", 100_000) + b" " * 100_000
    with pytest.raises(MessageTooLargeError):
        decode_npy(blob)


def test_decode_npy_version_3_bad_utf8() -> None:
    raw = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }\xff\n"
    blob = b"\x93NUMPY\x03\x00" + struct.pack("<I", len(raw)) + raw + b"\x00" * 4
    with pytest.raises(MalformedMessageError):
        decode_npy(blob)


def test_decode_npy_accepts_any_contiguous_buffer() -> None:
    blob = encode_npy(np.arange(4, dtype=np.int32))  # 144 bytes
    shaped = memoryview(blob).cast("B", (2, len(blob) // 2))
    assert np.array_equal(decode_npy(shaped), np.arange(4))
    assert np.array_equal(decode_npy(memoryview(bytearray(blob))), np.arange(4))


def test_decode_npy_rejects_non_buffers() -> None:
    with pytest.raises(MalformedMessageError):
        decode_npy("not bytes")  # type: ignore[arg-type]


# -------------------------------------------------------------------- arrays in a body


def test_arrays_round_trip() -> None:
    arrays: dict[str, npt.NDArray[Any]] = {
        "fc1.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "fc1.bias": np.zeros(4, dtype=np.float16),
        "mask": np.array([True, False]),
        "step": np.array(7, dtype=np.int64),
    }
    index, body = encode_arrays(arrays)
    assert [entry.name for entry in index] == list(arrays)
    assert sum(entry.length for entry in index) == len(body)
    parsed = parse_array_index(index_to_json(index))
    assert parsed == index
    decoded = decode_arrays(parsed, body)
    assert arrays_equal(decoded, arrays)
    assert list(decoded) == list(arrays)


def test_empty_arrays() -> None:
    index, body = encode_arrays({})
    assert index == ()
    assert body == b""
    assert decode_arrays((), b"") == {}


def test_decode_arrays_lengths_must_sum_to_body() -> None:
    index, body = encode_arrays({"a": np.ones(3), "b": np.ones(2)})
    with pytest.raises(MalformedMessageError):
        decode_arrays(index, body + b"\x00")
    with pytest.raises(MalformedMessageError):
        decode_arrays(index, body[:-1])
    shifted = (
        ArrayEntry(index[0].name, index[0].length + 8),
        ArrayEntry(index[1].name, index[1].length - 8),
    )
    with pytest.raises(MalformedMessageError):
        decode_arrays(shifted, body)


def test_decode_arrays_rejects_duplicates_and_negative_lengths() -> None:
    index, body = encode_arrays({"a": np.ones(3)})
    blob_len = index[0].length
    with pytest.raises(MalformedMessageError):
        decode_arrays((ArrayEntry("a", blob_len), ArrayEntry("a", blob_len)), body + body)
    with pytest.raises(MalformedMessageError):
        decode_arrays((ArrayEntry("a", blob_len + 5), ArrayEntry("b", -5)), body)


def test_array_count_limit() -> None:
    arrays = {f"a{i}": np.zeros(1) for i in range(4)}
    limits = Limits(max_arrays=3)
    with pytest.raises(MessageTooLargeError):
        encode_arrays(arrays, limits=limits)
    index, body = encode_arrays(arrays)
    with pytest.raises(MessageTooLargeError):
        decode_arrays(index, body, limits=limits)
    with pytest.raises(MessageTooLargeError):
        parse_array_index(index_to_json(index), limits=limits)


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a b", "a" * 129, "é", "a\n"])
def test_encode_arrays_rejects_bad_names(name: str) -> None:
    with pytest.raises(MalformedMessageError):
        encode_arrays({name: np.zeros(1)})


@pytest.mark.parametrize(
    "value",
    [
        None,
        {},
        "arrays",
        [1],
        [{"name": "a"}],
        [{"length": 100}],
        [{"name": "a", "length": "100"}],
        [{"name": "a", "length": True}],
        [{"name": "a", "length": 1.0}],
        [{"name": "a", "length": 5}],
        [{"name": "a", "length": -1}],
        [{"name": 7, "length": 100}],
        [{"name": "a/../b c", "length": 100}],
        [{"name": "a", "length": 100}, {"name": "a", "length": 100}],
    ],
)
def test_parse_array_index_rejects(value: object) -> None:
    with pytest.raises(MalformedMessageError):
        parse_array_index(value)


def test_parse_array_index_length_limit_and_unknown_keys() -> None:
    with pytest.raises(MessageTooLargeError):
        parse_array_index([{"name": "a", "length": 10**12}])
    assert parse_array_index([{"name": "a", "length": 100, "future": [1]}]) == (
        ArrayEntry("a", 100),
    )


def test_arrays_equal() -> None:
    a = {"x": np.array([1.0, np.nan], dtype="<f4")}
    assert arrays_equal(a, {"x": np.array([1.0, np.nan], dtype=">f4")})
    assert arrays_equal(None, None)
    assert not arrays_equal(a, None)
    assert not arrays_equal(a, {"y": a["x"]})
    assert not arrays_equal(a, {"x": np.array([1.0, np.nan], dtype="<f8")})
    assert not arrays_equal(a, {"x": np.array([[1.0, np.nan]], dtype="<f4")})
    assert not arrays_equal(a, {"x": np.array([1.0, 2.0], dtype="<f4")})
    assert not arrays_equal({"x": np.array([0.0])}, {"x": np.array([-0.0])})


# ------------------------------------------------------------------- property tests

DTYPES: list[np.dtype[Any]] = [np.dtype(name) for name in ALLOWED]
DTYPES += [np.dtype(">f4"), np.dtype(">i8"), np.dtype(">u2")]
ARRAYS: st.SearchStrategy[npt.NDArray[Any]] = hnp.arrays(
    dtype=st.sampled_from(DTYPES),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
)


@settings(max_examples=300, deadline=None)
@given(ARRAYS)
def test_property_round_trip(array: npt.NDArray[Any]) -> None:
    decoded = decode_npy(encode_npy(array))
    assert arrays_equal({"a": decoded}, {"a": array})


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_property_random_bytes_only_protocol_errors(blob: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_npy(blob)


@settings(max_examples=500, deadline=None)
@given(
    ARRAYS,
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.integers(0, 400),
)
def test_property_mutated_npy_only_protocol_errors(
    array: npt.NDArray[Any], flips: list[tuple[int, int]], cut: int
) -> None:
    blob = bytearray(encode_npy(array))
    for position, value in flips:
        blob[position % len(blob)] = value
    if cut:
        blob = blob[: max(0, len(blob) - cut)]
    try:
        decoded = decode_npy(bytes(blob))
    except ProtocolError:
        return
    assert not decoded.flags.writeable
    assert decoded.dtype in ALLOWED_DTYPES


HEADER_PIECES = st.sampled_from(
    [
        "'descr'",
        "'fortran_order'",
        "'shape'",
        "'<f4'",
        "'|b1'",
        "'|O'",
        "True",
        "False",
        "(",
        ")",
        "{",
        "}",
        ",",
        ":",
        " ",
        "1",
        "0",
        "99999999999999999999",
        "'",
        '"',
        "\n",
        "\\",
        "\x00",
        "\u00ff",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(HEADER_PIECES, max_size=30).map("".join), st.binary(max_size=64))
def test_property_random_npy_headers_only_protocol_errors(header: str, data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_npy(npy(header, data))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.integers(0, 2) | st.integers(2**25, 2**27) | st.integers(2**62, 10**19 - 1),
        max_size=5,
    ),
    st.sampled_from(["<f8", "|u1", "|b1"]),
    st.binary(max_size=16),
)
def test_property_declared_shapes_only_protocol_errors(
    dims: list[int], descr: str, data: bytes
) -> None:
    shape = "(" + "".join(f"{dim}, " for dim in dims) + ")"
    header = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    with contextlib.suppress(ProtocolError):
        decode_npy(npy(header, data))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries({"name": st.text(max_size=5), "length": st.integers(-5, 400)}),
        max_size=4,
    )
    | st.lists(st.integers() | st.text() | st.none(), max_size=3),
    st.binary(max_size=400),
)
def test_property_random_index_and_body_only_protocol_errors(index: object, body: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_arrays(parse_array_index(index), body)
