"""The fedge wire protocol that the coordinator and the agents both speak.

Pure logic (stdlib + numpy, no MQTT client, no I/O): bytes and values in, values or
typed :class:`~edge_agent.errors.ProtocolError` subclasses out.

Layers, bottom up:

* :mod:`~edge_agent.protocol.limits`: :class:`Limits`, the size bounds every
  decoder checks before allocating.
* :mod:`~edge_agent.protocol.topics`: the topic tree ``fedge/v1/...``, channels and
  their direction, subscriptions, the broker ACL.
* :mod:`~edge_agent.protocol.framing`: one payload = magic, version, a JSON header
  and a binary body.
* :mod:`~edge_agent.protocol.arrays`: numeric arrays as ``.npy`` blobs in a body.
* :mod:`~edge_agent.protocol.messages_summary`: the window summary a telemetry
  record may carry (counts against a model's reference profile).
* :mod:`~edge_agent.protocol.messages`: the typed messages, :func:`encode`,
  :func:`decode` and :func:`check_route`.

Typical use::

    payload = encode(ChunkRequest(transfer_id=tid, indices=(3, 4)),
                     sender=device_id, sent_at=clock())
    client.publish(device_topic(device_id, Channel.EVENTS), payload)

    envelope = decode(msg.payload, limits)       # on the receiving side
    check_route(envelope, msg.topic)
    handle(envelope.message)
"""

from edge_agent.protocol.arrays import (
    ALLOWED_DTYPES,
    ArrayEntry,
    arrays_equal,
    decode_arrays,
    decode_npy,
    encode_arrays,
    encode_npy,
    index_to_json,
    parse_array_index,
)
from edge_agent.protocol.framing import (
    FRAMING_VERSION,
    MAGIC,
    Frame,
    decode_frame,
    encode_frame,
)
from edge_agent.protocol.limits import (
    CHUNK_BYTES_CEILING,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_LIMITS,
    MAX_SAFE_INT,
    Limits,
)
from edge_agent.protocol.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Chunk,
    ChunkRequest,
    Deploy,
    Envelope,
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
    check_route,
    chunk_count,
    decode,
    encode,
    new_message_id,
    sha256_hex,
)
from edge_agent.protocol.messages_summary import InvalidCounts, WindowSummary
from edge_agent.protocol.topics import (
    BROADCAST_FILTER,
    BROADCAST_PREFIX,
    COORDINATOR_SENDER,
    DEVICES_PREFIX,
    MOSQUITTO_ACL,
    OPERATOR_SEPARATOR,
    ROOT,
    BroadcastTopic,
    Channel,
    DeviceTopic,
    Direction,
    agent_subscriptions,
    broadcast_topic,
    coordinator_subscriptions,
    device_topic,
    is_valid_device_id,
    mosquitto_acl,
    operator_account,
    parse_broadcast_topic,
    parse_device_topic,
    parse_topic,
    validate_device_id,
)

__all__ = [
    "ALLOWED_DTYPES",
    "BROADCAST_FILTER",
    "BROADCAST_PREFIX",
    "CHUNK_BYTES_CEILING",
    "COORDINATOR_SENDER",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_LIMITS",
    "DEVICES_PREFIX",
    "FRAMING_VERSION",
    "MAGIC",
    "MAX_SAFE_INT",
    "MESSAGE_TYPES",
    "MOSQUITTO_ACL",
    "OPERATOR_SEPARATOR",
    "PROTOCOL_VERSION",
    "ROOT",
    "ArrayEntry",
    "BroadcastTopic",
    "Channel",
    "Chunk",
    "ChunkRequest",
    "Deploy",
    "DeviceTopic",
    "Direction",
    "Envelope",
    "ErrorReport",
    "EvalReport",
    "Frame",
    "Histogram",
    "InstallState",
    "InstallStatus",
    "InvalidCounts",
    "LatencyQuantiles",
    "Limits",
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
    "WindowSummary",
    "agent_subscriptions",
    "arrays_equal",
    "broadcast_topic",
    "check_route",
    "chunk_count",
    "coordinator_subscriptions",
    "decode",
    "decode_arrays",
    "decode_frame",
    "decode_npy",
    "device_topic",
    "encode",
    "encode_arrays",
    "encode_frame",
    "encode_npy",
    "index_to_json",
    "is_valid_device_id",
    "mosquitto_acl",
    "new_message_id",
    "operator_account",
    "parse_array_index",
    "parse_broadcast_topic",
    "parse_device_topic",
    "parse_topic",
    "sha256_hex",
    "validate_device_id",
]
