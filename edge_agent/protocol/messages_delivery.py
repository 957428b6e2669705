"""Messages of a model delivery (OTA), in the order they flow.

1. The coordinator sends :class:`Deploy` (the signed manifest, whole) or
   :class:`Rollback` on the device's ``cmd`` channel.
2. It pushes the payload once as :class:`Chunk` messages on a broadcast topic
   (``transfer_id`` = the payload's sha256); a device that misses some asks with a
   bounded :class:`ChunkRequest` and gets them on its ``chunks`` channel.
3. The device reports each step with :class:`InstallStatus` (an
   :class:`InstallState` and, on failure, an error code) on ``events``.

Field rules and the base class: :mod:`edge_agent.protocol.messages_base`;
encoding: :mod:`edge_agent.protocol.messages`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Self

from compress.strictjson import FieldReader
from edge_agent.errors import (
    MalformedMessageError,
    MessageTooLargeError,
)
from edge_agent.protocol.limits import Limits
from edge_agent.protocol.messages_base import (
    CODE_RE,
    HEX64_RE,
    IDENT_RE,
    Message,
    check_no_body,
    chunk_count,
    sha256_hex,
)
from edge_agent.protocol.topics import Channel


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
            deployment_id=data.text("deployment_id", pattern=IDENT_RE),
            transfer_id=data.text("transfer_id", pattern=HEX64_RE),
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
        check_no_body(body, cls.TYPE)
        return cls(
            model=data.text("model", pattern=IDENT_RE),
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
        check_no_body(body, cls.TYPE)
        indices = data.each(
            "indices", FieldReader.integer, max_len=limits.max_list_items, min_len=1
        )
        return cls(transfer_id=data.text("transfer_id", pattern=HEX64_RE), indices=tuple(indices))


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
        digest = data.text("sha256", pattern=HEX64_RE)
        if sha256_hex(body) != digest:
            raise MalformedMessageError(f"chunk {index} does not match its sha256")
        return cls(
            transfer_id=data.text("transfer_id", pattern=HEX64_RE),
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
        check_no_body(body, cls.TYPE)
        state = InstallState(data.text("state", choices=tuple(InstallState)))
        chunks_total = data.integer("chunks_total")
        return cls(
            deployment_id=data.text("deployment_id", pattern=IDENT_RE),
            state=state,
            model=data.opt_text("model", pattern=IDENT_RE),
            version=data.opt_integer("version"),
            chunks_held=data.integer("chunks_held", hi=chunks_total),
            chunks_total=chunks_total,
            error_code=data.opt_text("error_code", pattern=CODE_RE),
            reason=data.opt_text("reason", max_len=limits.max_string_chars),
        )
