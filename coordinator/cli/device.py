"""``fedge device``: enroll devices with one-time tokens, list them, revoke them.

These commands run through a coordinator service (``--api URL --token T``, or
``FEDGE_API`` and ``FEDGE_TOKEN``; an operator token): the service holds the broker's
password file and the key set (``[enrollment]`` in ``coordinator.toml``, see
:mod:`coordinator.service.enrollment`).

* ``enroll DEVICE_ID [--expires-in 1h]`` puts the device in the registry (pending)
  and prints its one-time enrollment token alone on stdout (shown once; valid
  ``[enrollment] token_hours`` unless ``--expires-in`` says otherwise), and on
  stderr the command to run on the device:
  ``fedge-agent enroll --token T --coordinator URL --device-id DEVICE_ID``.
* ``list [--json]`` shows the registry: pending, accepted and revoked devices.
* ``revoke DEVICE_ID`` removes the device's broker account: mosquitto drops its
  connection at once and refuses it from then on.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from coordinator.cli.options import Connection, JsonOption, with_api
from coordinator.cli.output import console, err_console, print_json, reported_errors
from coordinator.cli.service import parse_lifetime
from coordinator.cli.service_views import to_json
from coordinator.cli.views import humanize_age, safe_text
from coordinator.service.api_client import ApiClient
from coordinator.service.store.registry import RegisteredDevice

__all__ = ["app"]

app = typer.Typer(help="Enroll, list and revoke devices (through the service's API).")

DeviceId = Annotated[str, typer.Argument(help="The device id (its broker username).")]


def _client(connection: Connection) -> ApiClient:
    assert connection.api is not None  # with_api requires it
    return ApiClient(connection.api, connection.token or "", timeout=connection.api_timeout)


@with_api
def enroll(
    connection: Connection,
    device_id: DeviceId,
    expires_in: Annotated[
        str | None,
        typer.Option(
            "--expires-in",
            show_default=False,
            help="How long the token is valid (90m, 12h, 2d) [the service's token_hours].",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Enroll a device: print its one-time enrollment token (shown once)."""
    with reported_errors(as_json=as_json):
        lifetime = None if expires_in is None else parse_lifetime(expires_in)
        with _client(connection) as client:
            issued = client.enroll_device(device_id, expires_in_s=lifetime)
    if as_json:
        print_json(to_json(issued))
        return
    typer.echo(issued.token)
    when = datetime.fromtimestamp(issued.expires_at, UTC).isoformat(timespec="seconds")
    err_console.print(
        f"enrollment token for {device_id} (one use, expires {when}); on the device run:\n"
        f"  fedge-agent enroll --token TOKEN --coordinator {connection.api} "
        f"--device-id {device_id}",
        highlight=False,
        markup=False,
    )


@with_api
def revoke(connection: Connection, device_id: DeviceId, as_json: JsonOption = False) -> None:
    """Revoke a device: its broker account goes, it is disconnected and cannot reconnect."""
    with reported_errors(as_json=as_json), _client(connection) as client:
        row = client.revoke_device(device_id)
    if as_json:
        print_json(to_json(row))
    else:
        console.print(f"revoked {safe_text(row.device_id)}", highlight=False, markup=False)


@with_api
def list_devices(connection: Connection, as_json: JsonOption = False) -> None:
    """List the device registry: pending, accepted and revoked devices."""
    with reported_errors(as_json=as_json), _client(connection) as client:
        rows = client.enrollments()
    if as_json:
        print_json(to_json(rows))
    else:
        console.print(registry_table(rows, now=time.time()))


def registry_table(rows: list[RegisteredDevice], *, now: float) -> Table:
    """The registry as a table: device, state, credential, enrolled by, last change."""
    table = Table(title="Device registry")
    for column in ("device", "state", "credential", "enrolled by", "changed"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            Text(safe_text(row.device_id)),
            Text(row.state.value),
            Text(row.credential.value if row.credential else "-"),
            Text(safe_text(row.created_by)),
            Text(humanize_age(row.updated_at, now)),
        )
    return table


app.command("enroll")(enroll)
app.command("revoke")(revoke)
app.command("list")(list_devices)
