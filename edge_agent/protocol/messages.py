"""Typed fedge messages: what travels in the header's ``data`` and in the body.

Every payload is framed by :mod:`edge_agent.protocol.framing`; its header is::

    {"v": 1, "type": "<type>", "id": "<32 lowercase hex>",
     "sender": "<device id or 'coordinator'>", "sent_at": <unix seconds>,
     "data": {...type-specific fields...}}

Workflow:

* Sender: build a message (``Chunk.from_payload(...)``, ``InstallStatus(...)``),
  then ``encode(message, sender=..., sent_at=now)`` and publish the bytes on a topic
  whose channel is in the message's ``CHANNELS`` (or a broadcast topic when
  ``BROADCAST`` is true). Constructing a message checks nothing; :func:`encode`
  checks everything, by decoding its own output with the receiver's checks, so
  nothing leaves this side that a peer with the same limits would refuse.
* Receiver: ``envelope = decode(payload, limits)`` then
  ``check_route(envelope, topic)`` before acting on ``envelope.message``.

Rules that :func:`decode` enforces:

* ``v`` is an int >= 1; a ``v`` above :data:`PROTOCOL_VERSION` raises
  :class:`~edge_agent.errors.UnsupportedVersionError` (checked before anything
  else in the header, since a newer version may change the rest).
* An unknown ``type`` raises :class:`~edge_agent.errors.UnknownMessageTypeError`.
* Unknown keys, at the top level, in ``data`` or in nested objects, are ignored:
  later versions add fields without breaking older agents. Known fields are
  required (unless documented optional, where ``null`` and absence both mean
  None) and checked strictly: bool is not an int, ints are within their range and
  at most 2**53 - 1, float fields accept JSON integers but only finite values,
  strings follow their pattern or length bound, enums and hex ids are checked,
  lists and mappings are bounded.
* Exceeding a :class:`~edge_agent.protocol.limits.Limits` bound raises
  :class:`~edge_agent.errors.MessageTooLargeError`; every other problem raises
  :class:`~edge_agent.errors.MalformedMessageError`. A type without a body must
  arrive with an empty body.

Routing (:func:`check_route`): the topic's channel must be one the type may travel
on; on from-device channels the sender must be the topic's device id, on
to-device channels and broadcast topics it must be ``coordinator``. A message
that breaks these rules raises :class:`~edge_agent.errors.TopicError`.

Identifier rules used below: *ident* is 1-64 of ``[A-Za-z0-9_.-]`` starting with a
letter or digit (model names, deployment/round/task ids, runtimes, families; safe as
file names); *key* is 1-64 of ``[A-Za-z0-9_.:/-]`` starting with a letter, digit
or ``_`` (keys of hardware, config and metrics); *code* is 1-64 of ``[a-z0-9_.]``
starting with a letter. A ``transfer_id`` is the sha256 (64 lowercase hex) of the
whole transferred payload, so every assembled transfer is verifiable, and each
chunk carries its own sha256.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, ClassVar, Self

import numpy.typing as npt

from compress.manifest import TAG_RE as _TAG_RE
from compress.strictjson import FieldReader
from edge_agent.errors import (
    MalformedMessageError,
    MessageTooLargeError,
    ProtocolError,
    TopicError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
)
from edge_agent.protocol.arrays import (
    ArrayEntry,
    arrays_equal,
    decode_arrays,
    encode_arrays,
    index_to_json,
    parse_array_index,
)
from edge_agent.protocol.framing import decode_frame, encode_frame
from edge_agent.protocol.limits import DEFAULT_LIMITS, MAX_SAFE_INT, Limits
from edge_agent.protocol.topics import (
    COORDINATOR_SENDER,
    BroadcastTopic,
    Channel,
    DeviceTopic,
    Direction,
    is_valid_device_id,
    parse_topic,
)

__all__ = [
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "Chunk",
    "ChunkRequest",
    "Deploy",
    "Envelope",
    "ErrorReport",
    "EvalReport",
    "Histogram",
    "InstallState",
    "InstallStatus",
    "LatencyQuantiles",
    "Message",
    "ModelInfo",
    "Rollback",
    "Status",
    "TaskAck",
    "TaskAction",
    "TelemetryBatch",
    "TelemetryRecord",
    "TrainTask",
    "UpdateReport",
    "check_route",
    "chunk_count",
    "decode",
    "encode",
    "new_message_id",
    "sha256_hex",
]

PROTOCOL_VERSION = 1
"""The header schema version (``v``) this side writes and the highest it reads."""

_IDENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,63}")
_CODE_RE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_CODEC_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+=,-]{0,127}")
_AGENT_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+!-]{0,63}")
_TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_HEX32_RE = re.compile(r"[0-9a-f]{32}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------- helpers


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Hash bytes the way transfer ids and chunk digests are formed.

    Args:
        data: The bytes.

    Returns:
        The sha256 digest as 64 lowercase hex characters.
    """
    return hashlib.sha256(data).hexdigest()


def new_message_id() -> str:
    """Draw a fresh random message id.

    Returns:
        32 lowercase hex characters (a uuid4).
    """
    return uuid.uuid4().hex


def chunk_count(total_size: int, chunk_size: int) -> int:
    """Count the chunks a payload splits into.

    An empty payload still travels as one (empty) chunk.

    Args:
        total_size: Payload length in bytes (>= 0).
        chunk_size: Chunk length in bytes (>= 1).

    Returns:
        ``max(1, ceil(total_size / chunk_size))``.

    Raises:
        MalformedMessageError: ``total_size`` < 0 or ``chunk_size`` < 1.
    """
    if total_size < 0 or chunk_size < 1:
        raise MalformedMessageError("chunk_count needs total_size >= 0 and chunk_size >= 1")
    return max(1, -(-total_size // chunk_size))


def _scalars(
    data: FieldReader, key: str, limits: Limits, *, bools: bool = False
) -> dict[str, str | int | float | bool]:
    """A mapping of str (free text), int or finite float; bool only if ``bools``."""

    def scalar(r: FieldReader, name: str) -> str | int | float | bool:
        value = r.raw(name)
        if type(value) is bool and bools:
            return value
        if type(value) is int:
            return r.integer(name, lo=-MAX_SAFE_INT)
        if type(value) is float:
            return r.number(name, lo=-math.inf)
        if type(value) is str:
            return r.text(name, max_len=limits.max_string_chars)
        raise r.fail(name, f"expected a string or a number, got {type(value).__name__}")

    return data.mapping(key, scalar, max_len=limits.max_dict_items, key_pattern=_KEY_RE)


def _model_info(models: FieldReader, key: str) -> ModelInfo:
    model = models.req_obj(key)
    return ModelInfo(
        name=model.text("name", pattern=_IDENT_RE),
        version=model.integer("version"),
        sha256=model.text("sha256", pattern=_HEX64_RE),
    )


def _metrics(data: FieldReader, limits: Limits) -> dict[str, float]:
    """The ``metrics`` mapping of a report: *key* -> finite float."""
    return data.mapping(
        "metrics",
        lambda r, key: r.number(key, lo=-math.inf),
        max_len=limits.max_dict_items,
        key_pattern=_KEY_RE,
    )


def _no_body(body: bytes, type_name: str) -> None:
    if body:
        raise MalformedMessageError(f"a {type_name} message carries no body, got {len(body)} bytes")


# -------------------------------------------------------------------------- messages


class Message(ABC):
    """Base class of every message type.

    Subclasses are frozen, keyword-only dataclasses with these class attributes:

    Attributes:
        TYPE: The header's ``type`` string.
        CHANNELS: The per-device channels the type may travel on.
        BROADCAST: Whether it may also travel on broadcast topics.
    """

    TYPE: ClassVar[str]
    CHANNELS: ClassVar[frozenset[Channel]]
    BROADCAST: ClassVar[bool] = False

    @abstractmethod
    def _to_wire(self, limits: Limits) -> tuple[dict[str, Any], bytes]:
        """Give the header ``data`` object and the body.

        Args:
            limits: Bounds to respect while serialising (arrays).

        Returns:
            ``(data, body)``.
        """

    @classmethod
    @abstractmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        """Build the message from a checked header ``data`` object and the body.

        Args:
            data: The ``data`` object.
            body: The frame's body.
            limits: Bounds to enforce.

        Returns:
            The message.

        Raises:
            ProtocolError: A field is missing, malformed or over a limit.
        """


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model installed on a device.

    Attributes:
        name: Model name (*ident*).
        version: Installed version (>= 0).
        sha256: sha256 of the installed model file.
    """

    name: str
    version: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Status(Message):
    """Presence and capabilities of a device (retained; also the Last Will).

    The Last Will is the same message with ``online=False``, encoded at connect
    time.

    Attributes:
        online: Whether the agent is connected.
        agent_version: The agent's version string (e.g. ``0.1.0``).
        hardware: Facts such as ``machine``, ``system``, ``cpu_count``,
            ``memory_bytes``; *key* -> str, int or float.
        runtimes: Inference runtimes available (*ident* each, e.g. ``onnxruntime``).
        tags: Hardware/deployment tags (1-64 of ``[A-Za-z0-9_.:=+-]``).
        models: Installed models.
        train_examples: Local examples the agent can train on (0: it does not
            take part in federated rounds). Optional on the wire (default 0).
    """

    TYPE: ClassVar[str] = "status"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.STATUS})

    online: bool
    agent_version: str
    hardware: dict[str, str | int | float] = field(default_factory=dict)
    runtimes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    models: tuple[ModelInfo, ...] = ()
    train_examples: int = 0

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {
            "online": self.online,
            "agent_version": self.agent_version,
            "hardware": dict(self.hardware),
            "runtimes": list(self.runtimes),
            "tags": list(self.tags),
            "models": [
                {"name": m.name, "version": m.version, "sha256": m.sha256} for m in self.models
            ],
            "train_examples": self.train_examples,
        }
        return data, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        _no_body(body, cls.TYPE)
        hardware = _scalars(data, "hardware", limits)
        for key in ("runtimes", "tags"):  # reported before the models are checked
            if not data.has(key):
                raise data.fail(key, "missing")
        models = data.each("models", _model_info, max_len=limits.max_list_items)
        return cls(
            online=data.boolean("online"),
            agent_version=data.text("agent_version", pattern=_AGENT_VERSION_RE),
            hardware=hardware,
            runtimes=tuple(
                data.texts("runtimes", max_len=limits.max_list_items, pattern=_IDENT_RE)
            ),
            tags=tuple(data.texts("tags", max_len=limits.max_list_items, pattern=_TAG_RE)),
            models=tuple(models),
            train_examples=data.opt_integer("train_examples") or 0,
        )


@dataclass(frozen=True, kw_only=True)
class Deploy(Message):
    """Command: fetch, verify and install a signed artifact.

    The signed manifest travels as the body (opaque here; the trust core verifies
    it). The model payload follows as ``chunk`` messages of ``transfer_id``.

    Attributes:
        deployment_id: The deployment (*ident*).
        transfer_id: sha256 of the model payload; names its chunks.
        total_size: Payload length in bytes (<= ``limits.max_transfer_bytes``).
        chunk_size: Bytes per chunk (1..``limits.max_chunk_bytes``).
        chunk_count: Number of chunks; must equal
            ``chunk_count(total_size, chunk_size)``.
        manifest: The signed manifest (1..``limits.max_manifest_bytes`` bytes).
    """

    TYPE: ClassVar[str] = "deploy"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.CMD})

    deployment_id: str
    transfer_id: str
    total_size: int
    chunk_size: int
    chunk_count: int
    manifest: bytes

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {
            "deployment_id": self.deployment_id,
            "transfer_id": self.transfer_id,
            "total_size": self.total_size,
            "chunk_size": self.chunk_size,
            "chunk_count": self.chunk_count,
        }
        return data, bytes(self.manifest)

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        if len(body) > limits.max_manifest_bytes:
            raise MessageTooLargeError(
                f"manifest of {len(body)} bytes, limit {limits.max_manifest_bytes}"
            )
        if not body:
            raise MalformedMessageError("a deploy message must carry the manifest as its body")
        total_size = data.integer("total_size", limit=limits.max_transfer_bytes)
        chunk_size = data.integer("chunk_size", lo=1, limit=limits.max_chunk_bytes)
        count = data.integer("chunk_count", lo=1)
        if count != chunk_count(total_size, chunk_size):
            raise data.fail("chunk_count", f"{count} does not match total_size and chunk_size")
        return cls(
            deployment_id=data.text("deployment_id", pattern=_IDENT_RE),
            transfer_id=data.text("transfer_id", pattern=_HEX64_RE),
            total_size=total_size,
            chunk_size=chunk_size,
            chunk_count=count,
            manifest=body,
        )


@dataclass(frozen=True, kw_only=True)
class Rollback(Message):
    """Command: return a model to its previously installed version.

    Attributes:
        model: Model name (*ident*).
        reason: Why (free text, may be empty).
    """

    TYPE: ClassVar[str] = "rollback"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.CMD})

    model: str
    reason: str = ""

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        return {"model": self.model, "reason": self.reason}, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        _no_body(body, cls.TYPE)
        return cls(
            model=data.text("model", pattern=_IDENT_RE),
            reason=data.text("reason", max_len=limits.max_string_chars),
        )


@dataclass(frozen=True, kw_only=True)
class ChunkRequest(Message):
    """Event: the agent asks for (missing) chunks of a transfer.

    A resuming agent requests only what it does not hold yet.

    Attributes:
        transfer_id: The transfer.
        indices: Chunk indices wanted (1..``limits.max_list_items`` of them, >= 0).
    """

    TYPE: ClassVar[str] = "chunk_request"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.EVENTS})

    transfer_id: str
    indices: tuple[int, ...]

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        return {"transfer_id": self.transfer_id, "indices": list(self.indices)}, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        _no_body(body, cls.TYPE)
        indices = data.each(
            "indices", FieldReader.integer, max_len=limits.max_list_items, min_len=1
        )
        return cls(transfer_id=data.text("transfer_id", pattern=_HEX64_RE), indices=tuple(indices))


@dataclass(frozen=True, kw_only=True)
class Chunk(Message):
    """One verifiable piece of a transfer; the body is the chunk's bytes.

    Travels coordinator -> agent on ``chunks`` or a broadcast topic, and agent ->
    coordinator on ``events`` (uploads of large updates). Decoding checks that
    ``count == chunk_count(total_size, chunk_size)``, ``index < count``,
    ``offset == index * chunk_size``, that the body is exactly
    ``min(chunk_size, total_size - offset)`` bytes, and its sha256.

    Attributes:
        transfer_id: sha256 of the whole payload.
        index: This chunk's index (0-based).
        count: Number of chunks in the transfer.
        chunk_size: Bytes per chunk (the last one may be shorter).
        offset: This chunk's byte offset in the payload.
        total_size: Payload length.
        sha256: sha256 of this chunk's bytes.
        data: This chunk's bytes.
    """

    TYPE: ClassVar[str] = "chunk"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.CHUNKS, Channel.EVENTS})
    BROADCAST: ClassVar[bool] = True

    transfer_id: str
    index: int
    count: int
    chunk_size: int
    offset: int
    total_size: int
    sha256: str
    data: bytes

    @classmethod
    def from_payload(
        cls, payload: bytes, index: int, *, chunk_size: int, transfer_id: str | None = None
    ) -> Self:
        """Cut chunk ``index`` out of a payload.

        Args:
            payload: The whole payload.
            index: Which chunk.
            chunk_size: Bytes per chunk.
            transfer_id: The payload's sha256, if already known (saves hashing
                the payload once per chunk).

        Returns:
            The chunk message.

        Raises:
            MalformedMessageError: ``chunk_size`` < 1 or ``index`` out of range.
        """
        count = chunk_count(len(payload), chunk_size)
        if not 0 <= index < count:
            raise MalformedMessageError(f"chunk index {index} outside [0, {count})")
        offset = index * chunk_size
        data = bytes(payload[offset : offset + chunk_size])
        return cls(
            transfer_id=transfer_id if transfer_id is not None else sha256_hex(payload),
            index=index,
            count=count,
            chunk_size=chunk_size,
            offset=offset,
            total_size=len(payload),
            sha256=sha256_hex(data),
            data=data,
        )

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {
            "transfer_id": self.transfer_id,
            "index": self.index,
            "count": self.count,
            "chunk_size": self.chunk_size,
            "offset": self.offset,
            "total_size": self.total_size,
            "sha256": self.sha256,
        }
        return data, bytes(self.data)

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        if len(body) > limits.max_chunk_bytes:
            raise MessageTooLargeError(
                f"chunk of {len(body)} bytes, limit {limits.max_chunk_bytes}"
            )
        chunk_size = data.integer("chunk_size", lo=1, limit=limits.max_chunk_bytes)
        total_size = data.integer("total_size", limit=limits.max_transfer_bytes)
        count = data.integer("count", lo=1)
        if count != chunk_count(total_size, chunk_size):
            raise data.fail("count", f"{count} does not match total_size and chunk_size")
        index = data.integer("index", hi=count - 1)
        offset = data.integer("offset")
        if offset != index * chunk_size:
            raise data.fail("offset", f"{offset} is not index * chunk_size")
        expected = min(chunk_size, total_size - offset)
        if len(body) != expected:
            raise MalformedMessageError(f"chunk body is {len(body)} bytes, expected {expected}")
        digest = data.text("sha256", pattern=_HEX64_RE)
        if sha256_hex(body) != digest:
            raise MalformedMessageError(f"chunk {index} does not match its sha256")
        return cls(
            transfer_id=data.text("transfer_id", pattern=_HEX64_RE),
            index=index,
            count=count,
            chunk_size=chunk_size,
            offset=offset,
            total_size=total_size,
            sha256=digest,
            data=body,
        )


class InstallState(StrEnum):
    """Stages of an installation, as reported by ``install_status``."""

    ACCEPTED = "accepted"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    INSTALLED = "installed"
    FAILED = "failed"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True, kw_only=True)
class InstallStatus(Message):
    """Event: progress or outcome of a deployment (or a rollback) on a device.

    Attributes:
        deployment_id: The deployment (*ident*).
        model: Model name, optional (None while the manifest is not yet trusted).
        version: Model version, optional.
        state: The stage reached.
        chunks_held: Chunks the device holds (<= ``chunks_total``).
        chunks_total: Chunks in the transfer.
        error_code: Optional *code* (e.g. a trust error's code) on failure.
        reason: Optional free text.
    """

    TYPE: ClassVar[str] = "install_status"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.EVENTS})

    deployment_id: str
    state: InstallState
    model: str | None = None
    version: int | None = None
    chunks_held: int = 0
    chunks_total: int = 0
    error_code: str | None = None
    reason: str | None = None

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {
            "deployment_id": self.deployment_id,
            "state": str(self.state),
            "model": self.model,
            "version": self.version,
            "chunks_held": self.chunks_held,
            "chunks_total": self.chunks_total,
            "error_code": self.error_code,
            "reason": self.reason,
        }
        return data, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        _no_body(body, cls.TYPE)
        state = InstallState(data.text("state", choices=tuple(InstallState)))
        chunks_total = data.integer("chunks_total")
        return cls(
            deployment_id=data.text("deployment_id", pattern=_IDENT_RE),
            state=state,
            model=data.opt_text("model", pattern=_IDENT_RE),
            version=data.opt_integer("version"),
            chunks_held=data.integer("chunks_held", hi=chunks_total),
            chunks_total=chunks_total,
            error_code=data.opt_text("error_code", pattern=_CODE_RE),
            reason=data.opt_text("reason", max_len=limits.max_string_chars),
        )


@dataclass(frozen=True, slots=True)
class LatencyQuantiles:
    """Inference latency quantiles over a window, in milliseconds.

    Attributes:
        p50: Median.
        p95: 95th percentile.
        p99: 99th percentile.
    """

    p50: float
    p95: float
    p99: float


@dataclass(frozen=True, slots=True)
class Histogram:
    """A latency histogram in milliseconds.

    Attributes:
        bounds: Strictly increasing, finite bucket upper bounds.
        counts: One count per bucket, plus one for values above the last bound
            (so ``len(counts) == len(bounds) + 1``).
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TelemetryRecord:
    """Inference and resource figures for one time window.

    Attributes:
        window_start: Window start, unix seconds.
        window_end: Window end, unix seconds (>= ``window_start``).
        model: Model served (*ident*), or None with ``version`` None when none is.
        version: Its version.
        predictions: Predictions served in the window.
        errors: Failed inference calls in the window.
        latency_ms: Latency quantiles.
        histogram: Latency histogram.
        cpu_percent: Agent CPU use (may exceed 100 on several cores).
        memory_bytes: Agent resident memory.
        uptime_s: Agent uptime in seconds.
    """

    window_start: float
    window_end: float
    model: str | None
    version: int | None
    predictions: int
    errors: int
    latency_ms: LatencyQuantiles
    histogram: Histogram
    cpu_percent: float
    memory_bytes: int
    uptime_s: float


def _record_to_json(record: TelemetryRecord) -> dict[str, Any]:
    return {
        "window_start": record.window_start,
        "window_end": record.window_end,
        "model": record.model,
        "version": record.version,
        "predictions": record.predictions,
        "errors": record.errors,
        "latency_ms": {
            "p50": record.latency_ms.p50,
            "p95": record.latency_ms.p95,
            "p99": record.latency_ms.p99,
        },
        "histogram": {
            "bounds": list(record.histogram.bounds),
            "counts": list(record.histogram.counts),
        },
        "cpu_percent": record.cpu_percent,
        "memory_bytes": record.memory_bytes,
        "uptime_s": record.uptime_s,
    }


def _record_from_json(records: FieldReader, key: str, limits: Limits) -> TelemetryRecord:
    rec = records.req_obj(key)
    start = rec.number("window_start")
    end = rec.number("window_end", lo=start)
    if (rec.raw("model") is None) != (rec.raw("version") is None):
        raise records.fail(key, "model and version must both be set or both be null")
    latency = rec.req_obj("latency_ms")
    hist = rec.req_obj("histogram")
    max_items = limits.max_list_items
    bounds = hist.each("bounds", lambda r, k: r.number(k, lo=-math.inf), max_len=max_items)
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        raise hist.fail("bounds", "must be strictly increasing")
    counts = hist.each("counts", FieldReader.integer, max_len=max_items)
    if len(counts) != len(bounds) + 1:
        raise hist.fail("counts", "must have one more entry than bounds")
    return TelemetryRecord(
        window_start=start,
        window_end=end,
        model=rec.opt_text("model", pattern=_IDENT_RE),
        version=rec.opt_integer("version"),
        predictions=rec.integer("predictions"),
        errors=rec.integer("errors"),
        latency_ms=LatencyQuantiles(
            p50=latency.number("p50"), p95=latency.number("p95"), p99=latency.number("p99")
        ),
        histogram=Histogram(bounds=tuple(bounds), counts=tuple(counts)),
        cpu_percent=rec.number("cpu_percent"),
        memory_bytes=rec.integer("memory_bytes"),
        uptime_s=rec.number("uptime_s"),
    )


@dataclass(frozen=True, kw_only=True)
class TelemetryBatch(Message):
    """Telemetry: a batch of window records.

    Attributes:
        seq: Batch sequence number (gaps reveal lost batches).
        dropped: Records dropped since the previous batch (buffer overflow).
        records: The records (0..``limits.max_list_items``).
    """

    TYPE: ClassVar[str] = "telemetry_batch"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.TELEMETRY})

    seq: int
    dropped: int = 0
    records: tuple[TelemetryRecord, ...] = ()

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {
            "seq": self.seq,
            "dropped": self.dropped,
            "records": [_record_to_json(record) for record in self.records],
        }
        return data, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        _no_body(body, cls.TYPE)
        return cls(
            seq=data.integer("seq"),
            dropped=data.integer("dropped"),
            records=tuple(
                data.each(
                    "records",
                    lambda r, k: _record_from_json(r, k, limits),
                    max_len=limits.max_list_items,
                )
            ),
        )


class TaskAction(StrEnum):
    """What a :class:`TrainTask` asks for."""

    TRAIN = "train"
    EVALUATE = "evaluate"


@dataclass(frozen=True, kw_only=True)
class TrainTask(Message):
    """Command: train (or evaluate) locally on a round's global weights.

    The weights travel once per round for all devices: a chunked transfer of
    ``weights_transfer_id`` (the payload is the concatenated ``.npy`` blobs that
    ``weights_index`` splits, see :mod:`edge_agent.protocol.arrays`), broadcast on
    ``fedge/v1/broadcast/<weights_transfer_id>``; a device asks with
    ``chunk_request`` for what it lacks. A device that already holds the payload
    (the previous task used the same weights) starts at once.

    The answer is an :class:`UpdateReport` (train), an :class:`EvalReport`
    (evaluate) or an :class:`ErrorReport` whose ``ref`` is ``task_id``.

    Attributes:
        round_id: The round (*ident*).
        task_id: This device's task in the round (32 lowercase hex).
        action: Train or evaluate.
        model: Model name (*ident*).
        family: Model family (*ident*, e.g. ``softmax``, ``mlp``).
        weights_transfer_id: sha256 of the weights payload.
        weights_size: Weights payload length (<= ``limits.max_transfer_bytes``);
            the lengths in ``weights_index`` add up to it.
        weights_index: Names and ``.npy`` lengths of the weights, in order.
        chunk_size: Bytes per chunk of the weights transfer.
        codec: Update codec spec (1-128 of ``[A-Za-z0-9_.:+=,-]``).
        deadline: Report by this time, unix seconds.
        config: Training settings, *key* -> int, float, str or bool.
    """

    TYPE: ClassVar[str] = "train_task"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.CMD})

    round_id: str
    task_id: str
    action: TaskAction = TaskAction.TRAIN
    model: str
    family: str
    weights_transfer_id: str
    weights_size: int
    weights_index: tuple[ArrayEntry, ...]
    chunk_size: int
    codec: str
    deadline: float
    config: dict[str, int | float | str | bool] = field(default_factory=dict)

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {
            "round_id": self.round_id,
            "task_id": self.task_id,
            "action": str(self.action),
            "model": self.model,
            "family": self.family,
            "weights_transfer_id": self.weights_transfer_id,
            "weights_size": self.weights_size,
            "weights_index": index_to_json(self.weights_index),
            "chunk_size": self.chunk_size,
            "codec": self.codec,
            "deadline": self.deadline,
            "config": dict(self.config),
        }
        return data, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        _no_body(body, cls.TYPE)
        config = _scalars(data, "config", limits, bools=True)
        action_text = data.text("action", pattern=_IDENT_RE)
        try:
            action = TaskAction(action_text)
        except ValueError:
            raise data.fail("action", f"unknown action {action_text!r}") from None
        size = data.integer("weights_size", limit=limits.max_transfer_bytes)
        index = parse_array_index(data.raw("weights_index"), limits=limits)
        if not index or sum(entry.length for entry in index) != size:
            raise data.fail("weights_index", "lengths must add up to weights_size")
        return cls(
            round_id=data.text("round_id", pattern=_IDENT_RE),
            task_id=data.text("task_id", pattern=_HEX32_RE),
            action=action,
            model=data.text("model", pattern=_IDENT_RE),
            family=data.text("family", pattern=_IDENT_RE),
            weights_transfer_id=data.text("weights_transfer_id", pattern=_HEX64_RE),
            weights_size=size,
            weights_index=index,
            chunk_size=data.integer("chunk_size", lo=1, limit=limits.max_chunk_bytes),
            codec=data.text("codec", pattern=_CODEC_RE),
            deadline=data.number("deadline"),
            config=config,
        )


@dataclass(frozen=True, kw_only=True)
class TaskAck(Message):
    """Event: a device took a :class:`TrainTask` (sent before any download).

    The coordinator pushes the round's weights once, on their broadcast topic, after
    the devices that need them have acknowledged (so they have subscribed).

    Attributes:
        round_id: The round (*ident*).
        task_id: The task (32 lowercase hex).
        has_weights: The device already holds the task's weights (no download).
    """

    TYPE: ClassVar[str] = "task_ack"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.EVENTS})

    round_id: str
    task_id: str
    has_weights: bool = False

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {"round_id": self.round_id, "task_id": self.task_id, "has_weights": self.has_weights}
        return data, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, _limits: Limits) -> Self:
        _no_body(body, cls.TYPE)
        return cls(
            round_id=data.text("round_id", pattern=_IDENT_RE),
            task_id=data.text("task_id", pattern=_HEX32_RE),
            has_weights=data.boolean("has_weights"),
        )


@dataclass(frozen=True, kw_only=True)
class UpdateReport(Message):
    """Event: the result of a train task.

    Exactly one of two forms:

    * inline: ``arrays`` holds the encoded update; it travels in the body as
      ``.npy`` blobs indexed by ``data.arrays``;
    * uploaded (too big for one message): ``upload_transfer_id`` names a chunked
      upload (``chunk`` messages on ``events``) whose payload is the concatenated
      ``.npy`` blobs, and ``upload_index`` (sent as ``data.arrays``) splits it;
      decode that payload with
      ``decode_arrays(report.upload_index, payload, limits=...)``. The body is
      empty and the index's lengths must add up to at most
      ``limits.max_transfer_bytes``.

    Equality compares arrays by name, shape, dtype and bytes.

    Attributes:
        round_id: The round (*ident*).
        task_id: The task (32 lowercase hex).
        num_examples: Examples trained on.
        metrics: Training metrics, *key* -> finite float.
        codec: The codec the arrays were encoded with.
        arrays: Inline arrays by name (read-only after decoding), or None.
        upload_transfer_id: sha256 of the uploaded payload, or None.
        upload_index: Index of the uploaded payload (empty when inline).
    """

    TYPE: ClassVar[str] = "update_report"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.EVENTS})

    round_id: str
    task_id: str
    num_examples: int
    codec: str
    metrics: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, npt.NDArray[Any]] | None = None
    upload_transfer_id: str | None = None
    upload_index: tuple[ArrayEntry, ...] = ()

    def __eq__(self, other: object) -> bool:
        """Compare field by field, arrays by content.

        Args:
            other: Any value.

        Returns:
            Whether ``other`` is an equal UpdateReport.
        """
        if not isinstance(other, UpdateReport):
            return NotImplemented
        return (
            self.round_id == other.round_id
            and self.task_id == other.task_id
            and self.num_examples == other.num_examples
            and self.codec == other.codec
            and self.metrics == other.metrics
            and self.upload_transfer_id == other.upload_transfer_id
            and self.upload_index == other.upload_index
            and arrays_equal(self.arrays, other.arrays)
        )

    def __hash__(self) -> int:
        """Hash the identifying fields (consistent with ``__eq__``).

        Returns:
            A hash of ``(round_id, task_id)``.
        """
        return hash((self.round_id, self.task_id))

    def _to_wire(self, limits: Limits) -> tuple[dict[str, Any], bytes]:
        if (self.arrays is None) == (self.upload_transfer_id is None):
            raise MalformedMessageError(
                "an update_report needs exactly one of arrays and upload_transfer_id"
            )
        if self.arrays is not None:
            index, body = encode_arrays(self.arrays, limits=limits)
        else:
            index, body = self.upload_index, b""
        data = {
            "round_id": self.round_id,
            "task_id": self.task_id,
            "num_examples": self.num_examples,
            "codec": self.codec,
            "metrics": dict(self.metrics),
            "arrays": index_to_json(index),
            "upload_transfer_id": self.upload_transfer_id,
        }
        return data, body

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        metrics = _metrics(data, limits)
        index = parse_array_index(data.raw("arrays"), limits=limits)
        upload = data.opt_text("upload_transfer_id", pattern=_HEX64_RE)
        arrays: dict[str, npt.NDArray[Any]] | None = None
        upload_index: tuple[ArrayEntry, ...] = ()
        if upload is None:
            arrays = decode_arrays(index, body, limits=limits)
        else:
            _no_body(body, f"{cls.TYPE} (uploaded)")
            if not index:
                raise data.fail("arrays", "an uploaded update needs a non-empty index")
            total = sum(entry.length for entry in index)
            if total > limits.max_transfer_bytes:
                raise MessageTooLargeError(
                    f"uploaded update of {total} bytes, limit {limits.max_transfer_bytes}"
                )
            upload_index = index
        return cls(
            round_id=data.text("round_id", pattern=_IDENT_RE),
            task_id=data.text("task_id", pattern=_HEX32_RE),
            num_examples=data.integer("num_examples"),
            codec=data.text("codec", pattern=_CODEC_RE),
            metrics=metrics,
            arrays=arrays,
            upload_transfer_id=upload,
            upload_index=upload_index,
        )


@dataclass(frozen=True, kw_only=True)
class EvalReport(Message):
    """Event: the result of an evaluate task (metrics on local held-out data).

    Attributes:
        round_id: The round (*ident*).
        task_id: The task (32 lowercase hex).
        num_examples: Held-out examples evaluated.
        metrics: ``loss``, ``accuracy`` and any others, *key* -> finite float.
    """

    TYPE: ClassVar[str] = "eval_report"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.EVENTS})

    round_id: str
    task_id: str
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {
            "round_id": self.round_id,
            "task_id": self.task_id,
            "num_examples": self.num_examples,
            "metrics": dict(self.metrics),
        }
        return data, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        _no_body(body, cls.TYPE)
        return cls(
            round_id=data.text("round_id", pattern=_IDENT_RE),
            task_id=data.text("task_id", pattern=_HEX32_RE),
            num_examples=data.integer("num_examples"),
            metrics=_metrics(data, limits),
        )


@dataclass(frozen=True, kw_only=True)
class ErrorReport(Message):
    """An error either side reports to the other (``events`` or ``cmd``).

    Attributes:
        code: Stable error *code* (e.g. an :class:`~edge_agent.errors.AgentError`
            ``code``).
        message: Human-readable text (free text).
        ref: Id of the message this error refers to, if any.
    """

    TYPE: ClassVar[str] = "error"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.EVENTS, Channel.CMD})

    code: str
    message: str = ""
    ref: str | None = None

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        return {"code": self.code, "message": self.message, "ref": self.ref}, b""

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        _no_body(body, cls.TYPE)
        return cls(
            code=data.text("code", pattern=_CODE_RE),
            message=data.text("message", max_len=limits.max_string_chars),
            ref=data.opt_text("ref", pattern=_HEX32_RE),
        )


MESSAGE_TYPES: Mapping[str, type[Message]] = MappingProxyType(
    {
        cls.TYPE: cls
        for cls in (
            Status,
            Deploy,
            Rollback,
            ChunkRequest,
            Chunk,
            InstallStatus,
            TelemetryBatch,
            TrainTask,
            TaskAck,
            UpdateReport,
            EvalReport,
            ErrorReport,
        )
    }
)
"""The registry: header ``type`` -> message class."""


# ------------------------------------------------------------------ encode / decode


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded message with its header fields.

    Attributes:
        id: Message id (32 lowercase hex).
        sender: ``coordinator`` or the sending device's id.
        sent_at: Sender's clock at sending, unix seconds.
        version: The header's schema version ``v``.
        message: The typed message.
    """

    id: str
    sender: str
    sent_at: float
    version: int
    message: Message


def encode(
    message: Message,
    *,
    sender: str,
    sent_at: float,
    msg_id: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Encode a message into one MQTT payload.

    The result is decoded again with :func:`decode` (same limits) before it is
    returned, so an invalid message fails here rather than at the receiver.

    Args:
        message: The message.
        sender: ``coordinator`` or this device's id.
        sent_at: The current time, unix seconds.
        msg_id: 32 lowercase hex; None draws a random one (:func:`new_message_id`).
        limits: Bounds to respect.

    Returns:
        The payload bytes.

    Raises:
        MessageTooLargeError: The message exceeds a limit.
        MalformedMessageError: A field, the sender, the id or ``sent_at`` is
            invalid.
        UnknownMessageTypeError: ``message`` is not of a registered type.
    """
    if not isinstance(message, Message) or MESSAGE_TYPES.get(message.TYPE) is not type(message):
        raise UnknownMessageTypeError(f"not a registered message type: {type(message).__name__}")
    try:
        data, body = message._to_wire(limits)
    except ProtocolError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise MalformedMessageError(f"cannot serialise {message.TYPE}: {exc}") from exc
    header = {
        "v": PROTOCOL_VERSION,
        "type": message.TYPE,
        "id": new_message_id() if msg_id is None else msg_id,
        "sender": sender,
        "sent_at": sent_at,
        "data": data,
    }
    payload = encode_frame(header, body, limits=limits)
    decode(payload, limits=limits)
    return payload


def decode(payload: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Decode one MQTT payload into an :class:`Envelope`, strictly.

    Args:
        payload: The payload bytes.
        limits: Bounds to enforce.

    Returns:
        The envelope with the typed message.

    Raises:
        MessageTooLargeError: Something exceeds a limit.
        UnsupportedVersionError: The framing or schema version is newer than this
            side's.
        UnknownMessageTypeError: The ``type`` is not registered.
        MalformedMessageError: Anything else is wrong.
    """
    frame = decode_frame(payload, limits=limits)
    header = FieldReader(
        frame.header,
        MalformedMessageError,
        "header",
        over=MessageTooLargeError,
        max_int=MAX_SAFE_INT,
    )
    version = header.integer("v", lo=1)
    if version > PROTOCOL_VERSION:
        raise UnsupportedVersionError(
            f"schema version {version}, this side speaks up to {PROTOCOL_VERSION}"
        )
    type_name = header.text("type", pattern=_TYPE_RE)
    cls = MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise UnknownMessageTypeError(f"unknown message type {type_name!r}")
    msg_id = header.text("id", pattern=_HEX32_RE)
    sender = header.raw("sender")
    if sender != COORDINATOR_SENDER and not is_valid_device_id(sender):
        raise header.fail("sender", "must be 'coordinator' or a valid device id")
    sent_at = header.number("sent_at")
    message = cls._from_wire(header.req_obj("data"), frame.body, limits)
    return Envelope(id=msg_id, sender=sender, sent_at=sent_at, version=version, message=message)


def check_route(envelope: Envelope, topic: str) -> DeviceTopic | BroadcastTopic:
    """Check that a decoded message may arrive on the topic it arrived on.

    Args:
        envelope: The decoded message.
        topic: The topic it was received on.

    Returns:
        The parsed topic.

    Raises:
        TopicError: The topic is invalid; the type may not travel on this channel
            (or on broadcast topics); or the sender does not match: on a
            from-device channel it must be the topic's device id, on a to-device
            channel or a broadcast topic it must be ``coordinator``.
    """
    parsed = parse_topic(topic)
    message = envelope.message
    if isinstance(parsed, BroadcastTopic):
        if not message.BROADCAST:
            raise TopicError(f"{message.TYPE} messages may not be broadcast")
        expected = COORDINATOR_SENDER
    else:
        if parsed.channel not in message.CHANNELS:
            raise TopicError(f"{message.TYPE} messages may not travel on {parsed.channel.value}")
        if parsed.channel.direction is Direction.FROM_DEVICE:
            expected = parsed.device_id
        else:
            expected = COORDINATOR_SENDER
    if envelope.sender != expected:
        raise TopicError(f"sender {envelope.sender!r} may not publish {message.TYPE} on {topic!r}")
    return parsed
