"""The fleet statement message: the coordinator's signed word on what a fleet runs now.

The coordinator publishes one :class:`FleetStatementMessage` per fleet, retained, on
``broadcast_topic(statement_broadcast(fleet))``; every agent of the fleet subscribes
to it for as long as it runs. The body is the signed statement
(:meth:`compress.statement.SignedStatement.to_bytes`), opaque here: the agent checks
its signature, fleet, expiry and version with
:func:`compress.statement.verify_statement` before it believes a word of it.

Field rules and the base class: :mod:`edge_agent.protocol.messages_base`;
encoding: :mod:`edge_agent.protocol.messages`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from compress.statement import MAX_SIGNED_STATEMENT_BYTES
from compress.strictjson import FieldReader
from edge_agent.errors import MalformedMessageError, MessageTooLargeError
from edge_agent.protocol.limits import Limits
from edge_agent.protocol.messages_base import Message
from edge_agent.protocol.topics import Channel


@dataclass(frozen=True, kw_only=True)
class FleetStatementMessage(Message):
    """Broadcast (retained) or command: the fleet's current signed statement.

    Attributes:
        statement: The signed statement bytes (1..``MAX_SIGNED_STATEMENT_BYTES``);
            the header's ``data`` is empty.
    """

    TYPE: ClassVar[str] = "fleet_statement"
    CHANNELS: ClassVar[frozenset[Channel]] = frozenset({Channel.CMD})
    BROADCAST: ClassVar[bool] = True

    statement: bytes

    def _to_wire(self, _limits: Limits) -> tuple[dict[str, Any], bytes]:
        return {}, bytes(self.statement)

    @classmethod
    def _from_wire(cls, _data: FieldReader, body: bytes, _limits: Limits) -> Self:
        if len(body) > MAX_SIGNED_STATEMENT_BYTES:
            raise MessageTooLargeError(
                f"fleet statement of {len(body)} bytes, limit {MAX_SIGNED_STATEMENT_BYTES}"
            )
        if not body:
            raise MalformedMessageError("a fleet_statement message must carry the statement")
        return cls(statement=body)
