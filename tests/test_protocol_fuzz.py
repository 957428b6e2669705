"""Property tests: valid messages round-trip, and no input crashes the decoder.

The "no crash" properties assert that ``decode`` either succeeds or raises a
``ProtocolError`` subclass; any other exception fails the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import operator
import struct
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.errors import ProtocolError
from edge_agent.protocol import (
    MAGIC,
    MAX_SAFE_INT,
    MESSAGE_TYPES,
    ArrayEntry,
    Channel,
    Chunk,
    ChunkRequest,
    Deploy,
    ErrorReport,
    EvalReport,
    Histogram,
    InstallState,
    InstallStatus,
    LatencyQuantiles,
    Message,
    ModelInfo,
    Rollback,
    Status,
    TaskAck,
    TaskAction,
    TelemetryBatch,
    TelemetryRecord,
    TrainTask,
    UpdateReport,
    broadcast_topic,
    check_route,
    chunk_count,
    decode,
    device_topic,
    encode,
)
from tests.test_protocol_arrays import npy

COORD = "coordinator"
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------- valid-value strategies

ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def token(first: str, rest: str, max_size: int = 15) -> st.SearchStrategy[str]:
    """Strings of one character from ``first`` then up to ``max_size`` from ``rest``."""
    return st.builds(operator.add, st.sampled_from(first), st.text(rest, max_size=max_size))


idents = token(ALNUM, ALNUM + "_.-")
device_ids = idents.filter(lambda s: s != COORD)
keys = token(ALNUM + "_", ALNUM + "_.:/-")
tags = token(ALNUM, ALNUM + "_.:=+-")
codes = token("abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvwxyz0123456789_.")
codecs = token(ALNUM, ALNUM + "_.:+=,-")
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)
hex32 = st.text("0123456789abcdef", min_size=32, max_size=32)
counts = st.integers(0, MAX_SAFE_INT)
small_counts = st.integers(0, 10_000)
non_negative = st.floats(min_value=0, max_value=1e12, allow_nan=False)
finite = st.floats(allow_nan=False, allow_infinity=False)
texts = st.text(max_size=30)
safe_ints = st.integers(-MAX_SAFE_INT, MAX_SAFE_INT)


@st.composite
def telemetry_records(draw: st.DrawFn) -> TelemetryRecord:
    start = draw(non_negative)
    model = draw(st.none() | idents)
    bounds = sorted(draw(st.lists(finite, unique=True, max_size=5)))
    return TelemetryRecord(
        window_start=start,
        window_end=start + draw(st.floats(0, 1e6)),
        model=model,
        version=None if model is None else draw(counts),
        predictions=draw(counts),
        errors=draw(counts),
        latency_ms=LatencyQuantiles(
            p50=draw(non_negative), p95=draw(non_negative), p99=draw(non_negative)
        ),
        histogram=Histogram(
            bounds=tuple(bounds),
            counts=tuple(
                draw(st.lists(small_counts, min_size=len(bounds) + 1, max_size=len(bounds) + 1))
            ),
        ),
        cpu_percent=draw(non_negative),
        memory_bytes=draw(counts),
        uptime_s=draw(non_negative),
    )


@st.composite
def chunks(draw: st.DrawFn) -> Chunk:
    payload = draw(st.binary(max_size=300))
    chunk_size = draw(st.integers(1, 128))
    index = draw(st.integers(0, chunk_count(len(payload), chunk_size) - 1))
    return Chunk.from_payload(payload, index, chunk_size=chunk_size)


@st.composite
def deploys(draw: st.DrawFn) -> Deploy:
    total = draw(st.integers(0, 10**8))
    chunk_size = draw(st.integers(1, 128 * 1024))
    return Deploy(
        deployment_id=draw(idents),
        transfer_id=draw(hex64),
        total_size=total,
        chunk_size=chunk_size,
        chunk_count=chunk_count(total, chunk_size),
        manifest=draw(st.binary(min_size=1, max_size=200)),
    )


array_dtypes = st.sampled_from(
    [np.dtype(n) for n in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")]
)
small_arrays = hnp.arrays(
    array_dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)
)


@st.composite
def update_reports(draw: st.DrawFn) -> UpdateReport:
    common: dict[str, Any] = {
        "round_id": draw(idents),
        "task_id": draw(hex32),
        "num_examples": draw(counts),
        "codec": draw(codecs),
        "metrics": draw(st.dictionaries(keys, finite, max_size=4)),
    }
    if draw(st.booleans()):
        return UpdateReport(**common, arrays=draw(st.dictionaries(keys, small_arrays, max_size=3)))
    names = draw(st.lists(keys, min_size=1, max_size=4, unique=True))
    index = tuple(ArrayEntry(name, draw(st.integers(10, 10**6))) for name in names)
    return UpdateReport(**common, upload_transfer_id=draw(hex64), upload_index=index)


scalars = texts | safe_ints | finite
settings_values = scalars | st.booleans()

# (message strategy, sender strategy, channel; None = broadcast)
ROUTED: list[tuple[st.SearchStrategy[Message], st.SearchStrategy[str], Channel | None]] = [
    (
        st.builds(
            Status,
            online=st.booleans(),
            agent_version=token(ALNUM, ALNUM + "_.+!-"),
            hardware=st.dictionaries(keys, scalars, max_size=4),
            runtimes=st.lists(idents, max_size=3).map(tuple),
            tags=st.lists(tags, max_size=3).map(tuple),
            models=st.lists(
                st.builds(ModelInfo, name=idents, version=counts, sha256=hex64), max_size=3
            ).map(tuple),
        ),
        device_ids,
        Channel.STATUS,
    ),
    (deploys(), st.just(COORD), Channel.CMD),
    (st.builds(Rollback, model=idents, reason=texts), st.just(COORD), Channel.CMD),
    (
        st.builds(
            ChunkRequest,
            transfer_id=hex64,
            indices=st.lists(counts, min_size=1, max_size=20).map(tuple),
        ),
        device_ids,
        Channel.EVENTS,
    ),
    (chunks(), st.just(COORD), Channel.CHUNKS),
    (chunks(), st.just(COORD), None),
    (chunks(), device_ids, Channel.EVENTS),
    (
        st.builds(
            InstallStatus,
            deployment_id=idents,
            state=st.sampled_from(list(InstallState)),
            model=st.none() | idents,
            version=st.none() | counts,
            chunks_held=st.just(0),
            chunks_total=counts,
            error_code=st.none() | codes,
            reason=st.none() | texts,
        ),
        device_ids,
        Channel.EVENTS,
    ),
    (
        st.builds(
            TelemetryBatch,
            seq=counts,
            dropped=counts,
            records=st.lists(telemetry_records(), max_size=3).map(tuple),
        ),
        device_ids,
        Channel.TELEMETRY,
    ),
    (
        st.builds(
            TrainTask,
            round_id=idents,
            task_id=hex32,
            action=st.sampled_from(TaskAction),
            model=idents,
            family=idents,
            weights_transfer_id=hex64,
            weights_size=st.just(300),
            weights_index=st.just((ArrayEntry("W0", 200), ArrayEntry("b0", 100))),
            chunk_size=st.integers(1, 128 * 1024),
            codec=codecs,
            deadline=non_negative,
            config=st.dictionaries(keys, settings_values, max_size=4),
        ),
        st.just(COORD),
        Channel.CMD,
    ),
    (update_reports(), device_ids, Channel.EVENTS),
    (
        st.builds(TaskAck, round_id=idents, task_id=hex32, has_weights=st.booleans()),
        device_ids,
        Channel.EVENTS,
    ),
    (
        st.builds(
            EvalReport,
            round_id=idents,
            task_id=hex32,
            num_examples=counts,
            metrics=st.dictionaries(keys, finite, max_size=4),
        ),
        device_ids,
        Channel.EVENTS,
    ),
    (
        st.builds(ErrorReport, code=codes, message=texts, ref=st.none() | hex32),
        device_ids,
        Channel.EVENTS,
    ),
    (
        st.builds(ErrorReport, code=codes, message=texts, ref=st.none() | hex32),
        st.just(COORD),
        Channel.CMD,
    ),
]


@st.composite
def routed_messages(draw: st.DrawFn) -> tuple[Message, str, str]:
    """A valid message, a sender allowed to send it, and a topic it may travel on."""
    strategy, senders, channel = draw(st.sampled_from(ROUTED))
    message = draw(strategy)
    sender = draw(senders)
    if channel is None:
        topic = broadcast_topic(draw(idents))
    elif channel.direction.value == "from_device":
        topic = device_topic(sender, channel)
    else:
        topic = device_topic(draw(device_ids), channel)
    return message, sender, topic


def encode_valid(data: st.DataObject) -> bytes:
    message, sender, _ = data.draw(routed_messages())
    return encode(message, sender=sender, sent_at=data.draw(non_negative))


# ------------------------------------------------------------------------ round trip


@FUZZ
@given(routed_messages(), non_negative, hex32)
def test_every_valid_message_round_trips_and_routes(
    routed: tuple[Message, str, str], sent_at: float, msg_id: str
) -> None:
    message, sender, topic = routed
    envelope = decode(encode(message, sender=sender, sent_at=sent_at, msg_id=msg_id))
    assert envelope.message == message
    assert (envelope.id, envelope.sender, envelope.sent_at) == (msg_id, sender, sent_at)
    check_route(envelope, topic)


# ---------------------------------------------------------------------- no crashes


def decode_or_protocol_error(payload: bytes) -> None:
    """Decode; success and ProtocolError are both fine, anything else propagates."""
    with contextlib.suppress(ProtocolError):
        decode(payload)


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes(payload: bytes) -> None:
    decode_or_protocol_error(payload)


@FUZZ
@given(st.integers(0, 3), st.integers(0, 2**32 - 1), st.binary(max_size=500))
def test_random_bytes_after_a_valid_prefix(version: int, length: int, rest: bytes) -> None:
    decode_or_protocol_error(MAGIC + bytes([version]) + struct.pack(">I", length) + rest)


@FUZZ
@given(st.data())
def test_flipped_bytes(data: st.DataObject) -> None:
    payload = bytearray(encode_valid(data))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    decode_or_protocol_error(bytes(payload))


@FUZZ
@given(st.data())
def test_truncated_and_extended(data: st.DataObject) -> None:
    payload = encode_valid(data)
    cut = data.draw(st.integers(0, len(payload)))
    decode_or_protocol_error(payload[:cut])
    decode_or_protocol_error(payload[:cut] + data.draw(st.binary(max_size=50)))
    start = data.draw(st.integers(0, len(payload)))
    decode_or_protocol_error(payload[:start] + payload[start + data.draw(st.integers(1, 20)) :])


def frame(header: bytes, body: bytes = b"") -> bytes:
    return MAGIC + b"\x01" + struct.pack(">I", len(header)) + header + body


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
    | st.sampled_from(["", "coordinator", "0" * 32, "a" * 64, "installed", "status", "chunk"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


FIELD_NAMES = sorted(
    {f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    | {"arrays", "records", "latency_ms", "histogram", "window_start", "p50", "bounds"}
)
random_headers = st.fixed_dictionaries(
    {},
    optional={
        "v": st.just(1) | json_values,
        "type": st.sampled_from(sorted(MESSAGE_TYPES)) | json_values,
        "id": st.just("0" * 32) | json_values,
        "sender": st.sampled_from([COORD, "pi-1"]) | json_values,
        "sent_at": st.just(1.5) | json_values,
        "data": st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=5), json_values)
        | json_values,
        "extra": json_values,
    },
)


@FUZZ
@given(random_headers, st.binary(max_size=100))
def test_random_json_headers(header: dict[str, Any], body: bytes) -> None:
    decode_or_protocol_error(frame(json.dumps(header).encode(), body))


@FUZZ
@given(st.data())
def test_valid_headers_with_random_fields(data: st.DataObject) -> None:
    payload = encode_valid(data)
    (length,) = struct.unpack(">I", payload[5:9])
    header = json.loads(payload[9 : 9 + length])
    body = payload[9 + length :]
    for _ in range(data.draw(st.integers(1, 3))):
        # Walk down a random path, then replace, delete or add something there.
        node: Any = header
        while isinstance(node, dict | list) and node and data.draw(st.booleans()):
            child = node[
                data.draw(
                    st.sampled_from(list(node) if isinstance(node, dict) else range(len(node)))
                )
            ]
            if not isinstance(child, dict | list):
                break
            node = child
        if isinstance(node, dict):
            key = data.draw(st.sampled_from(list(node)) | st.text(max_size=6)) if node else "x"
            if key in node and data.draw(st.booleans()):
                del node[key]
            else:
                node[key] = data.draw(json_values)
        elif isinstance(node, list) and node:
            node[data.draw(st.integers(0, len(node) - 1))] = data.draw(json_values)
    if data.draw(st.booleans()):
        body = data.draw(st.binary(max_size=100))
    decode_or_protocol_error(frame(json.dumps(header).encode(), body))


@FUZZ
@given(st.data())
def test_mutated_header_text(data: st.DataObject) -> None:
    payload = encode_valid(data)
    (length,) = struct.unpack(">I", payload[5:9])
    text = bytearray(payload[9 : 9 + length])
    body = payload[9 + length :]
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(text) - 1))
        text[position] = data.draw(st.sampled_from(b'{}[]",:0123456789-.eEtrufalsn \\\xff'))
    decode_or_protocol_error(frame(bytes(text), body))


@FUZZ
@given(
    st.lists(
        st.integers(0, 3) | st.integers(2**25, 2**40) | st.integers(2**62, 10**19 - 1),
        max_size=5,
    ).map(tuple),
    st.sampled_from(["<f8", ">f4", "|u1", "|b1"]),
    st.binary(max_size=24),
)
def test_update_report_with_any_declared_array_shape(
    shape: tuple[int, ...], descr: str, data: bytes
) -> None:
    """Zero-size and huge declared shapes in an inline update only raise ProtocolError."""
    report = UpdateReport(round_id="r", task_id="0" * 32, num_examples=0, codec="npy", arrays={})
    payload = encode(report, sender="pi-1", sent_at=1.0)
    (length,) = struct.unpack(">I", payload[5:9])
    header = json.loads(payload[9 : 9 + length])
    blob = npy(f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}", data)
    header["data"]["arrays"] = [{"name": "w", "length": len(blob)}]
    decode_or_protocol_error(frame(json.dumps(header).encode(), blob))
