"""Tests for typed messages, encode/decode and routing (edge_agent.protocol.messages)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from compress.keys import generate_signing_key
from compress.manifest import MAX_MANIFEST_BYTES, MAX_PAYLOAD_BYTES
from compress.signing import MAX_BLOB_BYTES, MAX_SIGNATURES, sign_manifest
from compress.statement import MAX_SIGNED_STATEMENT_BYTES
from edge_agent.errors import (
    MalformedMessageError,
    MessageTooLargeError,
    TopicError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
)
from edge_agent.protocol import (
    MAGIC,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    ArrayEntry,
    BroadcastTopic,
    Channel,
    Chunk,
    ChunkRequest,
    Deploy,
    DeviceTopic,
    Envelope,
    ErrorReport,
    EvalReport,
    FleetStatementMessage,
    Histogram,
    InstallState,
    InstallStatus,
    LatencyQuantiles,
    Limits,
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
    new_message_id,
    sha256_hex,
)
from tests.conftest import make_manifest

DEVICE = "pi-7"
COORD = "coordinator"
SHA = "ab" * 32
MSG_ID = "0123456789abcdef0123456789abcdef"
TASK = "fedcba9876543210" * 2
PAYLOAD = bytes(range(256)) * 700  # 179200 bytes -> 3 chunks of 64 KiB


def record(**overrides: Any) -> TelemetryRecord:
    fields: dict[str, Any] = {
        "window_start": 1_700_000_000.0,
        "window_end": 1_700_000_060.0,
        "model": "kws",
        "version": 3,
        "predictions": 120,
        "errors": 1,
        "latency_ms": LatencyQuantiles(p50=1.5, p95=4.0, p99=9.25),
        "histogram": Histogram(bounds=(1.0, 5.0, 10.0), counts=(50, 60, 9, 1)),
        "cpu_percent": 12.5,
        "memory_bytes": 50_000_000,
        "uptime_s": 3600.0,
    }
    fields.update(overrides)
    return TelemetryRecord(**fields)


def samples() -> dict[str, tuple[Message, str]]:
    """One message of every type with a sender that may send it."""
    return {
        "status": (
            Status(
                online=True,
                agent_version="0.1.0+g1234",
                hardware={
                    "machine": "aarch64",
                    "cpu_count": 4,
                    "memory_bytes": 4 << 30,
                    "ghz": 1.8,
                },
                runtimes=("onnxruntime", "tflite"),
                tags=("camera", "arch=aarch64"),
                models=(ModelInfo(name="kws", version=3, sha256=SHA),),
            ),
            DEVICE,
        ),
        "deploy": (
            Deploy(
                deployment_id="dep-42",
                transfer_id=sha256_hex(PAYLOAD),
                total_size=len(PAYLOAD),
                chunk_size=65536,
                chunk_count=3,
                manifest=b'{"signed": "manifest"}',
            ),
            COORD,
        ),
        "rollback": (Rollback(model="kws", reason="accuracy dropped"), COORD),
        "chunk_request": (ChunkRequest(transfer_id=SHA, indices=(0, 2, 5)), DEVICE),
        "chunk": (Chunk.from_payload(PAYLOAD, 2, chunk_size=65536), COORD),
        "install_status": (
            InstallStatus(
                deployment_id="dep-42",
                model="kws",
                version=4,
                state=InstallState.FAILED,
                chunks_held=2,
                chunks_total=3,
                error_code="bad_signature",
                reason="threshold not met",
            ),
            DEVICE,
        ),
        "telemetry_batch": (
            TelemetryBatch(seq=17, dropped=2, records=(record(), record(model=None, version=None))),
            DEVICE,
        ),
        "train_task": (
            TrainTask(
                round_id="run1-r3",
                task_id=TASK,
                action=TaskAction.EVALUATE,
                model="kws",
                family="softmax_regression",
                weights_transfer_id=SHA,
                weights_size=4096,
                weights_index=(ArrayEntry("W0", 4000), ArrayEntry("b0", 96)),
                chunk_size=1024,
                codec="topk:0.1+int8",
                deadline=1_700_000_600.5,
                config={"epochs": 2, "lr": 0.01, "optimizer": "sgd", "shuffle": True},
            ),
            COORD,
        ),
        "update_report": (
            UpdateReport(
                round_id="run1-r3",
                task_id=TASK,
                num_examples=512,
                codec="fp16",
                metrics={"loss": 0.25, "accuracy": 0.9},
                arrays={
                    "fc1.weight": np.arange(12, dtype=np.float16).reshape(3, 4),
                    "fc1.bias": np.zeros(4, dtype=np.float32),
                },
            ),
            DEVICE,
        ),
        "task_ack": (TaskAck(round_id="run1-r3", task_id=TASK, has_weights=True), DEVICE),
        "eval_report": (
            EvalReport(
                round_id="run1-r3",
                task_id=TASK,
                num_examples=40,
                metrics={"loss": 0.5, "accuracy": 0.875},
            ),
            DEVICE,
        ),
        "error": (ErrorReport(code="malformed", message="bad chunk", ref=MSG_ID), DEVICE),
        "fleet_statement": (FleetStatementMessage(statement=b"FFS1 opaque signed bytes"), COORD),
    }


def header_of(payload: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack(">I", payload[5:9])
    return json.loads(payload[9 : 9 + length]), payload[9 + length :]


def reframe(header: dict[str, Any], body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return MAGIC + b"\x01" + struct.pack(">I", len(raw)) + raw + body


def encoded(name: str) -> bytes:
    message, sender = samples()[name]
    return encode(message, sender=sender, sent_at=1_700_000_000.25, msg_id=MSG_ID)


def mutated(
    name: str, mutate: Callable[[dict[str, Any]], None], body: bytes | None = None
) -> bytes:
    """Re-encode a sample after changing its decoded header in place."""
    header, original_body = header_of(encoded(name))
    mutate(header)
    return reframe(header, original_body if body is None else body)


def set_data(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(header: dict[str, Any]) -> None:
        for key, value in changes.items():
            if value is DELETE:
                del header["data"][key]
            else:
                header["data"][key] = value

    return mutate


DELETE = object()


# ----------------------------------------------------------------------- round trips


def test_registry_covers_every_type() -> None:
    assert set(MESSAGE_TYPES) == set(samples())
    for name, cls in MESSAGE_TYPES.items():
        assert name == cls.TYPE
        assert cls.CHANNELS


@pytest.mark.parametrize("name", sorted(samples()))
def test_round_trip(name: str) -> None:
    message, sender = samples()[name]
    envelope = decode(encode(message, sender=sender, sent_at=1_700_000_000.25, msg_id=MSG_ID))
    assert envelope == Envelope(
        id=MSG_ID,
        sender=sender,
        sent_at=1_700_000_000.25,
        version=PROTOCOL_VERSION,
        message=message,
    )


def test_encode_draws_a_message_id() -> None:
    message, sender = samples()["rollback"]
    first = decode(encode(message, sender=sender, sent_at=0.0))
    second = decode(encode(message, sender=sender, sent_at=0.0))
    assert first.id != second.id
    assert len(new_message_id()) == 32


def test_header_layout() -> None:
    header, body = header_of(encoded("rollback"))
    assert header == {
        "v": 1,
        "type": "rollback",
        "id": MSG_ID,
        "sender": COORD,
        "sent_at": 1_700_000_000.25,
        "data": {"model": "kws", "reason": "accuracy dropped"},
    }
    assert body == b""


def test_deploy_body_is_the_manifest() -> None:
    _, body = header_of(encoded("deploy"))
    assert body == b'{"signed": "manifest"}'


def test_int_sent_at_and_float_fields_accept_json_integers() -> None:
    payload = mutated("train_task", lambda h: h.update(sent_at=5) or h["data"].update(deadline=7))
    envelope = decode(payload)
    assert envelope.sent_at == 5.0
    assert isinstance(envelope.message, TrainTask)
    assert envelope.message.deadline == 7.0
    assert isinstance(envelope.message.deadline, float)


def test_optional_fields_may_be_absent_or_null() -> None:
    def drop(header: dict[str, Any]) -> None:
        for key in ("model", "version", "error_code", "reason"):
            del header["data"][key]

    message = decode(mutated("install_status", drop)).message
    assert message == InstallStatus(
        deployment_id="dep-42", state=InstallState.FAILED, chunks_held=2, chunks_total=3
    )
    message = decode(mutated("error", set_data(ref=None))).message
    assert message == ErrorReport(code="malformed", message="bad chunk")


def test_unknown_keys_are_ignored() -> None:
    def add(header: dict[str, Any]) -> None:
        header["future_top_level"] = {"x": [1, 2]}
        header["data"]["future_field"] = "ignored"
        header["data"]["records"][0]["future_metric"] = 1.0
        header["data"]["records"][0]["histogram"]["future"] = True

    envelope = decode(mutated("telemetry_batch", add))
    assert envelope.message == samples()["telemetry_batch"][0]


def test_update_report_upload_form() -> None:
    index = (ArrayEntry("fc1.weight", 300), ArrayEntry("fc1.bias", 150))
    report = UpdateReport(
        round_id="r1",
        task_id=TASK,
        num_examples=10,
        codec="int8",
        upload_transfer_id=SHA,
        upload_index=index,
    )
    payload = encode(report, sender=DEVICE, sent_at=1.0)
    decoded = decode(payload).message
    assert decoded == report
    assert isinstance(decoded, UpdateReport)
    assert decoded.arrays is None
    assert decoded.upload_index == index


def test_update_report_inline_arrays_are_read_only() -> None:
    decoded = decode(encoded("update_report")).message
    assert isinstance(decoded, UpdateReport)
    assert decoded.arrays is not None
    assert all(not array.flags.writeable for array in decoded.arrays.values())


def test_update_report_equality_and_hash() -> None:
    report = samples()["update_report"][0]
    assert isinstance(report, UpdateReport)
    other = copy.deepcopy(report)
    assert report == other
    assert hash(report) == hash(other)
    assert report != "something else"
    assert other.arrays is not None
    other.arrays["fc1.bias"] = np.ones(4, dtype=np.float32)
    assert report != other


def test_chunk_helpers() -> None:
    assert chunk_count(0, 10) == 1
    assert chunk_count(10, 10) == 1
    assert chunk_count(11, 10) == 2
    with pytest.raises(MalformedMessageError):
        chunk_count(-1, 10)
    with pytest.raises(MalformedMessageError):
        chunk_count(10, 0)
    chunks = [Chunk.from_payload(PAYLOAD, i, chunk_size=65536) for i in range(3)]
    assert b"".join(c.data for c in chunks) == PAYLOAD
    assert {c.transfer_id for c in chunks} == {hashlib.sha256(PAYLOAD).hexdigest()}
    assert [c.offset for c in chunks] == [0, 65536, 131072]
    with pytest.raises(MalformedMessageError):
        Chunk.from_payload(PAYLOAD, 3, chunk_size=65536)
    empty = Chunk.from_payload(b"", 0, chunk_size=1024)
    assert decode(encode(empty, sender=COORD, sent_at=0.0)).message == empty


def test_every_chunk_of_a_payload_round_trips() -> None:
    tid = sha256_hex(PAYLOAD)
    for index in range(3):
        chunk = Chunk.from_payload(PAYLOAD, index, chunk_size=65536, transfer_id=tid)
        assert decode(encode(chunk, sender=COORD, sent_at=0.0)).message == chunk


def test_max_size_chunk_fits_in_a_message() -> None:
    payload = b"\x07" * (128 * 1024 * 2)
    chunk = Chunk.from_payload(payload, 1, chunk_size=128 * 1024)
    assert decode(encode(chunk, sender=COORD, sent_at=0.0)).message == chunk


# ----------------------------------------------------------------- header strictness


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda h: h.update(v=2), UnsupportedVersionError),
        (lambda h: h.update(v=99, type="brand_new", data=[]), UnsupportedVersionError),
        (lambda h: h.update(v=0), MalformedMessageError),
        (lambda h: h.update(v=True), MalformedMessageError),
        (lambda h: h.update(v=1.0), MalformedMessageError),
        (lambda h: h.update(v="1"), MalformedMessageError),
        (lambda h: h.pop("v"), MalformedMessageError),
        (lambda h: h.update(type="no_such_type"), UnknownMessageTypeError),
        (lambda h: h.update(type="Rollback"), MalformedMessageError),
        (lambda h: h.update(type=7), MalformedMessageError),
        (lambda h: h.pop("type"), MalformedMessageError),
        (lambda h: h.update(id="0123456789ABCDEF0123456789ABCDEF"), MalformedMessageError),
        (lambda h: h.update(id="0123"), MalformedMessageError),
        (lambda h: h.update(id=123), MalformedMessageError),
        (lambda h: h.pop("id"), MalformedMessageError),
        (lambda h: h.update(sender="bad/sender"), MalformedMessageError),
        (lambda h: h.update(sender=""), MalformedMessageError),
        (lambda h: h.update(sender=None), MalformedMessageError),
        (lambda h: h.pop("sender"), MalformedMessageError),
        (lambda h: h.update(sent_at="now"), MalformedMessageError),
        (lambda h: h.update(sent_at=True), MalformedMessageError),
        (lambda h: h.update(sent_at=-1.0), MalformedMessageError),
        (lambda h: h.update(sent_at=2**60), MalformedMessageError),
        (lambda h: h.pop("sent_at"), MalformedMessageError),
        (lambda h: h.update(data=[]), MalformedMessageError),
        (lambda h: h.update(data=None), MalformedMessageError),
        (lambda h: h.pop("data"), MalformedMessageError),
    ],
)
def test_header_checks(mutate: Callable[[dict[str, Any]], Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(mutated("rollback", mutate))


def test_decode_rejects_framing_errors_with_typed_errors() -> None:
    with pytest.raises(MalformedMessageError):
        decode(b"")
    with pytest.raises(MalformedMessageError):
        decode(b"not a fedge payload")
    with pytest.raises(MessageTooLargeError):
        decode(b"\x00" * (256 * 1024 + 1))


def test_body_on_a_bodyless_type() -> None:
    for name in ("status", "rollback", "chunk_request", "install_status", "telemetry_batch"):
        with pytest.raises(MalformedMessageError):
            decode(mutated(name, lambda h: None, body=b"x"))
    for name in ("train_task", "error"):
        with pytest.raises(MalformedMessageError):
            decode(mutated(name, lambda h: None, body=b"x"))


# ------------------------------------------------------------------ field strictness

LONG = "x" * 4097
BAD_FIELDS: list[tuple[str, dict[str, Any], type[Exception]]] = [
    # status
    ("status", {"online": 1}, MalformedMessageError),
    ("status", {"online": DELETE}, MalformedMessageError),
    ("status", {"agent_version": ""}, MalformedMessageError),
    ("status", {"agent_version": "1.0 beta"}, MalformedMessageError),
    ("status", {"hardware": []}, MalformedMessageError),
    ("status", {"hardware": {"gpu": True}}, MalformedMessageError),
    ("status", {"hardware": {"x": None}}, MalformedMessageError),
    ("status", {"hardware": {"x": [1]}}, MalformedMessageError),
    ("status", {"hardware": {"bad key": 1}}, MalformedMessageError),
    ("status", {"hardware": {"": 1}}, MalformedMessageError),
    ("status", {"hardware": {"x": 2**53}}, MalformedMessageError),
    ("status", {"hardware": {"x": LONG}}, MessageTooLargeError),
    ("status", {"hardware": {f"k{i}": i for i in range(257)}}, MessageTooLargeError),
    ("status", {"runtimes": "onnxruntime"}, MalformedMessageError),
    ("status", {"runtimes": ["../etc"]}, MalformedMessageError),
    ("status", {"runtimes": ["a"] * 1025}, MessageTooLargeError),
    ("status", {"tags": ["has space"]}, MalformedMessageError),
    ("status", {"tags": [1]}, MalformedMessageError),
    ("status", {"models": [{"name": "kws", "version": -1, "sha256": SHA}]}, MalformedMessageError),
    (
        "status",
        {"models": [{"name": "kws", "version": 1, "sha256": "AB" * 32}]},
        MalformedMessageError,
    ),
    ("status", {"models": [{"name": "kws", "version": 1}]}, MalformedMessageError),
    ("status", {"models": [["kws", 1, SHA]]}, MalformedMessageError),
    # deploy
    ("deploy", {"deployment_id": "a/b"}, MalformedMessageError),
    ("deploy", {"transfer_id": SHA[:-1]}, MalformedMessageError),
    ("deploy", {"chunk_size": 0}, MalformedMessageError),
    ("deploy", {"chunk_size": 128 * 1024 + 1}, MessageTooLargeError),
    ("deploy", {"chunk_size": 65536.0}, MalformedMessageError),
    ("deploy", {"chunk_count": 4}, MalformedMessageError),
    ("deploy", {"chunk_count": 0}, MalformedMessageError),
    ("deploy", {"total_size": 2**40}, MessageTooLargeError),
    ("deploy", {"total_size": -1}, MalformedMessageError),
    ("deploy", {"total_size": False}, MalformedMessageError),
    # rollback
    ("rollback", {"model": ""}, MalformedMessageError),
    ("rollback", {"model": ".."}, MalformedMessageError),
    ("rollback", {"reason": None}, MalformedMessageError),
    ("rollback", {"reason": LONG}, MessageTooLargeError),
    # chunk_request
    ("chunk_request", {"indices": []}, MalformedMessageError),
    ("chunk_request", {"indices": [-1]}, MalformedMessageError),
    ("chunk_request", {"indices": [True]}, MalformedMessageError),
    ("chunk_request", {"indices": [1.0]}, MalformedMessageError),
    ("chunk_request", {"indices": list(range(1025))}, MessageTooLargeError),
    ("chunk_request", {"indices": {"0": 1}}, MalformedMessageError),
    ("chunk_request", {"transfer_id": None}, MalformedMessageError),
    # install_status
    ("install_status", {"state": "exploded"}, MalformedMessageError),
    ("install_status", {"state": "INSTALLED"}, MalformedMessageError),
    ("install_status", {"state": 3}, MalformedMessageError),
    ("install_status", {"chunks_held": 4}, MalformedMessageError),
    ("install_status", {"chunks_total": -1}, MalformedMessageError),
    ("install_status", {"error_code": "Bad Code"}, MalformedMessageError),
    ("install_status", {"version": "4"}, MalformedMessageError),
    ("install_status", {"reason": LONG}, MessageTooLargeError),
    ("install_status", {"deployment_id": DELETE}, MalformedMessageError),
    # telemetry_batch
    ("telemetry_batch", {"seq": -1}, MalformedMessageError),
    ("telemetry_batch", {"dropped": 0.5}, MalformedMessageError),
    ("telemetry_batch", {"records": {}}, MalformedMessageError),
    ("telemetry_batch", {"records": [1]}, MalformedMessageError),
    # train_task
    ("train_task", {"codec": ""}, MalformedMessageError),
    ("train_task", {"codec": "fp16 topk"}, MalformedMessageError),
    ("train_task", {"deadline": "soon"}, MalformedMessageError),
    ("train_task", {"weights_size": 2**40}, MessageTooLargeError),
    ("train_task", {"config": {"nested": {"a": 1}}}, MalformedMessageError),
    ("train_task", {"config": {"list": [1]}}, MalformedMessageError),
    ("train_task", {"config": {"none": None}}, MalformedMessageError),
    ("train_task", {"config": {"big": 2**53}}, MalformedMessageError),
    ("train_task", {"family": "mlp/../x"}, MalformedMessageError),
    # update_report
    ("update_report", {"num_examples": -3}, MalformedMessageError),
    ("update_report", {"metrics": {"loss": "low"}}, MalformedMessageError),
    ("update_report", {"metrics": {"loss": True}}, MalformedMessageError),
    ("update_report", {"metrics": {"loss": None}}, MalformedMessageError),
    ("update_report", {"arrays": DELETE}, MalformedMessageError),
    ("update_report", {"arrays": [{"name": "fc1.weight", "length": 10}]}, MalformedMessageError),
    ("update_report", {"upload_transfer_id": SHA}, MalformedMessageError),
    ("update_report", {"upload_transfer_id": "xyz"}, MalformedMessageError),
    # error
    ("error", {"code": ""}, MalformedMessageError),
    ("error", {"code": "Has-Caps"}, MalformedMessageError),
    ("error", {"message": 5}, MalformedMessageError),
    ("error", {"ref": "abc"}, MalformedMessageError),
    ("error", {"message": LONG}, MessageTooLargeError),
]


@pytest.mark.parametrize(
    ("name", "changes", "error"),
    BAD_FIELDS,
    ids=[f"{name}-{'-'.join(changes)}-{i}" for i, (name, changes, _) in enumerate(BAD_FIELDS)],
)
def test_field_checks(name: str, changes: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(mutated(name, set_data(**changes)))


def test_missing_required_field_of_every_type() -> None:
    for name in samples():
        header, body = header_of(encoded(name))
        for key in header["data"]:
            if name == "install_status" and key in ("model", "version", "error_code", "reason"):
                continue
            if (name, key) in (
                ("status", "train_examples"),
                ("status", "train_models"),
                ("status", "stale"),
                ("telemetry_batch", "stale"),
            ):
                continue  # optional (default 0, empty, false)
            if name == "train_task" and key in ("model_spec", "model_args", "task"):
                continue  # optional (built-in family, classification)
            if name in ("error", "update_report") and key in ("ref", "upload_transfer_id"):
                continue
            broken = copy.deepcopy(header)
            del broken["data"][key]
            with pytest.raises(MalformedMessageError):
                decode(reframe(broken, body))


BAD_RECORDS: list[dict[str, Any]] = [
    {"window_end": 1.0},
    {"window_start": -5.0},
    {"model": None},
    {"version": None},
    {"model": "a b"},
    {"predictions": -1},
    {"errors": 1.5},
    {"latency_ms": {"p50": 1.0, "p95": 2.0}},
    {"latency_ms": {"p50": -1.0, "p95": 2.0, "p99": 3.0}},
    {"latency_ms": [1, 2, 3]},
    {"histogram": {"bounds": [1.0, 1.0], "counts": [1, 2, 3]}},
    {"histogram": {"bounds": [2.0, 1.0], "counts": [1, 2, 3]}},
    {"histogram": {"bounds": [1.0], "counts": [1]}},
    {"histogram": {"bounds": [1.0], "counts": [1, -2]}},
    {"histogram": {"bounds": ["a"], "counts": [1, 2]}},
    {"cpu_percent": -0.5},
    {"memory_bytes": 1.0},
    {"uptime_s": None},
]


@pytest.mark.parametrize("changes", BAD_RECORDS)
def test_telemetry_record_checks(changes: dict[str, Any]) -> None:
    def mutate(header: dict[str, Any]) -> None:
        header["data"]["records"][0].update(changes)

    with pytest.raises(MalformedMessageError):
        decode(mutated("telemetry_batch", mutate))


def test_telemetry_record_missing_field() -> None:
    def mutate(header: dict[str, Any]) -> None:
        del header["data"]["records"][0]["uptime_s"]

    with pytest.raises(MalformedMessageError):
        decode(mutated("telemetry_batch", mutate))


# ------------------------------------------------------------------ body strictness


def test_deploy_manifest_bounds() -> None:
    with pytest.raises(MalformedMessageError):
        decode(mutated("deploy", lambda h: None, body=b""))
    with pytest.raises(MessageTooLargeError):
        decode(mutated("deploy", lambda h: None, body=b"m" * (64 * 1024 + 1)))


@pytest.mark.parametrize("name", ["status", "telemetry_batch"])
def test_stale_is_optional_on_the_wire(name: str) -> None:
    """Agents from before fleet statements send no ``stale``: it reads as false."""
    message, sender = samples()[name]
    flagged = dataclasses.replace(message, stale=True)  # type: ignore[type-var]
    assert decode(encode(flagged, sender=sender, sent_at=1.0)).message == flagged

    def drop(header: dict[str, Any]) -> None:
        del header["data"]["stale"]

    assert decode(mutated(name, drop)).message.stale is False  # type: ignore[attr-defined]
    with pytest.raises(MalformedMessageError):
        decode(mutated(name, set_data(stale="yes")))


def test_fleet_statement_bounds() -> None:
    with pytest.raises(MalformedMessageError):
        decode(mutated("fleet_statement", lambda h: None, body=b""))
    with pytest.raises(MessageTooLargeError):
        decode(
            mutated("fleet_statement", lambda h: None, body=b"s" * (MAX_SIGNED_STATEMENT_BYTES + 1))
        )
    largest = FleetStatementMessage(statement=b"s" * MAX_SIGNED_STATEMENT_BYTES)
    assert decode(encode(largest, sender=COORD, sent_at=1.0)).message == largest


TAMPERED = b"<tampered>"


@pytest.mark.parametrize(
    ("changes", "body", "error"),
    [
        ({}, TAMPERED, MalformedMessageError),  # right size, wrong sha256
        ({}, b"short", MalformedMessageError),
        ({"sha256": "cd" * 32}, None, MalformedMessageError),
        ({"index": 3}, None, MalformedMessageError),
        ({"index": -1}, None, MalformedMessageError),
        ({"count": 4}, None, MalformedMessageError),
        ({"offset": 0}, None, MalformedMessageError),
        ({"chunk_size": 65535}, None, MalformedMessageError),
        ({"chunk_size": 0}, None, MalformedMessageError),
        ({"total_size": 179201}, None, MalformedMessageError),
        ({"transfer_id": "nothex"}, None, MalformedMessageError),
        ({}, b"\x00" * (128 * 1024 + 1), MessageTooLargeError),
    ],
)
def test_chunk_checks(changes: dict[str, Any], body: bytes | None, error: type[Exception]) -> None:
    header, original = header_of(encoded("chunk"))
    header["data"].update(changes)
    if body is TAMPERED:
        body = b"tampered".ljust(len(original), b"\x00")
    with pytest.raises(error):
        decode(reframe(header, original if body is None else body))


def test_chunk_with_flipped_byte_is_rejected() -> None:
    header, body = header_of(encoded("chunk"))
    flipped = bytes([body[0] ^ 1]) + body[1:]
    with pytest.raises(MalformedMessageError, match="sha256"):
        decode(reframe(header, flipped))


def test_chunk_over_a_lowered_limit() -> None:
    limits = Limits(max_chunk_bytes=16 * 1024, default_chunk_bytes=16 * 1024)
    with pytest.raises(MessageTooLargeError):
        decode(encoded("chunk"), limits)


def test_update_report_body_checks() -> None:
    header, body = header_of(encoded("update_report"))
    with pytest.raises(MalformedMessageError):
        decode(reframe(header, body + b"\x00"))
    with pytest.raises(MalformedMessageError):
        decode(reframe(header, body[:-1]))
    with pytest.raises(MalformedMessageError):
        decode(reframe(header, b"\x00" * len(body)))
    upload = copy.deepcopy(header)
    upload["data"]["upload_transfer_id"] = SHA
    with pytest.raises(MalformedMessageError):
        decode(reframe(upload, body))  # uploaded form must have an empty body
    upload["data"]["arrays"] = []
    with pytest.raises(MalformedMessageError):
        decode(reframe(upload, b""))  # and a non-empty index
    upload["data"]["arrays"] = [{"name": "a", "length": 2**30}]
    with pytest.raises(MessageTooLargeError):
        decode(reframe(upload, b""))  # one entry over max_array_bytes
    upload["data"]["arrays"] = [{"name": f"a{i}", "length": 64 * 2**20} for i in range(9)]
    with pytest.raises(MessageTooLargeError):
        decode(reframe(upload, b""))  # all entries together over max_transfer_bytes


def test_update_report_rejects_forbidden_dtypes_in_body() -> None:
    blob = b"\x93NUMPY\x01\x00v\x00" + (
        b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }".ljust(117) + b"\n"
    )
    blob += b"\x00" * 8
    header, _ = header_of(encoded("update_report"))
    header["data"]["arrays"] = [{"name": "evil", "length": len(blob)}]
    with pytest.raises(MalformedMessageError):
        decode(reframe(header, blob))


# --------------------------------------------------------------------------- encode


def test_encode_checks_what_it_sends() -> None:
    with pytest.raises(MalformedMessageError):
        encode(Rollback(model="../x"), sender=COORD, sent_at=0.0)
    with pytest.raises(MalformedMessageError):
        encode(Rollback(model="kws"), sender="bad sender", sent_at=0.0)
    with pytest.raises(MalformedMessageError):
        encode(Rollback(model="kws"), sender=COORD, sent_at=float("nan"))
    with pytest.raises(MalformedMessageError):
        encode(Rollback(model="kws"), sender=COORD, sent_at=0.0, msg_id="XYZ")
    with pytest.raises(MalformedMessageError):
        encode(ChunkRequest(transfer_id=SHA, indices=()), sender=DEVICE, sent_at=0.0)
    numpy_scalar: Any = np.int64(3)  # not a plain int: json cannot encode it
    with pytest.raises(MalformedMessageError):
        encode(
            Status(online=True, agent_version="1", hardware={"n": numpy_scalar}),
            sender=DEVICE,
            sent_at=0.0,
        )
    with pytest.raises(MessageTooLargeError):
        encode(Rollback(model="kws", reason="r" * 5000), sender=COORD, sent_at=0.0)


def test_encode_rejects_inconsistent_chunks() -> None:
    chunk = Chunk.from_payload(PAYLOAD, 1, chunk_size=65536)
    bad = Chunk(**{**chunk.__dict__, "data": b"x" * len(chunk.data)})
    with pytest.raises(MalformedMessageError):
        encode(bad, sender=COORD, sent_at=0.0)


def test_encode_update_report_needs_exactly_one_form() -> None:
    both = UpdateReport(
        round_id="r", task_id=TASK, num_examples=1, codec="fp32", arrays={}, upload_transfer_id=SHA
    )
    neither = UpdateReport(round_id="r", task_id=TASK, num_examples=1, codec="fp32")
    for report in (both, neither):
        with pytest.raises(MalformedMessageError):
            encode(report, sender=DEVICE, sent_at=0.0)
    bad_array = UpdateReport(
        round_id="r", task_id=TASK, num_examples=1, codec="fp32", arrays={"a": np.array(["s"])}
    )
    with pytest.raises(MalformedMessageError):
        encode(bad_array, sender=DEVICE, sent_at=0.0)
    not_a_mapping = UpdateReport(
        round_id="r",
        task_id=TASK,
        num_examples=1,
        codec="fp32",
        arrays=[1, 2],  # type: ignore[arg-type]
    )
    with pytest.raises(MalformedMessageError):
        encode(not_a_mapping, sender=DEVICE, sent_at=0.0)


def test_encode_too_large_update() -> None:
    big = UpdateReport(
        round_id="r",
        task_id=TASK,
        num_examples=1,
        codec="fp32",
        arrays={"w": np.zeros(300 * 1024 // 4, dtype=np.float32)},
    )
    with pytest.raises(MessageTooLargeError):
        encode(big, sender=DEVICE, sent_at=0.0)


def test_encode_rejects_unregistered_types() -> None:
    class Custom(Rollback):
        pass

    with pytest.raises(UnknownMessageTypeError):
        encode(Custom(model="kws"), sender=COORD, sent_at=0.0)
    with pytest.raises(UnknownMessageTypeError):
        encode("rollback", sender=COORD, sent_at=0.0)  # type: ignore[arg-type]


# -------------------------------------------------------------------------- routing


ALLOWED_ROUTES = [
    ("status", DEVICE, Channel.STATUS),
    ("deploy", COORD, Channel.CMD),
    ("rollback", COORD, Channel.CMD),
    ("train_task", COORD, Channel.CMD),
    ("error", COORD, Channel.CMD),
    ("chunk", COORD, Channel.CHUNKS),
    ("chunk", DEVICE, Channel.EVENTS),
    ("chunk_request", DEVICE, Channel.EVENTS),
    ("install_status", DEVICE, Channel.EVENTS),
    ("update_report", DEVICE, Channel.EVENTS),
    ("eval_report", DEVICE, Channel.EVENTS),
    ("task_ack", DEVICE, Channel.EVENTS),
    ("error", DEVICE, Channel.EVENTS),
    ("telemetry_batch", DEVICE, Channel.TELEMETRY),
    ("fleet_statement", COORD, Channel.CMD),
]


def envelope_for(name: str, sender: str) -> Envelope:
    message, _ = samples()[name]
    return Envelope(id=MSG_ID, sender=sender, sent_at=0.0, version=1, message=message)


@pytest.mark.parametrize(("name", "sender", "channel"), ALLOWED_ROUTES)
def test_allowed_routes(name: str, sender: str, channel: Channel) -> None:
    topic = device_topic(DEVICE, channel)
    assert check_route(envelope_for(name, sender), topic) == DeviceTopic(DEVICE, channel)


def test_channels_match_the_route_table() -> None:
    table = {(name, channel) for name, _, channel in ALLOWED_ROUTES}
    declared = {(name, channel) for name, cls in MESSAGE_TYPES.items() for channel in cls.CHANNELS}
    assert declared == table


@pytest.mark.parametrize("name", sorted(samples()))
@pytest.mark.parametrize("channel", list(Channel))
def test_disallowed_channels(name: str, channel: Channel) -> None:
    if channel in MESSAGE_TYPES[name].CHANNELS:
        return
    sender = DEVICE if channel.direction.value == "from_device" else COORD
    with pytest.raises(TopicError):
        check_route(envelope_for(name, sender), device_topic(DEVICE, channel))


def test_device_cannot_speak_for_another_device() -> None:
    for name, sender, channel in ALLOWED_ROUTES:
        if sender == DEVICE:
            with pytest.raises(TopicError):
                check_route(envelope_for(name, "pi-8"), device_topic(DEVICE, channel))
            with pytest.raises(TopicError):
                check_route(envelope_for(name, COORD), device_topic(DEVICE, channel))


def test_only_the_coordinator_sends_to_devices() -> None:
    for name, sender, channel in ALLOWED_ROUTES:
        if sender == COORD:
            with pytest.raises(TopicError):
                check_route(envelope_for(name, DEVICE), device_topic(DEVICE, channel))


def test_broadcast_routes() -> None:
    topic = broadcast_topic("round-3")
    assert check_route(envelope_for("chunk", COORD), topic) == BroadcastTopic("round-3")
    with pytest.raises(TopicError):
        check_route(envelope_for("chunk", DEVICE), topic)
    fleet = broadcast_topic("fleet.plant-a")
    assert check_route(envelope_for("fleet_statement", COORD), fleet) == BroadcastTopic(
        "fleet.plant-a"
    )
    with pytest.raises(TopicError):
        check_route(envelope_for("fleet_statement", DEVICE), fleet)
    for name in samples():
        if name not in ("chunk", "fleet_statement"):
            with pytest.raises(TopicError):
                check_route(envelope_for(name, COORD), topic)


@pytest.mark.parametrize(
    "topic", ["", "fedge/v1/devices/pi-7", "other/pi-7/events", "fedge/v1/devices/+/events"]
)
def test_route_with_bad_topic(topic: str) -> None:
    with pytest.raises(TopicError):
        check_route(envelope_for("chunk_request", DEVICE), topic)


def test_decode_then_route_end_to_end() -> None:
    envelope = decode(encoded("install_status"))
    route = check_route(envelope, f"fedge/v1/devices/{DEVICE}/events")
    assert isinstance(route, DeviceTopic)
    assert route.device_id == DEVICE
    assert envelope.sender == DEVICE


def test_largest_signed_manifest_fits_a_deploy_message_with_default_limits() -> None:
    assert Limits().max_manifest_bytes == MAX_BLOB_BYTES
    assert Limits().max_transfer_bytes == MAX_PAYLOAD_BYTES
    # Pad metadata until the manifest is exactly as large as compress allows.
    metadata: dict[str, str] = {}
    manifest = make_manifest(metadata=metadata)
    while MAX_MANIFEST_BYTES - len(manifest.to_bytes()) > 1030:
        metadata[f"pad{len(metadata):02d}"] = "x" * 1000
        manifest = make_manifest(metadata=metadata)
    # One more entry adds ',"tail":"..."': 10 bytes plus its value.
    metadata["tail"] = "x" * (MAX_MANIFEST_BYTES - len(manifest.to_bytes()) - 10)
    manifest = make_manifest(metadata=metadata)
    assert len(manifest.to_bytes()) == MAX_MANIFEST_BYTES
    blob = sign_manifest(manifest, [generate_signing_key() for _ in range(MAX_SIGNATURES)])
    blob_bytes = blob.to_bytes()
    assert MAX_BLOB_BYTES - 8 * 1024 < len(blob_bytes) <= MAX_BLOB_BYTES

    total = MAX_PAYLOAD_BYTES
    deploy = Deploy(
        deployment_id="dep-max",
        transfer_id=SHA,
        total_size=total,
        chunk_size=65536,
        chunk_count=chunk_count(total, 65536),
        manifest=blob_bytes,
    )
    envelope = decode(encode(deploy, sender=COORD, sent_at=1.0))
    assert envelope.message == deploy
