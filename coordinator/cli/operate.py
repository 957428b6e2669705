"""Where the operator's commands run: a coordinator's HTTP API, or in-process.

Every command that operates the fleet (``fedge devices``, ``telemetry``,
``presence``, ``audit``, ``artifacts``, ``deploy``, ``rollback``, ``rollout``,
``rounds``) is written once
against :class:`~coordinator.service.operations.Operations` and gets it from
:func:`operations`, given the :class:`~coordinator.cli.options.Connection` that
:func:`~coordinator.cli.options.with_connection` built from its options:

* ``--api URL`` (``FEDGE_API``) with ``--token`` (``FEDGE_TOKEN``): an
  :class:`~coordinator.service.api_client.ApiClient` talking to ``fedge coordinator
  serve``, which keeps running rollouts and runs after the command exits;
* ``--broker URL`` (``FEDGE_BROKER``) with ``--db`` (``FEDGE_DB``), ``--trust``
  and the broker's credentials: a :class:`~coordinator.service.fleet_service.FleetService`
  started in this process (:func:`~coordinator.service.local.local_service`) on the
  same SQLite state the long-running service uses (or, for ``fedge devices``
  without ``--db``, a temporary one removed when the command ends). A rollout or
  run it starts goes on only while the command runs, and resumes when a service
  next opens that database.

The options of the in-process mode (``--db``, ``--trust``, the broker's
credentials, ``fedge deploy --chunk-size``) are ignored with ``--api``, where the
service has its own.

A command that sends an artifact (``fedge rollout create``, ``fedge deploy``) takes
a ``.fedge`` file or the sha256 of an uploaded one: :func:`resolve_artifact` tells
which, and :func:`uploaded_sha256` uploads the file (the service verifies it
against its trusted keys: in-process, those of ``--trust``)::

    @with_connection
    def devices(connection: Connection, as_json: JsonOption = False) -> None:
        with reported_errors(as_json=as_json), operations(connection) as ops:
            rows = ops.devices()
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import click
import typer
from rich.table import Table

from compress.errors import ArtifactError
from compress.fileio import read_bounded
from coordinator.cli.options import Connection
from coordinator.cli.output import console, err_console, print_json, reported_errors
from coordinator.cli.service_views import to_json
from coordinator.cli.views import safe_text
from coordinator.service.api_client import ApiClient
from coordinator.service.operations import CLI_ACTOR, Operations
from edge_agent.protocol import DEFAULT_CHUNK_BYTES

__all__ = [
    "MAX_ARTIFACT_BYTES",
    "operations",
    "read_artifact",
    "resolve_artifact",
    "show_rows",
    "uploaded_sha256",
]

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")

MAX_ARTIFACT_BYTES = 512 << 20
"""Largest artifact file the CLI reads (the API's default upload limit)."""


@contextmanager
def operations(
    connection: Connection, *, chunk_size: int = DEFAULT_CHUNK_BYTES
) -> Iterator[Operations]:
    """The operations of a connection: an API client, or a started local service.

    Args:
        connection: Where to run (exactly one of ``api`` and ``broker`` is set).
        chunk_size: Bytes per payload chunk of the local service (not used with
            ``api``: the service has its own).

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
    from coordinator.service.local import local_service  # noqa: PLC0415

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
                chunk_size=chunk_size,
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


def resolve_artifact(artifact: str) -> str | bytes:
    """The sha256 ARTIFACT names (a ``str``), or the bytes of the file it names.

    Raises:
        typer.BadParameter: neither.
        ArtifactError: the file cannot be read.
    """
    path = Path(artifact)
    if _SHA256.fullmatch(artifact) and not path.exists():
        return artifact.lower()
    if path.exists():
        return read_artifact(path)
    raise typer.BadParameter(
        "neither a .fedge file nor the sha256 of an uploaded artifact", param_hint="ARTIFACT"
    )


def uploaded_sha256(ops: Operations, resolved: str | bytes, *, as_json: bool) -> str:
    """The sha256 of a resolved ARTIFACT, uploading its bytes first (idempotent).

    Says ``uploaded NAME vN (SHA256)`` on stderr unless ``as_json``.

    Raises:
        ArtifactRejectedError: the service refused the upload.
    """
    if isinstance(resolved, str):
        return resolved
    uploaded = ops.upload_artifact(resolved, actor=CLI_ACTOR)
    if not as_json:
        err_console.print(
            f"uploaded {safe_text(uploaded.name)} v{uploaded.version} ({uploaded.sha256})",
            highlight=False,
            markup=False,
        )
    return uploaded.sha256
