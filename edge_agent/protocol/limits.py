"""Size and count limits that bound what the wire protocol accepts.

Every decoder in :mod:`edge_agent.protocol` takes a :class:`Limits` value (the
default instance, :data:`DEFAULT_LIMITS`, when none is given) and checks each size
against it *before* slicing, allocating or parsing, so a hostile or corrupted
payload costs at most a bounded amount of memory and CPU. Encoders check the same
limits, so nothing leaves one side that the other side (with the same limits) would
refuse.

Workflow:

1. Entry points (agent and coordinator configuration) build one ``Limits`` value,
   usually the defaults, possibly lowered for a constrained broker
   (``Limits(max_chunk_bytes=32 * 1024)``).
2. They pass it to :func:`edge_agent.protocol.decode` and
   :func:`edge_agent.protocol.encode`; the framing, array and message layers all
   read their bounds from it.

The manifest and transfer defaults are ``compress``'s own bounds
(:data:`compress.signing.MAX_BLOB_BYTES`, :data:`compress.manifest.MAX_PAYLOAD_BYTES`),
imported rather than copied, so every signed manifest and payload that ``compress``
produces fits in a ``deploy`` message and its transfer.

Chunks are never larger than :data:`CHUNK_BYTES_CEILING` (128 KiB) so that every
message passes the message-size limits of common managed brokers; a configuration
may lower ``max_chunk_bytes`` but never raise it above that ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from compress.manifest import MAX_PAYLOAD_BYTES
from compress.npy import NUMPY_MAX_NDIM
from compress.signing import MAX_BLOB_BYTES
from edge_agent.errors import ConfigError

__all__ = [
    "CHUNK_BYTES_CEILING",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_LIMITS",
    "FRAME_PREFIX_BYTES",
    "MAX_SAFE_INT",
    "Limits",
]

KIB = 1024
MIB = 1024 * KIB

CHUNK_BYTES_CEILING = 128 * KIB
"""Hard ceiling on one chunk's body; no configuration may exceed it."""

DEFAULT_CHUNK_BYTES = 64 * KIB
"""Chunk size used when the sender does not choose one."""

FRAME_PREFIX_BYTES = 9
"""Fixed framing prefix: 4 magic bytes, 1 version byte, 4 header-length bytes."""

MAX_SAFE_INT = 2**53 - 1
"""Largest integer a JSON field may carry (exactly representable as a double)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on messages, headers, bodies, arrays and header contents.

    Attributes:
        max_message_bytes: Whole MQTT payload (prefix + header + body).
        max_header_bytes: The UTF-8 JSON header.
        max_json_depth: Nesting depth of objects/arrays in the header (the header
            object itself is depth 1).
        max_chunk_bytes: One chunk's body; at most :data:`CHUNK_BYTES_CEILING`.
        default_chunk_bytes: Chunk size a sender uses unless told otherwise.
        max_manifest_bytes: The signed manifest carried in a ``deploy`` body;
            default :data:`compress.signing.MAX_BLOB_BYTES`, the largest signed
            manifest ``compress`` produces or accepts.
        max_transfer_bytes: A whole chunked transfer (model or weights payload);
            default :data:`compress.manifest.MAX_PAYLOAD_BYTES`, the largest model
            payload a manifest may describe.
        max_arrays: Arrays in one array index (one message or one upload).
        max_array_bytes: The data of one array (and one ``.npy`` blob); also bounds
            each single dimension, so even a zero-size array stays representable.
        max_array_ndim: Dimensions of one array.
        max_list_items: Items in any list field (chunk indices, tags, records...).
        max_dict_items: Entries in any mapping field (hardware, config, metrics).
        max_string_chars: Characters in free-text fields (reasons, messages).
        max_keyset_chain: Signed key sets in one ``keyset_chain`` message (the
            rotations a device that was offline can catch up on at once).
        max_keyset_chain_bytes: All the signed key sets of one ``keyset_chain``
            message together (each is also at most
            :data:`compress.keyset.MAX_SIGNED_KEYSET_BYTES`).
    """

    max_message_bytes: int = 256 * KIB
    max_header_bytes: int = 32 * KIB
    max_json_depth: int = 16
    max_chunk_bytes: int = CHUNK_BYTES_CEILING
    default_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_manifest_bytes: int = MAX_BLOB_BYTES
    max_transfer_bytes: int = MAX_PAYLOAD_BYTES
    max_arrays: int = 256
    max_array_bytes: int = 64 * MIB
    max_array_ndim: int = 32
    max_list_items: int = 1024
    max_dict_items: int = 256
    max_string_chars: int = 4096
    max_keyset_chain: int = 8
    max_keyset_chain_bytes: int = 128 * KIB

    def __post_init__(self) -> None:
        """Check that the limits are positive and mutually consistent.

        Raises:
            ConfigError: A limit is not a positive integer, ``max_chunk_bytes``
                exceeds :data:`CHUNK_BYTES_CEILING`, ``default_chunk_bytes``
                exceeds ``max_chunk_bytes``, ``max_array_ndim`` exceeds 64, or a
                full header plus a full chunk (or manifest) would not fit in
                ``max_message_bytes``.
        """
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"Limits.{field.name} must be a positive int, got {value!r}")
        if self.max_chunk_bytes > CHUNK_BYTES_CEILING:
            raise ConfigError(
                f"Limits.max_chunk_bytes={self.max_chunk_bytes} exceeds the "
                f"{CHUNK_BYTES_CEILING}-byte ceiling"
            )
        if self.default_chunk_bytes > self.max_chunk_bytes:
            raise ConfigError("Limits.default_chunk_bytes must not exceed max_chunk_bytes")
        if self.max_array_ndim > NUMPY_MAX_NDIM:
            raise ConfigError(
                f"Limits.max_array_ndim must not exceed numpy's {NUMPY_MAX_NDIM} dimensions"
            )
        envelope = FRAME_PREFIX_BYTES + self.max_header_bytes
        if envelope + max(self.max_chunk_bytes, self.max_manifest_bytes) > self.max_message_bytes:
            raise ConfigError(
                "Limits.max_message_bytes must hold the framing prefix, a full header "
                "and a full chunk or manifest"
            )


DEFAULT_LIMITS = Limits()
"""The default limits, used whenever a caller passes none."""
