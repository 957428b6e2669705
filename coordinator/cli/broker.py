"""``fedge broker``: what the fleet's MQTT broker needs from fedge.

* ``config --out DIR`` writes a complete mosquitto setup
  (:mod:`coordinator.link.broker_config`): ``mosquitto.conf`` (one listener, TLS
  when a certificate is given, mutual TLS with ``--cafile``, revoked client
  certificates refused with ``--crlfile`` (``fedge ca``); no anonymous clients;
  every client id bound to the authenticated username, so no device can take the
  coordinator's connection or session; a per-client queue sized for the fleet;
  persistence), the ``acl`` file and an empty ``passwd`` file (mode 0600) unless
  ``--password-file`` names an existing one. Add the accounts with
  ``add-user USER --passwd DIR/passwd``: ``coordinator`` for the service, the device
  id for each device, ``coordinator@NAME`` for an operator given ``--operator NAME``.
  Then ``mosquitto -c DIR/mosquitto.conf``.
* ``add-user USERNAME --passwd FILE`` adds an account (or replaces its password)
  with ``mosquitto_passwd``, the password read from ``--secret-file`` or a hidden
  prompt and handed over on stdin (:mod:`coordinator.link.broker_accounts`); only
  device ids, ``coordinator`` and ``coordinator@NAME`` are accepted. mosquitto reads
  the file at start and on SIGHUP.
* ``acl`` prints the least-privilege mosquitto ACL (each device may publish only on
  its own status, events and telemetry topics and read only its own cmd and chunks
  topics and the broadcasts; the coordinator accounts read and write the whole
  tree); ``config`` writes the same text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.cli.output import console, reported_errors
from coordinator.link.broker_accounts import add_account
from coordinator.link.broker_config import (
    MESSAGES_PER_DEVICE,
    MIN_QUEUED_MESSAGES,
    BrokerSetup,
    write_broker_config,
)
from edge_agent.config.values import read_password
from edge_agent.protocol import mosquitto_acl

app = typer.Typer(help="Broker setup for a fedge fleet.", no_args_is_help=True)

OperatorOption = Annotated[
    list[str],
    typer.Option(
        "--operator",
        show_default=False,
        help="Add the account coordinator@NAME with the coordinator's rights, for an "
        "operator's one-shot commands beside the service; repeat for several.",
    ),
]


@app.command("acl")
def acl(operators: OperatorOption = []) -> None:  # noqa: B006 - Typer's list default
    """Print the mosquitto ACL file for a fedge fleet (least privilege per device)."""
    with reported_errors():
        typer.echo(mosquitto_acl(operators), nl=False)


@app.command("config")
def config(
    out: Annotated[
        Path, typer.Option("--out", "-o", show_default=False, help="Directory to write into.")
    ],
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, show_default=False, help="Listener port [1883; TLS 8883]."),
    ] = None,
    bind: Annotated[
        str | None,
        typer.Option(show_default=False, help="Listener address [every interface]."),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(show_default=False, help="Server certificate (PEM): the listener is TLS."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(show_default=False, help="The server certificate's key.")
    ] = None,
    cafile: Annotated[
        Path | None,
        typer.Option(
            show_default=False,
            help="CA of the client certificates: mutual TLS, the certificate's CN is the "
            "username (the device id, or coordinator).",
        ),
    ] = None,
    crlfile: Annotated[
        Path | None,
        typer.Option(
            show_default=False,
            help="The CA's revocation list (fedge ca revoke writes CA_DIR/crl.pem): a revoked "
            "client certificate cannot connect; needs --cafile.",
        ),
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option(
            show_default=False,
            help="mosquitto password file to use [DIR/passwd, created empty if missing].",
        ),
    ] = None,
    fleet_size: Annotated[
        int,
        typer.Option(
            min=1,
            help=f"Devices in the fleet: the per-client queue holds "
            f"max({MIN_QUEUED_MESSAGES}, {MESSAGES_PER_DEVICE} x this) messages.",
        ),
    ] = 100,
    operators: OperatorOption = [],  # noqa: B006 - Typer's list default
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing mosquitto.conf and acl.")
    ] = False,
) -> None:
    """Write a complete mosquitto config for the fleet: mosquitto.conf, acl, passwd."""
    with reported_errors():
        setup = BrokerSetup(
            directory=out,
            port=port,
            bind=bind,
            tls_cert=tls_cert,
            tls_key=tls_key,
            cafile=cafile,
            crlfile=crlfile,
            password_file=password_file,
            fleet_size=fleet_size,
            operators=tuple(operators),
        )
        files = write_broker_config(setup, overwrite=force)
    console.print(f"wrote {files.config} and {files.acl}")
    console.print(f"add accounts: fedge broker add-user <username> --passwd {files.passwords}")
    console.print(f"start: mosquitto -c {files.config}")


@app.command("add-user")
def add_user(
    username: Annotated[
        str, typer.Argument(help="A device id, coordinator, or coordinator@NAME (an operator).")
    ],
    passwd: Annotated[
        Path,
        typer.Option(show_default=False, help="The mosquitto password file (created if missing)."),
    ],
    secret_file: Annotated[
        Path | None,
        typer.Option(show_default=False, help="Read the password from this file [prompt]."),
    ] = None,
) -> None:
    """Add an account to the broker's password file (or set a new password for it)."""
    with reported_errors():
        if secret_file is not None:
            secret = read_password(secret_file, "", key="--secret-file")
        else:
            secret = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        add_account(passwd, username, secret)
    console.print(f"{username} set in {passwd}; reload mosquitto (SIGHUP) to use it")
