"""The embedded broker (amqtt) sends retained messages as mosquitto does, quietly.

A client gets a retained message when it subscribes to a matching filter, and never one
for a filter only another client holds. amqtt 0.11 on its own sends every connecting
client the retained messages of every filter any client subscribed to: with the
coordinator's ``fedge/v1/devices/+/status``, each agent got every other agent's status.
And a late PUBACK is handled by amqtt instead of escaping as an asyncio error.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import pytest

from coordinator.sim.embedded_broker import EmbeddedBroker
from edge_agent.config.agent import BrokerConfig
from edge_agent.transport.mqtt import MqttLink
from tests.fleet_support import wait_for

WAIT_S = 10.0
STATUS_FILTER = "fedge/v1/devices/+/status"


class Client:
    """One MQTT link and the ``(topic, payload, retained)`` messages it received."""

    def __init__(self, url: str, client_id: str, subscriptions: list[str]) -> None:
        self.received: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.link = MqttLink(
            BrokerConfig.from_url(url),
            client_id=client_id,
            subscriptions=subscriptions,
            on_message=self._on_message,
        )
        self.link.start()
        self.link.connect(WAIT_S)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        with self._lock:
            self.received.append((topic, payload, retained))

    def messages(self) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return list(self.received)


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as instance:
        yield instance


@pytest.fixture
def clients(broker: EmbeddedBroker) -> Iterator[list[Client]]:
    started: list[Client] = []
    yield started
    for client in started:
        client.link.stop()


def test_a_connecting_client_gets_only_the_retained_messages_it_subscribes_to(
    broker: EmbeddedBroker, clients: list[Client]
) -> None:
    watcher = Client(broker.url, "coordinator", [STATUS_FILTER])
    clients.append(watcher)
    sim00 = Client(broker.url, "sim00", ["fedge/v1/devices/sim00/cmd"])
    clients.append(sim00)
    status = ("fedge/v1/devices/sim00/status", b"online")
    assert sim00.link.publish_wait(*status, retain=True, timeout=WAIT_S)
    assert sim00.link.publish_wait("marker/sim01", b"marker", retain=True, timeout=WAIT_S)
    wait_for(watcher.messages, WAIT_S, "the coordinator to see the status")

    sim01 = Client(broker.url, "sim01", ["fedge/v1/devices/sim01/cmd"])
    clients.append(sim01)
    # Whatever the broker sends on connect comes before what this subscription brings.
    sim01.link.subscribe("marker/#")
    wait_for(sim01.messages, WAIT_S, "the retained marker")

    assert sim01.messages() == [("marker/sim01", b"marker", True)]


def test_a_new_subscription_still_gets_the_matching_retained_messages(
    broker: EmbeddedBroker, clients: list[Client]
) -> None:
    sim00 = Client(broker.url, "sim00", [])
    clients.append(sim00)
    assert sim00.link.publish_wait(
        "fedge/v1/devices/sim00/status", b"online", retain=True, timeout=WAIT_S
    )

    late = Client(broker.url, "coordinator", [STATUS_FILTER])
    clients.append(late)
    wait_for(late.messages, WAIT_S, "the retained status")

    assert late.messages() == [("fedge/v1/devices/sim00/status", b"online", True)]


def test_a_puback_for_a_settled_message_is_handled_by_amqtt(broker: EmbeddedBroker) -> None:
    """A second PUBACK (or one after the wait ended) is logged by amqtt, not raised."""
    from amqtt.mqtt.protocol.handler import ProtocolHandler  # noqa: PLC0415
    from amqtt.mqtt.puback import PubackPacket  # noqa: PLC0415

    async def late_puback() -> None:
        settled: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        settled.set_result(None)
        handler = ProtocolHandler.__new__(ProtocolHandler)
        handler._puback_waiters = {7: settled}
        handler.logger = logging.getLogger("amqtt.test")
        await handler.handle_puback(PubackPacket.build(7))

    asyncio.run(late_puback())
