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

* The network I/O runs on a :class:`~edge_agent.transport.network_loop.NetworkLoop`: a
  private one (one thread) by default, or one shared by many links in a process
  (``network=``), which is how ``fedge simulate`` holds 1,000 agents. paho is
  driven through its external-loop API (``loop_read``/``loop_write``/``loop_misc``);
  the link itself connects, and reconnects forever with jittered exponential
  backoff between ``reconnect_min_s`` and ``reconnect_max_s``. It re-subscribes on
  every connect, so a broker restart without persistence is survived.
  ``on_connect`` runs after the subscriptions were sent, on the loop's thread: keep
  it short.
* ``on_message`` also runs on the loop's thread; the agent hands messages to its
  own worker queue there. An exception in a callback is logged, never propagated
  into the loop. A connection attempt blocks the loop for at most paho's connect
  timeout (5 s), as paho's own thread does.
* :meth:`publish` refuses (returns False) while disconnected instead of letting
  paho queue messages in memory without bound; callers that must not lose a message
  keep it themselves (the agent's telemetry spool) and retry after reconnecting.
* TLS (``mqtts://``) uses the configured CA file, or the system's CAs when none is
  given; a client certificate and key enable mutual TLS.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config.agent import BrokerConfig
from edge_agent.errors import BrokerError
from edge_agent.transport.link import Will, call_safely, deliver_safely
from edge_agent.transport.network_loop import NetworkLoop, TimerHandle

__all__ = ["MqttLink", "Will"]

logger = logging.getLogger(__name__)

SUBSCRIBE_QOS = 1
MAX_INFLIGHT = 32
MAX_QUEUED = 4096
"""Messages paho may hold for sending; beyond it a publish fails instead of growing."""
READ_BURST = 256
"""Packets read from one socket before the loop serves the others."""
CLOSE_WAIT_S = 2.0
"""How long :meth:`MqttLink.stop` waits for the DISCONNECT to go out before cutting."""


class MqttLink:
    """A paho-mqtt client that connects in the background and stays connected.

    Implements :class:`edge_agent.transport.link.DeviceLink`.
    """

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
        network: NetworkLoop | None = None,
        clean_session: bool = True,
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
            network: The loop that runs this link's I/O, shared with other links
                (the caller starts and closes it); None: a private one, started
                and closed with the link.
            clean_session: False for a persistent session: the broker keeps this
                client's subscriptions and queues QoS 1 messages for it while it
                is away, and delivers them when it reconnects. Needs a stable
                ``client_id`` that no other client uses at the same time.

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
        self._socket_closed = threading.Event()
        self._socket_closed.set()
        self._started = False
        self._last_error: str | None = None
        self._client_id = client_id
        self._own_network = network is None
        self._network = network if network is not None else self._private_loop()
        self._backoff_s = broker.reconnect_min_s
        self._retry: TimerHandle | None = None
        self._ticker: int | None = None
        self._jitter = random.Random()  # noqa: S311 - spreads reconnects, not a secret
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
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
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.max_queued_messages_set(MAX_QUEUED)
        client.on_pre_connect = self._handle_pre_connect
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_socket_open = self._handle_socket_open
        client.on_socket_close = self._handle_socket_close
        client.on_socket_register_write = self._handle_register_write
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
        if self._own_network and self._network.closed:  # started again after stop()
            self._network = self._private_loop()
        self._started = True
        self._backoff_s = self._broker.reconnect_min_s
        logger.info("connecting to %s", self._broker.url)
        self._client.connect_async(
            self._broker.host, self._broker.port, keepalive=self._broker.keepalive_s
        )
        self._network.start()
        self._ticker = self._network.add_ticker(self._tick)
        self._network.call_soon(self._attempt)

    def _private_loop(self) -> NetworkLoop:
        return NetworkLoop(name=f"mqtt-{self._client_id}")

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

        Must not be called from a callback (the network loop would deadlock).

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
        """Disconnect cleanly (no Last Will) and stop the link's I/O (idempotent)."""
        if not self._halt():
            return
        sock = self._client.socket()
        if sock is not None:
            if self._client.disconnect() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                _cut(sock)
            self._await_close(sock)
        self._finish_stop()

    def drop_connection(self) -> None:
        """Cut the connection without DISCONNECT and reconnect (with backoff).

        The broker sends the Last Will, as when a device's network fails for a
        moment; simulations and tests use it.
        """
        sock = self._client.socket()
        if sock is not None:
            _cut(sock)

    def kill(self) -> None:
        """Drop the connection without DISCONNECT (the broker sends the Last Will).

        Simulates a device losing power; used by simulations and tests.
        """
        if not self._halt():
            return
        sock = self._client.socket()
        if sock is not None:
            _cut(sock)
            self._await_close(sock)
        self._finish_stop()

    def _halt(self) -> bool:
        """Stop reconnecting; False when the link was not started."""
        if not self._started:
            return False
        self._started = False
        retry, self._retry = self._retry, None
        if retry is not None:
            retry.cancel()
        if self._ticker is not None:
            self._network.remove_ticker(self._ticker)
            self._ticker = None
        return True

    def _await_close(self, sock: Any) -> None:
        """Wait for the loop to close ``sock``; cut it if the DISCONNECT is stuck."""
        if self._network.in_loop() or not self._network.running:
            return
        if not self._socket_closed.wait(CLOSE_WAIT_S):
            _cut(sock)
            self._socket_closed.wait(CLOSE_WAIT_S)

    def _finish_stop(self) -> None:
        self._connected.clear()
        if self._own_network:
            self._network.close()

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
        self._backoff_s = self._broker.reconnect_min_s
        with self._subscription_lock:
            topics = list(self._subscriptions)
        if topics:
            client.subscribe([(topic, SUBSCRIBE_QOS) for topic in topics])
        self._connected.set()
        logger.info("connected to %s", self._broker.url)
        call_safely(self._on_connect)

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
            call_safely(self._on_disconnect)

    def _handle_socket_open(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._socket_closed.clear()
        self._network.watch(sock, self._on_ready)

    def _handle_socket_close(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._network.unwatch(sock)
        self._socket_closed.set()
        if self._started:
            self._schedule_retry()

    def _handle_register_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._network.set_writable(sock, True)

    # ------------------------------------------------------------ on the loop

    def _attempt(self) -> None:
        """Open a connection (the loop's thread); on failure retry with backoff."""
        self._retry = None
        if not self._started or self._client.socket() is not None:
            return
        try:
            rc = self._client.reconnect()
        except (OSError, ValueError) as exc:  # refused, unreachable, DNS, TLS
            self._last_error = f"broker unreachable: {exc}"
            logger.info("cannot reach %s (%s); retrying with backoff", self._broker.url, exc)
            self._schedule_retry()
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._last_error = f"connect failed: {mqtt.error_string(rc)}"
            sock = self._client.socket()
            if sock is not None:
                _cut(sock)  # the loop sees it closed and schedules the retry
            else:
                self._schedule_retry()

    def _schedule_retry(self) -> None:
        if not self._started or self._retry is not None:
            return
        delay = self._backoff_s * self._jitter.uniform(0.5, 1.0)
        self._backoff_s = min(self._broker.reconnect_max_s, self._backoff_s * 2)
        self._retry = self._network.call_later(delay, self._attempt)

    def _on_ready(self, readable: bool, writable: bool) -> None:
        client = self._client
        if readable:
            # paho reads one packet per call; read on while more has arrived (a
            # coordinator hears the whole fleet, and the broker drops what queues up).
            for _ in range(READ_BURST):
                if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
                if not _more_to_read(client.socket()):
                    break
        if writable and client.socket() is not None:
            client.loop_write()
        self._sync_writable()

    def _tick(self) -> None:
        if self._client.socket() is not None:
            self._client.loop_misc()  # keepalive: PINGREQ, or close when unanswered
            self._sync_writable()

    def _sync_writable(self) -> None:
        sock = self._client.socket()
        if sock is not None:
            self._network.set_writable(sock, self._client.want_write)

    def _handle_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        deliver_safely(self._on_message, msg.topic, bytes(msg.payload), bool(msg.retain))


def _cut(sock: Any) -> None:
    """Shut a socket down; the loop then sees it closed (no DISCONNECT is sent)."""
    if isinstance(sock, socket.socket):  # an ssl.SSLSocket is one too
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _more_to_read(sock: Any) -> bool:
    """Whether ``sock`` has bytes waiting (TLS: decrypted ones it no longer signals)."""
    if sock is None:
        return False
    pending = getattr(sock, "pending", None)
    if callable(pending) and int(pending()) > 0:
        return True
    if isinstance(sock, ssl.SSLSocket):
        return False  # a peek would see ciphertext; epoll signals the rest
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # let paho's next read see the error and close
