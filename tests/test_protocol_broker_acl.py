"""The shipped MOSQUITTO_ACL, enforced by a real mosquitto broker.

Starts ``mosquitto`` on a free loopback port with :data:`MOSQUITTO_ACL` and a
password file made by ``mosquitto_passwd``, connects paho-mqtt clients as the
coordinator and as a device, and checks that a device cannot publish on its own
to-device channels (so it cannot forge "coordinator" messages to itself, retained or
not) while its from-device channels and the coordinator's commands flow normally.

CI installs mosquitto; when it is missing this test fails (it does not skip).
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edge_agent.protocol import Channel, agent_subscriptions, device_topic
from tests.fleet_support import Mosquitto, password

DEVICE = "pi-7"
OTHER = "pi-8"
TIMEOUT = 3.0


@pytest.fixture
def broker_users() -> list[str]:
    return [DEVICE, OTHER]


class Client:
    """A connected paho-mqtt 2 client that queues what it receives."""

    def __init__(
        self,
        port: int,
        user: str,
        client_id: str | None = None,
        *,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """Connect as ``user`` (password :func:`password`); ``tls``: (CA, client
        certificate, key) for a mutual-TLS broker, which names the client by the CN."""
        self.received: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self._acks: queue.Queue[Any] = queue.Queue()
        self.mqtt = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or user,
            protocol=mqtt.MQTTv311,
        )
        self.mqtt.username_pw_set(user, password(user))
        if tls is not None:
            self.mqtt.tls_set(ca_certs=str(tls[0]), certfile=str(tls[1]), keyfile=str(tls[2]))
        self.mqtt.on_connect = lambda _c, _u, _f, reason, _p: self._acks.put(reason)
        self.mqtt.on_subscribe = lambda _c, _u, _mid, reasons, _p: self._acks.put(reasons)
        self.mqtt.on_message = lambda _c, _u, msg: self.received.put(
            (msg.topic, msg.payload, msg.retain)
        )
        self.mqtt.connect("127.0.0.1", port)
        self.mqtt.loop_start()
        reason = self._acks.get(timeout=TIMEOUT)
        if reason.is_failure:  # stop paho's thread, or it retries for the whole session
            self.mqtt.loop_stop()
        assert not reason.is_failure, f"{user} could not connect: {reason}"

    def subscribe(self, *filters: str) -> list[bool]:
        """Subscribe at QoS 1; return, per filter, whether the broker granted it."""
        self.mqtt.subscribe([(topic, 1) for topic in filters])
        return [not reason.is_failure for reason in self._acks.get(timeout=TIMEOUT)]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.mqtt.publish(topic, payload, qos=1, retain=retain).wait_for_publish(TIMEOUT)

    def next_message(self) -> tuple[str, bytes, bool]:
        return self.received.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


@pytest.fixture
def clients(broker: Mosquitto) -> Iterator[dict[str, Client]]:
    opened: dict[str, Client] = {}
    try:
        opened["coordinator"] = Client(broker.port, "coordinator")
        opened[DEVICE] = Client(broker.port, DEVICE)
        opened["probe"] = Client(broker.port, "coordinator", client_id="coordinator-probe")
        yield opened
    finally:
        for client in opened.values():
            client.close()


def test_device_cannot_publish_to_its_own_to_device_channels(clients: dict[str, Client]) -> None:
    coordinator, device, probe = clients["coordinator"], clients[DEVICE], clients["probe"]
    cmd, chunks = device_topic(DEVICE, Channel.CMD), device_topic(DEVICE, Channel.CHUNKS)
    events = device_topic(DEVICE, Channel.EVENTS)
    assert coordinator.subscribe("fedge/v1/#") == [True]
    assert device.subscribe(*agent_subscriptions(DEVICE)) == [True, True, True]
    # mosquitto acknowledges this subscription but never delivers on it (see below).
    device.subscribe(device_topic(OTHER, Channel.CMD))

    # Forgeries first (QoS 1, so the broker has handled each before the next is sent),
    # then a legitimate event. Messages from one client arrive in order, so once the
    # event is in, any forgery that got through would have arrived before it.
    device.publish(cmd, b"forged command", retain=True)
    device.publish(chunks, b"forged chunk", retain=True)
    device.publish(device_topic(OTHER, Channel.EVENTS), b"posing as another device")
    device.publish(events, b"genuine event")
    assert coordinator.next_message() == (events, b"genuine event", False)
    assert coordinator.received.empty()

    # Nothing was retained on cmd: a fresh subscriber gets only the coordinator's marker.
    assert probe.subscribe(cmd) == [True]
    coordinator.publish(device_topic(OTHER, Channel.CMD), b"for the other device")
    coordinator.publish(cmd, b"real command")
    assert probe.next_message() == (cmd, b"real command", False)
    # The device got its coordinator command: not its own forgery, not the other's.
    assert device.next_message() == (cmd, b"real command", False)
    assert device.received.empty()
