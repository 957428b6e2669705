"""The key-set chain: how a rotation of the trusted keys reaches every device.

The coordinator (``fedge keys publish``) publishes one :class:`KeySetChain`,
retained, on ``broadcast_topic(KEYSET_BROADCAST)`` (``fedge/v1/broadcast/keyset``).
It carries consecutive signed key sets (:class:`compress.keyset.SignedKeySet`
bytes), oldest first, ending with the current one. An agent provisioned with a key
set subscribes to that topic for good, so it gets the chain on every (re)connect
and whenever a new one is published; it applies the versions above its own in
order (:mod:`edge_agent.ota.keyset_store`), which is how a device that was offline
across several rotations catches up.

The body is the key sets' bytes one after the other; the header's ``sizes`` says
where each ends. Both the count and the total are bounded by
:class:`~edge_agent.protocol.limits.Limits` (``max_keyset_chain``,
``max_keyset_chain_bytes``) and each key set by
:data:`compress.keyset.MAX_SIGNED_KEYSET_BYTES`, all checked before slicing.
Here the bytes are opaque: whether a key set is trusted is decided by the agent's
key-set store with :func:`compress.keyset.verify_rotation_chain`.

Field rules and the base class: :mod:`edge_agent.protocol.messages_base`;
encoding: :mod:`edge_agent.protocol.messages`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from compress.keyset import MAX_SIGNED_KEYSET_BYTES
from compress.strictjson import FieldReader
from edge_agent.errors import MalformedMessageError, MessageTooLargeError
from edge_agent.protocol.limits import Limits
from edge_agent.protocol.messages_base import Message
from edge_agent.protocol.topics import Channel

__all__ = ["KeySetChain"]


@dataclass(frozen=True, kw_only=True)
class KeySetChain(Message):
    """Broadcast (retained): consecutive signed key sets, oldest first.

    Attributes:
        keysets: The signed key sets' bytes (1..``limits.max_keyset_chain`` of them,
            each 1..:data:`compress.keyset.MAX_SIGNED_KEYSET_BYTES` bytes, together
            at most ``limits.max_keyset_chain_bytes``).
    """

    TYPE: ClassVar[str] = "keyset_chain"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.CMD})
    BROADCAST: ClassVar[bool] = True

    keysets: tuple[bytes, ...]

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        data = {"sizes": [len(blob) for blob in self.keysets]}
        return data, b"".join(bytes(blob) for blob in self.keysets)

    @classmethod
    def _from_wire(cls, data: FieldReader, body: bytes, limits: Limits) -> Self:
        if len(body) > limits.max_keyset_chain_bytes:
            raise MessageTooLargeError(
                f"key-set chain of {len(body)} bytes, limit {limits.max_keyset_chain_bytes}"
            )
        sizes = data.each(
            "sizes",
            lambda r, k: r.integer(k, lo=1, hi=MAX_SIGNED_KEYSET_BYTES),
            max_len=limits.max_keyset_chain,
            min_len=1,
        )
        if sum(sizes) != len(body):
            raise MalformedMessageError(
                f"a keyset_chain body of {len(body)} bytes does not match its sizes "
                f"(they add up to {sum(sizes)})"
            )
        blobs: list[bytes] = []
        offset = 0
        for size in sizes:
            blobs.append(body[offset : offset + size])
            offset += size
        return cls(keysets=tuple(blobs))
