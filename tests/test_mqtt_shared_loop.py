"""Many MqttLinks on one shared NetworkLoop, against a real mosquitto.

This is how ``fedge simulate`` holds hundreds of agents in one process: one network
thread, epoll, descriptors above select()'s 1023 ceiling. The single-link path
(a device's private loop) is exercised by every other MQTT test. A link's reconnect
timers are checked on a manual loop (:class:`ManualLoop`), without a broker.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from edge_agent.config.agent import BrokerConfig
from edge_agent.transport.mqtt import MqttLink, Will
from edge_agent.transport.network_loop import NetworkLoop, TimerHandle
from tests.descriptor_support import descriptors_above
from tests.fleet_support import Mosquitto, free_port, wait_for

LINKS = 30
WAIT_S = 15.0
USERS = [f"net{i:02d}" for i in range(LINKS)]


def events_of(user: str) -> str:
    return f"fedge/v1/devices/{user}/events"


def cmd_of(user: str) -> str:
    return f"fedge/v1/devices/{user}/cmd"


@dataclass
class Probe:
    """One link and what it saw."""

    user: str
    link: MqttLink
    received: list[bytes] = field(default_factory=list)
    connects: int = 0
    disconnects: int = 0
    got: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def broker_users() -> list[str]:
    return USERS


@pytest.fixture
def network() -> Iterator[NetworkLoop]:
    loop = NetworkLoop(name="shared-net")
    loop.start()
    yield loop
    loop.close()


def make_probe(
    broker: Mosquitto, network: NetworkLoop, user: str, topics: list[str] | None = None
) -> Probe:
    """A device link that hears its cmd topic (the ACL's rule), or ``topics``."""
    probe: Probe

    def on_message(_topic: str, payload: bytes, _retained: bool) -> None:
        probe.received.append(payload)
        probe.got.set()

    def on_connect() -> None:
        probe.connects += 1

    def on_disconnect() -> None:
        probe.disconnects += 1

    link = MqttLink(
        broker.broker(user),
        client_id=user,
        subscriptions=topics if topics is not None else [cmd_of(user)],
        on_message=on_message,
        on_connect=on_connect,
        on_disconnect=on_disconnect,
        will=Will(events_of(user), f"gone {user}".encode(), retain=False),
        network=network,
    )
    probe = Probe(user, link)
    return probe


def echo(coordinator: Probe, probe: Probe, payload: bytes) -> bool:
    """Both directions: the device publishes an event, the coordinator a command."""
    up = probe.user.encode() + b":" + payload
    if not probe.link.publish_wait(events_of(probe.user), up, timeout=WAIT_S):
        return False
    wait_for(lambda: up in coordinator.received, what=f"{probe.user}'s event")
    probe.got.clear()
    if not coordinator.link.publish_wait(cmd_of(probe.user), payload, timeout=WAIT_S):
        return False
    return probe.got.wait(WAIT_S) and payload in probe.received


def make_coordinator(broker: Mosquitto, network: NetworkLoop) -> Probe:
    return make_probe(broker, network, "coordinator", topics=["fedge/v1/devices/+/events"])


def test_links_share_one_thread_above_the_select_limit(
    broker: Mosquitto, network: NetworkLoop
) -> None:
    with descriptors_above(1100):
        coordinator = make_coordinator(broker, network)
        probes = [make_probe(broker, network, user) for user in USERS]
        try:
            for probe in [coordinator, *probes]:
                probe.link.start()
            assert wait_for(lambda: all(p.link.connected for p in [coordinator, *probes]))
            assert all(echo(coordinator, p, b"hello") for p in probes)
            paho_threads = [t for t in threading.enumerate() if t.name.startswith("paho-mqtt")]
            mqtt_threads = [t for t in threading.enumerate() if t.name.startswith("mqtt-net")]
            assert paho_threads == []
            assert mqtt_threads == []  # no private loops: everything is on shared-net
        finally:
            for probe in [coordinator, *probes]:
                probe.link.stop()
        assert not any(p.link.connected for p in probes)
        assert network.running  # the owner closes a shared loop, not its links


def test_one_dropped_link_reconnects_and_the_others_are_untouched(
    broker: Mosquitto, network: NetworkLoop
) -> None:
    probes = [make_probe(broker, network, user) for user in USERS[:5]]
    coordinator = make_coordinator(broker, network)
    everyone = [coordinator, *probes]
    try:
        for probe in everyone:
            probe.link.start()
        assert wait_for(lambda: all(p.link.connected for p in everyone))

        probes[0].link.drop_connection()
        assert wait_for(lambda: f"gone {USERS[0]}".encode() in coordinator.received)
        assert wait_for(lambda: probes[0].connects == 2)  # reconnected (backoff 0.5-1 s)
        assert echo(coordinator, probes[0], b"back")
        assert [p.disconnects for p in probes[1:]] == [0, 0, 0, 0]
        assert coordinator.disconnects == 0
        assert all(echo(coordinator, p, b"still here") for p in probes[1:])
        assert not any(b"gone" in m and USERS[0].encode() not in m for m in coordinator.received)
    finally:
        for probe in everyone:
            probe.link.stop()


def test_links_survive_a_broker_restart(broker: Mosquitto, network: NetworkLoop) -> None:
    probes = [make_probe(broker, network, user) for user in USERS[:8]]
    coordinator = make_coordinator(broker, network)
    everyone = [coordinator, *probes]
    try:
        for probe in everyone:
            probe.link.start()
        assert wait_for(lambda: all(p.link.connected for p in everyone))
        broker.stop()
        assert wait_for(lambda: not any(p.link.connected for p in everyone))
        assert not probes[0].link.publish(events_of(USERS[0]), b"lost")  # nothing is queued
        assert wait_for(lambda: probes[0].link.last_error is not None)
        broker.start()
        assert wait_for(lambda: all(p.link.connected for p in everyone), timeout=20.0)
        assert all(echo(coordinator, p, b"after restart") for p in probes)  # re-subscribed
        assert b"lost" not in coordinator.received
    finally:
        for probe in everyone:
            probe.link.stop()


def test_stopping_a_link_that_waits_to_reconnect_is_prompt(
    broker: Mosquitto, network: NetworkLoop
) -> None:
    probe = make_probe(broker, network, USERS[0])
    broker.stop()
    probe.link.start()
    assert wait_for(lambda: probe.link.last_error is not None)
    started = time.monotonic()
    probe.link.stop()
    assert time.monotonic() - started < 1.0
    broker.start()
    # That a stopped link's pending retry never runs is proven on a manual loop
    # (test_a_stopped_link_cancels_its_pending_retry); here: the loop goes on
    # serving the links still started, and the stopped one stays down.
    other = make_probe(broker, network, USERS[1])
    other.link.start()
    try:
        wait_for(lambda: other.link.connected, what="another link on the loop")
    finally:
        other.link.stop()
    assert not probe.link.connected
    assert probe.connects == 0


def test_a_private_loop_is_started_and_closed_with_its_link(broker: Mosquitto) -> None:
    link = MqttLink(
        broker.broker(USERS[0]),
        client_id=USERS[0],
        subscriptions=[],
        on_message=lambda *_args: None,
    )
    link.connect(WAIT_S)
    assert any(t.name == f"mqtt-{USERS[0]}" for t in threading.enumerate())
    link.stop()
    assert not any(t.name == f"mqtt-{USERS[0]}" for t in threading.enumerate())
    link.connect(WAIT_S)  # a stopped link can start again, on a fresh loop
    assert link.connected
    link.stop()


class ManualLoop:
    """A :class:`NetworkLoop` twin on the test's thread: timers run when time is moved."""

    running = True
    closed = False

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[TimerHandle] = []
        self._seq = itertools.count()

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def in_loop(self) -> bool:
        return True

    def add_ticker(self, _callback: Callable[[], None]) -> int:
        return 1

    def remove_ticker(self, _ticker_id: int) -> None:
        pass

    def call_soon(self, callback: Callable[[], None]) -> TimerHandle:
        return self.call_later(0.0, callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(self.now + delay, next(self._seq), callback)
        self.timers.append(handle)
        return handle

    def pending(self) -> list[TimerHandle]:
        return [t for t in self.timers if not t.cancelled]

    def advance(self, seconds: float) -> None:
        """Move the clock, running every timer that falls due (in order)."""
        self.now += seconds
        while due := sorted(t for t in self.pending() if t.when <= self.now):
            self.timers.remove(due[0])
            due[0].callback()


def test_a_stopped_link_cancels_its_pending_retry() -> None:
    """The fake-clock half of the prompt stop: no retry runs after stop(), ever."""
    loop = ManualLoop()
    closed_port = BrokerConfig("127.0.0.1", free_port(), False, reconnect_min_s=1.0,
                               reconnect_max_s=2.0)  # fmt: skip

    def link(user: str) -> MqttLink:
        return MqttLink(
            closed_port,
            client_id=user,
            subscriptions=[],
            on_message=lambda *_args: None,
            network=loop,
        )  # type: ignore[arg-type]

    stopped, going = link("a"), link("b")
    stopped.start()
    going.start()
    loop.advance(0.0)  # the first attempts: refused, a retry each within 0.5-1 s
    assert stopped.last_error is not None
    assert going.last_error is not None
    assert len(loop.pending()) == 2
    stopped.stop()
    assert len(loop.pending()) == 1  # the stopped link's retry is cancelled
    retries = 0
    for _ in range(10):  # a minute of backoff (at most 2 s apart): only the started link
        before = loop.pending()
        loop.advance(2.0)
        retries += loop.pending() != before
    assert retries == 10
    assert len(loop.pending()) == 1
    assert not stopped.connected
    going.stop()
    assert loop.pending() == []
