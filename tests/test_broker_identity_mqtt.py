"""A device cannot borrow the coordinator's MQTT identity (issue 17, finding 4).

The attack: a device with valid credentials connects with the coordinator's client
id. A broker that lets clients choose their id disconnects the real coordinator and
hands the device its session; with a clean session the device also discards what
waited in the coordinator's persistent session. The ACL cannot prevent it.

The fix, run here on a real mosquitto started from the config ``fedge broker
config`` writes (:mod:`coordinator.link.broker_config`): ``use_username_as_clientid``
replaces every client id by the authenticated username, and the coordinator's client
id is its username (:func:`coordinator.link.hub.hub_client_id`), so the device's
attempt only ever gets the device its own id. The first test also reproduces the
attack on the suite's older config (client ids not bound), so it can fail.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.link.hub import HubConfig, MqttHub, hub_client_id
from edge_agent.config.agent import BrokerConfig
from edge_agent.protocol import Channel, ErrorReport, Message, device_topic, encode
from edge_agent.transport.mqtt import MqttLink
from tests.fleet_support import WAIT_S, Mosquitto, TlsFiles, running_broker, wait_for
from tests.test_protocol_broker_acl import Client

pytestmark = pytest.mark.slow

DEVICE = "pi-7"
SESSION = "main"
EVENTS = device_topic(DEVICE, Channel.EVENTS)
STOLEN_IDS = ("coordinator", f"coordinator:{SESSION}", hub_client_id("coordinator", SESSION))


def report(code: str) -> bytes:
    """A valid error report from :data:`DEVICE` (what its events topic carries)."""
    return encode(ErrorReport(code=code), sender=DEVICE, sent_at=time.time())


@pytest.mark.parametrize("bound", [False, True], ids=["old-config", "fedge-broker-config"])
def test_a_device_connecting_with_the_coordinators_id_does_not_disconnect_it(
    tmp_path: Path, bound: bool
) -> None:
    with running_broker(tmp_path, [DEVICE], generated=bound) as broker:
        coordinator = Client(broker.port, "coordinator", client_id="coordinator")
        dropped = threading.Event()
        coordinator.mqtt.on_disconnect = lambda *_args: dropped.set()
        assert coordinator.subscribe("fedge/v1/#") == [True]
        attacker = Client(broker.port, DEVICE, client_id="coordinator")  # accepted either way
        try:
            if not bound:  # the attack as it was: the broker hands the id to the device
                wait_for(dropped.is_set, what="the coordinator disconnected by the device")
                return
            # The broker renamed the device's connection to pi-7: the coordinator is
            # still connected and hears what the device sends after its attempt.
            attacker.publish(EVENTS, b"after the attempt")
            assert coordinator.next_message() == (EVENTS, b"after the attempt", False)
            assert not dropped.is_set()
        finally:
            attacker.close()
            coordinator.close()


Heard = queue.Queue[tuple[str, Message]]


def hub_on(broker: BrokerConfig, heard: Heard, connects: list[int]) -> MqttHub:
    """The service's hub (persistent session) with listeners, started."""
    hub = MqttHub(HubConfig(broker=broker, session=SESSION))
    hub.add_listener(lambda device, envelope, _size: heard.put((device, envelope.message)))
    hub.add_connect_listener(lambda: connects.append(1))
    hub.start()
    return hub


def test_the_coordinators_session_stays_its_own(tmp_path: Path) -> None:
    heard: Heard = queue.Queue()
    connects: list[int] = []
    with running_broker(tmp_path, [DEVICE], generated=True) as broker:
        hub = hub_on(broker.broker("coordinator"), heard, connects)
        try:
            assert connects == [1]
            for index, stolen in enumerate(STOLEN_IDS):
                attacker = Client(broker.port, DEVICE, client_id=stolen)
                attacker.publish(EVENTS, report(f"attempt_{index}"))
                attacker.close()
                # the coordinator hears it: still connected, never reconnected
                assert heard.get(timeout=WAIT_S) == (DEVICE, ErrorReport(code=f"attempt_{index}"))
                assert connects == [1], "the coordinator was disconnected and reconnected"
        finally:
            hub.stop()
        # While the coordinator is away its session queues what devices send. The
        # device connects with the coordinator's id and a clean session: on a broker
        # that does not bind ids this would discard that queue; here it cannot.
        sender = Client(broker.port, DEVICE)
        sender.publish(EVENTS, report("while_away"))
        sender.close()
        attacker = Client(broker.port, DEVICE, client_id="coordinator")
        attacker.close()
        again = hub_on(broker.broker("coordinator"), heard, connects)
        try:
            # the first thing it hears is what waited in its session
            assert heard.get(timeout=WAIT_S) == (DEVICE, ErrorReport(code="while_away"))
        finally:
            again.stop()


def test_with_client_certificates_the_certificate_names_the_client(tmp_path: Path) -> None:
    # Mutual TLS (fedge broker config --cafile): the certificate's CN is the username
    # and the client id. A device with its own certificate that claims the
    # coordinator's username and client id is still pi-7 to the broker.
    tls = TlsFiles.create(tmp_path / "tls")
    heard: Heard = queue.Queue()
    connects: list[int] = []
    with Mosquitto(tmp_path / "broker", [DEVICE], tls=tls, generated=True) as broker:
        cert, key = tls.issue("coordinator")
        as_coordinator = replace(broker.broker("coordinator"), cert_file=cert, key_file=key)
        hub = hub_on(as_coordinator, heard, connects)
        cert, key = tls.issue(DEVICE)
        claim = replace(broker.broker(DEVICE), username="coordinator", cert_file=cert,
                        key_file=key)  # fmt: skip
        attacker = MqttLink(claim, client_id="coordinator", subscriptions=(),
                            on_message=lambda *_args: None)  # fmt: skip
        try:
            attacker.connect(WAIT_S)
            # as pi-7 it may publish on pi-7's events: the coordinator hears it there
            assert attacker.publish_wait(EVENTS, report("claimed"), timeout=WAIT_S)
            assert heard.get(timeout=WAIT_S) == (DEVICE, ErrorReport(code="claimed"))
            assert connects == [1], "the coordinator was disconnected and reconnected"
        finally:
            attacker.stop()
            hub.stop()
