"""The fleet's mTLS CA (coordinator.link.ca) and the device's CSR helper, without a broker.

Each refusal is typed (CertificateAuthorityError) and logged; the mosquitto side
(a CA-issued device connects, a revoked, foreign or expired one does not) is in
tests/test_ca_mqtt.py.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from coordinator.cli.app import app
from coordinator.errors import CertificateAuthorityError
from coordinator.link.ca import (
    CRL_DAYS,
    CaFiles,
    coordinator_certificate,
    init_ca,
    issue_certificate,
    issued_certificates,
    refresh_crl,
    revoke_certificate,
    server_certificate,
)
from edge_agent.errors import TopicError
from edge_agent.transport.csr import make_key_and_csr

runner = CliRunner(mix_stderr=False)


@pytest.fixture
def ca(tmp_path: Path) -> CaFiles:
    return init_ca(tmp_path / "ca", name="test fleet CA")


def _crl(files: CaFiles) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(files.crl.read_bytes())


def _ca_cert(files: CaFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificate(files.cert.read_bytes())


def _refused(caplog: pytest.LogCaptureFixture, match: str) -> None:
    assert any(
        r.levelno == logging.ERROR and "CA refused" in r.getMessage() for r in caplog.records
    ), caplog.text
    assert match in caplog.text


def test_init_makes_a_ten_year_p256_ca_with_a_private_key_and_an_empty_crl(ca: CaFiles) -> None:
    assert ca.key.stat().st_mode & 0o777 == 0o600
    cert = _ca_cert(ca)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3650) <= lifetime <= timedelta(days=3650, minutes=10)
    crl = _crl(ca)
    assert crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]
    assert len(crl) == 0
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - datetime.now(UTC) > timedelta(days=CRL_DAYS - 1)


def test_init_refuses_a_directory_that_already_holds_a_ca(
    ca: CaFiles, caplog: pytest.LogCaptureFixture
) -> None:
    key = ca.key.read_bytes()
    with pytest.raises(CertificateAuthorityError, match="already holds a CA"):
        init_ca(ca.directory, name="second")
    assert ca.key.read_bytes() == key
    _refused(caplog, "already holds a CA")


def test_a_device_certificate_is_a_one_year_client_certificate_for_its_id(ca: CaFiles) -> None:
    key_pem, csr_pem = make_key_and_csr("cam-1")
    cert = x509.load_pem_x509_certificate(issue_certificate(ca.directory, csr_pem,
                                                             device_id="cam-1"))  # fmt: skip
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-1"
    assert cert.issuer == _ca_cert(ca).subject
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=365) <= lifetime <= timedelta(days=365, minutes=10)
    cert.verify_directly_issued_by(_ca_cert(ca))
    again = x509.load_pem_x509_certificate(issue_certificate(ca.directory, csr_pem,
                                                              device_id="cam-1"))  # fmt: skip
    assert again.serial_number != cert.serial_number  # random serials
    records = json.loads(ca.index.read_text())["certificates"]
    assert [(r["kind"], r["name"]) for r in records] == [("device", "cam-1")] * 2


def test_a_csr_for_another_device_id_is_refused(
    ca: CaFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A device enrolling as cam-1 cannot obtain a certificate that names cam-2."""
    _, csr_pem = make_key_and_csr("cam-2")
    with pytest.raises(CertificateAuthorityError, match="not the device id 'cam-1'"):
        issue_certificate(ca.directory, csr_pem, device_id="cam-1")
    _refused(caplog, "CN is 'cam-2'")
    assert json.loads(ca.index.read_text())["certificates"] == []


def test_a_csr_not_signed_by_its_own_key_is_refused(
    ca: CaFiles, caplog: pytest.LogCaptureFixture
) -> None:
    _, csr_pem = make_key_and_csr("cam-1")
    csr = x509.load_pem_x509_csr(csr_pem)
    other = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(csr.subject)
        .sign(other, hashes.SHA256())
    )
    # the forged CSR carries `other`'s public key; swap in the victim's key bytes
    der = bytearray(forged.public_bytes(serialization.Encoding.DER))
    victim = csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mine = other.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    start = bytes(der).index(mine)
    der[start : start + len(mine)] = victim
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CertificateAuthorityError, match="not signed by its own key"):
        issue_certificate(ca.directory, tampered, device_id="cam-1")
    _refused(caplog, "not signed by its own key")


@pytest.mark.parametrize("device_id", ["coordinator", "coordinator@laptop", "bad id", ""])
def test_reserved_or_malformed_device_ids_get_no_certificate(ca: CaFiles, device_id: str) -> None:
    """CN=coordinator would be a coordinator account on an mTLS broker."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id or "x")]))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CertificateAuthorityError):
        issue_certificate(ca.directory, csr, device_id=device_id)
    with pytest.raises(TopicError):
        make_key_and_csr(device_id)


def test_a_weak_csr_key_is_refused(ca: CaFiles, caplog: pytest.LogCaptureFixture) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cam-1")]))
        .sign(weak, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CertificateAuthorityError, match="is not EC P-256/P-384 or RSA"):
        issue_certificate(ca.directory, csr, device_id="cam-1")
    _refused(caplog, "RSAPublicKey")


def test_revoke_lists_every_certificate_of_the_device_on_a_new_crl(ca: CaFiles) -> None:
    serials = []
    for device in ("cam-1", "cam-1", "cam-2"):
        pem = issue_certificate(ca.directory, make_key_and_csr(device)[1], device_id=device)
        serials.append(x509.load_pem_x509_certificate(pem).serial_number)
    number_before = _crl(ca).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert revoke_certificate(ca.directory, "cam-1") == ca.crl
    crl = _crl(ca)
    assert crl.is_signature_valid(_ca_cert(ca).public_key())  # type: ignore[arg-type]
    assert {entry.serial_number for entry in crl} == set(serials[:2])
    assert crl.get_revoked_certificate_by_serial_number(serials[2]) is None
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number_before


def test_a_revoked_device_id_gets_a_new_certificate_only_when_forced(
    ca: CaFiles, caplog: pytest.LogCaptureFixture
) -> None:
    issue_certificate(ca.directory, make_key_and_csr("cam-1")[1], device_id="cam-1")
    revoke_certificate(ca.directory, "cam-1")
    _, csr = make_key_and_csr("cam-1")
    with pytest.raises(CertificateAuthorityError, match="was revoked"):
        issue_certificate(ca.directory, csr, device_id="cam-1")
    _refused(caplog, "needs --force")
    new = x509.load_pem_x509_certificate(
        issue_certificate(ca.directory, csr, device_id="cam-1", force=True)
    )
    assert _crl(ca).get_revoked_certificate_by_serial_number(new.serial_number) is None


def test_revoking_an_unknown_device_is_refused(
    ca: CaFiles, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(CertificateAuthorityError, match="never issued"):
        revoke_certificate(ca.directory, "ghost")
    _refused(caplog, "ghost")


def test_a_ca_key_others_can_read_is_refused(ca: CaFiles, caplog: pytest.LogCaptureFixture) -> None:
    ca.key.chmod(0o644)
    with pytest.raises(CertificateAuthorityError, match="chmod 600"):
        issue_certificate(ca.directory, make_key_and_csr("cam-1")[1], device_id="cam-1")
    _refused(caplog, "readable by others")


def test_no_certificate_outlives_the_ca(tmp_path: Path) -> None:
    files = init_ca(tmp_path / "short", name="short CA", days=30)
    with pytest.raises(CertificateAuthorityError, match="outlive the CA"):
        issue_certificate(files.directory, make_key_and_csr("cam-1")[1], device_id="cam-1")
    issue_certificate(files.directory, make_key_and_csr("cam-1")[1], device_id="cam-1", days=29)


def test_now_in_the_past_gives_an_expired_certificate(ca: CaFiles) -> None:
    past = datetime.now(UTC) - timedelta(days=10)
    pem = issue_certificate(ca.directory, make_key_and_csr("cam-1")[1], device_id="cam-1",
                            days=2, now=past)  # fmt: skip
    assert x509.load_pem_x509_certificate(pem).not_valid_after_utc < datetime.now(UTC)


@pytest.mark.parametrize(
    ("host", "san"),
    [
        ("127.0.0.1", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
        ("broker.example.org", x509.DNSName("broker.example.org")),
    ],
)
def test_server_certificate_names_the_host(ca: CaFiles, host: str, san: x509.GeneralName) -> None:
    cert_pem, key_pem = server_certificate(ca.directory, host)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [san]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert cert.public_key() == key.public_key()


def test_server_certificate_refuses_a_malformed_host(ca: CaFiles) -> None:
    with pytest.raises(CertificateAuthorityError, match="bad host"):
        server_certificate(ca.directory, "evil host/../x")


def test_coordinator_certificates_only_for_coordinator_accounts(ca: CaFiles) -> None:
    for account in ("coordinator", "coordinator@laptop"):
        cert_pem, _ = coordinator_certificate(ca.directory, account=account)
        cert = x509.load_pem_x509_certificate(cert_pem)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == account
    for account in ("cam-1", "coordinator@", "coordinator@a b"):
        with pytest.raises(CertificateAuthorityError):
            coordinator_certificate(ca.directory, account=account)


def test_refresh_crl_keeps_the_entries_and_moves_next_update(ca: CaFiles) -> None:
    issue_certificate(ca.directory, make_key_and_csr("cam-1")[1], device_id="cam-1")
    revoke_certificate(ca.directory, "cam-1")
    later = datetime.now(UTC) + timedelta(days=20)
    refresh_crl(ca.directory, now=later)
    crl = _crl(ca)
    assert len(crl) == 1
    assert crl.next_update_utc is not None
    assert crl.next_update_utc > later + timedelta(days=CRL_DAYS - 1)


def test_not_a_ca_directory(tmp_path: Path) -> None:
    with pytest.raises(CertificateAuthorityError, match="not a CA directory"):
        issue_certificate(tmp_path, make_key_and_csr("cam-1")[1], device_id="cam-1")


def fedge_ca(*args: object) -> Result:
    """Run ``fedge ca ARGS...`` in-process."""
    return runner.invoke(app, ["ca", *map(str, args)])


def test_fedge_ca_commands_run_the_ca(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ok = fedge_ca("init", ca_dir, "--name", "acme CA")
    assert ok.exit_code == 0, ok.stderr
    assert (ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    again = fedge_ca("init", ca_dir)
    assert again.exit_code == 1
    assert "already holds a CA" in again.stderr

    pair = ("--cert", tmp_path / "s.crt", "--key", tmp_path / "s.key")
    server = fedge_ca("server-cert", ca_dir, "--host", "127.0.0.1", *pair)
    assert server.exit_code == 0, server.stderr
    assert (tmp_path / "s.key").stat().st_mode & 0o777 == 0o600
    pair = ("--cert", tmp_path / "c.crt", "--key", tmp_path / "c.key")
    coordinator = fedge_ca("coordinator-cert", ca_dir, *pair)
    assert coordinator.exit_code == 0, coordinator.stderr
    same = fedge_ca("coordinator-cert", ca_dir, *pair)
    assert same.exit_code == 1
    assert "exists (pass --force" in same.stderr

    csr = tmp_path / "cam-1.csr"
    csr.write_bytes(make_key_and_csr("cam-1")[1])
    printed = fedge_ca("issue", ca_dir, "--csr", csr, "--device-id", "cam-1", "--days", 30)
    assert printed.exit_code == 0, printed.stderr
    cert = x509.load_pem_x509_certificate(printed.stdout.encode())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < timedelta(days=31)
    wrong = fedge_ca("issue", ca_dir, "--csr", csr, "--device-id", "cam-2")
    assert wrong.exit_code == 1
    assert "not the device id 'cam-2'" in wrong.stderr

    revoked = fedge_ca("revoke", ca_dir, "cam-1")
    assert revoked.exit_code == 0, revoked.stderr
    assert "kill -HUP" in revoked.stdout
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    out = ("--out", tmp_path / "cam-1.crt")
    refused = fedge_ca("issue", ca_dir, "--csr", csr, "--device-id", "cam-1", *out)
    assert refused.exit_code == 1
    assert "--force" in refused.stderr
    forced = fedge_ca("issue", ca_dir, "--csr", csr, "--device-id", "cam-1", *out, "--force")
    assert forced.exit_code == 0, forced.stderr
    assert (tmp_path / "cam-1.crt").exists()
    fresh = fedge_ca("crl", ca_dir)
    assert fresh.exit_code == 0, fresh.stderr
    assert len(x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())) == 1


def test_an_operators_coordinator_certificate_can_be_revoked_by_its_account(ca: CaFiles) -> None:
    cert_pem, _ = coordinator_certificate(ca.directory, account="coordinator@laptop")
    service_pem, _ = coordinator_certificate(ca.directory)
    revoke_certificate(ca.directory, "coordinator@laptop")
    crl = _crl(ca)
    lost = x509.load_pem_x509_certificate(cert_pem).serial_number
    service = x509.load_pem_x509_certificate(service_pem).serial_number
    assert crl.get_revoked_certificate_by_serial_number(lost) is not None
    assert crl.get_revoked_certificate_by_serial_number(service) is None
    for bad in ("coordinator@", "x/y"):
        with pytest.raises(CertificateAuthorityError, match=r"invalid operator name|unknown kind"):
            revoke_certificate(ca.directory, bad)


def test_concurrent_issuers_lose_no_record(ca: CaFiles) -> None:
    """The service's enrollment route and an operator's fedge ca may issue at once."""
    csrs = {f"cam-{n}": make_key_and_csr(f"cam-{n}")[1] for n in range(8)}
    with ThreadPoolExecutor(max_workers=8) as pool:
        serials = list(
            pool.map(
                lambda item: (
                    x509.load_pem_x509_certificate(
                        issue_certificate(ca.directory, item[1], device_id=item[0])
                    ).serial_number
                ),
                csrs.items(),
            )
        )
    records = issued_certificates(ca.directory)
    assert sorted(r.name for r in records) == sorted(csrs)
    assert {r.serial for r in records} == set(serials)


def test_fedge_ca_list_shows_what_was_issued_and_revoked(ca: CaFiles) -> None:
    issue_certificate(ca.directory, make_key_and_csr("cam-1")[1], device_id="cam-1")
    issue_certificate(ca.directory, make_key_and_csr("cam-2")[1], device_id="cam-2")
    revoke_certificate(ca.directory, "cam-2")
    listed = fedge_ca("list", ca.directory, "--json")
    assert listed.exit_code == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)["certificates"]}
    assert rows["cam-1"]["revoked_at"] is None
    assert rows["cam-2"]["revoked_at"] is not None
    table = fedge_ca("list", ca.directory)
    assert table.exit_code == 0, table.stderr
    assert "cam-2" in table.stdout
