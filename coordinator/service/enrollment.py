"""Enrolling devices with one-time tokens, and revoking them: the service's side.

Workflow (the API routes of :mod:`coordinator.service.api.enrollment_routes` call an
:class:`EnrollmentDesk`; ``fedge device ...`` and ``fedge-agent enroll`` call those):

1. An operator enrolls a device: ``fedge device enroll pi-7 [--expires-in 1h]``
   -> :meth:`EnrollmentDesk.issue`: the registry records ``pi-7`` as pending and
   returns a random token bound to it (shown once; only its hash is kept; default
   lifetime ``[enrollment] token_hours``). Audited (``device.enroll``).
2. On the device, ``fedge-agent enroll --token T --coordinator URL --device-id pi-7``
   makes a random broker password (it never leaves the device but in this one
   request) and posts it with the token (:class:`EnrollRequest`) ->
   :meth:`EnrollmentDesk.enroll`: the token is spent (one-time; see
   :mod:`coordinator.service.store.registry`), the account ``pi-7`` is added to the
   broker's password file and mosquitto reloaded, the device is marked accepted
   (audited ``device.accept``) and gets an :class:`EnrollGrant`: the broker URL (and
   the broker's CA), the signed key set, the fleet id. A refused token raises
   :class:`~coordinator.errors.EnrollmentRefusedError` (the API answers 401 and
   rate-limits the address like a failed authentication).
3. ``fedge device revoke pi-7`` -> :meth:`EnrollmentDesk.revoke`: the account is
   removed from the password file and mosquitto reloaded, which disconnects the
   device at once; it cannot reconnect. Then the registry says revoked (audited
   ``device.revoke``), the device's row goes offline and its retained status is
   cleared (mosquitto sends no will for a dropped client). Revoking a device whose
   account cannot be removed fails (typed, logged) and leaves the registry as it was.

The broker runs on the service's machine (it signals mosquitto through its pid
file, ``fedge broker config`` writes ``pid_file``). Password-file changes are
serialised by a lock: ``mosquitto_passwd`` rewrites the whole file.
"""

from __future__ import annotations

import base64
import logging
import math
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from compress.errors import CompressError
from compress.fileio import atomic_write, read_bounded
from compress.keyset import SignedKeySet, verify_self_signed
from coordinator.errors import CoordinatorError, EnrollmentError, NotFoundError
from coordinator.link.broker_accounts import add_account, reload_broker, remove_account
from coordinator.link.ca import CaFiles, issue_certificate, revoke_certificate
from coordinator.link.eviction import evict
from coordinator.service.config_schema import DEFAULT_TOKEN_HOURS
from coordinator.service.operations import Actor
from coordinator.service.store import Store
from coordinator.service.store.registry import Credential, RegisteredDevice
from coordinator.service.tokens import Role
from edge_agent.config.agent import parse_broker_url
from edge_agent.config.values import FieldError
from edge_agent.errors import ConfigError, TopicError
from edge_agent.protocol import is_valid_device_id
from edge_agent.protocol.topics import validate_fleet_id
from edge_agent.transport.csr import make_key_and_csr

__all__ = [
    "MAX_TOKEN_HOURS",
    "CaDirectory",
    "DeviceCa",
    "EnrollGrant",
    "EnrollRequest",
    "EnrollmentDesk",
    "EnrollmentSettings",
    "IssuedEnrollment",
]

logger = logging.getLogger(__name__)

MAX_TOKEN_HOURS = 24.0 * 30
"""Longest lifetime of an enrollment token."""

MAX_KEYSET_BYTES = 1 << 20
MAX_CA_BYTES = 1 << 20

DEVICE_PASSWORD = re.compile(r"[A-Za-z0-9_\-.~+/=]{16,256}")
"""What a device's broker password must look like (``fedge-agent enroll`` sends 43
urlsafe-base64 characters): long, one line, nothing mosquitto_passwd could misread."""


def _fail(message: str) -> EnrollmentError:
    logger.error("enrollment: %s", message)
    return EnrollmentError(message)


class DeviceCa(Protocol):
    """The fleet's CA, as enrollment by certificate (mutual TLS) uses it.

    An adapter over :mod:`coordinator.link.ca` (``[enrollment] ca_dir``); any
    :class:`~coordinator.errors.CoordinatorError` it raises is reported as an
    :class:`~coordinator.errors.EnrollmentError`.
    """

    def certificate_pem(self) -> str:
        """The CA's certificate (PEM): what devices verify the broker with."""
        ...

    def issue(self, csr_pem: bytes, device_id: str) -> bytes:
        """A client certificate (PEM) for the CSR, CN ``device_id``."""
        ...

    def revoke(self, device_id: str) -> None:
        """Revoke every certificate issued for ``device_id`` (the CRL file)."""
        ...


@dataclass(frozen=True)
class CaDirectory:
    """:class:`DeviceCa` over the CA directory of ``fedge ca`` (``[enrollment] ca_dir``).

    It issues with ``force``: a device whose certificates were revoked gets a new one
    when the operator enrolls it again (a new token is that decision), and the
    eviction certificate of a revocation is issued to a just-revoked id.
    """

    directory: Path

    def certificate_pem(self) -> str:
        """The CA certificate (``ca.crt``)."""
        path = CaFiles(self.directory).cert
        try:
            return path.read_text(encoding="ascii")
        except (OSError, UnicodeError) as exc:
            raise _fail(f"cannot read the CA certificate {path}: {exc}") from None

    def issue(self, csr_pem: bytes, device_id: str) -> bytes:
        """A client certificate for the CSR (see :func:`coordinator.link.ca.issue_certificate`)."""
        return issue_certificate(self.directory, csr_pem, device_id=device_id, force=True)

    def revoke(self, device_id: str) -> None:
        """Every certificate of the device onto the CRL."""
        revoke_certificate(self.directory, device_id)


@dataclass(frozen=True, slots=True)
class EnrollmentSettings:
    """The ``[enrollment]`` table of ``coordinator.toml`` (see its schema for each key).

    Raises:
        ServiceConfigError: (through the config loader) a malformed broker URL or
            fleet id, or a token lifetime outside (0, 720] hours.
    """

    broker_url: str | None = None  # the schema default
    broker_ca: Path | None = None  # the schema default
    password_file: Path | None = None  # the schema default
    broker_pid_file: Path | None = None  # the schema default
    keyset: Path | None = None  # the schema default
    fleet: str | None = None  # the schema default
    token_hours: float = DEFAULT_TOKEN_HOURS
    ca_dir: Path | None = None  # the schema default

    def device_ca(self) -> CaDirectory | None:
        """The CA of ``ca_dir`` (certificate enrollment), or None: passwords only."""
        return None if self.ca_dir is None else CaDirectory(self.ca_dir)

    def __post_init__(self) -> None:
        """Check the values (files are read when a device enrolls)."""
        if self.broker_url is not None:
            try:
                parse_broker_url(self.broker_url)
            except ConfigError as exc:
                raise FieldError("enrollment.broker_url", f"enrollment.broker_url: {exc}") from None
        if self.fleet is not None:
            try:
                validate_fleet_id(self.fleet)
            except (TopicError, TypeError) as exc:
                raise FieldError("enrollment.fleet", f"enrollment.fleet: {exc}") from None
        hours = self.token_hours
        if (
            isinstance(hours, bool)
            or not isinstance(hours, int | float)
            or not math.isfinite(hours)
            or not 0 < hours <= MAX_TOKEN_HOURS
        ):
            raise FieldError(
                "enrollment.token_hours",
                f"enrollment.token_hours must be a number of hours in (0, {MAX_TOKEN_HOURS:g}]",
            )

    def missing(self) -> list[str]:
        """The keys enrollment needs that are not set (empty: enrollment is on)."""
        needed = ("broker_url", "password_file", "broker_pid_file", "keyset")
        return [f"enrollment.{name}" for name in needed if getattr(self, name) is None]


@dataclass(frozen=True)
class IssuedEnrollment:
    """A device put in the registry with its one-time token (shown once)."""

    device: RegisteredDevice
    token: str
    expires_at: float


@dataclass(frozen=True)
class EnrollRequest:
    """What an enrolling device sends.

    Attributes:
        token: Its one-time enrollment token.
        device_id: Its id (the token must have been issued for it).
        password: The broker password it made for itself, or None ...
        csr: ... a certificate signing request (PEM, CN = its id) for mutual TLS.
    """

    token: str
    device_id: str
    password: str | None = None
    csr: str | None = None


@dataclass(frozen=True)
class EnrollGrant:
    """What an enrolled device receives: all it needs for its ``agent.toml``.

    Attributes:
        device_id: Its id, which is its broker username.
        broker_url: Where its broker is.
        broker_ca: The broker's CA certificate (PEM text), or None (system CAs).
        keyset: The signed key set's bytes: its initial trust anchor.
        fleet: Its fleet id, or None.
        certificate: Its client certificate (PEM) when it sent a CSR, else None.
    """

    device_id: str
    broker_url: str
    broker_ca: str | None
    keyset: bytes
    fleet: str | None
    certificate: str | None = None

    @property
    def keyset_b64(self) -> str:
        """The key set as base64 (how JSON carries it)."""
        return base64.b64encode(self.keyset).decode("ascii")


class EnrollmentDesk:
    """Issues enrollment tokens, enrolls devices and revokes them (module docstring).

    Args:
        store: The registry lives in it (and the audit log).
        settings: The ``[enrollment]`` table.
        clock: Unix seconds (a fake in tests).
        forget: Clears a revoked device's retained status on the broker (the
            service's :meth:`~coordinator.link.hub.MqttHub.forget_device`): mosquitto
            sends no Last Will for a device it drops on a reload, so without it the
            fleet view would keep the device online.
        ca: The fleet's CA, for devices that enroll with a CSR (mutual TLS); None:
            password accounts only.
    """

    def __init__(
        self,
        store: Store,
        settings: EnrollmentSettings,
        *,
        clock: Callable[[], float] = time.time,
        forget: Callable[[str], object] | None = None,
        ca: DeviceCa | None = None,
    ) -> None:
        """Keep the store and the settings."""
        self._store = store
        self._settings = settings
        self._clock = clock
        self._forget = forget
        self._ca = ca
        self._accounts = threading.Lock()

    @property
    def settings(self) -> EnrollmentSettings:
        """The ``[enrollment]`` table."""
        return self._settings

    def registry(self) -> list[RegisteredDevice]:
        """Every enrolled (pending, accepted or revoked) device, sorted by id."""
        return self._store.registry()

    def issue(
        self, device_id: str, *, expires_in_s: float | None, actor: Actor
    ) -> IssuedEnrollment:
        """Put ``device_id`` in the registry as pending and issue its token.

        Args:
            device_id: The device to enroll.
            expires_in_s: The token's lifetime; None: ``[enrollment] token_hours``.
            actor: The operator (audited).

        Raises:
            EnrollmentError: a malformed device id, or a lifetime outside
                (0, :data:`MAX_TOKEN_HOURS`].
            ConflictError: the device is enrolled (revoke it first).
            StoreError: the database failed.
        """
        _check_device_id(device_id)
        lifetime = self._settings.token_hours * 3600.0 if expires_in_s is None else expires_in_s
        if not math.isfinite(lifetime) or not 0 < lifetime <= MAX_TOKEN_HOURS * 3600.0:
            raise _fail(f"a token's lifetime must be in (0, {MAX_TOKEN_HOURS:g} h], not {lifetime}")
        now = self._clock()
        device, token = self._store.add_enrollment(
            device_id, actor=actor.name, at=now, expires_at=now + lifetime
        )
        self._audit(actor, "device.enroll", device_id, {"expires_at": now + lifetime})
        logger.info(
            "enrollment token issued for %s (valid %g s) by %s", device_id, lifetime, actor.name
        )
        return IssuedEnrollment(device, token, now + lifetime)

    def enroll(self, request: EnrollRequest) -> EnrollGrant:
        """Enroll a device that presents its token (see the module docstring).

        Raises:
            EnrollmentRefusedError: the token is unknown, used, expired or another
                device's, or the device is not pending.
            EnrollmentError: enrollment is not configured, a malformed device id or
                password, an unreadable key set or broker CA, or the broker account
                could not be created (the token is spent then: issue a new one).
            StoreError: the database failed.
        """
        settings = self._settings
        missing = settings.missing()
        if missing:
            raise _fail(
                f"enrollment is not configured on this coordinator: set {', '.join(missing)} "
                "under [enrollment] in coordinator.toml"
            )
        _check_device_id(request.device_id)
        credential = self._check_credential(request)
        grant = self._grant(request.device_id)  # before the token is spent
        self._store.redeem_enrollment(request.token, request.device_id, self._clock())
        spent = "its token is spent: fix the cause and issue a new one"
        try:
            with self._accounts:
                if request.password is not None:
                    assert settings.password_file is not None
                    assert settings.broker_pid_file is not None
                    add_account(settings.password_file, request.device_id, request.password)
                    reload_broker(settings.broker_pid_file)
                else:
                    assert self._ca is not None
                    assert request.csr is not None
                    issued = self._ca.issue(request.csr.encode("ascii"), request.device_id)
                    grant = replace(
                        grant,
                        certificate=issued.decode("ascii"),
                        broker_ca=grant.broker_ca or self._ca.certificate_pem(),
                    )
        except CoordinatorError as exc:
            raise _fail(
                f"the broker credential of {request.device_id} could not be made ({exc}); {spent}"
            ) from None
        self._store.accept_device(request.device_id, credential, self._clock())
        device = Actor(f"device:{request.device_id}", Role.VIEWER)
        self._audit(device, "device.accept", request.device_id, {"credential": credential.value})
        logger.info("device %s enrolled (%s)", request.device_id, credential.value)
        return grant

    def _check_credential(self, request: EnrollRequest) -> Credential:
        """The kind of credential the request brings, checked."""
        if (request.password is None) == (request.csr is None):
            raise _fail("an enrollment request carries exactly one of a password and a CSR")
        if request.password is not None:
            if not DEVICE_PASSWORD.fullmatch(request.password):
                raise _fail("the device's broker password must be 16-256 urlsafe characters")
            return Credential.PASSWORD
        if self._ca is None:
            raise _fail(
                "this coordinator has no CA for client certificates ([enrollment] ca_dir): "
                "enroll with a password"
            )
        assert request.csr is not None
        try:
            csr = x509.load_pem_x509_csr(request.csr.encode("ascii"))
            names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            valid = csr.is_signature_valid
        except (ValueError, UnicodeError) as exc:
            raise _fail(f"the CSR is not a PEM certificate signing request: {exc}") from None
        if not valid or [name.value for name in names] != [request.device_id]:
            raise _fail(f"the CSR must be self-signed with CN = {request.device_id!r}")
        return Credential.CERTIFICATE

    def revoke(self, device_id: str, *, actor: Actor) -> RegisteredDevice:
        """Remove a device's broker access, disconnecting it, then mark it revoked.

        Raises:
            NotFoundError: the device is not in the registry.
            EnrollmentError: its broker account could not be removed (nothing
                changed in the registry).
            StoreError: the database failed.
        """
        found = self._store.registered(device_id)
        if found is None:
            raise NotFoundError(f"device {device_id!r} is not in the registry")
        settings = self._settings
        if found.credential is not None:
            if settings.password_file is None or settings.broker_pid_file is None:
                raise _fail(
                    f"{device_id} has broker credentials but enrollment.password_file and "
                    "enrollment.broker_pid_file are not set: cannot remove them"
                )
            try:
                with self._accounts:
                    if found.credential is Credential.PASSWORD:
                        remove_account(settings.password_file, device_id)
                        reload_broker(settings.broker_pid_file)
                    else:
                        self._revoke_certificate(device_id, settings.broker_pid_file)
            except CoordinatorError as exc:
                raise _fail(f"could not remove the broker access of {device_id}: {exc}") from None
        revoked = self._store.revoke_device(device_id, self._clock())
        if self._store.device(device_id) is not None:  # seen: it is offline now
            self._store.upsert_device(device_id, online=False, at=self._clock())
        if self._forget is not None:
            self._forget(device_id)
        self._audit(actor, "device.revoke", device_id, {"credential": found.credential})
        logger.info("device %s revoked by %s", device_id, actor.name)
        return revoked

    def _revoke_certificate(self, device_id: str, pid_file: Path) -> None:
        """CRL and reload, evict the live connection, then CRL and reload again."""
        if self._ca is None:
            raise _fail(f"{device_id} has a certificate but this coordinator has no CA")
        self._ca.revoke(device_id)
        reload_broker(pid_file)
        assert self._settings.broker_url is not None
        with tempfile.TemporaryDirectory(prefix="fedge-evict-") as scratch:
            files = Path(scratch)
            cert_file, key_file, ca_file = (
                files / "evict.crt",
                files / "evict.key",
                files / "ca.crt",
            )
            key_pem, csr_pem = make_key_and_csr(device_id)
            cert_file.write_bytes(self._ca.issue(csr_pem, device_id))
            atomic_write(key_file, key_pem, mode=0o600)
            ca_file.write_text(self._ca.certificate_pem())
            try:
                evict(
                    self._settings.broker_url,
                    device_id,
                    ca_file=self._settings.broker_ca or ca_file,
                    cert_file=cert_file,
                    key_file=key_file,
                )
            finally:
                self._ca.revoke(device_id)  # the eviction certificate too
                reload_broker(pid_file)

    def _grant(self, device_id: str) -> EnrollGrant:
        settings = self._settings
        assert settings.keyset is not None
        assert settings.broker_url is not None
        try:
            keyset = read_bounded(
                settings.keyset, max_bytes=MAX_KEYSET_BYTES, error=EnrollmentError, what="key set"
            )
            verify_self_signed(SignedKeySet.from_bytes(keyset))
        except (CompressError, EnrollmentError) as exc:
            raise _fail(
                f"enrollment.keyset {settings.keyset} is not a signed key set: {exc}"
            ) from None
        ca = None
        if settings.broker_ca is not None:
            try:
                ca = settings.broker_ca.read_text(encoding="ascii")[:MAX_CA_BYTES]
            except (OSError, UnicodeError) as exc:
                raise _fail(
                    f"cannot read enrollment.broker_ca {settings.broker_ca}: {exc}"
                ) from None
        return EnrollGrant(device_id, settings.broker_url, ca, keyset, settings.fleet)

    def _audit(self, actor: Actor, action: str, target: str, detail: dict[str, object]) -> None:
        self._store.audit(actor.name, actor.role, action, target, detail=detail, at=self._clock())


def _check_device_id(device_id: str) -> None:
    if not is_valid_device_id(device_id):
        raise _fail(f"invalid device id {device_id[:80]!r}: 1-64 of [A-Za-z0-9_.-]")
