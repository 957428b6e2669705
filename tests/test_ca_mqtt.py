"""The fleet CA's certificates on a real mosquitto (issue 17: a small CA for mTLS, a
certificate deny list).

The broker runs the config ``fedge broker config`` writes with ``--cafile`` and
``--crlfile`` (:class:`tests.fleet_support.Mosquitto` with ``generated=True``), its
server certificate and the clients' from :mod:`coordinator.link.ca`. A device whose
key and CSR were made by :func:`edge_agent.transport.csr.make_key_and_csr` and whose
certificate the CA issued connects, is its device id to the broker and is confined
to its own topics by the ACL. The attacks, each refused in the TLS handshake (the
broker logs "certificate verify failed"; the client sees an SSLError) while other
devices still connect: a revoked certificate (after ``fedge ca revoke`` and a
SIGHUP; a connection made before the revocation lasts until the broker restarts),
a certificate from another CA with the same CN, an expired one. A CSR for another
device id gets no certificate at all (tests/test_ca.py). A CRL past its next-update
time locks every device out, which is why ``fedge ca crl`` must run regularly.
Last, real ``fedge-agent run`` processes on CA-issued certificates take a deploy
from ``fedge`` on a coordinator certificate, and a revoked one stays out.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.keys import SigningKey
from coordinator.cli.app import app
from coordinator.link.ca import CRL_DAYS, issue_certificate, refresh_crl, revoke_certificate
from edge_agent.protocol import Channel, agent_subscriptions, device_topic
from edge_agent.transport.csr import make_key_and_csr
from tests.fleet_support import (
    TIMEOUT,
    AgentProcess,
    Mosquitto,
    TlsFiles,
    make_artifact,
    public_key_file,
    wait_for,
)
from tests.test_protocol_broker_acl import Client

pytestmark = pytest.mark.slow

DEVICE = "cam-1"
OTHER = "cam-2"
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


def mqtt_connect(port: int, ca: Path, cert: Path, key: Path) -> bytes:
    """Open a TLS connection with this client certificate, send an MQTT CONNECT and
    return the broker's first 4 bytes (a CONNACK); a refusal raises ssl.SSLError
    with the broker's TLS alert (e.g. CERTIFICATE_REVOKED)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + b"\x00\x05probe"
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(bytes([0x10, len(body)]) + body)
        return tls.recv(4)


def device_files(
    tls: TlsFiles, device_id: str, *, now: datetime | None = None, days: int = 365
) -> tuple[Path, Path]:
    """A device's key and CSR made as on the device, its certificate from the CA."""
    key_pem, csr_pem = make_key_and_csr(device_id)
    cert_pem = issue_certificate(tls.ca_dir, csr_pem, device_id=device_id, now=now, days=days)
    cert, key = tls.ca_dir.parent / f"{device_id}.crt", tls.ca_dir.parent / f"{device_id}.key"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    return cert, key


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return TlsFiles.create(tmp_path / "tls")


@pytest.fixture
def broker(tmp_path: Path, tls: TlsFiles) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker", [], tls=tls, generated=True) as running:
        yield running


@pytest.fixture
def coordinator(broker: Mosquitto, tls: TlsFiles) -> Iterator[Client]:
    """The coordinator account (its certificate from ``fedge ca coordinator-cert``),
    subscribed to the whole tree."""
    cert, key = tls.issue("coordinator")
    client = Client(broker.port, "coordinator", tls=(tls.ca, cert, key))
    assert client.subscribe("fedge/v1/#") == [True]
    yield client
    client.close()


def refusals(broker: Mosquitto) -> int:
    """How many TLS handshakes the broker has refused for a bad client certificate."""
    return broker.log.read_text().count("certificate verify failed")


def refused(broker: Mosquitto, port: int, ca: Path, cert: Path, key: Path) -> None:
    """Connect with this certificate; the broker must refuse it in the TLS handshake
    (the client sees the alert or just the closed connection, whichever comes first)
    and log that it failed to verify the certificate."""
    before = refusals(broker)
    with pytest.raises(ssl.SSLError):
        mqtt_connect(port, ca, cert, key)
    wait_for(lambda: refusals(broker) > before, TIMEOUT, what="the broker's refusal in its log")


def test_a_device_with_a_ca_issued_certificate_is_confined_to_its_own_topics(
    broker: Mosquitto, tls: TlsFiles, coordinator: Client
) -> None:
    cert, key = device_files(tls, DEVICE)
    # it even claims the coordinator's username and client id: the CN decides
    device = Client(broker.port, "coordinator", client_id="coordinator", tls=(tls.ca, cert, key))
    try:
        assert device.subscribe(*agent_subscriptions(DEVICE)) == [True, True, True]
        device.subscribe(device_topic(OTHER, Channel.CMD))  # granted, never delivered
        own_events = device_topic(DEVICE, Channel.EVENTS)
        device.publish(device_topic(OTHER, Channel.EVENTS), b"posing as cam-2")
        device.publish(device_topic(DEVICE, Channel.CMD), b"forged command")
        device.publish(own_events, b"genuine event")
        assert coordinator.next_message() == (own_events, b"genuine event", False)
        assert coordinator.received.empty()
        coordinator.publish(device_topic(OTHER, Channel.CMD), b"for cam-2")
        coordinator.publish(device_topic(DEVICE, Channel.CMD), b"for cam-1")
        assert device.next_message() == (device_topic(DEVICE, Channel.CMD), b"for cam-1", False)
        assert device.received.empty()
    finally:
        device.close()
    assert f"u'{DEVICE}'" in broker.log.read_text()  # the broker's username for it


def test_a_revoked_certificate_cannot_connect_after_the_broker_reloads(
    broker: Mosquitto, tls: TlsFiles, coordinator: Client
) -> None:
    cert, key = device_files(tls, DEVICE)
    other = device_files(tls, OTHER)
    assert mqtt_connect(broker.port, tls.ca, cert, key) == CONNACK_ACCEPTED
    revoke_certificate(tls.ca_dir, DEVICE)
    broker.reload()
    refused(broker, broker.port, tls.ca, cert, key)
    # every other device is unaffected
    assert mqtt_connect(broker.port, tls.ca, *other) == CONNACK_ACCEPTED


def test_a_revoked_device_connected_before_the_reload_is_cut_off_by_a_restart(
    broker: Mosquitto, tls: TlsFiles, coordinator: Client
) -> None:
    """A SIGHUP does not end established TLS sessions; restarting the broker does (its
    persistence keeps everyone else's sessions) and the device cannot come back."""
    cert, key = device_files(tls, DEVICE)
    device = Client(broker.port, DEVICE, tls=(tls.ca, cert, key))
    try:
        revoke_certificate(tls.ca_dir, DEVICE)
        broker.reload()
        events = device_topic(DEVICE, Channel.EVENTS)
        device.publish(events, b"still connected")
        assert coordinator.next_message() == (events, b"still connected", False)
        broker.stop()
        broker.start()
        wait_for(lambda: refusals(broker) >= 1, what="the revoked device's reconnect refused")
    finally:
        device.close()


@pytest.mark.parametrize("case", ["other-ca", "expired"])
def test_a_foreign_or_expired_certificate_is_refused(
    broker: Mosquitto, tls: TlsFiles, tmp_path: Path, case: str
) -> None:
    if case == "other-ca":  # same CN, signed by a CA the broker does not trust
        cert, key = TlsFiles.create(tmp_path / "rogue").issue(DEVICE)
    else:
        past = datetime.now(UTC) - timedelta(days=3)
        cert, key = device_files(tls, DEVICE, now=past, days=1)
    refused(broker, broker.port, tls.ca, cert, key)
    cert, key = device_files(tls, OTHER)  # normal operation is unaffected
    assert mqtt_connect(broker.port, tls.ca, cert, key) == CONNACK_ACCEPTED


def test_a_stale_crl_locks_every_device_out_until_fedge_ca_crl(
    broker: Mosquitto, tls: TlsFiles
) -> None:
    """Why ``fedge ca crl`` must run from cron: OpenSSL refuses every client once
    the CRL is past its next-update time."""
    cert, key = device_files(tls, DEVICE)
    refresh_crl(tls.ca_dir, now=datetime.now(UTC) - timedelta(days=CRL_DAYS + 1))
    broker.reload()
    refused(broker, broker.port, tls.ca, cert, key)
    refresh_crl(tls.ca_dir)
    broker.reload()
    assert mqtt_connect(broker.port, tls.ca, cert, key) == CONNACK_ACCEPTED


def test_agent_processes_on_ca_certificates_take_a_deploy_and_a_revoked_one_stays_out(
    broker: Mosquitto, tls: TlsFiles, tmp_path: Path, signing_key: SigningKey
) -> None:
    """Real ``fedge-agent run`` processes with CA-issued certificates and the
    operator's ``fedge`` on a coordinator certificate: a signed deploy installs on
    both; after ``revoke`` the broker restarts (cutting the open connection) and only
    the revoked device stays out."""
    trust = public_key_file(tmp_path / "keys", signing_key)
    cert, key = tls.issue("coordinator")
    operator = ["--ca-file", str(tls.ca), "--cert-file", str(cert), "--key-file", str(key)]

    def fedge(*args: str) -> tuple[int, str]:
        result = CliRunner(mix_stderr=False).invoke(
            app, [*args, *operator], env={"FEDGE_BROKER": broker.url}
        )
        return result.exit_code, result.stdout

    def online() -> dict[str, bool]:
        status, out = fedge("devices", "--json")
        return {} if status else {d["device_id"]: d["online"] for d in json.loads(out)["devices"]}

    agents = []
    for device in (DEVICE, OTHER):
        cert, key = device_files(tls, device)
        tls_options = ["--ca-file", str(tls.ca), "--cert-file", str(cert), "--key-file", str(key)]
        agents.append(AgentProcess(broker, device, tmp_path / device, trust, extra=tls_options))
    try:
        wait_for(lambda: online() == {DEVICE: True, OTHER: True}, what="both agents online")
        artifact = make_artifact(tmp_path, signing_key, version=1)
        status, out = fedge("deploy", str(artifact), "--trust", str(trust), "--wait",
                            "--timeout", "60", "--json")  # fmt: skip
        assert status == 0, out
        states = {d["device_id"]: d["state"] for d in json.loads(out)["devices"]}
        assert states == {DEVICE: "installed", OTHER: "installed"}

        revoke_certificate(tls.ca_dir, OTHER)
        broker.stop()
        broker.start()
        wait_for(lambda: refusals(broker) >= 1, what="the revoked agent's reconnect refused")
        wait_for(lambda: online().get(DEVICE), what=f"{DEVICE} back online")
        since_restart = broker.log.read_text().rsplit("starting", 1)[1]
        assert f"as {DEVICE} " in since_restart
        assert f"as {OTHER} " not in since_restart
        assert all(agent.alive() for agent in agents)  # the revoked one keeps retrying
    finally:
        for agent in agents:
            agent.kill()
