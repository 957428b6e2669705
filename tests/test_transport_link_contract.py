"""The DeviceLink contract, held by MqttLink on mosquitto and by MemoryLink alike.

Each test runs twice: ``mosquitto`` (a real broker with the shipped ACL; the device
``dev1`` and a ``coordinator`` peer) and ``memory`` (both links on one
MemoryBroker). A message that must NOT arrive is proven absent without sleeping: the
peer publishes a marker after it on a topic the device hears, and the broker
delivers one publisher's messages in order, so once the marker is in, the other is
known to be lost.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_agent.transport.link import DeviceLink, Will
from edge_agent.transport.memory import MemoryBroker, MemoryLink, topic_matches
from edge_agent.transport.mqtt import MqttLink
from tests.fleet_support import Mosquitto, running_broker, wait_for

DEVICE = "dev1"
CMD = f"fedge/v1/devices/{DEVICE}/cmd"
STATUS = f"fedge/v1/devices/{DEVICE}/status"
EVENTS = f"fedge/v1/devices/{DEVICE}/events"
BROADCAST = "fedge/v1/broadcast/t1"
PROBE = b"~"


@dataclass
class Ends:
    """One link and what it saw."""

    link: MqttLink | MemoryLink
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    connects: int = 0
    disconnects: int = 0
    fail_on: bytes | None = None  # on_message raises after recording this payload

    def payloads(self, topic: str) -> list[bytes]:
        """What arrived on ``topic``, without the test's own ``~`` probes."""
        return [
            payload
            for got, payload, _ in self.messages
            if got == topic and not payload.startswith(PROBE)
        ]

    def probes(self, topic: str) -> list[bytes]:
        return [p for got, p, _ in self.messages if got == topic and p.startswith(PROBE)]


Factory = Callable[..., Ends]


@pytest.fixture(params=["mosquitto", "memory"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """``make(user, subscriptions, will=None)``: a started-on-demand link and its record."""
    made: list[Ends] = []
    real = request.param == "mosquitto"
    with running_broker(tmp_path, [DEVICE]) if real else contextlib.nullcontext() as mqtt:
        memory = MemoryBroker()

        def factory(
            user: str, subscriptions: list[str], will: Will | Callable[[], Will] | None = None
        ) -> Ends:
            ends: Ends

            def on_message(topic: str, payload: bytes, retained: bool) -> None:
                ends.messages.append((topic, payload, retained))
                if payload == ends.fail_on:
                    raise RuntimeError("a bug in the handler")

            def on_connect() -> None:
                ends.connects += 1

            def on_disconnect() -> None:
                ends.disconnects += 1

            link: MqttLink | MemoryLink
            if isinstance(mqtt, Mosquitto):
                link = MqttLink(
                    mqtt.broker(user),
                    client_id=user,
                    subscriptions=subscriptions,
                    on_message=on_message,
                    on_connect=on_connect,
                    on_disconnect=on_disconnect,
                    will=will,
                )
            else:
                link = MemoryLink(
                    memory,
                    client_id=user,
                    subscriptions=subscriptions,
                    on_message=on_message,
                    on_connect=on_connect,
                    on_disconnect=on_disconnect,
                    will=will,
                )
            ends = Ends(link)
            made.append(ends)
            return ends

        yield factory
        for ends in made:
            ends.link.stop()


def as_device_link(link: DeviceLink) -> DeviceLink:
    """Both implementations are DeviceLinks (mypy checks this call)."""
    return link


def started(ends: Ends, peer: Ends | None = None) -> Ends:
    """Start ``ends`` and wait until its subscriptions are in place at the broker.

    A peer (the coordinator, allowed to publish anywhere) hears itself on its first
    subscription; a device is settled through ``peer``."""
    link = as_device_link(ends.link)
    link.start()
    assert link.wait_connected(10.0)
    wait_for(lambda: ends.connects >= 1, what="on_connect")
    if peer is not None:
        settled(ends, peer)
    else:
        marker(ends, ends, EVENTS)
    return ends


def marker(peer: Ends, device: Ends, topic: str = CMD) -> None:
    """Publish a probe on ``topic`` and wait until ``device`` has it."""
    payload = PROBE + f"marker-{len(device.messages)}".encode()
    assert peer.link.publish(topic, payload)
    wait_for(lambda: payload in device.probes(topic), what="the marker")


def settled(device: Ends, peer: Ends) -> None:
    """Wait until the broker processed what ``device`` sent so far ((un)subscriptions):
    it handles one client's packets in order, so an event published after them has
    passed them once ``peer`` (subscribed to the events) hears it."""
    payload = PROBE + f"settle-{len(peer.messages)}".encode()
    assert device.link.publish(EVENTS, payload)
    wait_for(lambda: payload in peer.probes(EVENTS), what="the settle event")


# ----------------------------------------------------------------------- contract


def test_nothing_is_published_before_the_link_connects(make: Factory) -> None:
    device = make(DEVICE, [CMD])
    assert not device.link.connected
    assert not device.link.publish(EVENTS, b"x")
    assert not device.link.publish_wait(EVENTS, b"x", timeout=0.5)


def test_a_started_link_connects_and_hears_its_subscriptions(make: Factory) -> None:
    peer = started(make("coordinator", [EVENTS]))
    device = started(make(DEVICE, [CMD]), peer)
    assert device.link.last_error is None
    assert peer.link.publish(CMD, b"hello")
    wait_for(lambda: device.payloads(CMD), what="the command")
    assert device.messages == [(CMD, b"hello", False)]


def test_what_the_device_publishes_reaches_a_subscriber(make: Factory) -> None:
    peer = started(make("coordinator", [EVENTS]))
    device = started(make(DEVICE, [CMD]), peer)
    assert device.link.publish_wait(EVENTS, b"acked", timeout=10.0)
    assert device.link.publish(EVENTS, b"plain")
    wait_for(lambda: len(peer.payloads(EVENTS)) == 2, what="both events")
    assert peer.payloads(EVENTS) == [b"acked", b"plain"]


def test_subscribe_and_unsubscribe_are_idempotent(make: Factory) -> None:
    peer = started(make("coordinator", [EVENTS]))
    device = started(make(DEVICE, [CMD]), peer)
    device.link.subscribe(BROADCAST)
    device.link.subscribe(BROADCAST)
    settled(device, peer)
    assert peer.link.publish(BROADCAST, b"chunk")
    wait_for(lambda: device.payloads(BROADCAST), what="the broadcast")
    device.link.unsubscribe(BROADCAST)
    device.link.unsubscribe(BROADCAST)
    settled(device, peer)
    assert peer.link.publish(BROADCAST, b"late")
    marker(peer, device)
    assert device.payloads(BROADCAST) == [b"chunk"]


def test_a_retained_message_arrives_on_subscribing(make: Factory) -> None:
    peer = started(make("coordinator", [EVENTS]))
    assert peer.link.publish_wait(BROADCAST, b"kept", timeout=10.0, retain=True)
    device = started(make(DEVICE, [CMD]), peer)
    device.link.subscribe(BROADCAST)
    wait_for(lambda: device.payloads(BROADCAST), what="the retained message")
    assert (BROADCAST, b"kept", True) in device.messages


def test_a_lost_connection_leaves_a_fresh_will_and_comes_back_subscribed(
    make: Factory,
) -> None:
    count = itertools.count(1)
    peer = started(make("coordinator", [EVENTS, STATUS]))
    device = started(
        make(DEVICE, [CMD], will=lambda: Will(STATUS, f"offline-{next(count)}".encode())), peer
    )
    device.link.drop_connection()
    wait_for(lambda: peer.payloads(STATUS), what="the Will")
    assert peer.payloads(STATUS) == [b"offline-1"]
    wait_for(lambda: device.connects == 2 and device.link.connected, what="the reconnect")
    assert device.disconnects == 1
    settled(device, peer)  # the subscriptions sent on reconnecting are in place
    assert peer.link.publish(CMD, b"again")
    wait_for(lambda: device.payloads(CMD), what="a command after reconnecting")
    device.link.drop_connection()
    wait_for(lambda: len(peer.payloads(STATUS)) == 2, what="the second Will")
    assert peer.payloads(STATUS)[1] == b"offline-2"  # made afresh for that connection


def test_a_clean_stop_leaves_no_will(make: Factory) -> None:
    peer = started(make("coordinator", [EVENTS, STATUS]))
    device = started(make(DEVICE, [CMD], will=Will(STATUS, b"offline")), peer)
    device.link.stop()
    assert not device.link.connected
    assert not device.link.publish(EVENTS, b"x")
    device.link.stop()  # idempotent
    marker(peer, peer, STATUS)
    assert peer.payloads(STATUS) == []


def test_a_killed_link_leaves_its_will_and_stays_down(make: Factory) -> None:
    peer = started(make("coordinator", [EVENTS, STATUS]))
    device = started(make(DEVICE, [CMD], will=Will(STATUS, b"gone")), peer)
    device.link.kill()  # both have it (simulations use it); the agent needs it not
    assert not device.link.connected
    wait_for(lambda: peer.payloads(STATUS), what="the Will")
    assert peer.payloads(STATUS) == [b"gone"]
    assert not device.link.publish(EVENTS, b"x")


def test_a_failing_callback_is_logged_and_the_link_goes_on(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    peer = started(make("coordinator", [EVENTS]))
    device = started(make(DEVICE, [CMD]), peer)
    device.fail_on = b"boom"
    assert peer.link.publish(CMD, b"boom")
    assert peer.link.publish(CMD, b"after")
    wait_for(lambda: device.payloads(CMD) == [b"boom", b"after"], what="both commands")
    assert "message handler failed" in caplog.text
    assert device.link.connected


# ----------------------------------------------------------- the twin's own parts


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("#", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def state(link: DeviceLink) -> tuple[bool, str | None]:
    return link.connected, link.last_error


def test_a_memory_broker_outage_drops_every_link_until_it_is_back() -> None:
    broker = MemoryBroker()
    heard: list[bytes] = []
    link = MemoryLink(
        broker,
        client_id=DEVICE,
        subscriptions=[CMD, STATUS],
        on_message=lambda _t, p, _r: heard.append(p),
        will=Will(STATUS, b"offline"),
    )
    link.start()
    broker.stop()
    assert state(link) == (False, "connection lost")
    link.drop_connection()  # cannot reconnect while the broker is down
    assert state(link) == (False, "broker unreachable: stopped")
    broker.start()
    assert state(link) == (True, None)
    broker.publish(CMD, b"back")
    assert heard == [b"back"]  # no Will: the broker went away, not the link
