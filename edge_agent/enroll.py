"""``fedge-agent enroll``: turn a one-time token into a ready ``agent.toml``.

Workflow (:func:`enroll`), on the device, with the token an operator got from
``fedge device enroll DEVICE_ID``:

1. Make the device's broker credential HERE: a random password (32 random bytes,
   urlsafe base64) written to ``OUT/broker.password`` (mode 0600). It leaves the
   device once, inside the enrollment request, over the coordinator's API (use an
   ``https://`` URL for anything but a lab: the request carries the token and the
   password). With ``certificate`` (mutual TLS), an EC P-256 key pair instead: the
   private key stays in ``OUT/device.key`` (mode 0600) and only a certificate
   signing request (CN = the device id) is sent.
2. ``POST {coordinator}/v1/enroll`` with ``{"token", "device_id", "password"}``
   (or ``"csr"`` instead of the password)
   (stdlib :mod:`urllib`, so the agent stays light). A 401 means the token is
   unknown, used, expired or another device's; 429 means too many failures from
   this address. Either raises :class:`~edge_agent.errors.EnrollmentFailedError`.
3. Check what came back: the signed key set must be signed by a threshold of its
   own keys and unexpired (the coordinator is trusted for this first key set, as
   for the token itself: trust on first use, over the channel the operator chose);
   the broker URL and the fleet id must be well formed.
4. Write, atomically: ``OUT/keyset.json`` (the signed key set, ``trust.keyset``),
   ``OUT/broker-ca.crt`` when the broker uses a private CA, ``OUT/device.crt`` (the
   certificate the coordinator's CA issued, mutual TLS only), and ``OUT/agent.toml``
   naming them all,
   ``data_dir = OUT/data``. ``fedge-agent run --config OUT/agent.toml`` starts the
   enrolled agent as is.

An existing ``agent.toml`` is not replaced without ``force``. Every failure is
logged and raised as :class:`~edge_agent.errors.EnrollmentFailedError` with one line
that says what to do.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.fileio import atomic_write
from compress.keyset import SignedKeySet, check_not_expired, verify_self_signed
from edge_agent.config.agent import parse_broker_url
from edge_agent.errors import ConfigError, EnrollmentFailedError, TopicError
from edge_agent.protocol import is_valid_device_id
from edge_agent.protocol.topics import validate_fleet_id
from edge_agent.transport.csr import make_key_and_csr

__all__ = ["ENROLL_ROUTE", "Enrolled", "enroll", "new_password"]

logger = logging.getLogger(__name__)

ENROLL_ROUTE = "/v1/enroll"
"""The coordinator API's enrollment route."""

MAX_ANSWER_BYTES = 4 << 20
"""Largest enrollment answer read."""

DEFAULT_TIMEOUT_S = 30.0


def _fail(message: str) -> EnrollmentFailedError:
    logger.error("enrollment failed: %s", message)
    return EnrollmentFailedError(message)


def new_password() -> str:
    """A fresh broker password: 32 random bytes, urlsafe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Enrolled:
    """What :func:`enroll` wrote.

    Attributes:
        config: The ready ``agent.toml``.
        broker_url: The broker the device will connect to.
        fleet: Its fleet id, or None.
        keyset_version: The version of the key set it starts from.
    """

    config: Path
    broker_url: str
    fleet: str | None
    keyset_version: int


def enroll(
    coordinator: str,
    token: str,
    device_id: str,
    out: Path,
    *,
    force: bool = False,
    certificate: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    now: datetime | None = None,
) -> Enrolled:
    """Enroll this device (see the module docstring).

    Args:
        coordinator: The coordinator API's base URL (``https://host:8780``).
        token: The one-time enrollment token.
        device_id: This device's id (the token was issued for it).
        out: Directory to write into (created, mode 0700).
        force: Replace an existing ``agent.toml``.
        certificate: Enroll for mutual TLS: a key pair and a CSR instead of a password.
        timeout_s: Seconds to wait for the coordinator.
        now: The current time (for the key set's expiry); default the clock.

    Raises:
        EnrollmentFailedError: a bad device id or URL, an existing ``agent.toml``,
            the coordinator refused or could not be reached, its answer is
            malformed, or a file cannot be written.
    """
    if not is_valid_device_id(device_id):
        raise _fail(f"invalid device id {device_id[:80]!r}: 1-64 of [A-Za-z0-9_.-]")
    if not coordinator.startswith(("https://", "http://")):
        raise _fail(f"--coordinator must be an http(s):// URL, not {coordinator[:80]!r}")
    out = out.absolute()
    config = out / "agent.toml"
    if config.exists() and not force:
        raise _fail(f"{config} exists: pass --force to replace it (the device is re-enrolled)")
    credential = _Credential.make(device_id, certificate=certificate)
    answer = _post(
        coordinator.rstrip("/") + ENROLL_ROUTE,
        {"token": token, "device_id": device_id, **credential.request},
        timeout_s,
    )
    grant = _Grant.read(answer, now or datetime.now(UTC), certificate=certificate)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        login = credential.write(out, grant.certificate)
        keyset = out / "keyset.json"
        atomic_write(keyset, grant.keyset, mode=0o644)
        ca = None
        if grant.broker_ca is not None:
            ca = out / "broker-ca.crt"
            atomic_write(ca, grant.broker_ca.encode("ascii"), mode=0o644)
        text = _agent_toml(device_id, out / "data", grant, login=login, ca=ca, keyset=keyset)
        atomic_write(config, text.encode(), mode=0o600)
    except (OSError, UnicodeError) as exc:
        raise _fail(f"cannot write the enrollment files in {out}: {exc}") from None
    logger.info("enrolled %s: wrote %s (broker %s)", device_id, config, grant.broker_url)
    return Enrolled(config, grant.broker_url, grant.fleet, grant.signed.keyset.version)


def _post(url: str, body: dict[str, str], timeout_s: float) -> Any:
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked: http(s) only
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            data = response.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise _fail(_refusal(exc)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _fail(f"cannot reach the coordinator at {url}: {reason}") from None
    if len(data) > MAX_ANSWER_BYTES:
        raise _fail(f"the coordinator's answer is over {MAX_ANSWER_BYTES} bytes")
    try:
        return json.loads(data)
    except ValueError:
        raise _fail(f"the coordinator at {url} answered without JSON: is the URL right?") from None


def _refusal(exc: urllib.error.HTTPError) -> str:
    """One line for an error answer of the enrollment route."""
    message = ""
    try:
        error = json.loads(exc.read(64 << 10)).get("error", {})
        message = str(error.get("message", ""))[:300]
    except (ValueError, AttributeError, OSError):
        pass
    if exc.code == 401:
        return (
            "the coordinator refused the token (unknown, used, expired or issued for another "
            "device): ask the operator for a new one (fedge device enroll ID)"
        )
    if exc.code == 429:
        return f"too many failed enrollments from this address; retry later ({message})"
    return f"the coordinator refused the enrollment ({exc.code}): {message or exc.reason}"


@dataclass(frozen=True)
class _Credential:
    """The device's broker credential, made here: a password, or a key and its CSR."""

    request: dict[str, str]
    secret: bytes

    @classmethod
    def make(cls, device_id: str, *, certificate: bool) -> _Credential:
        if not certificate:
            password = new_password()
            return cls({"password": password}, f"{password}\n".encode())
        key_pem, csr_pem = make_key_and_csr(device_id)
        return cls({"csr": csr_pem.decode("ascii")}, key_pem)

    def write(self, out: Path, certificate: str | None) -> dict[str, Path]:
        """Write the credential; give the ``[broker]`` keys that name its files."""
        if certificate is None:
            secret = out / "broker.password"
            atomic_write(secret, self.secret, mode=0o600)
            return {"password_file": secret}
        key, cert = out / "device.key", out / "device.crt"
        atomic_write(key, self.secret, mode=0o600)
        atomic_write(cert, certificate.encode("ascii"), mode=0o644)
        return {"cert_file": cert, "key_file": key}


@dataclass(frozen=True)
class _Grant:
    broker_url: str
    broker_ca: str | None
    keyset: bytes
    signed: SignedKeySet
    fleet: str | None
    certificate: str | None

    @classmethod
    def read(cls, answer: Any, now: datetime, *, certificate: bool) -> _Grant:
        """Check the coordinator's answer (module docstring, step 3)."""
        if not isinstance(answer, dict):
            raise _fail("the coordinator's answer is not a JSON object")
        try:
            broker_url = answer["broker_url"]
            parse_broker_url(broker_url)
            fleet = answer.get("fleet")
            if fleet is not None:
                validate_fleet_id(fleet)
            ca = answer.get("broker_ca")
            if ca is not None and not _is_pem(ca):
                raise _fail("the coordinator sent a broker CA that is not a PEM certificate")
            issued = answer.get("certificate") if certificate else None
            if certificate and not _is_pem(issued):
                raise _fail("the coordinator sent no certificate for the CSR")
            keyset = base64.b64decode(answer["keyset"], validate=True)
            signed = SignedKeySet.from_bytes(keyset)
            check_not_expired(verify_self_signed(signed), now=now)
        except (KeyError, TypeError) as exc:
            raise _fail(f"the coordinator's answer lacks {exc}") from None
        except (ConfigError, TopicError, binascii.Error, CompressError) as exc:
            raise _fail(f"the coordinator's answer is malformed: {exc}") from None
        return cls(broker_url, ca, keyset, signed, fleet, issued)


def _is_pem(text: object) -> bool:
    return isinstance(text, str) and text.lstrip().startswith("-----BEGIN CERTIFICATE-----")


def _toml(value: str | Path) -> str:
    """A TOML basic string (JSON's escaping is TOML's)."""
    return json.dumps(str(value))


def _agent_toml(
    device_id: str,
    data_dir: Path,
    grant: _Grant,
    *,
    login: dict[str, Path],
    ca: Path | None,
    keyset: Path,
) -> str:
    keyset_doc = grant.signed.keyset
    lines = [
        f"# Written by `fedge-agent enroll` for {device_id}; start with:",
        f"#   fedge-agent run --config {data_dir.parent / 'agent.toml'}",
        f"device_id = {_toml(device_id)}",
        f"data_dir = {_toml(data_dir)}",
        "",
        "[broker]",
        f"url = {_toml(grant.broker_url)}",
        "# made on this device at enrollment (a password: the broker knows only its hash)",
        *(f"{key} = {_toml(path)}" for key, path in login.items()),
    ]
    if ca is not None:
        lines.append(f"ca_file = {_toml(ca)}")
    lines += [
        "",
        "[trust]",
        f"# the signed key set v{keyset_doc.version} (rotations arrive over MQTT)",
        f"keyset = {_toml(keyset)}",
    ]
    if grant.fleet is not None:
        lines.append(f"fleet = {_toml(grant.fleet)}")
    return "\n".join(lines) + "\n"
