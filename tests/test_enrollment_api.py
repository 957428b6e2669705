"""Enrollment through the API, ``fedge device`` and ``fedge-agent enroll``: each refusal.

The real API app is served on 127.0.0.1 (over the in-memory operations twin and a
real store), with an :class:`EnrollmentDesk` whose broker is a real mosquitto from
``fedge broker config``. The end-to-end run with agent processes is
tests/test_enrollment_mqtt.py; the store's token rules are
tests/test_enrollment_registry.py.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from compress.keys import generate_signing_key
from compress.keyset import KeySet, sign_keyset
from coordinator.cli.app import app
from coordinator.errors import ApiAuthError, EnrollmentError, NotFoundError, ServiceConfigError
from coordinator.link.ca import issued_certificates
from coordinator.service.api.auth_limits import AuthLimits
from coordinator.service.api_client import ApiClient
from coordinator.service.config import ServiceConfig
from coordinator.service.config_reader import build_service_config
from coordinator.service.enrollment import CaDirectory
from coordinator.service.store import Store
from coordinator.service.store.registry import DeviceState
from edge_agent import enroll as agent_enroll
from edge_agent.cli import build_parser, config_from_args
from edge_agent.errors import EnrollmentFailedError
from tests.api_support import FakeOperations
from tests.enrollment_support import (
    FLEET,
    DeviceClient,
    Served,
    device_password,
    keyset_file,
    served_api,
    settings_for,
)
from tests.fleet_support import Mosquitto, TlsFiles

runner = CliRunner(mix_stderr=False)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state.db") as opened:
        yield opened


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker", [], generated=True) as instance:
        yield instance


@pytest.fixture
def keyset(tmp_path: Path) -> Path:
    return keyset_file(tmp_path / "keys", generate_signing_key())


@pytest.fixture
def site(store: Store, broker: Mosquitto, keyset: Path) -> Iterator[Served]:
    limits = AuthLimits(max_failures=3, window_s=60.0, lockout_s=60.0)
    with served_api(FakeOperations(), store, settings_for(broker, keyset), limits=limits) as served:
        yield served


def enroll_body(token: str, device_id: str = "pi-1") -> dict[str, str]:
    return {"token": token, "device_id": device_id, "password": "p" * 43}


def test_a_device_enrolls_and_its_agent_toml_is_accepted_by_fedge_agent_run(
    tmp_path: Path, site: Served, broker: Mosquitto, store: Store
) -> None:
    with ApiClient(site.url, site.operator) as client:
        token = client.enroll_device("pi-1", expires_in_s=None).token  # token_hours
    enrolled = agent_enroll.enroll(site.url, token, "pi-1", tmp_path / "dev")
    assert (enrolled.broker_url, enrolled.fleet, enrolled.keyset_version) == (
        broker.url,
        FLEET,
        1,
    )
    secret = tmp_path / "dev" / "broker.password"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "dev" / "agent.toml").stat().st_mode & 0o777 == 0o600
    assert device_password(tmp_path / "dev") not in (broker.directory / "passwd").read_text()
    args = build_parser().parse_args(["run", "--config", str(enrolled.config)])
    config = config_from_args(args, {})
    assert config.device_id == "pi-1"
    assert config.trust.keyset == tmp_path / "dev" / "keyset.json"
    assert config.trust.fleet == FLEET
    assert config.broker.username == "pi-1"
    assert config.broker.password == device_password(tmp_path / "dev")
    client = DeviceClient(broker.port, "pi-1", device_password(tmp_path / "dev"))
    assert client.connected
    client.close()
    row = store.registered("pi-1")
    assert row is not None
    assert row.state == DeviceState.ACCEPTED
    # a second enrollment over an existing agent.toml needs --force
    with pytest.raises(EnrollmentFailedError, match="pass --force"):
        agent_enroll.enroll(site.url, token, "pi-1", tmp_path / "dev")


def test_bad_tokens_get_401_are_audited_and_an_address_that_keeps_guessing_gets_429(
    site: Served, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    with ApiClient(site.url, site.operator) as client:
        good = client.enroll_device("pi-1", expires_in_s=600).token
        client.enroll_device("pi-2", expires_in_s=600)
    guesses = [
        enroll_body("fedge_enroll_" + "A" * 43),  # unknown
        enroll_body(good, device_id="pi-2"),  # another device's
        enroll_body("not-a-token"),
    ]
    with caplog.at_level(logging.INFO), httpx.Client(base_url=site.url) as http:
        codes = [http.post("/v1/enroll", json=body).status_code for body in guesses]
        locked = http.post("/v1/enroll", json=enroll_body(good))
    assert codes == [401, 401, 401]
    assert locked.status_code == 429  # even the right token, while cooling down
    assert "Retry-After" in locked.headers
    fails = [row for row in store.audit_log() if row.action == "auth.fail"]
    assert [row.detail["path"] for row in fails] == ["/v1/enroll"] * 3
    assert any("issued for 'pi-1'" in record.getMessage() for record in caplog.records)
    assert good not in caplog.text
    registry = {row.device_id: row.state for row in store.registry()}
    assert registry == {"pi-1": DeviceState.PENDING, "pi-2": DeviceState.PENDING}


def test_only_an_operator_enrolls_or_revokes_and_unknown_devices_are_404(site: Served) -> None:
    with ApiClient(site.url, site.viewer) as viewer:
        with pytest.raises(ApiAuthError) as caught:
            viewer.enroll_device("pi-1", expires_in_s=None)
        assert caught.value.status == 403
        with pytest.raises(ApiAuthError):
            viewer.revoke_device("pi-1")
        assert viewer.enrollments() == []
    with ApiClient(site.url, site.operator) as operator:
        with pytest.raises(NotFoundError):
            operator.revoke_device("pi-9")
        with pytest.raises(EnrollmentError, match="invalid device id"):
            operator.enroll_device("bad/id", expires_in_s=None)
    with httpx.Client(base_url=site.url) as http:
        assert http.get("/v1/enrollments").status_code == 401
        assert http.post("/v1/enrollments", json={"device_id": "x"}).status_code == 401


def test_a_failed_revocation_changes_nothing_and_says_why(
    tmp_path: Path,
    store: Store,
    broker: Mosquitto,
    keyset: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_for(broker, keyset)
    with served_api(FakeOperations(), store, settings) as site:
        with ApiClient(site.url, site.operator) as client:
            token = client.enroll_device("pi-1", expires_in_s=None).token
        agent_enroll.enroll(site.url, token, "pi-1", tmp_path / "dev")
    broken = settings_for(broker, keyset, broker_pid_file=tmp_path / "missing.pid")
    with (
        served_api(FakeOperations(), store, broken) as site,
        caplog.at_level(logging.ERROR),
        ApiClient(site.url, site.operator) as client,
        pytest.raises(EnrollmentError, match="could not remove the broker access"),
    ):
        client.revoke_device("pi-1")
    row = store.registered("pi-1")
    assert row is not None
    assert row.state == DeviceState.ACCEPTED
    assert any("missing.pid" in record.getMessage() for record in caplog.records)


def test_enrollment_that_is_not_configured_refuses_before_spending_the_token(
    tmp_path: Path, store: Store, broker: Mosquitto, keyset: Path
) -> None:
    unset = dataclasses.replace(settings_for(broker, keyset), keyset=None)
    with served_api(FakeOperations(), store, unset) as site:
        with ApiClient(site.url, site.operator) as client:
            token = client.enroll_device("pi-1", expires_in_s=None).token
        with pytest.raises(EnrollmentFailedError, match=r"enrollment\.keyset"):
            agent_enroll.enroll(site.url, token, "pi-1", tmp_path / "dev")
    with served_api(FakeOperations(), store, settings_for(broker, keyset)) as site:
        agent_enroll.enroll(site.url, token, "pi-1", tmp_path / "dev")  # still valid


def test_fedge_device_commands_enroll_list_and_revoke(
    tmp_path: Path, site: Served, broker: Mosquitto
) -> None:
    api = ["--api", site.url, "--token", site.operator]
    issued = runner.invoke(app, ["device", "enroll", "pi-7", "--expires-in", "1h", *api])
    assert issued.exit_code == 0, issued.stderr
    token = issued.stdout.strip()
    assert token.startswith("fedge_enroll_")
    assert "fedge-agent enroll --token TOKEN" in issued.stderr
    agent_enroll.enroll(site.url, token, "pi-7", tmp_path / "dev")
    listed = runner.invoke(app, ["device", "list", "--json", *api])
    assert listed.exit_code == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(row["device_id"], row["state"]) for row in rows] == [("pi-7", "accepted")]
    assert "pi-7" in runner.invoke(app, ["device", "list", *api]).stdout
    revoked = runner.invoke(app, ["device", "revoke", "pi-7", *api])
    assert revoked.exit_code == 0, revoked.stderr
    assert "pi-7:" not in (broker.directory / "passwd").read_text()
    client = DeviceClient(broker.port, "pi-7", device_password(tmp_path / "dev"))
    assert not client.connected
    usage = runner.invoke(app, ["device", "list"], env={"FEDGE_API": "", "FEDGE_TOKEN": ""})
    assert usage.exit_code == 2
    assert "--api" in usage.stderr


def _answer(**changes: Any) -> dict[str, Any]:
    key = generate_signing_key()
    now = datetime.now(UTC)
    keyset = KeySet(1, (key.public_key,), 1, now - timedelta(days=1), now + timedelta(days=30))
    answer: dict[str, Any] = {
        "device_id": "pi-1",
        "broker_url": "mqtts://broker.example:8883",
        "broker_ca": None,
        "keyset": base64.b64encode(sign_keyset(keyset, [key]).to_bytes()).decode(),
        "fleet": FLEET,
    }
    answer.update(changes)
    return answer


def _unsigned_keyset() -> str:
    now = datetime.now(UTC)
    mine, other = generate_signing_key(), generate_signing_key()
    keyset = KeySet(1, (mine.public_key,), 1, now - timedelta(days=1), now + timedelta(days=30))
    return base64.b64encode(sign_keyset(keyset, [other]).to_bytes()).decode()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"keyset": "bm90IGEga2V5IHNldA=="}, "malformed"),
        ({"keyset": "%%%"}, "malformed"),
        ({"broker_url": "http://evil"}, "malformed"),
        ({"fleet": "a/b"}, "malformed"),
        ({"broker_ca": "not a pem"}, "not a PEM certificate"),
        ({"broker_url": None}, "malformed"),
    ],
)
def test_the_agent_refuses_a_malformed_answer_and_writes_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    changes: dict[str, Any],
    message: str,
) -> None:
    monkeypatch.setattr(agent_enroll, "_post", lambda *_args: _answer(**changes))
    with caplog.at_level(logging.ERROR), pytest.raises(EnrollmentFailedError, match=message):
        agent_enroll.enroll("https://c.example", "t", "pi-1", tmp_path / "dev")
    assert not (tmp_path / "dev").exists()
    assert any("enrollment failed" in record.getMessage() for record in caplog.records)


def test_the_agent_refuses_a_key_set_its_own_keys_did_not_sign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_enroll, "_post", lambda *_args: _answer(keyset=_unsigned_keyset()))
    with pytest.raises(EnrollmentFailedError, match="malformed"):
        agent_enroll.enroll("https://c.example", "t", "pi-1", tmp_path / "dev")
    assert not (tmp_path / "dev").exists()


def test_the_agent_checks_its_arguments_and_reports_an_unreachable_coordinator(
    tmp_path: Path,
) -> None:
    with pytest.raises(EnrollmentFailedError, match="invalid device id"):
        agent_enroll.enroll("https://c.example", "t", "a/b", tmp_path)
    with pytest.raises(EnrollmentFailedError, match="http"):
        agent_enroll.enroll("ftp://c.example", "t", "pi-1", tmp_path)
    with pytest.raises(EnrollmentFailedError, match="cannot reach the coordinator"):
        agent_enroll.enroll("http://127.0.0.1:9", "t", "pi-1", tmp_path, timeout_s=2.0)


def test_the_enrollment_settings_are_checked_with_the_service_config() -> None:
    base = {"db": "s.db", "broker": {"url": "mqtt://b"}, "trust": {"keys": ["k.pub"]}}
    for bad, key in (
        ({"fleet": "a b"}, "enrollment.fleet"),
        ({"broker_url": "http://x"}, "enrollment.broker_url"),
        ({"token_hours": 0}, "enrollment.token_hours"),
    ):
        with pytest.raises(ServiceConfigError, match=key.replace(".", r"\.")):
            build_service_config(
                {**base, "enrollment": bad}, {}, base_dir=Path("/etc/fedge"), password="x"
            )
    config = build_service_config(
        {**base, "enrollment": {"keyset": "k.json", "fleet": FLEET}},
        {},
        base_dir=Path("/etc/fedge"),
        password="x",
    )
    assert config.enrollment.keyset == Path("/etc/fedge/k.json")
    assert config.enrollment.missing() == [
        "enrollment.broker_url",
        "enrollment.password_file",
        "enrollment.broker_pid_file",
    ]


def test_the_enrolled_fleet_defaults_to_the_fleet_the_service_keeps_a_statement_for() -> None:
    base = {"db": "s.db", "broker": {"url": "mqtt://b"}, "trust": {"keys": ["k.pub"]}}
    fleet = {"id": FLEET, "keys": ["statement.pem"]}

    def build(enrollment: dict[str, str]) -> ServiceConfig:
        return build_service_config(
            {**base, "fleet": fleet, "enrollment": enrollment},
            {},
            base_dir=Path("/etc/fedge"),
            password="x",
        )

    assert build({}).enrollment.fleet == FLEET
    assert build({"fleet": FLEET}).enrollment.fleet == FLEET
    with pytest.raises(ServiceConfigError, match=r"enrollment\.fleet 'other' differs"):
        build({"fleet": "other"})


def test_for_mutual_tls_the_key_stays_on_the_device_and_only_a_csr_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = TlsFiles.create(tmp_path / "tls")
    sent: list[dict[str, str]] = []

    def coordinator(_url: str, body: dict[str, str], _timeout: float) -> dict[str, Any]:
        sent.append(body)
        cert, _key = tls.issue("pi-1")  # what the coordinator's CA would answer
        return _answer(broker_ca=tls.ca.read_text(), certificate=cert.read_text())

    monkeypatch.setattr(agent_enroll, "_post", coordinator)
    out = tmp_path / "dev"
    enrolled = agent_enroll.enroll("https://c.example", "t", "pi-1", out, certificate=True)
    (body,) = sent
    assert "password" not in body
    csr = x509.load_pem_x509_csr(body["csr"].encode())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-1"
    assert (out / "device.key").stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in json.dumps(body)
    assert not (out / "broker.password").exists()
    config = config_from_args(
        build_parser().parse_args(["run", "--config", str(enrolled.config)]), {}
    )
    assert config.broker.cert_file == out / "device.crt"
    assert config.broker.key_file == out / "device.key"
    assert config.broker.ca_file == out / "broker-ca.crt"
    # no certificate in the answer: refused, nothing written
    monkeypatch.setattr(agent_enroll, "_post", lambda *_args: _answer())
    with pytest.raises(EnrollmentFailedError, match="no certificate"):
        agent_enroll.enroll("https://c.example", "t", "pi-2", tmp_path / "two", certificate=True)
    assert not (tmp_path / "two").exists()


def test_a_csr_needs_a_coordinator_ca_and_the_device_id_as_its_cn(
    tmp_path: Path, store: Store, broker: Mosquitto, keyset: Path, site: Served
) -> None:
    with ApiClient(site.url, site.operator) as client:
        token = client.enroll_device("pi-1", expires_in_s=600).token
    with pytest.raises(EnrollmentFailedError, match="no CA for client certificates"):
        agent_enroll.enroll(site.url, token, "pi-1", tmp_path / "dev", certificate=True)
    tls = TlsFiles.create(tmp_path / "tls")
    ca = CaDirectory(tls.ca_dir)
    with served_api(FakeOperations(), store, settings_for(broker, keyset), ca=ca) as with_ca:
        other = agent_enroll._Credential.make("pi-2", certificate=True).request["csr"]
        body = {"token": token, "device_id": "pi-1", "csr": other}
        both = {**body, "password": "p" * 43}
        with httpx.Client(base_url=with_ca.url) as http:
            wrong = http.post("/v1/enroll", json=body)
            twice = http.post("/v1/enroll", json=both)
        assert wrong.status_code == 400
        assert "CN = 'pi-1'" in wrong.json()["error"]["message"]
        assert twice.status_code == 400
        assert "exactly one" in twice.json()["error"]["message"]
        assert "pi-1" not in issued_names(tls)
        # the token was not spent by the refusals
        agent_enroll.enroll(with_ca.url, token, "pi-1", tmp_path / "dev", certificate=True)
    assert "pi-1" in issued_names(tls)


def issued_names(tls: TlsFiles) -> set[str]:
    """The CNs the test CA issued certificates to."""
    return {cert.name for cert in issued_certificates(tls.ca_dir)}
