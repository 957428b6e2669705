"""Read the message a broker keeps retained on one topic: :func:`read_retained`.

The hub listens to device topics only; a one-shot command that wants to know what
the coordinator published retained on a broadcast topic (``fedge fleet show``, or
``fedge fleet publish`` finding the last statement version) asks here. Workflow:

1. connect a short-lived clean session, as the coordinator account (its client id
   is the hub's, :func:`~coordinator.link.hub.hub_client_id`, so a broker that
   binds client ids to usernames is fine with it);
2. subscribe to the topic and to a private sync topic; the broker sends the
   retained message, if any, right after the subscription;
3. publish to the sync topic: it arrives after the retained message, so when it
   arrives, "nothing arrived" means "nothing is retained".
"""

from __future__ import annotations

import threading
import uuid

from coordinator.link.hub import SYNC_PREFIX, hub_client_id
from edge_agent.config.agent import BrokerConfig
from edge_agent.errors import BrokerError
from edge_agent.transport.mqtt import MqttLink

__all__ = ["read_retained"]


def read_retained(broker: BrokerConfig, topic: str, *, timeout: float) -> bytes | None:
    """The payload retained on ``topic``, or None when the broker holds none.

    Raises:
        BrokerError: no connection, or no answer, within ``timeout`` seconds.
    """
    sync_topic = f"{SYNC_PREFIX}/{uuid.uuid4().hex}"
    found: list[bytes] = []
    synced = threading.Event()

    def on_message(got: str, payload: bytes, retained: bool = False) -> None:
        if got == sync_topic:
            synced.set()
        elif got == topic and retained and payload:
            found.append(payload)

    link = MqttLink(
        broker,
        client_id=hub_client_id(broker.username, None),
        subscriptions=(topic, sync_topic),
        on_message=on_message,
    )
    link.connect(timeout)
    try:
        if not link.publish(sync_topic, b"sync") or not synced.wait(timeout):
            raise BrokerError(f"no answer from {broker.url} within {timeout:g}s")
    finally:
        link.stop()
    return found[-1] if found else None
