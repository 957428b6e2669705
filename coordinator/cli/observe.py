"""``fedge devices``, ``telemetry DEVICE``, ``presence DEVICE``, ``audit``: read-only views.

Each command asks :class:`~coordinator.service.operations.Operations` (over ``--api`` or
in-process over ``--broker``, see :mod:`coordinator.cli.operate`) and prints a
table, or the rows as JSON with ``--json``:

* ``devices`` (hidden alias ``fleet``): every device the coordinator has seen,
  with its agent, models, tags and training data; ``--json`` gives
  ``{"devices": [...]}`` (:func:`~coordinator.cli.device_views.device_json`).
  In-process without ``--db`` it runs on a temporary database, so it lists the
  devices whose status the broker holds;
* ``telemetry DEVICE [--limit N]``: the device's latest telemetry windows;
* ``presence DEVICE [--limit N]``: when it went online and offline, and for how long;
* ``audit [--limit N]``: the latest operator actions, oldest first.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from coordinator.cli.device_views import devices_json, devices_table
from coordinator.cli.operate import operations, show_rows
from coordinator.cli.options import (
    Connection,
    JsonOption,
    with_connection,
    with_snapshot_connection,
)
from coordinator.cli.output import console, print_json, reported_errors
from coordinator.cli.service_views import audit_table, presence_table, telemetry_table

__all__ = ["audit", "devices", "presence", "telemetry"]

MAX_LIMIT = 1000
"""Largest ``--limit`` (the API's)."""

DeviceArgument = Annotated[str, typer.Argument(help="Device id.", show_default=False)]


def _limit(what: str) -> Any:
    """The ``--limit`` option, for ``what`` (typer's ``OptionInfo``)."""
    return typer.Option("--limit", "-n", min=1, max=MAX_LIMIT, help=f"Most {what} to show.")


@with_snapshot_connection
def devices(connection: Connection, as_json: JsonOption = False) -> None:
    """List the devices: online or not, agent, models, tags, training data, last seen."""
    with reported_errors(as_json=as_json), operations(connection) as ops:
        rows = ops.devices()
    now = time.time()
    if as_json:
        print_json(devices_json(rows, now))
    else:
        console.print(devices_table(rows, now=now))


@with_connection
def telemetry(
    connection: Connection,
    device: DeviceArgument,
    limit: Annotated[int, _limit("windows")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Show a device's latest telemetry windows (newest first): calls, errors, latency."""
    show_rows(
        connection,
        lambda ops: ops.telemetry(device, limit=limit),
        lambda rows: telemetry_table(device, rows),
        as_json=as_json,
    )


@with_connection
def presence(
    connection: Connection,
    device: DeviceArgument,
    limit: Annotated[int, _limit("changes")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Show when a device went online and offline (newest first), and for how long."""
    show_rows(
        connection,
        lambda ops: ops.presence(device, limit=limit),
        lambda rows: presence_table(device, rows, now=time.time()),
        as_json=as_json,
    )


@with_connection
def audit(
    connection: Connection,
    limit: Annotated[int, _limit("actions")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Show the latest operator actions (oldest first): who did what, when."""
    show_rows(connection, lambda ops: ops.audit_log(limit=limit), audit_table, as_json=as_json)
