"""The MQTT adapter: one paho-mqtt client that stays connected.

Both sides use it: the agent (one link per device) and the coordinator (one link for
the fleet). It is the only module that touches paho; everything above it sees
``(topic, payload, retained)`` callbacks, a ``connected`` flag and :class:`BrokerError`.

Workflow::

    link = MqttLink(broker, client_id="pi-7", subscriptions=agent_subscriptions("pi-7"),
                    on_message=handle, on_connect=announce, will=Will(topic, offline))
    link.start()                    # returns at once; connects in the background
    link.wait_connected(10.0)       # optional
    link.publish(topic, payload)    # False when not connected (nothing is queued)
    link.stop()                     # clean DISCONNECT (the Last Will is not sent)

Behaviour that callers rely on:

* Reconnects forever with exponential backoff between ``reconnect_min_s`` and
  ``reconnect_max_s`` (paho's own loop), and re-subscribes on every connect, so a
  broker restart without persistence is survived. ``on_connect`` runs after the
  subscriptions were sent, on paho's network thread: keep it short.
* ``on_message`` also runs on paho's network thread; the agent hands messages to its
  own worker queue there. An exception in a callback is logged, never propagated
  into paho (which would kill the network loop).
* :meth:`publish` refuses (returns False) while disconnected instead of letting
  paho queue messages in memory without bound; callers that must not lose a message
  keep it themselves (the agent's telemetry spool) and retry after reconnecting.
* TLS (``mqtts://``) uses the configured CA file, or the system's CAs when none is
  given; a client certificate and key enable mutual TLS.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import BrokerConfig
from edge_agent.errors import BrokerError

__all__ = ["MqttLink", "Will"]

logger = logging.getLogger(__name__)

SUBSCRIBE_QOS = 1
MAX_INFLIGHT = 32
MAX_QUEUED = 4096
"""Messages paho may hold for sending; beyond it a publish fails instead of growing."""


@dataclass(frozen=True, slots=True)
class Will:
    """The Last Will the broker publishes if this client vanishes without DISCONNECT."""

    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


class MqttLink:
    """A paho-mqtt client that connects in the background and stays connected."""

    def __init__(
        self,
        broker: BrokerConfig,
        *,
        client_id: str,
        subscriptions: Sequence[str],
        on_message: Callable[[str, bytes, bool], None],
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        will: Will | Callable[[], Will] | None = None,
    ) -> None:
        """Prepare the client (nothing touches the network until :meth:`start`).

        Args:
            broker: Where and how to connect.
            client_id: The MQTT client id (unique per broker).
            subscriptions: Topic filters subscribed (QoS 1) on every connect (more
                can be added and removed later with :meth:`subscribe` and
                :meth:`unsubscribe`).
            on_message: Called with ``(topic, payload, retained)`` for every message
                (``retained``: the broker's stored copy, delivered on subscribing).
            on_connect: Called after each successful (re)connect.
            on_disconnect: Called after each lost connection.
            will: The Last Will, if any; a callable is asked for a fresh one before
                every connection attempt (so its timestamp and content are current).

        Raises:
            BrokerError: the TLS files cannot be loaded.
        """
        self._broker = broker
        self._subscriptions = list(subscriptions)
        self._subscription_lock = threading.Lock()
        self._will = will
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._connected = threading.Event()
        self._started = False
        self._last_error: str | None = None
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            try:
                client.tls_set(
                    ca_certs=str(broker.ca_file) if broker.ca_file else None,
                    certfile=str(broker.cert_file) if broker.cert_file else None,
                    keyfile=str(broker.key_file) if broker.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise BrokerError(f"cannot set up TLS for {broker.url}: {exc}") from exc
        client.reconnect_delay_set(
            max(1, round(broker.reconnect_min_s)), max(1, round(broker.reconnect_max_s))
        )
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.max_queued_messages_set(MAX_QUEUED)
        client.on_pre_connect = self._handle_pre_connect
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_connect_fail = self._handle_connect_fail
        self._client = client

    @property
    def connected(self) -> bool:
        """Whether the client is connected right now."""
        return self._connected.is_set()

    @property
    def last_error(self) -> str | None:
        """The last connection problem seen, for health reports (None when fine)."""
        return self._last_error

    def start(self) -> None:
        """Start connecting in the background (returns at once; idempotent)."""
        if self._started:
            return
        self._started = True
        logger.info("connecting to %s", self._broker.url)
        self._client.connect_async(
            self._broker.host, self._broker.port, keepalive=self._broker.keepalive_s
        )
        self._client.loop_start()

    def subscribe(self, topic: str) -> None:
        """Add a subscription (kept across reconnects; idempotent).

        A message published after the broker processed this SUBSCRIBE reaches us;
        since the broker handles one client's packets in order, anything this client
        publishes after calling :meth:`subscribe` is processed after it.
        """
        with self._subscription_lock:
            if topic in self._subscriptions:
                return
            self._subscriptions.append(topic)
        if self._connected.is_set():
            self._client.subscribe(topic, SUBSCRIBE_QOS)

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription added with :meth:`subscribe` (idempotent)."""
        with self._subscription_lock:
            if topic not in self._subscriptions:
                return
            self._subscriptions.remove(topic)
        if self._connected.is_set():
            self._client.unsubscribe(topic)

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a connection; return whether there is one."""
        return self._connected.wait(timeout)

    def connect(self, timeout: float) -> None:
        """Start and wait for the first connection.

        Raises:
            BrokerError: not connected within ``timeout`` seconds (the client is
                stopped again).
        """
        self.start()
        if not self.wait_connected(timeout):
            reason = self._last_error or "no answer"
            self.stop()
            raise BrokerError(f"cannot connect to {self._broker.url} within {timeout:g}s: {reason}")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Publish if connected.

        Returns:
            True when the message was handed to the connected client, False when
            disconnected (nothing is queued).
        """
        return self.publish_info(topic, payload, qos=qos, retain=retain) is not None

    def publish_info(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> mqtt.MQTTMessageInfo | None:
        """Like :meth:`publish`, returning paho's handle (to wait for the PUBACK)."""
        if not self._connected.is_set():
            return None
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            logger.debug("publish on %s not sent: %s", topic, mqtt.error_string(info.rc))
            return None
        return info

    def publish_wait(
        self, topic: str, payload: bytes, *, timeout: float, qos: int = 1, retain: bool = False
    ) -> bool:
        """Publish and wait until the broker acknowledged it (QoS 1).

        Must not be called from a callback (paho's network thread would deadlock).

        Returns:
            True once acknowledged, False when disconnected or not acknowledged in time.
        """
        info = self.publish_info(topic, payload, qos=qos, retain=retain)
        if info is None:
            return False
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            logger.debug("publish on %s not acknowledged: %s", topic, exc)
            return False
        return info.is_published()

    def stop(self) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread (idempotent)."""
        if not self._started:
            return
        self._started = False
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._close_sockets()
            self._connected.clear()

    def _close_sockets(self) -> None:
        """Close the socket and paho's wake-up socket pair now.

        paho closes the pair only when the client object is finalized, and a
        finalizer that runs after the sockets' own leaves them to the garbage
        collector (ResourceWarning). ``_reset_sockets`` is paho 2.x's own method.
        """
        reset = getattr(self._client, "_reset_sockets", None)
        if callable(reset):
            reset()

    def drop_connection(self) -> None:
        """Cut the connection without DISCONNECT and let paho reconnect (with backoff).

        The broker sends the Last Will, as when a device's network fails for a
        moment; simulations and tests use it.
        """
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # an ssl.SSLSocket is one too
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def kill(self) -> None:
        """Drop the connection without DISCONNECT (the broker sends the Last Will).

        Simulates a device losing power; used by simulations and tests.
        """
        self._started = False
        sock = self._client.socket()
        self._client.loop_stop()
        if sock is not None:
            sock.close()
        self._close_sockets()
        self._connected.clear()

    # ------------------------------------------------------------ paho callbacks

    def _handle_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: Any,
        reason: ReasonCode,
        _properties: Any,
    ) -> None:
        if reason.is_failure:
            self._last_error = f"broker refused the connection: {reason}"
            logger.warning("%s refused the connection: %s", self._broker.url, reason)
            return
        self._last_error = None
        with self._subscription_lock:
            topics = list(self._subscriptions)
        if topics:
            client.subscribe([(topic, SUBSCRIBE_QOS) for topic in topics])
        self._connected.set()
        logger.info("connected to %s", self._broker.url)
        self._call(self._on_connect)

    def _handle_pre_connect(self, client: mqtt.Client, _userdata: Any) -> None:
        will = self._will() if callable(self._will) else self._will
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def _handle_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: Any,
        reason: ReasonCode,
        _properties: Any,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected:
            if self._started:
                self._last_error = f"connection lost: {reason}"
                logger.warning(
                    "lost the connection to %s (%s); reconnecting", self._broker.url, reason
                )
            self._call(self._on_disconnect)

    def _handle_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        self._last_error = "broker unreachable"
        logger.info("cannot reach %s; retrying with backoff", self._broker.url)

    def _handle_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._on_message(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception:
            logger.exception("message handler failed on %s", msg.topic)

    @staticmethod
    def _call(callback: Callable[[], None] | None) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception:
            logger.exception("connection callback failed")
