"""One contract for both hubs: :class:`MemoryHub` and :class:`MqttHub` on a real mosquitto.

Every test runs twice, once per implementation, through a small rig that plays the
devices: ``say`` sends a message as a device would, ``heard`` is what a device
received (its ``cmd`` and ``chunks`` topics and every broadcast topic). With
mosquitto a device is an :class:`~edge_agent.transport.mqtt.MqttLink` logged in as
the device; with the twin it is :meth:`MemoryHub.receive` and
:attr:`MemoryHub.published`. What must *not* arrive is proven by ordering, never by
sleeping: the hub handles one device's messages in order, so once a later message
arrived the earlier one would have too.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.link.hub import HubConfig, MqttHub
from coordinator.link.memory import MemoryHub
from coordinator.link.port import Hub
from edge_agent.protocol import (
    BROADCAST_FILTER,
    BROADCAST_PREFIX,
    DEFAULT_LIMITS,
    Channel,
    Chunk,
    ChunkRequest,
    Envelope,
    InstallState,
    InstallStatus,
    Message,
    Rollback,
    Status,
    broadcast_topic,
    decode,
    device_topic,
    encode,
    sha256_hex,
)
from edge_agent.transport.mqtt import MqttLink
from tests.fleet_support import Mosquitto, running_broker, wait_for

DEVICES = ["hc0", "hc1"]
CHUNK = 1024
PAYLOAD = bytes(range(256)) * 10  # 2560 bytes: 3 chunks of 1 KiB


def status(*, online: bool = True, tags: tuple[str, ...] = ()) -> Status:
    return Status(online=online, agent_version="0.1.0", tags=tags)


class Rig(ABC):
    """A started hub and the devices around it."""

    hub: Hub

    @abstractmethod
    def say(self, device_id: str, message: Message) -> None:
        """Send ``message`` as ``device_id`` on its channel's topic."""

    @abstractmethod
    def say_raw(self, device_id: str, topic: str, payload: bytes) -> None:
        """Publish raw bytes as ``device_id``."""

    @abstractmethod
    def heard(self, device_id: str) -> list[tuple[str, Envelope]]:
        """``(topic, envelope)`` of everything the device received, oldest first."""

    @abstractmethod
    def lose_connection(self) -> None:
        """Make the hub lose its connection (it comes back by itself)."""

    def chunks(self, device_id: str) -> list[tuple[str, Chunk]]:
        return [(t, e.message) for t, e in self.heard(device_id) if isinstance(e.message, Chunk)]


class MemoryRig(Rig):
    def __init__(self) -> None:
        self.memory = MemoryHub(chunk_size=CHUNK)
        self.hub = self.memory
        self.memory.start()

    def say(self, device_id: str, message: Message) -> None:
        self.memory.receive(device_id, message, retained=False)

    def say_raw(self, device_id: str, topic: str, payload: bytes) -> None:
        self.memory.receive_raw(topic, payload)

    def heard(self, device_id: str) -> list[tuple[str, Envelope]]:
        own = {device_topic(device_id, Channel.CMD), device_topic(device_id, Channel.CHUNKS)}
        return [
            (p.topic, p.envelope())
            for p in self.memory.published
            if p.topic in own or p.topic.startswith(BROADCAST_PREFIX + "/")
        ]

    def lose_connection(self) -> None:
        self.memory.reconnect()

    def close(self) -> None:
        self.memory.stop()


class MqttRig(Rig):
    def __init__(self, broker: Mosquitto) -> None:
        self.mqtt = MqttHub(HubConfig(broker=broker.broker("coordinator"), chunk_size=CHUNK))
        self.hub = self.mqtt
        self._lock = threading.Lock()
        self._heard: dict[str, list[tuple[str, Envelope]]] = {d: [] for d in DEVICES}
        self.links = {d: self._device(broker, d) for d in DEVICES}
        for link in self.links.values():
            link.connect(10.0)
        self.mqtt.start()

    def _device(self, broker: Mosquitto, device_id: str) -> MqttLink:
        def collect(topic: str, payload: bytes, _retained: bool = False) -> None:
            with self._lock:
                self._heard[device_id].append((topic, decode(payload)))

        topics = (device_topic(device_id, Channel.CMD), device_topic(device_id, Channel.CHUNKS))
        return MqttLink(
            broker.broker(device_id),
            client_id=device_id,
            subscriptions=(*topics, BROADCAST_FILTER),
            on_message=collect,
        )

    def say(self, device_id: str, message: Message) -> None:
        channel = next(iter(message.CHANNELS - {Channel.CMD, Channel.CHUNKS}))
        payload = encode(message, sender=device_id, sent_at=time.time())
        self.say_raw(device_id, device_topic(device_id, channel), payload)

    def say_raw(self, device_id: str, topic: str, payload: bytes) -> None:
        retain = topic == device_topic(device_id, Channel.STATUS)
        assert self.links[device_id].publish_wait(topic, payload, timeout=10.0, retain=retain)

    def heard(self, device_id: str) -> list[tuple[str, Envelope]]:
        with self._lock:
            return list(self._heard[device_id])

    def lose_connection(self) -> None:
        self.mqtt._link.drop_connection()

    def close(self) -> None:
        self.mqtt.stop()
        for link in self.links.values():
            link.stop()


@pytest.fixture(params=["memory", "mqtt"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    if request.param == "memory":
        memory = MemoryRig()
        yield memory
        memory.close()
        return
    with running_broker(tmp_path, DEVICES) as broker:
        mqtt = MqttRig(broker)
        try:
            yield mqtt
        finally:
            mqtt.close()


class TestHubContract:
    def test_it_reports_its_chunk_size_and_limits(self, rig: Rig) -> None:
        assert rig.hub.chunk_size == CHUNK
        assert rig.hub.limits == DEFAULT_LIMITS

    def test_a_status_puts_the_device_in_the_fleet(self, rig: Rig) -> None:
        assert rig.hub.fleet() == []
        rig.say("hc1", status(tags=("cam",)))
        rig.say("hc0", status())
        wait_for(lambda: len(rig.hub.fleet()) == 2, what="two devices")
        assert [r.device_id for r in rig.hub.fleet()] == ["hc0", "hc1"]
        record = rig.hub.device("hc1")
        assert record is not None
        assert record.online
        assert record.tags == ("cam",)
        assert rig.hub.device("nobody") is None

    def test_an_offline_status_marks_the_device_offline(self, rig: Rig) -> None:
        rig.say("hc0", status())
        wait_for(lambda: rig.hub.device("hc0") is not None, what="hc0 known")
        rig.say("hc0", status(online=False))
        wait_for(lambda: not rig.hub.fleet()[0].online, what="hc0 offline")

    def test_listeners_hear_device_messages_in_order_until_removed(self, rig: Rig) -> None:
        first: list[tuple[str, Envelope, int]] = []
        second: list[tuple[str, Envelope, int]] = []

        def listen_first(device_id: str, envelope: Envelope, size: int) -> None:
            first.append((device_id, envelope, size))

        def listen_second(device_id: str, envelope: Envelope, size: int) -> None:
            second.append((device_id, envelope, size))

        rig.hub.add_listener(listen_first)
        rig.say("hc0", status())
        rig.say("hc0", InstallStatus(deployment_id="d1", state=InstallState.ACCEPTED))
        wait_for(lambda: len(first) == 2, what="two messages heard")
        assert [type(e.message) for _d, e, _s in first] == [Status, InstallStatus]
        assert all(d == "hc0" and size > 0 for d, _e, size in first)
        # The fleet was updated before the listener ran.
        assert rig.hub.device("hc0") is not None

        rig.hub.remove_listener(listen_first)
        rig.hub.remove_listener(listen_first)  # twice: no error
        rig.hub.add_listener(listen_second)
        rig.say("hc0", InstallStatus(deployment_id="d2", state=InstallState.ACCEPTED))
        wait_for(lambda: len(second) == 1, what="the second listener")
        assert len(first) == 2

    def test_send_delivers_a_command_to_one_device(self, rig: Rig) -> None:
        size = rig.hub.send("hc0", Rollback(model="digits", reason="test"), msg_id="a" * 32)
        assert size > 0
        [(topic, envelope)] = wait_for(lambda: rig.heard("hc0"), what="the command")
        assert topic == device_topic("hc0", Channel.CMD)
        assert envelope.id == "a" * 32
        assert envelope.sender == "coordinator"
        assert envelope.message == Rollback(model="digits", reason="test")
        rig.hub.send("hc1", Rollback(model="digits", reason="other"))
        wait_for(lambda: rig.heard("hc1"), what="hc1's command")
        assert len(rig.heard("hc0")) == 1

    def test_a_retained_broadcast_reaches_every_device(self, rig: Rig) -> None:
        message = Rollback(model="digits", reason="any message")
        assert rig.hub.publish_retained("fleet.plant-a", message) > 0
        for device_id in DEVICES:
            wait_for(lambda: all(rig.heard(d) for d in DEVICES), what="the broadcast")
            [(topic, envelope)] = rig.heard(device_id)
            assert topic == broadcast_topic("fleet.plant-a")
            assert envelope.sender == "coordinator"
            assert envelope.message == message

    def test_a_payload_pushed_to_one_device_goes_to_its_own_topic(self, rig: Rig) -> None:
        transfer_id = rig.hub.serve_payload(PAYLOAD)
        assert transfer_id == sha256_hex(PAYLOAD)
        assert rig.hub.bytes_sent(transfer_id) == 0
        assert rig.hub.push_payload(transfer_id, ["hc0"])
        chunks = wait_for(lambda: len(rig.chunks("hc0")) == 3 and rig.chunks("hc0"))
        assert {t for t, _c in chunks} == {device_topic("hc0", Channel.CHUNKS)}
        assert b"".join(c.data for _t, c in sorted(chunks, key=lambda x: x[1].index)) == PAYLOAD
        wait_for(lambda: rig.hub.bytes_sent(transfer_id) > len(PAYLOAD), what="bytes counted")

    def test_a_payload_pushed_to_two_devices_is_broadcast_once(self, rig: Rig) -> None:
        transfer_id = rig.hub.serve_payload(PAYLOAD)
        assert rig.hub.push_payload(transfer_id, ["hc0", "hc1"])
        wait_for(lambda: all(len(rig.chunks(d)) == 3 for d in DEVICES), what="both got 3 chunks")
        for device_id in DEVICES:
            assert {t for t, _c in rig.chunks(device_id)} == {broadcast_topic(transfer_id)}
        # Pushing nothing, or to nobody, sends nothing.
        assert rig.hub.push_payload("0" * 64, ["hc0"])
        assert rig.hub.push_payload(transfer_id, [])

    def test_chunk_requests_are_answered_until_the_payload_is_withdrawn(self, rig: Rig) -> None:
        rig.say("hc0", status())
        transfer_id = rig.hub.serve_payload(PAYLOAD)
        rig.say("hc0", ChunkRequest(transfer_id=transfer_id, indices=(2, 0, 99)))
        got = wait_for(lambda: len(rig.chunks("hc0")) == 2 and rig.chunks("hc0"))
        assert sorted(c.index for _t, c in got) == [0, 2]  # 99 is out of range
        assert {t for t, _c in got} == {device_topic("hc0", Channel.CHUNKS)}

        rig.hub.withdraw_payload(transfer_id)
        assert rig.hub.bytes_sent(transfer_id) == 0
        other = rig.hub.serve_payload(PAYLOAD[:100])
        rig.say("hc0", ChunkRequest(transfer_id=transfer_id, indices=(1,)))
        rig.say("hc0", ChunkRequest(transfer_id=other, indices=(0,)))
        wait_for(lambda: len(rig.chunks("hc0")) == 3, what="the other payload's chunk")
        assert rig.chunks("hc0")[-1][1].transfer_id == other

    def test_connect_listeners_run_after_a_reconnection(self, rig: Rig) -> None:
        calls: list[int] = []

        def on_connect() -> None:
            calls.append(1)

        rig.hub.add_connect_listener(on_connect)
        rig.lose_connection()
        wait_for(lambda: calls, what="the connect listener")
        rig.hub.remove_connect_listener(on_connect)
        rig.hub.remove_connect_listener(on_connect)  # twice: no error

    def test_nothing_goes_out_once_stopped(self, rig: Rig) -> None:
        rig.hub.stop()
        assert rig.hub.send("hc0", Rollback(model="digits", reason="late")) == 0

    def test_malformed_messages_are_dropped_and_a_cleared_status_forgets(self, rig: Rig) -> None:
        heard: list[str] = []
        rig.hub.add_listener(lambda device_id, _e, _s: heard.append(device_id))
        topic = device_topic("hc0", Channel.STATUS)
        rig.say_raw("hc0", topic, b"not a message")
        rig.say("hc0", status())
        wait_for(lambda: heard, what="the status")
        assert heard == ["hc0"]  # the malformed message was dropped, the status went through
        rig.say_raw("hc0", topic, b"")  # the retained status cleared
        wait_for(lambda: rig.hub.fleet() == [], what="hc0 forgotten")
