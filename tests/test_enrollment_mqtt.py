"""Enrollment and revocation end to end (issue 17's must-show), on a real mosquitto.

The broker runs the config ``fedge broker config`` writes (client ids bound to
usernames, the least-privilege ACL, the password file, ``pid_file``) and knows only
the coordinator's account at first. The coordinator is the real service
(:class:`FleetService` with the HTTP API and its :class:`EnrollmentDesk`, served by
uvicorn); the devices are real ``fedge-agent enroll`` and ``fedge-agent run``
processes:

1. The operator enrolls three devices (one-time tokens over the API); each device
   runs ``fedge-agent enroll``, which makes its broker password on the device and
   writes a ready ``agent.toml`` (key set, fleet id, broker settings). The service
   keeps the fleet's signed statement, so the agents enforce it.
2. A used token and an expired token are refused (401, typed error on the device,
   logged and audited by the service).
3. Every cross-device publish and subscribe attempt with an enrolled device's own
   credentials is denied: each is counted, and a denial is proven by the message
   never arriving (the broker acknowledges denied QoS 1 publishes of MQTT 3.1.1).
4. The three agents start from the written ``agent.toml`` as is and serve a
   rollout of a signed artifact.
5. One device is revoked while its agent runs: the broker drops it at once, it
   cannot reconnect, and nothing it sends arrives any more; the others go on.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from compress.keys import SigningKey
from coordinator.delivery.fleet_statement import StatementSettings
from coordinator.link.broker_config import BrokerSetup, write_broker_config
from coordinator.link.hub import MqttHub
from coordinator.rollout.actions import RolloutState
from coordinator.service.api_client import ApiClient
from coordinator.service.enrollment import CaDirectory
from coordinator.service.fleet_service import FleetService, ServiceSettings
from coordinator.service.operations import CLI_ACTOR, RolloutRequest
from coordinator.service.store import Store
from coordinator.service.store.registry import Credential, DeviceState
from edge_agent.protocol import Channel, broadcast_topic, device_topic
from tests.api_support import FakeOperations
from tests.enrollment_support import (
    FLEET,
    DeviceClient,
    Served,
    device_password,
    enroll_cli,
    keyset_file,
    served_api,
    settings_for,
)
from tests.fleet_support import (
    ACCEPT_WAIT_S,
    WAIT_S,
    Mosquitto,
    TlsFiles,
    make_artifact,
    password,
    wait_for,
)
from tests.service_support import running_service

pytestmark = pytest.mark.slow

DEVICES = ("en-1", "en-2", "en-3")
PROBE = "coordinator@probe"
"""An operator account (the coordinator's rights) that watches the topics: the
service's own account cannot be shared (client ids are bound to usernames)."""
MARKER = broadcast_topic("enroll-test-marker")
QUIET_S = 3.0
"""How long nothing from a revoked device must arrive (its agent reports every second)."""


class AgentRun:
    """``fedge-agent run --config OUT/agent.toml``, as written by ``fedge-agent enroll``
    (telemetry every second, so that a silence means something)."""

    def __init__(self, config: Path) -> None:
        self.log = config.parent / "agent.log"
        command = [sys.executable, "-m", "edge_agent.cli", "-vv", "run", "--config", str(config)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, "--telemetry-interval", "1"], stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """``fedge broker config --operator probe``: the coordinator and the test's probe only."""
    instance = Mosquitto(tmp_path / "broker", [PROBE], generated=True)
    passwd = instance.directory / "passwd"
    setup = BrokerSetup(instance.directory, port=instance.port, bind="127.0.0.1",
                        password_file=passwd, operators=("probe",))  # fmt: skip
    config = write_broker_config(setup, overwrite=True).config
    if os.geteuid() == 0:
        with config.open("a") as conf:
            conf.write("user root\n")
    with instance:
        yield instance


@pytest.fixture
def service(tmp_path: Path, broker: Mosquitto, signing_key: SigningKey) -> Iterator[FleetService]:
    # The enrolled agents get trust.fleet = FLEET, so they install only what the
    # service's fleet statement names: the service keeps one, signed by a key of the
    # key set the devices enroll with.
    settings = ServiceSettings(
        telemetry_flush_s=0.2,
        rollout_tick_s=0.2,
        accept_wait_s=ACCEPT_WAIT_S,
        fleet=StatementSettings(FLEET, (signing_key,)),
    )
    with running_service(tmp_path, broker, signing_key, settings) as instance:
        yield instance


@pytest.fixture
def site(
    tmp_path: Path, broker: Mosquitto, service: FleetService, signing_key: SigningKey
) -> Iterator[Served]:
    keyset = keyset_file(tmp_path / "keys", signing_key)
    settings = settings_for(broker, keyset)
    hub = service.hub
    assert isinstance(hub, MqttHub)
    with served_api(service, service.store, settings, forget=hub.forget_device) as served:
        yield served


def drain_until(client: DeviceClient, marker_topic: str) -> list[tuple[str, bytes]]:
    """Everything ``client`` received before the marker (waits for it)."""
    seen: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            topic, payload = client.received.get(timeout=1.0)
        except queue.Empty:
            continue
        if topic == marker_topic:
            return seen
        seen.append((topic, payload))
    pytest.fail(f"the marker on {marker_topic} never arrived")


def cross_device_attempts(
    broker: Mosquitto, secrets: dict[str, str], probe: DeviceClient
) -> tuple[int, int]:
    """Every device tries every other device's topics: (attempts, denials)."""
    attempts = denials = 0
    for attacker_id in DEVICES:
        for victim in (d for d in DEVICES if d != attacker_id):
            attacker = DeviceClient(broker.port, attacker_id, secrets[attacker_id])
            assert attacker.connected
            try:
                # publish as the victim, on the victim's device-to-coordinator topics
                forged = {
                    device_topic(victim, channel): f"forged {attacker_id}->{victim}".encode()
                    for channel in (Channel.STATUS, Channel.EVENTS, Channel.TELEMETRY)
                }
                for topic, payload in forged.items():
                    attacker.publish(topic, payload)
                    attempts += 1
                marker = device_topic(attacker_id, Channel.EVENTS)  # its own: allowed
                attacker.publish(marker, b"marker")
                heard = drain_until(probe, marker)
                denials += sum((topic, payload) not in heard for topic, payload in forged.items())
                # read what is meant for the victim
                filters = [
                    device_topic(victim, Channel.CMD),
                    device_topic(victim, Channel.CHUNKS),
                    device_topic(victim, Channel.EVENTS),
                    "fedge/v1/devices/#",
                ]
                attacker.subscribe(*filters)
                attacker.subscribe(MARKER)
                for topic in filters[:3]:
                    probe.publish(topic, b"secret for " + victim.encode())
                probe.publish(MARKER, b"marker")
                leaked = [topic for topic, _payload in drain_until(attacker, MARKER)]
                attempts += len(filters)
                denials += sum(
                    not any(mqtt.topic_matches_sub(wanted, topic) for topic in leaked)
                    for wanted in filters
                )
            finally:
                attacker.close()
    return attempts, denials


def test_three_devices_enroll_serve_a_rollout_and_a_revoked_one_is_cut_off(
    tmp_path: Path,
    broker: Mosquitto,
    service: FleetService,
    site: Served,
    signing_key: SigningKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    operator = ApiClient(site.url, site.operator)
    try:
        run_scenario(tmp_path, broker, service, site, signing_key, caplog, operator)
    finally:
        operator.close()


def run_scenario(
    tmp_path: Path,
    broker: Mosquitto,
    service: FleetService,
    site: Served,
    signing_key: SigningKey,
    caplog: pytest.LogCaptureFixture,
    operator: ApiClient,
) -> None:
    """The five steps of the module docstring."""
    outs = {device: tmp_path / device for device in DEVICES}
    tokens = {d: operator.enroll_device(d, expires_in_s=600).token for d in DEVICES}
    for device in DEVICES:
        done = enroll_cli(site.url, tokens[device], device, outs[device])
        assert done.returncode == 0, done.stderr
        assert f"enrolled {device}" in done.stdout
        text = (outs[device] / "agent.toml").read_text()
        assert f'fleet = "{FLEET}"' in text
        assert "keyset = " in text
    registry = {row.device_id: row for row in operator.enrollments()}
    assert {d: (r.state, r.credential) for d, r in registry.items()} == dict.fromkeys(
        DEVICES, (DeviceState.ACCEPTED, Credential.PASSWORD)
    )

    # 2. a used token and an expired one are refused, typed, logged and audited
    caplog.set_level(logging.WARNING, logger="coordinator.service.store.registry")
    again = enroll_cli(site.url, tokens["en-1"], "en-1", tmp_path / "again")
    assert again.returncode == 1
    assert "refused the token" in again.stderr
    short = operator.enroll_device("en-4", expires_in_s=1.0).token
    time.sleep(1.2)
    late = enroll_cli(site.url, short, "en-4", tmp_path / "late")
    assert late.returncode == 1
    assert "refused the token" in late.stderr
    reasons = [record.getMessage() for record in caplog.records]
    assert any("used already" in reason for reason in reasons), reasons
    assert any("expired" in reason for reason in reasons), reasons
    assert not (tmp_path / "late" / "agent.toml").exists()
    fails = [row for row in service.store.audit_log() if row.action == "auth.fail"]
    assert len(fails) >= 2
    assert "en-4:" not in (broker.directory / "passwd").read_text()

    # 3. cross-device publish and subscribe attempts: every one denied
    secrets = {device: device_password(outs[device]) for device in DEVICES}
    probe = DeviceClient(broker.port, PROBE, password(PROBE))
    try:
        assert probe.subscribe("fedge/v1/#") == [True]
        attempts, denials = cross_device_attempts(broker, secrets, probe)
    finally:
        probe.close()
    assert attempts == 6 * 7
    assert denials == attempts

    # 4. the agents start from what enroll wrote and serve a rollout
    agents = {device: AgentRun(outs[device] / "agent.toml") for device in DEVICES}
    try:
        wait_for(lambda: sum(r.online for r in service.hub.fleet()) == 3, what="3 online")
        artifact = make_artifact(tmp_path, signing_key, version=2)
        sha = service.upload_artifact(artifact.read_bytes(), actor=CLI_ACTOR).sha256
        request = RolloutRequest(artifact_sha256=sha, canary="3", soak="0s")
        rollout = service.create_rollout(request, actor=CLI_ACTOR).rollout.rollout_id
        wait_for(
            lambda: service.rollout(rollout).rollout.state == RolloutState.COMPLETED,
            what="the rollout to complete",
        )
        wait_for(
            lambda: all(
                any(m.name == "digits" and m.version == 2 for m in r.models)
                for r in service.hub.fleet()
            ),
            what="every device to serve v2",
        )

        # 5. revoke en-3 while it runs: dropped now, refused after, silent
        probe = DeviceClient(broker.port, PROBE, password(PROBE))
        try:
            assert probe.subscribe(device_topic("en-3", Channel.TELEMETRY)) == [True]
            probe.received.get(timeout=WAIT_S)  # it reports while enrolled
            log = broker.directory / "mosquitto.log"
            drops = log.read_text().count("Client en-3 disconnected")
            revoked = operator.revoke_device("en-3")
            assert revoked.state == DeviceState.REVOKED
            # mosquitto drops it on the reload (it sends no will then: the service
            # clears its retained status itself, so the fleet view forgets it)
            wait_for(
                lambda: log.read_text().count("Client en-3 disconnected") > drops,
                what="en-3 dropped",
            )
            time.sleep(0.5)  # what was in flight before the drop
            while not probe.received.empty():
                probe.received.get()
            with pytest.raises(queue.Empty):
                probe.received.get(timeout=QUIET_S)
            wait_for(
                lambda: "disconnected, not authorised" in log.read_text(),
                what="the revoked agent's reconnection refused",
            )
            retry = DeviceClient(broker.port, "en-3", secrets["en-3"])
            assert not retry.connected, "a revoked device reconnected"
        finally:
            probe.close()
        assert agents["en-3"].process.poll() is None  # it keeps trying, refused
        wait_for(lambda: service.hub.device("en-3") is None, what="en-3 out of the fleet view")
        online = {r.device_id: r.online for r in service.hub.fleet()}
        assert online == {"en-1": True, "en-2": True}
        row = service.store.device("en-3")
        assert row is not None
        assert not row.online
        assert "en-3:" not in (broker.directory / "passwd").read_text()
        actions = [row.action for row in service.store.audit_log(limit=1000)]
        assert actions.count("device.enroll") == 4
        assert actions.count("device.accept") == 3
        assert actions.count("device.revoke") == 1
    finally:
        for agent in agents.values():
            agent.stop()


def test_a_device_enrolled_for_mutual_tls_is_evicted_and_refused_when_revoked(
    tmp_path: Path, signing_key: SigningKey
) -> None:
    # Mutual TLS (fedge broker config --cafile --crlfile): the device sends a CSR,
    # its key never leaves it, the CA issues its certificate (CN = its id, which is
    # its username and client id). Revocation puts it on the CRL and reloads, which
    # refuses reconnection but keeps a live connection (tests/test_ca_mqtt.py),
    # so the service also evicts it by taking its client id over.
    tls = TlsFiles.create(tmp_path / "tls")  # a CA of fedge ca; the broker reads its CRL
    ca = CaDirectory(tls.ca_dir)
    instance = Mosquitto(tmp_path / "broker", [], tls, generated=True)
    store = Store.open(tmp_path / "coordinator.db")
    keyset = keyset_file(tmp_path / "keys", signing_key)
    with (
        instance as broker,
        served_api(FakeOperations(), store, settings_for(broker, keyset), ca=ca) as site,
        ApiClient(site.url, site.operator) as operator,
    ):
        token = operator.enroll_device("en-9", expires_in_s=600).token
        out = tmp_path / "en-9"
        done = enroll_cli(site.url, token, "en-9", out, "--certificate")
        assert done.returncode == 0, done.stderr
        assert (out / "device.key").stat().st_mode & 0o777 == 0o600
        assert not (out / "broker.password").exists()
        assert "en-9:" not in (broker.directory / "passwd").read_text()
        log = broker.directory / "mosquitto.log"
        agent = AgentRun(out / "agent.toml")
        try:
            wait_for(lambda: "u'en-9'" in log.read_text(), what="the agent connected over mTLS")
            refused_before = log.read_text().count("certificate verify failed")
            revoked = operator.revoke_device("en-9")
            assert (revoked.state, revoked.credential) == (
                DeviceState.REVOKED,
                Credential.CERTIFICATE,
            )
            assert "already connected, closing old connection" in log.read_text()  # evicted
            wait_for(
                lambda: log.read_text().count("certificate verify failed") > refused_before,
                what="the agent's reconnection refused by the CRL",
            )
            device = (tls.ca, out / "device.crt", out / "device.key")
            assert not DeviceClient(broker.port, "en-9", "", tls=device).connected
            assert agent.process.poll() is None  # it keeps trying, refused
        finally:
            agent.stop()
    store.close()
