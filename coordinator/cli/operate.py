"""Where the operator's commands run: a coordinator's HTTP API, or in-process.

Every command that operates the fleet (``fedge devices``, ``telemetry``,
``presence``, ``audit``, ``artifacts``, ``rollout``, ``rounds``) is written once
against :class:`~coordinator.service.operations.Operations` and gets it from
:func:`operations`, given the :class:`~coordinator.cli.options.Connection` that
:func:`~coordinator.cli.options.with_connection` built from its options:

* ``--api URL`` (``FEDGE_API``) with ``--token`` (``FEDGE_TOKEN``): an
  :class:`~coordinator.service.api_client.ApiClient` talking to ``fedge coordinator
  serve``, which keeps running rollouts and runs after the command exits;
* ``--broker URL`` (``FEDGE_BROKER``) with ``--db`` (``FEDGE_DB``), ``--trust``
  and the broker's credentials: a :class:`~coordinator.service.fleet_service.FleetService`
  started in this process (:func:`~coordinator.service.fleet_service.local_service`) on the
  same SQLite state the long-running service uses (or, for ``fedge devices``
  without ``--db``, a temporary one removed when the command ends). A rollout or
  run it starts goes on only while the command runs, and resumes when a service
  next opens that database.

The options of the in-process mode (``--db``, ``--trust``, the broker's
credentials) are ignored with ``--api``, where the service has its own::

    @with_connection
    def devices(connection: Connection, as_json: JsonOption = False) -> None:
        with reported_errors(as_json=as_json), operations(connection) as ops:
            rows = ops.devices()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import click
from rich.table import Table

from compress.errors import ArtifactError
from compress.fileio import read_bounded
from coordinator.cli.options import Connection
from coordinator.cli.output import console, print_json, reported_errors
from coordinator.cli.service_views import to_json
from coordinator.service.api_client import ApiClient
from coordinator.service.operations import Operations

__all__ = ["MAX_ARTIFACT_BYTES", "operations", "read_artifact", "show_rows"]

MAX_ARTIFACT_BYTES = 512 << 20
"""Largest artifact file the CLI reads (the API's default upload limit)."""


@contextmanager
def operations(connection: Connection) -> Iterator[Operations]:
    """The operations of a connection: an API client, or a started local service.

    Args:
        connection: Where to run (exactly one of ``api`` and ``broker`` is set).

    Yields:
        An :class:`Operations` object, closed or stopped when the block ends.

    Raises:
        ApiError: a bad API URL or token.
        ConfigError: bad broker settings or an unreadable password file.
        BrokerError: the broker cannot be reached.
        StoreError: the database cannot be opened.
        CompressError: a ``--trust`` key cannot be read.
    """
    if connection.api is not None:
        with ApiClient(
            connection.api, connection.token or "", timeout=connection.api_timeout
        ) as client:
            yield client
        return
    if connection.broker is None:  # with_connection makes sure one is set
        raise click.UsageError("give --api URL or --broker URL")
    # Imported here: the service brings Flower and the rollout engine, which the
    # remote mode does not need.
    from coordinator.service.fleet_service import local_service  # noqa: PLC0415

    broker = connection.broker_config()
    with ExitStack() as stack:
        db = connection.db
        if db is None:
            db = Path(stack.enter_context(TemporaryDirectory(prefix="fedge-"))) / "state.db"
        service = stack.enter_context(
            local_service(
                broker,
                db=db,
                trust=connection.trust,
                threshold=connection.threshold,
                timeout=connection.connect_timeout,
            )
        )
        yield service


def read_artifact(path: Path) -> bytes:
    """Read a ``.fedge`` file to upload.

    Raises:
        ArtifactError: not a regular file, unreadable, or over
            :data:`MAX_ARTIFACT_BYTES`.
    """
    return read_bounded(path, max_bytes=MAX_ARTIFACT_BYTES, error=ArtifactError, what="artifact")


def show_rows(
    connection: Connection,
    query: Callable[[Operations], Sequence[Any]],
    table: Callable[[Sequence[Any]], Table],
    *,
    as_json: bool,
) -> None:
    """Ask the query, then print its rows as JSON (``--json``), or as the table.

    The body of the listing commands (``fedge telemetry``, ``artifacts list``, ...);
    an error ends the command as :func:`~coordinator.cli.output.reported_errors` says.
    """
    with reported_errors(as_json=as_json), operations(connection) as ops:
        rows = query(ops)
    if as_json:
        print_json(to_json(rows))
    else:
        console.print(table(rows))
