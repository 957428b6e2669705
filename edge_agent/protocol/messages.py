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

The message types live in five modules, re-exported here:
:mod:`~edge_agent.protocol.messages_base` (:class:`Message`, field rules,
:class:`ErrorReport`), :mod:`~edge_agent.protocol.messages_status` (presence,
telemetry), :mod:`~edge_agent.protocol.messages_delivery` (deploy, chunks, install
status), :mod:`~edge_agent.protocol.messages_rounds` (federated tasks and
reports), :mod:`~edge_agent.protocol.messages_keys` (the key-set chain) and
:mod:`~edge_agent.protocol.messages_fleet` (the fleet statement). This module
holds the registry (:data:`MESSAGE_TYPES`), :func:`encode`, :func:`decode` and
:func:`check_route`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from compress.strictjson import FieldReader
from edge_agent.errors import (
    MalformedMessageError,
    MessageTooLargeError,
    ProtocolError,
    TopicError,
    UnknownMessageTypeError,
    UnsupportedVersionError,
)
from edge_agent.protocol.framing import decode_frame, encode_frame
from edge_agent.protocol.limits import DEFAULT_LIMITS, MAX_SAFE_INT, Limits
from edge_agent.protocol.messages_base import (
    HEX32_RE,
    PROTOCOL_VERSION,
    TYPE_RE,
    ErrorReport,
    Message,
    ModelInfo,
    chunk_count,
    new_message_id,
    sha256_hex,
)
from edge_agent.protocol.messages_delivery import (
    Chunk,
    ChunkRequest,
    Deploy,
    InstallState,
    InstallStatus,
    Rollback,
)
from edge_agent.protocol.messages_fleet import FleetStatementMessage
from edge_agent.protocol.messages_keys import KeySetChain
from edge_agent.protocol.messages_rounds import (
    EvalReport,
    TaskAck,
    TaskAction,
    TrainTask,
    UpdateReport,
)
from edge_agent.protocol.messages_status import (
    Histogram,
    LatencyQuantiles,
    Status,
    TelemetryBatch,
    TelemetryRecord,
)
from edge_agent.protocol.topics import (
    COORDINATOR_SENDER,
    BroadcastTopic,
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
    "FleetStatementMessage",
    "Histogram",
    "InstallState",
    "InstallStatus",
    "KeySetChain",
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
            KeySetChain,
            FleetStatementMessage,
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
    type_name = header.text("type", pattern=TYPE_RE)
    cls = MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise UnknownMessageTypeError(f"unknown message type {type_name!r}")
    msg_id = header.text("id", pattern=HEX32_RE)
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
