"""An in-process twin of the MQTT link: :class:`MemoryBroker` and :class:`MemoryLink`.

:class:`MemoryLink` keeps the :class:`~edge_agent.transport.link.DeviceLink`
contract (tests/test_transport_link_contract.py runs the same tests against it and
against :class:`~edge_agent.transport.mqtt.MqttLink` on mosquitto), without a
socket or a thread. Links attach to a :class:`MemoryBroker`, which does what the
parts of MQTT the agent relies on do:

* topic filters with ``+`` and ``#``; a message reaches every connected link with
  a matching subscription (the publisher too), with ``retained=False``;
* retained messages: the last retained payload of a topic (an empty one clears it)
  is delivered on subscribing, with ``retained=True``;
* Last Wills: published when a link loses its connection (:meth:`MemoryLink.kill`,
  :meth:`MemoryLink.drop_connection`), not when it disconnects cleanly
  (:meth:`MemoryLink.stop`) nor when the broker itself goes away
  (:meth:`MemoryBroker.stop`); a callable Will is asked afresh at every connect;
* outages: :meth:`MemoryBroker.stop` disconnects every link; started links connect
  again (and re-subscribe) on :meth:`MemoryBroker.start`.

Everything happens at once on the caller's thread: ``publish`` returns after every
subscriber's ``on_message`` ran, ``start`` after ``on_connect`` ran. Callbacks are
called outside the broker's lock, so they may publish in turn; an exception in a
callback is logged (:func:`~edge_agent.transport.link.deliver_safely`), as the
real link does.

Workflow::

    broker = MemoryBroker()
    link = MemoryLink(broker, client_id="pi-7", subscriptions=[cmd], on_message=handle)
    link.start()                       # connected, subscribed, on_connect called
    broker.publish(cmd, payload)       # handle(cmd, payload, False) has run
    link.publish(events, payload)      # True: delivered to whoever listens
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from edge_agent.transport.link import Will, call_safely, deliver_safely

__all__ = ["MemoryBroker", "MemoryLink", "topic_matches"]

Delivery = tuple[Callable[[str, bytes, bool], None], str, bytes, bool]
"""An ``on_message`` call to make: callback, topic, payload, retained."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT filter (``+``: one level, ``#``: the rest)."""
    wanted, levels = topic_filter.split("/"), topic.split("/")
    for index, part in enumerate(wanted):
        if part == "#":
            return True
        if index >= len(levels) or part not in ("+", levels[index]):
            return False
    return len(wanted) == len(levels)


class MemoryBroker:
    """The in-process broker that :class:`MemoryLink` instances share."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._links: list[MemoryLink] = []
        self._retained: dict[str, bytes] = {}
        self._online = True

    @property
    def online(self) -> bool:
        """Whether links can connect (False between :meth:`stop` and :meth:`start`)."""
        return self._online

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Deliver to every connected, subscribed link (as any client would publish)."""
        with self.lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            deliveries = [
                (link.on_message, topic, payload, False)
                for link in self._links
                if link.connected and link.hears(topic)
            ]
        _deliver(deliveries)

    def stop(self) -> None:
        """An outage: every link loses its connection (a broker that goes away
        publishes no Wills)."""
        with self.lock:
            self._online = False
            links = [link for link in self._links if link.connected]
        for link in links:
            link.lose_connection(will=False)

    def start(self) -> None:
        """Back from an outage: every started link connects again."""
        with self.lock:
            self._online = True
            links = list(self._links)
        for link in links:
            link.reconnect()

    def attach(self, link: MemoryLink) -> None:
        """Register a link (its constructor does)."""
        with self.lock:
            self._links.append(link)

    def retained(self, topic_filter: str) -> list[tuple[str, bytes]]:
        """The retained ``(topic, payload)`` a new subscription to ``topic_filter`` gets."""
        with self.lock:
            return [
                (topic, payload)
                for topic, payload in self._retained.items()
                if topic_matches(topic_filter, topic)
            ]


class MemoryLink:
    """A :class:`~edge_agent.transport.link.DeviceLink` on a :class:`MemoryBroker`."""

    def __init__(
        self,
        broker: MemoryBroker,
        *,
        client_id: str,
        subscriptions: Sequence[str],
        on_message: Callable[[str, bytes, bool], None],
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        will: Will | Callable[[], Will] | None = None,
    ) -> None:
        """Prepare the link (it connects on :meth:`start`); arguments as for MqttLink."""
        self._broker = broker
        self.client_id = client_id
        self._subscriptions = list(subscriptions)
        self.subscription_changes: list[tuple[str, str]] = []
        """Every ``("subscribe" | "unsubscribe", topic)`` that changed the subscriptions,
        in order (tests read what a component asked of its link)."""
        self.on_message = on_message
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._will_source = will
        self._will: Will | None = None
        self._started = False
        self._connected = threading.Event()
        self._last_error: str | None = None
        broker.attach(self)

    @property
    def connected(self) -> bool:
        """Whether the link is connected right now."""
        return self._connected.is_set()

    @property
    def last_error(self) -> str | None:
        """Why the link is not connected (None when fine)."""
        return self._last_error

    @property
    def subscriptions(self) -> list[str]:
        """The topic filters subscribed, in the order they were added."""
        with self._broker.lock:
            return list(self._subscriptions)

    def hears(self, topic: str) -> bool:
        """Whether a message on ``topic`` reaches this link's subscriptions."""
        with self._broker.lock:
            return any(topic_matches(wanted, topic) for wanted in self._subscriptions)

    def start(self) -> None:
        """Connect now if the broker is up, else as soon as it is (idempotent)."""
        with self._broker.lock:
            if self._started:
                return
            self._started = True
        self.reconnect()

    def stop(self) -> None:
        """Disconnect cleanly, without the Will (idempotent)."""
        with self._broker.lock:
            if not self._started:
                return
            self._started = False
        self.lose_connection(will=False, clean=True)

    def kill(self) -> None:
        """Vanish without DISCONNECT, as on a power loss: the Will goes out."""
        with self._broker.lock:
            if not self._started:
                return
            self._started = False
        self.lose_connection(will=True)

    def drop_connection(self) -> None:
        """Lose the connection (the Will goes out), then connect again."""
        self.lose_connection(will=True)
        self.reconnect()

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a connection; return whether there is one."""
        return self._connected.wait(timeout)

    def subscribe(self, topic: str) -> None:
        """Add a subscription; retained messages on it are delivered (idempotent)."""
        with self._broker.lock:
            if topic in self._subscriptions:
                return
            self._subscriptions.append(topic)
            self.subscription_changes.append(("subscribe", topic))
            retained = self._retained_for([topic]) if self.connected else []
        _deliver(retained)

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription (idempotent)."""
        with self._broker.lock:
            if topic in self._subscriptions:
                self._subscriptions.remove(topic)
                self.subscription_changes.append(("unsubscribe", topic))

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> bool:
        """Deliver through the broker if connected; False when disconnected."""
        del qos  # every delivery is immediate and certain
        if not self.connected:
            return False
        self._broker.publish(topic, payload, retain=retain)
        return True

    def publish_wait(
        self, topic: str, payload: bytes, *, timeout: float, qos: int = 1, retain: bool = False
    ) -> bool:
        """Like :meth:`publish`: delivery is done when it returns."""
        del timeout
        return self.publish(topic, payload, qos=qos, retain=retain)

    # ------------------------------------------------------- called by the broker

    def reconnect(self) -> None:
        """Connect if started, not connected and the broker is up."""
        with self._broker.lock:
            if not self._started or self.connected:
                return
            if not self._broker.online:
                self._last_error = "broker unreachable: stopped"
                return
            source = self._will_source
            self._will = source() if callable(source) else source
            self._connected.set()
            self._last_error = None
            retained = self._retained_for(self._subscriptions)
        _deliver(retained)
        call_safely(self._on_connect)

    def lose_connection(self, *, will: bool, clean: bool = False) -> bool:
        """Drop the connection; publish the Will when ``will``. False if not connected.

        ``clean``: a DISCONNECT of this link's own (no error is recorded).
        """
        with self._broker.lock:
            if not self.connected:
                return False
            self._connected.clear()
            if not clean:
                self._last_error = "connection lost"
            last_will, self._will = self._will, None
        if will and last_will is not None:
            self._broker.publish(last_will.topic, last_will.payload, retain=last_will.retain)
        call_safely(self._on_disconnect)
        return True

    def _retained_for(self, topic_filters: Sequence[str]) -> list[Delivery]:
        return [
            (self.on_message, topic, payload, True)
            for topic_filter in topic_filters
            for topic, payload in self._broker.retained(topic_filter)
        ]


def _deliver(deliveries: Sequence[Delivery]) -> None:
    for on_message, topic, payload, retained in deliveries:
        deliver_safely(on_message, topic, payload, retained)
