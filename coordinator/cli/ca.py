"""``fedge ca``: the fleet's small certificate authority for mutual TLS.

Front end of :mod:`coordinator.link.ca`. A typical setup::

    fedge ca init /etc/fedge/ca --name "acme fleet CA"
    fedge ca server-cert /etc/fedge/ca --host broker.acme.org \\
        --cert /etc/fedge/broker/server.crt --key /etc/fedge/broker/server.key
    fedge ca coordinator-cert /etc/fedge/ca --cert coord.crt --key coord.key
    fedge broker config --out /etc/fedge/broker --tls-cert ... --tls-key ... \\
        --cafile /etc/fedge/ca/ca.crt --crlfile /etc/fedge/ca/crl.pem
    fedge ca issue /etc/fedge/ca --csr cam-1.csr --device-id cam-1 --out cam-1.crt
    fedge ca revoke /etc/fedge/ca cam-1        # then: kill -HUP <mosquitto>
    fedge ca crl /etc/fedge/ca                 # daily, from cron (then SIGHUP)
    fedge ca list /etc/fedge/ca                # what was issued, what is revoked

A device makes its own key and CSR (``fedge-agent enroll`` does, with
:func:`edge_agent.transport.csr.make_key_and_csr`); its key never leaves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from compress.fileio import read_bounded
from coordinator.cli.output import console, print_json, reported_errors
from coordinator.errors import CertificateAuthorityError
from coordinator.link.ca import (
    CA_DAYS,
    CRL_DAYS,
    LEAF_DAYS,
    coordinator_certificate,
    init_ca,
    issue_certificate,
    issued_certificates,
    refresh_crl,
    revoke_certificate,
    save_pem,
    server_certificate,
)
from edge_agent.protocol import COORDINATOR_SENDER

app = typer.Typer(help="The fleet's certificate authority for mutual TLS.", no_args_is_help=True)

CaDir = Annotated[Path, typer.Argument(help="The CA directory (made by fedge ca init).")]
LeafDays = Annotated[
    int, typer.Option(min=1, help="Lifetime of the certificate in days (must end before the CA).")
]
CertOut = Annotated[
    Path, typer.Option("--cert", show_default=False, help="Write the certificate (PEM) here.")
]
KeyOut = Annotated[
    Path, typer.Option("--key", show_default=False, help="Write its private key here (mode 0600).")
]
Force = Annotated[bool, typer.Option("--force", help="Replace existing output files.")]
MAX_CSR_BYTES = 64 * 1024


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="Where to create the CA (created if missing).")],
    name: Annotated[str, typer.Option(help="The CA certificate's common name.")] = "fedge fleet CA",
    days: Annotated[int, typer.Option(min=1, help="Lifetime of the CA in days.")] = CA_DAYS,
) -> None:
    """Create a CA: ca.key (EC P-256, mode 0600), ca.crt, an empty crl.pem, index.json."""
    with reported_errors():
        files = init_ca(directory, name=name, days=days)
    console.print(f"CA {name!r} in {files.directory}: give {files.cert} to the broker (--cafile)")
    console.print(
        f"and to devices; the broker's --crlfile is {files.crl}. Keep {files.key} secret."
    )


@app.command("issue")
def issue(
    directory: CaDir,
    csr: Annotated[Path, typer.Option(show_default=False, help="The device's CSR (PEM).")],
    device_id: Annotated[
        str, typer.Option(show_default=False, help="The device id; must be the CSR's CN.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(show_default=False, help="Write the certificate here [standard output]."),
    ] = None,
    days: LeafDays = LEAF_DAYS,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Issue even if the device's certificates were revoked; replace --out."
        ),
    ] = False,
) -> None:
    """Sign a device's CSR: a client certificate whose CN (the MQTT username) is the id."""
    with reported_errors():
        csr_pem = read_bounded(csr, max_bytes=MAX_CSR_BYTES, error=CertificateAuthorityError,
                               what="CSR")  # fmt: skip
        cert = issue_certificate(directory, csr_pem, device_id=device_id, days=days, force=force)
        if out is None:
            typer.echo(cert.decode(), nl=False)
            return
        save_pem(out, cert, private=False, overwrite=force)
    console.print(f"wrote the certificate of {device_id} to {out} (valid {days} days)")


@app.command("server-cert")
def server_cert(
    directory: CaDir,
    host: Annotated[
        str,
        typer.Option(
            show_default=False,
            help="The broker's IP address or DNS name, as clients connect to it.",
        ),
    ],
    cert: CertOut,
    key: KeyOut,
    days: LeafDays = LEAF_DAYS,
    force: Force = False,
) -> None:
    """Make the broker's key and server certificate (for --tls-cert / --tls-key)."""
    with reported_errors():
        cert_pem, key_pem = server_certificate(directory, host, days=days)
        save_pem(key, key_pem, private=True, overwrite=force)
        save_pem(cert, cert_pem, private=False, overwrite=force)
    console.print(f"wrote the server certificate for {host} to {cert} and its key to {key}")


@app.command("coordinator-cert")
def coordinator_cert(
    directory: CaDir,
    cert: CertOut,
    key: KeyOut,
    account: Annotated[
        str,
        typer.Option(help="coordinator (the service) or coordinator@NAME (an operator)."),
    ] = COORDINATOR_SENDER,
    days: LeafDays = LEAF_DAYS,
    force: Force = False,
) -> None:
    """Make a key and client certificate for a coordinator account (full MQTT access)."""
    with reported_errors():
        cert_pem, key_pem = coordinator_certificate(directory, account=account, days=days)
        save_pem(key, key_pem, private=True, overwrite=force)
        save_pem(cert, cert_pem, private=False, overwrite=force)
    console.print(f"wrote the certificate of {account} to {cert} and its key to {key}")


@app.command("revoke")
def revoke(
    directory: CaDir,
    device_id: Annotated[
        str, typer.Argument(help="The device (or coordinator@NAME) whose certificates to revoke.")
    ],
) -> None:
    """Revoke every certificate of a device (or coordinator@NAME) and re-issue the CRL.

    Then SIGHUP the broker; a connection already open lasts until it restarts.
    """
    with reported_errors():
        crl = revoke_certificate(directory, device_id)
    console.print(f"revoked {device_id}; wrote {crl}")
    console.print("reload the broker so it reads the new CRL: kill -HUP <mosquitto pid>")


@app.command("crl")
def crl(directory: CaDir) -> None:
    """Re-issue the CRL (run daily from cron, then SIGHUP the broker).

    The broker refuses every client once its CRL is past its next-update time.
    """
    with reported_errors():
        path = refresh_crl(directory)
    console.print(f"wrote {path} (valid {CRL_DAYS} days); reload the broker: kill -HUP <pid>")


@app.command("list")
def list_certificates(
    directory: CaDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List every certificate the CA issued (kind, name, serial, validity, revocation)."""
    with reported_errors(as_json=as_json):
        records = issued_certificates(directory)
    if as_json:
        print_json({"certificates": [record.to_json() for record in records]})
        return
    table = Table(title="Certificates (times in UTC)", title_justify="left")
    for column in ("KIND", "NAME", "SERIAL", "NOT AFTER", "REVOKED"):
        table.add_column(column, no_wrap=column != "NAME", overflow="fold")
    for record in records:
        table.add_row(
            Text(record.kind),
            Text(record.name),
            Text(f"{record.serial:x}"[:16]),
            Text(record.not_after[:16]),
            Text(record.revoked_at[:16] if record.revoked_at else "", style="red"),
        )
    console.print(table)
