"""What the agent needs of its broker connection: the :class:`DeviceLink` Protocol.

The agent (:mod:`edge_agent.agent`), its updater (:mod:`edge_agent.ota.updates`) and
its round participant (:mod:`edge_agent.training.participant`) talk to the broker
only through this interface. Two implementations keep it:

* :class:`edge_agent.transport.mqtt.MqttLink`: paho-mqtt, the real thing;
* :class:`edge_agent.transport.memory.MemoryLink`: an in-process twin on a
  :class:`~edge_agent.transport.memory.MemoryBroker`, for tests without a broker.

Both are held to one contract test (tests/test_transport_link_contract.py): a link
connects in the background after :meth:`~DeviceLink.start`, re-subscribes on every
connect, refuses to publish while disconnected (nothing is queued), hands every
message to its ``on_message(topic, payload, retained)`` callback, and leaves its
:class:`Will` behind when the connection is lost rather than closed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["DeviceLink", "Will", "call_safely", "deliver_safely"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Will:
    """The Last Will the broker publishes if this client vanishes without DISCONNECT."""

    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


class DeviceLink(Protocol):
    """A broker connection that connects in the background and stays connected."""

    @property
    def connected(self) -> bool:
        """Whether the link is connected right now."""
        ...

    @property
    def last_error(self) -> str | None:
        """The last connection problem seen, for health reports (None when fine)."""
        ...

    def start(self) -> None:
        """Start connecting in the background (returns at once; idempotent)."""
        ...

    def stop(self) -> None:
        """Disconnect cleanly, without the Last Will (idempotent)."""
        ...

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a connection; return whether there is one."""
        ...

    def subscribe(self, topic: str) -> None:
        """Add a subscription, kept across reconnects (idempotent)."""
        ...

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription added with :meth:`subscribe` (idempotent)."""
        ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Publish if connected; False when disconnected (nothing is queued)."""
        ...

    def publish_wait(
        self, topic: str, payload: bytes, *, timeout: float, qos: int = 1, retain: bool = False
    ) -> bool:
        """Publish and wait for the broker's acknowledgement; False if none came."""
        ...

    def drop_connection(self) -> None:
        """Lose the connection as a network failure would (the Will goes out), then
        reconnect by itself."""
        ...


def deliver_safely(
    on_message: Callable[[str, bytes, bool], None], topic: str, payload: bytes, retained: bool
) -> None:
    """Hand a message to a link's callback; an exception is logged, never propagated
    into the transport (both implementations deliver through here)."""
    try:
        on_message(topic, payload, retained)
    except Exception:
        logger.exception("message handler failed on %s", topic)


def call_safely(callback: Callable[[], None] | None) -> None:
    """Call a connection callback (``on_connect``, ``on_disconnect``) if there is one;
    an exception is logged, never propagated into the transport."""
    if callback is None:
        return
    try:
        callback()
    except Exception:
        logger.exception("connection callback failed")
