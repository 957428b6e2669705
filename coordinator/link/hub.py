"""The coordinator's MQTT link to the fleet: :class:`MqttHub`.

One MQTT connection as the ``coordinator`` user. It keeps a
:class:`~coordinator.link.fleet.Fleet` from the agents' retained status messages,
lets other parts hear every device message (listeners), sends commands to one
device, and serves payloads as chunks. It implements the
:class:`~coordinator.link.port.Hub` protocol; what is not about MQTT (the fleet
view, listeners, routing) is :class:`~coordinator.link.base.HubBase`. Workflow::

    with MqttHub(HubConfig(broker)) as hub:      # connects, syncs the fleet
        records = hub.fleet()
        hub.add_listener(on_message)            # (device_id, envelope, size)
        transfer_id = hub.serve_payload(payload)
        hub.send(device_id, command)
        hub.push_payload(transfer_id, [device_id])

Serving a payload:

1. :meth:`push_payload` publishes every chunk once: on
   ``fedge/v1/broadcast/<transfer_id>`` for two or more devices, on the device's own
   ``chunks`` topic for one;
2. whatever a device missed (broker restart, agent restart, a late start) it asks
   for with ``chunk_request``; a sender thread answers, once on the broadcast topic
   for chunks several devices want, else to the device alone
   (:mod:`coordinator.link.chunk_sender`).

One-shot deployments and rollbacks are built on this hub in
:mod:`coordinator.delivery.deliveries`. Only the ``coordinator`` MQTT user may
publish commands and chunks (the broker ACL). Incoming messages are decoded
strictly; what fails is logged and dropped.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from coordinator.errors import CoordinatorError
from coordinator.lifecycle import Startable
from coordinator.link.base import HubBase
from coordinator.link.chunk_sender import ChunkRequestItem, ChunkSender, PlannedSend
from edge_agent.config.agent import BrokerConfig
from edge_agent.protocol import (
    COORDINATOR_SENDER,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_LIMITS,
    ROOT,
    Channel,
    Limits,
    coordinator_subscriptions,
    device_topic,
)
from edge_agent.transport.mqtt import MqttLink

__all__ = ["SESSION_NAME_RE", "HubConfig", "MqttHub", "hub_client_id"]

logger = logging.getLogger(__name__)

SESSION_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""What :attr:`HubConfig.session` may be (it is also an MQTT topic level)."""


def hub_client_id(username: str | None, session: str | None) -> str:
    """The hub's MQTT client id: its username (``coordinator`` when it has none).

    A persistent session is keyed by this id, so the service's session is the
    ``coordinator`` account's. The fleet's broker binds every client id to the
    authenticated username (``use_username_as_clientid``, written by ``fedge broker
    config``): a device that connects with the coordinator's id gets its own
    username as id instead, and cannot take the coordinator's connection or session.
    A short-lived hub (``session`` None, a clean session) adds a random suffix,
    which only matters on a broker that does not bind ids (tests, the embedded
    development broker), where it lets one-shots run beside the service; a binding
    broker replaces it by the username, so there a one-shot beside the service
    needs an account of its own (``coordinator@<name>``,
    :func:`edge_agent.protocol.operator_account`).
    """
    account = username or COORDINATOR_SENDER
    return account if session is not None else f"{account}:{uuid.uuid4().hex[:12]}"


SYNC_PREFIX = f"{ROOT}/coordinator/sync"


@dataclass(frozen=True)
class HubConfig:
    """How the hub connects and serves payloads.

    Attributes:
        broker: The fleet's broker; the username should be ``coordinator`` (the
            service) or an operator account ``coordinator@<name>``.
        chunk_size: Bytes per chunk (at most the protocol's 128 KiB ceiling).
        sync_timeout_s: How long to wait for the retained statuses after connecting.
        limits: Protocol limits.
        session: None (default): a clean session, for short-lived processes. A
            name: a persistent session under the client id = the username
            (:func:`hub_client_id`; a broker that binds client ids to usernames
            keeps every device away from it), for the long-running service; the
            name keys its sync topic. What devices send while it is
            down or restarting (telemetry, presence, install reports) waits in the
            broker (up to its per-client queue, mosquitto's ``max_queued_messages``)
            and arrives when it is back. One process at a time per username: a
            second connection with it takes the session over.
    """

    broker: BrokerConfig
    chunk_size: int = DEFAULT_CHUNK_BYTES
    sync_timeout_s: float = 5.0
    limits: Limits = DEFAULT_LIMITS
    session: str | None = None

    def __post_init__(self) -> None:
        """Check the values.

        Raises:
            CoordinatorError: a chunk size outside 1..limits.max_chunk_bytes, a
                non-positive timeout, or a bad session name.
        """
        if not 1 <= self.chunk_size <= self.limits.max_chunk_bytes:
            raise CoordinatorError(
                f"chunk size must be 1..{self.limits.max_chunk_bytes} bytes, got {self.chunk_size}"
            )
        if self.sync_timeout_s <= 0:
            raise CoordinatorError("timeouts must be positive")
        if self.session is not None and SESSION_NAME_RE.fullmatch(self.session) is None:
            raise CoordinatorError(
                f"bad session name {self.session[:40]!r}: 1-64 letters, digits, '.', '_' or '-'"
            )


class MqttHub(HubBase, Startable):
    """The fleet view, device messages, commands and chunks over one MQTT connection
    (thread-safe)."""

    def __init__(self, config: HubConfig, *, clock: Callable[[], float] = time.time):
        """Prepare (nothing connects until :meth:`start`)."""
        super().__init__(chunk_size=config.chunk_size, limits=config.limits, clock=clock)
        self.config = config
        # A persistent session keeps its subscriptions: its sync topic stays the same.
        self._sync_topic = f"{SYNC_PREFIX}/{config.session or uuid.uuid4().hex}"
        self._synced = threading.Event()
        self._link = MqttLink(
            config.broker,
            client_id=hub_client_id(config.broker.username, config.session),
            clean_session=config.session is None,
            subscriptions=(*coordinator_subscriptions(), self._sync_topic),
            on_message=self._on_message,
            on_connect=self._connected,
        )
        self._sender = ChunkSender(
            self._link,
            self._payload_of,
            chunk_size=config.chunk_size,
            limits=config.limits,
            clock=clock,
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Connect and load the fleet's retained statuses.

        Raises:
            BrokerError: no connection within ``timeout`` seconds.
        """
        self._link.connect(timeout)
        self._sender.start()
        self.sync_fleet()

    def stop(self) -> None:
        """Stop serving chunks and disconnect (idempotent)."""
        self._sender.stop()
        self._link.stop()

    def sync_fleet(self) -> None:
        """Wait until the retained statuses delivered on subscribing have arrived.

        The broker sends retained messages right after the subscription; a message
        this client publishes to its own sync topic afterwards arrives after them.
        """
        self._synced.clear()
        self._link.publish(self._sync_topic, b"sync")
        if not self._synced.wait(self.config.sync_timeout_s):
            logger.warning("fleet sync timed out; the device list may be incomplete")

    def bytes_sent(self, transfer_id: str) -> int:
        """MQTT payload bytes of the chunks of ``transfer_id`` published so far."""
        return self._sender.bytes_sent(transfer_id)

    def forget_device(self, device_id: str) -> bool:
        """Clear a device's retained status on the broker (a revoked device's).

        mosquitto sends no Last Will for a client it drops because its account was
        removed, so the retained status would say "online" for ever; an empty
        retained status removes it, and this hub (like every coordinator) forgets
        the device when it comes back through the subscription.

        Returns:
            Whether the clearing message went out (False while disconnected).
        """
        return self._link.publish(device_topic(device_id, Channel.STATUS), b"", retain=True)

    # ------------------------------------------------------------------- the wire

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        return self._link.publish(topic, payload, retain=retain)

    def _publish_chunks(self, sends: Iterable[PlannedSend]) -> bool:
        return self._sender.publish(sends)

    def _request_chunks(self, item: ChunkRequestItem) -> None:
        self._sender.request(item)

    def _forget_transfer(self, transfer_id: str) -> None:
        self._sender.forget(transfer_id)

    def _on_message(self, topic: str, payload: bytes, retained: bool = False) -> None:
        if topic == self._sync_topic:
            self._synced.set()
            return
        self._receive(topic, payload, retained)
