"""Tests for limits and framing (edge_agent.protocol.limits / framing)."""

from __future__ import annotations

import struct
import time
from typing import Any

import pytest

from edge_agent.errors import (
    ConfigError,
    MalformedMessageError,
    MessageTooLargeError,
    UnsupportedVersionError,
)
from edge_agent.protocol import (
    CHUNK_BYTES_CEILING,
    DEFAULT_LIMITS,
    FRAMING_VERSION,
    MAGIC,
    Frame,
    Limits,
    decode_frame,
    encode_frame,
)
from edge_agent.protocol.limits import FRAME_PREFIX_BYTES


def raw_frame(
    header: bytes, body: bytes = b"", *, version: int = 1, length: int | None = None
) -> bytes:
    """Frame raw header bytes without any checks."""
    size = len(header) if length is None else length
    return MAGIC + bytes([version]) + struct.pack(">I", size) + header + body


# ----------------------------------------------------------------------------- limits


def test_default_limits() -> None:
    assert Limits() == DEFAULT_LIMITS
    assert DEFAULT_LIMITS.max_message_bytes == 256 * 1024
    assert DEFAULT_LIMITS.max_header_bytes == 32 * 1024
    assert DEFAULT_LIMITS.max_chunk_bytes == CHUNK_BYTES_CEILING == 128 * 1024
    assert DEFAULT_LIMITS.default_chunk_bytes == 64 * 1024
    assert FRAME_PREFIX_BYTES == 9


def test_limits_may_be_lowered() -> None:
    limits = Limits(max_chunk_bytes=16 * 1024, default_chunk_bytes=16 * 1024)
    assert limits.max_chunk_bytes == 16 * 1024


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_chunk_bytes": CHUNK_BYTES_CEILING + 1},
        {"default_chunk_bytes": 100 * 1024, "max_chunk_bytes": 64 * 1024},
        {"max_message_bytes": 128 * 1024},
        {"max_header_bytes": 0},
        {"max_arrays": -1},
        {"max_list_items": True},
        {"max_string_chars": 1.5},
        {"max_array_ndim": 65},
    ],
)
def test_limits_reject_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Limits(**kwargs)


def test_limits_are_frozen() -> None:
    with pytest.raises(AttributeError):
        DEFAULT_LIMITS.max_arrays = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------- framing


def test_round_trip() -> None:
    payload = encode_frame({"a": 1, "b": ["x", 2.5, None, True]}, b"\x00body")
    assert payload[:4] == MAGIC
    assert payload[4] == FRAMING_VERSION
    frame = decode_frame(payload)
    assert frame == Frame(header={"a": 1, "b": ["x", 2.5, None, True]}, body=b"\x00body")


def test_round_trip_empty_body_and_unicode() -> None:
    frame = decode_frame(encode_frame({"name": "caf\u00e9 \U0001f600"}))
    assert frame.header == {"name": "caf\u00e9 \U0001f600"}
    assert frame.body == b""


def test_accepts_bytearray_and_memoryview() -> None:
    payload = encode_frame({"a": 1}, b"xyz")
    assert decode_frame(bytearray(payload)).body == b"xyz"
    assert decode_frame(memoryview(payload)).body == b"xyz"


def test_header_is_compact() -> None:
    payload = encode_frame({"a": [1, 2]})
    assert payload[FRAME_PREFIX_BYTES:] == b'{"a":[1,2]}'


@pytest.mark.parametrize(
    "header",
    [
        {"x": float("nan")},
        {"x": float("inf")},
        {"x": object()},
        {1: "non-str key"},
        {"x": "\ud800"},
    ],
)
def test_encode_rejects_unencodable_headers(header: dict[Any, Any]) -> None:
    with pytest.raises(MalformedMessageError):
        encode_frame(header)


def test_encode_rejects_circular_header() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(MalformedMessageError):
        encode_frame({"x": loop})


def test_encode_rejects_absurdly_deep_header() -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(MalformedMessageError):
        encode_frame({"x": deep})


def test_encode_enforces_depth() -> None:
    depth = DEFAULT_LIMITS.max_json_depth
    nested: list[Any] = []
    for _ in range(depth - 2):
        nested = [nested]
    assert decode_frame(encode_frame({"x": nested})).header == {"x": nested}
    with pytest.raises(MalformedMessageError):
        encode_frame({"x": [nested]})


def test_encode_enforces_sizes() -> None:
    limits = Limits()
    with pytest.raises(MessageTooLargeError):
        encode_frame({"x": "a" * limits.max_header_bytes})
    with pytest.raises(MessageTooLargeError):
        encode_frame({"x": 1}, b"\x00" * limits.max_message_bytes)


def test_decode_too_large_payload_checked_first() -> None:
    huge = b"garbage" * 40_000
    with pytest.raises(MessageTooLargeError):
        decode_frame(huge)
    with pytest.raises(MessageTooLargeError):
        decode_frame(memoryview(huge))


def test_decode_released_buffer() -> None:
    view = memoryview(encode_frame({"a": 1}))
    view.release()
    with pytest.raises(MalformedMessageError):
        decode_frame(view)


def test_decode_non_bytes() -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame("FEDG")  # type: ignore[arg-type]
    with pytest.raises(MalformedMessageError):
        decode_frame(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("payload", [b"", b"F", b"FEDG", b"FEDG\x01\x00\x00\x00"])
def test_decode_truncated_prefix(payload: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(payload)


def test_decode_bad_magic() -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(b"FEDH" + raw_frame(b"{}")[4:])


def test_decode_newer_framing_version() -> None:
    with pytest.raises(UnsupportedVersionError):
        decode_frame(raw_frame(b"{}", version=2))


def test_decode_framing_version_zero() -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(raw_frame(b"{}", version=0))


def test_decode_header_length_over_limit_checked_before_reading() -> None:
    with pytest.raises(MessageTooLargeError):
        decode_frame(raw_frame(b"{}", length=DEFAULT_LIMITS.max_header_bytes + 1))
    with pytest.raises(MessageTooLargeError):
        decode_frame(raw_frame(b"{}", length=0xFFFFFFFF))


def test_decode_header_length_past_end() -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(raw_frame(b"{}", length=3))


def test_decode_empty_header() -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(raw_frame(b""))


def test_decode_custom_limits() -> None:
    limits = Limits(
        max_message_bytes=1024,
        max_header_bytes=64,
        max_chunk_bytes=512,
        default_chunk_bytes=512,
        max_manifest_bytes=512,
    )
    with pytest.raises(MessageTooLargeError):
        decode_frame(encode_frame({"a": 1}, b"x" * 1100), limits=limits)
    with pytest.raises(MessageTooLargeError):
        decode_frame(encode_frame({"a": "b" * 100}), limits=limits)


@pytest.mark.parametrize(
    "header",
    [
        b"[]",
        b"1",
        b'"text"',
        b"null",
        b"true",
        b"{",
        b"{}}",
        b"{} ",
        b" {}",
        b"{}\n",
        b"{}{}",
        b'{"a":1}x',
        b"{'a':1}",
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":-Infinity}',
        b'{"a":1e999}',
        b'{"a":-1e999}',
        b'{"a":1' + b"0" * 60 + b"}",
        b'{"a":1,"a":2}',
        b'{"a":{"b":1,"b":1}}',
        b'{"a":"\xff"}',
        b'\xef\xbb\xbf{"a":1}',
        b'{"a":"\xed\xa0\x80"}',
        b'{"a":"\\ud800"}',
        b'{"\\udc00":1}',
        b'{"a":"\x01"}',
        b'{"a":01}',
        b'{"a":.5}',
        b'{"a":1,}',
    ],
)
def test_decode_rejects_bad_headers(header: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        decode_frame(raw_frame(header))


def test_decode_accepts_surrogate_pairs() -> None:
    frame = decode_frame(raw_frame(b'{"a":"\\ud83d\\ude00"}'))
    assert frame.header == {"a": "\U0001f600"}


def test_decode_depth_limit() -> None:
    depth = DEFAULT_LIMITS.max_json_depth
    ok = b'{"a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    assert decode_frame(raw_frame(ok)).header["a"] is not None
    too_deep = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(MalformedMessageError):
        decode_frame(raw_frame(too_deep))


def test_decode_very_deep_nesting_does_not_recurse() -> None:
    deep = b'{"a":' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    limits = Limits(max_header_bytes=64 * 1024, max_message_bytes=512 * 1024)
    with pytest.raises(MalformedMessageError):
        decode_frame(raw_frame(deep), limits=limits)


def test_depth_ignores_brackets_inside_strings() -> None:
    header = b'{"a":"' + b"[{" * 100 + b'\\"' + b'"}'
    assert decode_frame(raw_frame(header)).header == {"a": "[{" * 100 + '"'}


def test_body_is_everything_after_the_header() -> None:
    frame = decode_frame(raw_frame(b"{}", b"FEDG\x01rest"))
    assert frame.header == {}
    assert frame.body == b"FEDG\x01rest"


@pytest.mark.parametrize(
    "header",
    [
        b'{"a":"' + b'\\"' * 16_000,  # unterminated string full of escaped quotes
        b"{" + b'"a' * 16_000,
        b'{"a":' + b"[[]," * 8_000,
        b'["' + b'a","' * 8_000 + b'"]',
    ],
)
def test_hostile_headers_are_rejected_in_linear_time(header: bytes) -> None:
    header = header[: DEFAULT_LIMITS.max_header_bytes]
    started = time.perf_counter()
    with pytest.raises(MalformedMessageError):
        decode_frame(raw_frame(header))
    # A quadratic scan took seconds here; a linear one takes milliseconds.
    assert time.perf_counter() - started < 1.0
