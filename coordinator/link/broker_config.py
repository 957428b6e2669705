"""A complete mosquitto configuration for a fedge fleet (``fedge broker config``).

Why a generated config: the ACL (:func:`edge_agent.protocol.mosquitto_acl`) keeps a
device to its own topics, but an ACL cannot restrict MQTT client ids. A broker that
lets a client choose its id lets a credentialed device connect with the
coordinator's id: the broker disconnects the real coordinator and hands the device
its persistent session. The config written here binds every client id to the
authenticated identity (``use_username_as_clientid true``; with client certificates
``use_identity_as_username true`` first makes the certificate's CN the username),
so a device connecting with any client id gets its own username as id and the
coordinator's session is out of its reach. The coordinator's client id is its
username too (:func:`coordinator.link.hub.hub_client_id`).

Workflow::

    setup = BrokerSetup(directory=Path("/etc/fedge/broker"), fleet_size=500)
    files = write_broker_config(setup)   # mosquitto.conf, acl, passwd, data/
    # then: fedge broker add-user coordinator --passwd <passwd>; one per device;
    # mosquitto -c <conf>

:func:`render_config` is pure (the text, every line preceded by a comment that
explains it); :func:`write_broker_config` writes the files. Each device account's
username is its device id; the coordinator service's is ``coordinator``; an
operator running one-shot commands (``fedge deploy --broker``) beside the service
needs an account of its own (``coordinator@<name>``, ``--operator``): with bound
client ids a second ``coordinator`` connection would disconnect the service.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from compress.fileio import atomic_write
from coordinator.errors import BrokerSetupError
from edge_agent.errors import TopicError
from edge_agent.protocol import COORDINATOR_SENDER, mosquitto_acl, operator_account

__all__ = [
    "MESSAGES_PER_DEVICE",
    "MIN_QUEUED_MESSAGES",
    "BrokerFiles",
    "BrokerSetup",
    "queue_size",
    "render_config",
    "write_broker_config",
]

logger = logging.getLogger(__name__)

MIN_QUEUED_MESSAGES = 1000
"""mosquitto's own default per-client queue; never generate less."""

MESSAGES_PER_DEVICE = 20
"""Queued messages per device the coordinator's queue must hold in a burst: a status,
telemetry windows, install reports and an update report's upload chunks, all at
the same moment from every device (e.g. the end of a federated round)."""

PLAIN_PORT = 1883
TLS_PORT = 8883


def queue_size(fleet_size: int) -> int:
    """``max_queued_messages`` for a fleet: max(1000, 20 x fleet size)."""
    return max(MIN_QUEUED_MESSAGES, MESSAGES_PER_DEVICE * fleet_size)


def _fail(message: str) -> BrokerSetupError:
    logger.error("broker config refused: %s", message)
    return BrokerSetupError(message)


@dataclass(frozen=True)
class BrokerSetup:
    """What the generated broker config is made from.

    Attributes:
        directory: Where the files go (made absolute; every path in the config is).
        port: The listener's port; None: 8883 with TLS, else 1883.
        bind: The listener's address; None: every interface.
        tls_cert: The server certificate (PEM); with ``tls_key`` the listener speaks
            TLS only.
        tls_key: The server certificate's private key.
        cafile: The CA that signs client certificates: with it every client must
            present one (mutual TLS), and its CN is the client's username.
        crlfile: The CA's certificate revocation list (``fedge ca revoke`` writes
            it): a client whose certificate it lists cannot connect. Needs ``cafile``.
        password_file: The mosquitto password file; None: ``<directory>/passwd``
            (created empty, mode 0600, if missing).
        fleet_size: How many devices; sizes ``max_queued_messages`` (:func:`queue_size`).
        operators: Operator names; each gets the account ``coordinator@<name>``
            with the coordinator's rights.
    """

    directory: Path
    port: int | None = None
    bind: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cafile: Path | None = None
    crlfile: Path | None = None
    password_file: Path | None = None
    fleet_size: int = 100
    operators: Sequence[str] = ()

    def __post_init__(self) -> None:
        """Check the settings; make every path absolute.

        Raises:
            BrokerSetupError: a port outside 1..65535, a fleet size below 1, a TLS
                certificate without its key (or the reverse), a CA without a server
                certificate, a CRL without a CA, a bad operator name, or a bind
                address with spaces.
        """
        if self.port is not None and not 1 <= self.port <= 65535:
            raise _fail(f"port must be 1..65535, got {self.port}")
        if self.fleet_size < 1:
            raise _fail(f"fleet size must be at least 1, got {self.fleet_size}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise _fail("a TLS listener needs both --tls-cert and --tls-key")
        if self.cafile is not None and self.tls_cert is None:
            raise _fail("client certificates (--cafile) need a TLS listener (--tls-cert/--tls-key)")
        if self.crlfile is not None and self.cafile is None:
            raise _fail("a revocation list (--crlfile) needs client certificates (--cafile)")
        if self.bind is not None and (not self.bind or any(c.isspace() for c in self.bind)):
            raise _fail(f"bad bind address {self.bind[:40]!r}")
        try:
            for name in self.operators:
                operator_account(name)
        except TopicError as exc:
            raise _fail(str(exc)) from None
        for field in ("directory", "tls_cert", "tls_key", "cafile", "crlfile", "password_file"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, Path(value).absolute())
        object.__setattr__(self, "operators", tuple(dict.fromkeys(self.operators)))

    @property
    def tls(self) -> bool:
        """Whether the listener speaks TLS."""
        return self.tls_cert is not None

    @property
    def listen_port(self) -> int:
        """The listener's port."""
        return self.port if self.port is not None else (TLS_PORT if self.tls else PLAIN_PORT)

    @property
    def passwords(self) -> Path:
        """The password file the config names."""
        return self.password_file or self.directory / "passwd"

    @property
    def acl(self) -> Path:
        """The ACL file written next to the config."""
        return self.directory / "acl"

    @property
    def data(self) -> Path:
        """mosquitto's persistence directory."""
        return self.directory / "data"

    @property
    def config(self) -> Path:
        """The mosquitto config file."""
        return self.directory / "mosquitto.conf"

    @property
    def pid_file(self) -> Path:
        """Where mosquitto writes its pid (the enrollment service reloads it through it)."""
        return self.directory / "mosquitto.pid"


@dataclass(frozen=True)
class BrokerFiles:
    """What :func:`write_broker_config` wrote (or found, for the password file)."""

    config: Path
    acl: Path
    passwords: Path
    data: Path


def _lines(setup: BrokerSetup) -> list[tuple[str, str]]:
    """(comment, line) pairs, in config order."""
    where = f"{setup.listen_port} {setup.bind}" if setup.bind else f"{setup.listen_port}"
    lines = [
        ("One listener; every setting below it applies to it.", f"listener {where}"),
    ]
    if setup.tls:
        lines += [
            ("TLS only: the broker's certificate ...", f"certfile {setup.tls_cert}"),
            ("... and its private key.", f"keyfile {setup.tls_key}"),
        ]
    if setup.cafile is not None:
        lines += [
            ("The CA whose client certificates are accepted.", f"cafile {setup.cafile}"),
            ("Mutual TLS: a client without a valid certificate cannot connect.",
             "require_certificate true"),
            ("The certificate's CN (the device id, or 'coordinator') is the username;\n"
             "no password is checked on this listener.", "use_identity_as_username true"),
        ]  # fmt: skip
    if setup.crlfile is not None:
        lines.append((
            "Revoked client certificates (fedge ca revoke); re-read on SIGHUP. Keep it\n"
            "fresh (fedge ca crl): once past its next-update time every client is refused.",
            f"crlfile {setup.crlfile}",
        ))  # fmt: skip
    lines += [
        ("The client id is replaced by the (authenticated) username, so no client can\n"
         "take another's id, connection or persistent session (not the coordinator's).",
         "use_username_as_clientid true"),
        ("No anonymous clients: every client authenticates.", "allow_anonymous false"),
        ("Accounts: the device id for a device, 'coordinator' for the service; add one\n"
         f"with: fedge broker add-user <username> --passwd {setup.passwords}",
         f"password_file {setup.passwords}"),
        ("Least privilege per account (fedge broker acl): a device publishes only on its\n"
         "own status/events/telemetry and reads only its own cmd/chunks and broadcasts.",
         f"acl_file {setup.acl}"),
        (f"Per-client queue: max(1000, {MESSAGES_PER_DEVICE} x {setup.fleet_size} devices), "
         "so a burst from\nthe whole fleet waits for the coordinator instead of being dropped.",
         f"max_queued_messages {queue_size(setup.fleet_size)}"),
        ("Keep retained statuses and persistent sessions (the coordinator's queue)\n"
         "across broker restarts ...", "persistence true"),
        ("... in this directory ...", f"persistence_location {setup.data}/"),
        ("... saved every minute (at most a minute lost on a crash).", "autosave_interval 60"),
        ("mosquitto's pid: the coordinator's enrollment (fedge device enroll/revoke,\n"
         "[enrollment] broker_pid_file) sends it SIGHUP to re-read the password file,\n"
         "which also disconnects a revoked device at once.", f"pid_file {setup.pid_file}"),
        ("Forget a persistent session whose client has been away for two weeks.",
         "persistent_client_expiration 14d"),
    ]  # fmt: skip
    return lines


def render_config(setup: BrokerSetup) -> str:
    """The mosquitto config text: every line preceded by the comment that explains it."""
    accounts = ", ".join((COORDINATOR_SENDER, *map(operator_account, setup.operators)))
    head = (
        "# mosquitto config for a fedge fleet, written by `fedge broker config`.\n"
        f"# Start it with: mosquitto -c {setup.config}\n"
        f"# Coordinator accounts (full access): {accounts}; every other account is a device.\n"
    )
    body = "".join(
        "".join(f"# {part}\n" for part in comment.split("\n")) + f"{line}\n"
        for comment, line in _lines(setup)
    )
    return f"{head}\n{body}"


def write_broker_config(setup: BrokerSetup, *, overwrite: bool = False) -> BrokerFiles:
    """Write ``mosquitto.conf`` and ``acl``; create ``data/`` and an empty password file.

    An existing password file is left as it is (it holds the accounts).

    Raises:
        BrokerSetupError: the config or ACL exists and ``overwrite`` is false, or a
            file cannot be written.
    """
    files = BrokerFiles(setup.config, setup.acl, setup.passwords, setup.data)
    if not overwrite:
        for path in (files.config, files.acl):
            if path.exists():
                raise _fail(f"{path} exists (pass --force to replace it)")
    try:
        setup.directory.mkdir(parents=True, exist_ok=True)
        files.data.mkdir(mode=0o700, exist_ok=True)
        atomic_write(files.acl, mosquitto_acl(setup.operators).encode())
        atomic_write(files.config, render_config(setup).encode())
        if not files.passwords.exists():
            atomic_write(files.passwords, b"", mode=0o600, overwrite=False)
    except OSError as exc:
        raise _fail(f"cannot write the broker config in {setup.directory}: {exc}") from None
    logger.info("wrote the mosquitto config %s (ACL %s)", files.config, files.acl)
    return files
