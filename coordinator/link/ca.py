"""A small certificate authority for the fleet's mutual TLS (``fedge ca``).

With mutual TLS the broker (``fedge broker config --cafile ... --crlfile ...``)
accepts only clients whose certificate this CA signed and has not revoked, and the
certificate's CN becomes the MQTT username (``use_identity_as_username``): a
device's CN is its device id, so the ACL confines it to its own topics, and its
client id is bound to it. The CA never sees a device's private key: the device
makes a key and a CSR (:func:`edge_agent.transport.csr.make_key_and_csr`), the CA
signs a certificate whose subject it builds itself from the device id (nothing of
the CSR but its public key is copied), and refuses a CSR whose CN is not that id.

Files in the CA directory::

    ca.key      the CA's EC P-256 private key, mode 0600 (refused if others can read it)
    ca.crt      the CA certificate (give it to the broker as cafile, to devices as ca_file)
    crl.pem     the certificate revocation list (the broker's crlfile)
    index.json  every certificate issued (:mod:`coordinator.link.ca_index`)

Lifetimes: the CA 10 years, device, coordinator and server certificates 1 year,
each CRL :data:`CRL_DAYS` days. The CRL is re-issued on every revocation and by
:func:`refresh_crl` (``fedge ca crl``): OpenSSL refuses EVERY client once the
broker's CRL is past its next-update time, so run ``fedge ca crl DIR`` from cron
well within that time, then SIGHUP mosquitto (which re-reads it; see
docs/security.md). Serial numbers are random (159 bits).

Workflow::

    init_ca(ca_dir, name="acme fleet CA")                 # ca.key, ca.crt, crl.pem
    cert, key = server_certificate(ca_dir, "broker.example")
    cert, key = coordinator_certificate(ca_dir)             # or account="coordinator@ops"
    cert = issue_certificate(ca_dir, csr_pem, device_id="cam-1")
    revoke_certificate(ca_dir, "cam-1")                     # crl.pem; SIGHUP the broker
    issued_certificates(ca_dir)                             # what the index holds

A SIGHUP makes mosquitto refuse the revoked certificate from its next handshake
on; a connection opened before stays up until the broker restarts. Every issuing
and revoking function takes ``now`` (default: the clock), so tests can make an
expired certificate or a stale CRL without waiting. All of them hold the CA
directory's lock (:func:`coordinator.link.ca_index.locked`) while they read and
write the index, so the service and the CLI can issue at the same time.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from compress.fileio import atomic_write, read_bounded
from coordinator.errors import BrokerSetupError, CertificateAuthorityError
from coordinator.link.broker_accounts import check_account_name
from coordinator.link.ca_index import (
    INDEX_FILE,
    CaIndex,
    CertificateKind,
    IssuedCertificate,
    locked,
)
from edge_agent.errors import TopicError
from edge_agent.protocol import COORDINATOR_SENDER, is_valid_device_id, validate_device_id

__all__ = [
    "CA_DAYS",
    "CRL_DAYS",
    "LEAF_DAYS",
    "CaFiles",
    "coordinator_certificate",
    "init_ca",
    "issue_certificate",
    "issued_certificates",
    "refresh_crl",
    "revoke_certificate",
    "save_pem",
    "server_certificate",
]

logger = logging.getLogger(__name__)

CA_DAYS = 3650
"""Default lifetime of the CA certificate (10 years)."""
LEAF_DAYS = 365
"""Default lifetime of a device, coordinator or server certificate (1 year)."""
CRL_DAYS = 30
"""Each CRL's next-update time, in days after it is written (re-issue it before)."""
BACKDATE = timedelta(minutes=5)
"""Certificates start this much before ``now`` (clock skew between CA and devices)."""
MAX_PEM_BYTES = 64 * 1024
MIN_RSA_BITS = 2048
EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
_DNS_RE = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # fmt: skip


def _fail(message: str) -> CertificateAuthorityError:
    logger.error("CA refused: %s", message)
    return CertificateAuthorityError(message)


@dataclass(frozen=True)
class CaFiles:
    """The files of a CA directory."""

    directory: Path

    @property
    def key(self) -> Path:
        """The CA's private key (0600)."""
        return self.directory / "ca.key"

    @property
    def cert(self) -> Path:
        """The CA certificate (PEM)."""
        return self.directory / "ca.crt"

    @property
    def crl(self) -> Path:
        """The certificate revocation list (PEM)."""
        return self.directory / "crl.pem"

    @property
    def index(self) -> Path:
        """The record of issued certificates."""
        return self.directory / INDEX_FILE


def _now(now: datetime | None) -> datetime:
    return datetime.now(UTC) if now is None else now.astimezone(UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, ca: bool, rsa_key: bool = False) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf signs (ECDHE) or, with RSA, enciphers."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _check_days(days: int, what: str) -> None:
    if not 1 <= days <= 100 * 365:
        raise _fail(f"{what} lifetime must be 1..36500 days, got {days}")


def init_ca(
    directory: Path, *, name: str, days: int = CA_DAYS, now: datetime | None = None
) -> CaFiles:
    """Create a CA in ``directory``: ca.key (0600), ca.crt, an empty crl.pem, index.json.

    Args:
        directory: Created if missing; must not hold a CA already.
        name: The CA certificate's CN (e.g. ``acme fleet CA``).
        days: The CA certificate's lifetime.
        now: The start of validity (default: the clock).

    Raises:
        CertificateAuthorityError: a CA is already there, a bad name or lifetime, or
            the files cannot be written.
    """
    _check_days(days, "CA")
    if not name or len(name) > 64:
        raise _fail("the CA name must be 1-64 characters")
    files = CaFiles(Path(directory).absolute())
    start = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    try:
        files.directory.mkdir(parents=True, exist_ok=True)
        with locked(files.directory):
            if files.key.exists() or files.index.exists():
                raise _fail(f"{files.directory} already holds a CA")
            atomic_write(files.key, _key_pem(key), mode=0o600, overwrite=False)
            atomic_write(files.cert, _pem(cert))
            index = CaIndex(files.index)
            _write_crl(files, index, cert, key, start)
    except OSError as exc:
        raise _fail(f"cannot write the CA in {files.directory}: {exc}") from None
    logger.info("created the CA %r in %s (valid %d days)", name, files.directory, days)
    return files


def _load_ca(files: CaFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key; the key must be readable by its owner only."""
    try:
        mode = files.key.stat().st_mode
    except FileNotFoundError:
        raise _fail(f"{files.key} is missing: not a CA directory (run fedge ca init)") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise _fail(f"{files.key} is readable by others (mode {mode & 0o777:o}); chmod 600 it")
    key_pem = read_bounded(files.key, max_bytes=MAX_PEM_BYTES, error=CertificateAuthorityError,
                           what="CA key")  # fmt: skip
    cert_pem = read_bounded(files.cert, max_bytes=MAX_PEM_BYTES, error=CertificateAuthorityError,
                            what="CA certificate")  # fmt: skip
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, TypeError) as exc:
        raise _fail(
            f"the CA key or certificate in {files.directory} is unreadable: {exc}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise _fail(f"{files.key} is not the key of {files.cert}")
    return cert, key


def _sign_leaf(
    files: CaFiles,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    *,
    kind: CertificateKind,
    name: str,
    days: int,
    now: datetime | None,
    san: x509.GeneralName | None = None,
    force: bool = False,
) -> x509.Certificate:
    """Sign and record a leaf certificate (the CA lock held by the caller)."""
    _check_days(days, "certificate")
    ca_cert, ca_key = _load_ca(files)
    index = CaIndex.load(files.index)
    earlier = index.of(kind, name)
    if earlier and all(r.revoked for r in earlier) and not force:
        raise _fail(f"{kind} {name!r} was revoked; issuing it a new certificate needs --force")
    start = _now(now)
    end = start + timedelta(days=days)
    if end > ca_cert.not_valid_after_utc:
        raise _fail(
            f"a certificate valid until {end:%Y-%m-%d} would outlive the CA "
            f"(valid until {ca_cert.not_valid_after_utc:%Y-%m-%d}); ask for fewer days"
        )
    usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False, rsa_key=isinstance(public_key, rsa.RSAPublicKey)), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    index.add(
        IssuedCertificate(
            serial=cert.serial_number,
            kind=kind,
            name=name,
            not_before=cert.not_valid_before_utc.isoformat(),
            not_after=cert.not_valid_after_utc.isoformat(),
        )
    )
    index.save()
    logger.info("issued a %s certificate for %r (serial %x, until %s)", kind, name,
                cert.serial_number, f"{end:%Y-%m-%d}")  # fmt: skip
    return cert


def _csr_public_key(csr_pem: bytes, device_id: str) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The CSR's public key, after checking its signature, CN and key type."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise _fail(f"not a PEM certificate signing request: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError, TypeError):
        valid = False
    if not valid:
        raise _fail(f"the CSR for {device_id!r} is not signed by its own key")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = names[0].value if len(names) == 1 else None
    if common_name != device_id:
        raise _fail(f"the CSR's CN is {common_name!r}, not the device id {device_id!r}")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, EC_CURVES):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return key
    raise _fail(
        f"the CSR's key ({type(key).__name__}) is not EC P-256/P-384 or RSA >= {MIN_RSA_BITS}"
    )


def issue_certificate(
    ca_dir: Path,
    csr_pem: bytes,
    *,
    device_id: str,
    days: int = LEAF_DAYS,
    force: bool = False,
    now: datetime | None = None,
) -> bytes:
    """Sign a device's CSR: a PEM client certificate with CN = ``device_id``.

    Only the CSR's public key is used; the subject (CN = device id), the lifetime and
    the extensions (clientAuth, not a CA) are the CA's.

    Args:
        ca_dir: The CA directory (:func:`init_ca`).
        csr_pem: The device's CSR (PEM), signed by its key; its CN must be the id.
        device_id: The device id (the MQTT username the broker derives from the CN).
        days: Lifetime (default one year); must end before the CA does.
        force: Issue even though the id's certificates were revoked (a re-enrolled device).
        now: The start of validity (default: the clock; tests pass a past time to get
            an expired certificate).

    Raises:
        CertificateAuthorityError: a bad device id, a CSR that is malformed, not
            self-signed, with another CN or a weak key; a revoked id without
            ``force``; a lifetime past the CA's.
    """
    try:
        validate_device_id(device_id)
    except TopicError as exc:
        raise _fail(str(exc)) from None
    public_key = _csr_public_key(csr_pem, device_id)
    files = CaFiles(Path(ca_dir))
    with locked(files.directory):
        cert = _sign_leaf(files, public_key, kind="device", name=device_id, days=days, now=now,
                          force=force)  # fmt: skip
    return _pem(cert)


def coordinator_certificate(
    ca_dir: Path,
    *,
    account: str = COORDINATOR_SENDER,
    days: int = LEAF_DAYS,
    now: datetime | None = None,
) -> tuple[bytes, bytes]:
    """A key and client certificate for a coordinator account: (cert PEM, key PEM).

    ``account`` is ``coordinator`` (the service) or ``coordinator@NAME`` (an
    operator, :func:`edge_agent.protocol.operator_account`). The key is made here:
    the coordinator runs next to its CA.

    Raises:
        CertificateAuthorityError: not a coordinator account, or as :func:`issue_certificate`.
    """
    if _account_kind(account) != "coordinator":
        raise _fail(f"{account!r} is not coordinator or coordinator@NAME")
    key = ec.generate_private_key(ec.SECP256R1())
    files = CaFiles(Path(ca_dir))
    with locked(files.directory):
        cert = _sign_leaf(files, key.public_key(), kind="coordinator", name=account, days=days,
                          now=now, force=True)  # fmt: skip
    return _pem(cert), _key_pem(key)


def server_certificate(
    ca_dir: Path, host: str, *, days: int = LEAF_DAYS, now: datetime | None = None
) -> tuple[bytes, bytes]:
    """A key and server certificate for the broker at ``host``: (cert PEM, key PEM).

    ``host`` is an IP address or a DNS name; it is the CN and the only subject
    alternative name (clients check the name they connect to against it).

    Raises:
        CertificateAuthorityError: an empty or malformed host, or as :func:`issue_certificate`.
    """
    address = host.strip("[]")
    san: x509.GeneralName
    if _is_ip(address):
        san = x509.IPAddress(ipaddress.ip_address(address))
    elif _DNS_RE.fullmatch(host) is not None:
        san = x509.DNSName(host)
    else:
        raise _fail(f"bad host {host[:80]!r}: want an IP address or a DNS name")
    key = ec.generate_private_key(ec.SECP256R1())
    files = CaFiles(Path(ca_dir))
    with locked(files.directory):
        cert = _sign_leaf(files, key.public_key(), kind="server", name=address,
                          days=days, now=now, san=san, force=True)  # fmt: skip
    return _pem(cert), _key_pem(key)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _write_crl(
    files: CaFiles,
    index: CaIndex,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
) -> None:
    """Write a new CRL listing every revoked certificate, and the index (lock held)."""
    index.crl_number += 1
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(index.crl_number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    for record in index.revoked():
        assert record.revoked_at is not None
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(record.serial)
            .revocation_date(datetime.fromisoformat(record.revoked_at))
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    atomic_write(files.crl, crl.public_bytes(serialization.Encoding.PEM))
    index.save()


def _account_kind(name: str) -> CertificateKind:
    """``device`` for a device id, ``coordinator`` for a coordinator account."""
    try:
        check_account_name(name)
    except BrokerSetupError as exc:
        raise _fail(str(exc)) from None
    return "device" if is_valid_device_id(name) else "coordinator"


def revoke_certificate(ca_dir: Path, device_id: str, *, now: datetime | None = None) -> Path:
    """Revoke every certificate of a device and write the new CRL; return its path.

    ``device_id`` may also be a coordinator account (``coordinator@NAME``, e.g. an
    operator's lost laptop). The broker refuses the certificates once it has re-read
    the CRL (``kill -HUP`` mosquitto). Revoking again only re-issues the CRL.

    Raises:
        CertificateAuthorityError: a bad name, or one the CA never issued to.
    """
    kind = _account_kind(device_id)
    files = CaFiles(Path(ca_dir))
    when = _now(now)
    with locked(files.directory):
        ca_cert, ca_key = _load_ca(files)
        index = CaIndex.load(files.index)
        if not index.of(kind, device_id):
            raise _fail(f"the CA never issued a certificate to {device_id!r}")
        count = index.revoke(kind, device_id, when)
        try:
            _write_crl(files, index, ca_cert, ca_key, when)
        except OSError as exc:
            raise _fail(f"cannot write {files.crl}: {exc}") from None
    logger.warning("revoked %d certificate(s) of %r; CRL %s (reload the broker)", count,
                   device_id, files.crl)  # fmt: skip
    return files.crl


def issued_certificates(ca_dir: Path) -> list[IssuedCertificate]:
    """Every certificate the CA issued, oldest first (revoked ones included).

    Raises:
        CertificateAuthorityError: not a CA directory, or an unreadable index.
    """
    files = CaFiles(Path(ca_dir))
    with locked(files.directory):
        return CaIndex.load(files.index).certificates


def refresh_crl(ca_dir: Path, *, now: datetime | None = None) -> Path:
    """Re-issue the CRL (same entries, a new next-update time); return its path.

    Raises:
        CertificateAuthorityError: not a CA directory, or the CRL cannot be written.
    """
    files = CaFiles(Path(ca_dir))
    with locked(files.directory):
        ca_cert, ca_key = _load_ca(files)
        index = CaIndex.load(files.index)
        try:
            _write_crl(files, index, ca_cert, ca_key, _now(now))
        except OSError as exc:
            raise _fail(f"cannot write {files.crl}: {exc}") from None
    logger.info("re-issued the CRL %s (valid %d days)", files.crl, CRL_DAYS)
    return files.crl


def save_pem(path: Path, data: bytes, *, private: bool, overwrite: bool = False) -> None:
    """Write a certificate (0644) or a private key (``private``: 0600) atomically.

    Raises:
        CertificateAuthorityError: the file exists and ``overwrite`` is false, or it
            cannot be written.
    """
    try:
        atomic_write(Path(path), data, mode=0o600 if private else 0o644, overwrite=overwrite)
    except FileExistsError:
        raise _fail(f"{path} exists (pass --force to replace it)") from None
    except OSError as exc:
        raise _fail(f"cannot write {path}: {exc}") from None
