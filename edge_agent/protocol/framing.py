"""Framing: one MQTT payload <-> a JSON header and a binary body.

Layout of one payload (all integers big-endian)::

    offset  size  field
    0       4     magic b"FEDG"
    4       1     framing version (1)
    5       4     header length H
    9       H     header: one JSON object, UTF-8, no surrounding whitespace
    9 + H   rest  body: opaque bytes (may be empty)

Decoding (:func:`decode_frame`) is strict and checks every size before it slices,
allocates or parses:

1. the payload is at most ``limits.max_message_bytes`` long and at least 9 bytes;
2. the magic matches and the framing version is one this side speaks (a newer one
   raises :class:`~edge_agent.errors.UnsupportedVersionError`);
3. ``0 < H <= limits.max_header_bytes`` and H fits in the payload;
4. the header is valid UTF-8, nests at most ``limits.max_json_depth`` levels
   (counted on the raw text before the JSON parser sees it, so deep nesting cannot
   exhaust the stack), and is exactly one JSON object spanning all H bytes: no
   leading/trailing whitespace or data, no duplicate keys, no ``NaN`` /
   ``Infinity`` (neither as constants nor as overflowing literals like ``1e999``),
   no integer literal over 40 digits, no lone UTF-16 surrogate in any string.

The schema of the header (``v``, ``type``, ``id``...) is not this module's business:
:mod:`edge_agent.protocol.messages` checks it. Every failure raises a
:class:`~edge_agent.errors.ProtocolError` subclass; nothing else escapes for any
byte string.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from compress.strictjson import check_depth, loads_strict
from edge_agent.errors import (
    MalformedMessageError,
    MessageTooLargeError,
    UnsupportedVersionError,
)
from edge_agent.protocol.limits import DEFAULT_LIMITS, FRAME_PREFIX_BYTES, Limits

__all__ = [
    "FRAMING_VERSION",
    "MAGIC",
    "Frame",
    "decode_frame",
    "encode_frame",
]

MAGIC = b"FEDG"
"""First four bytes of every fedge payload."""

FRAMING_VERSION = 1
"""The framing version this side writes and reads."""

_PREFIX = struct.Struct(">4sBI")  # FRAME_PREFIX_BYTES long


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded payload: the parsed header object and the raw body.

    Attributes:
        header: The header JSON object (str keys, JSON values).
        body: The bytes after the header (possibly empty).
    """

    header: dict[str, Any]
    body: bytes


def encode_frame(
    header: Mapping[str, Any], body: bytes = b"", *, limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """Frame a header object and a body into one payload.

    The header is serialised compactly (no whitespace) as UTF-8.

    Args:
        header: A JSON-serialisable mapping with str keys. Floats must be finite.
        body: The body bytes.
        limits: Size limits to respect.

    Returns:
        The payload bytes.

    Raises:
        MalformedMessageError: The header is not JSON-serialisable (including
            non-finite floats, lone surrogates and non-str keys at any depth) or
            nests deeper than ``limits.max_json_depth``.
        MessageTooLargeError: The header or the whole payload exceeds its limit.
    """
    try:
        text = json.dumps(dict(header), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        raw = text.encode("utf-8")
    except (TypeError, ValueError) as exc:
        # UnicodeEncodeError is a ValueError; so is a circular reference.
        raise MalformedMessageError(f"header is not encodable as JSON: {exc}") from None
    except RecursionError:
        raise MalformedMessageError("header nests too deeply") from None
    _check_keys(header)
    check_depth(text, MalformedMessageError, what="header", max_depth=limits.max_json_depth)
    if len(raw) > limits.max_header_bytes:
        raise MessageTooLargeError(f"header is {len(raw)} bytes, limit {limits.max_header_bytes}")
    total = FRAME_PREFIX_BYTES + len(raw) + len(body)
    if total > limits.max_message_bytes:
        raise MessageTooLargeError(f"message is {total} bytes, limit {limits.max_message_bytes}")
    return b"".join((_PREFIX.pack(MAGIC, FRAMING_VERSION, len(raw)), raw, bytes(body)))


def decode_frame(
    payload: bytes | bytearray | memoryview, *, limits: Limits = DEFAULT_LIMITS
) -> Frame:
    """Split a payload into its header object and body, strictly.

    Args:
        payload: The MQTT payload.
        limits: Size limits to enforce.

    Returns:
        The decoded :class:`Frame`.

    Raises:
        MessageTooLargeError: The payload or the header is over its limit.
        UnsupportedVersionError: The framing version is newer than this side's.
        MalformedMessageError: Anything else is wrong: not bytes, too short, bad
            magic, bad header length, invalid UTF-8, too deep, not exactly one JSON
            object, duplicate keys, non-finite numbers, huge integer literals, lone
            surrogates.
    """
    data = _as_bytes(payload, limits)
    if len(data) < FRAME_PREFIX_BYTES:
        raise MalformedMessageError(f"payload of {len(data)} bytes is shorter than the prefix")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise MalformedMessageError("payload does not start with the fedge magic")
    if version > FRAMING_VERSION:
        raise UnsupportedVersionError(
            f"framing version {version}, this side speaks {FRAMING_VERSION}"
        )
    if version != FRAMING_VERSION:
        raise MalformedMessageError(f"invalid framing version {version}")
    if header_len > limits.max_header_bytes:
        raise MessageTooLargeError(
            f"header length {header_len} exceeds limit {limits.max_header_bytes}"
        )
    if header_len == 0:
        raise MalformedMessageError("empty header")
    end = FRAME_PREFIX_BYTES + header_len
    if end > len(data):
        raise MalformedMessageError(
            f"header length {header_len} runs past the end of a {len(data)}-byte payload"
        )
    header = _parse_header(data[FRAME_PREFIX_BYTES:end], limits)
    return Frame(header=header, body=data[end:])


def _as_bytes(payload: object, limits: Limits) -> bytes:
    """Return the payload as bytes, checking its size before copying anything."""
    if isinstance(payload, bytes):
        size = len(payload)
    elif isinstance(payload, bytearray | memoryview):
        try:
            view = memoryview(payload)
        except ValueError:  # a released memoryview
            raise MalformedMessageError("payload buffer is not readable") from None
        size = view.nbytes
    else:
        raise MalformedMessageError(f"payload must be bytes, got {type(payload).__name__}")
    if size > limits.max_message_bytes:
        raise MessageTooLargeError(f"message is {size} bytes, limit {limits.max_message_bytes}")
    if isinstance(payload, bytes):
        return payload
    return view.tobytes()


def _parse_header(raw: bytes, limits: Limits) -> dict[str, Any]:
    """Parse the header bytes into a dict, strictly (see the module docstring)."""
    return loads_strict(raw, MalformedMessageError, what="header", max_depth=limits.max_json_depth)


def _check_keys(value: Any) -> None:
    """Reject non-str keys, which ``json.dumps`` would silently turn into strings."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise MalformedMessageError(f"header key {key!r} is not a str")
                stack.append(child)
        elif isinstance(item, list | tuple):
            stack.extend(item)
