"""``fedge devices``, ``telemetry DEVICE``, ``presence DEVICE``, ``audit``: read-only views.

Each command asks :class:`~coordinator.operations.Operations` (over ``--api`` or
in-process over ``--broker``, see :mod:`coordinator.cli.operate`) and prints a
table, or the rows as JSON with ``--json``:

* ``devices``: every device the coordinator has seen, with its model and tags;
* ``telemetry DEVICE [--limit N]``: the device's latest telemetry windows;
* ``presence DEVICE [--limit N]``: when it went online and offline, and for how long;
* ``audit [--limit N]``: the latest operator actions, oldest first.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from coordinator.cli.fleet import JsonOption
from coordinator.cli.operate import Connection, operations, with_connection
from coordinator.cli.output import console, print_json, reported_errors
from coordinator.cli.service_views import (
    audit_table,
    devices_table,
    presence_table,
    telemetry_table,
    to_json,
)

__all__ = ["audit", "devices", "presence", "telemetry"]

MAX_LIMIT = 1000
"""Largest ``--limit`` (the API's)."""


@with_connection
def devices(connection: Connection, as_json: JsonOption = False) -> None:
    """List the devices the coordinator has seen: online or not, model, tags."""
    with reported_errors(as_json=as_json), operations(connection) as ops:
        rows = ops.devices()
    if as_json:
        print_json(to_json(rows))
    else:
        console.print(devices_table(rows, now=time.time()))


@with_connection
def telemetry(
    connection: Connection,
    device: Annotated[str, typer.Argument(help="Device id.", show_default=False)],
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=MAX_LIMIT, help="Most windows to show.")
    ] = 20,
    as_json: JsonOption = False,
) -> None:
    """Show a device's latest telemetry windows (newest first): calls, errors, latency."""
    with reported_errors(as_json=as_json), operations(connection) as ops:
        rows = ops.telemetry(device, limit=limit)
    if as_json:
        print_json(to_json(rows))
    else:
        console.print(telemetry_table(device, rows))


@with_connection
def presence(
    connection: Connection,
    device: Annotated[str, typer.Argument(help="Device id.", show_default=False)],
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=MAX_LIMIT, help="Most changes to show.")
    ] = 20,
    as_json: JsonOption = False,
) -> None:
    """Show when a device went online and offline (newest first), and for how long."""
    with reported_errors(as_json=as_json), operations(connection) as ops:
        rows = ops.presence(device, limit=limit)
    if as_json:
        print_json(to_json(rows))
    else:
        console.print(presence_table(device, rows, now=time.time()))


@with_connection
def audit(
    connection: Connection,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=MAX_LIMIT, help="Most actions to show.")
    ] = 50,
    as_json: JsonOption = False,
) -> None:
    """Show the latest operator actions (oldest first): who did what, when."""
    with reported_errors(as_json=as_json), operations(connection) as ops:
        rows = ops.audit_log(limit=limit)
    if as_json:
        print_json(to_json(rows))
    else:
        console.print(audit_table(rows))
