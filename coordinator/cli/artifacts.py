"""``fedge artifacts upload FILE`` and ``fedge artifacts list``.

``upload`` sends a signed ``.fedge`` file to the coordinator, which verifies it
against its trusted keys (``--trust`` in-process) before storing it; uploading the
same bytes again is harmless and returns the stored row. It prints the artifact's
sha256 (alone on stdout, for scripts), which ``fedge rollout create`` takes.
``list`` shows the stored artifacts, newest first. Both run over ``--api`` or
in-process (:mod:`coordinator.cli.operate`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from coordinator.cli.operate import operations, read_artifact, show_rows
from coordinator.cli.options import Connection, JsonOption, with_connection
from coordinator.cli.output import console, err_console, human_bytes, print_json, reported_errors
from coordinator.cli.service_views import artifacts_table, to_json
from coordinator.cli.views import safe_text
from coordinator.service.operations import CLI_ACTOR

__all__ = ["app"]

app = typer.Typer(
    help="Upload signed artifacts to the coordinator and list them.", no_args_is_help=True
)


@app.command("upload")
@with_connection
def upload(
    connection: Connection,
    file: Annotated[
        Path,
        typer.Argument(help="The signed .fedge artifact.", exists=True, dir_okay=False),
    ],
    as_json: JsonOption = False,
) -> None:
    """Upload a signed artifact; the coordinator verifies it before storing it."""
    with reported_errors(as_json=as_json):
        data = read_artifact(file)
        with operations(connection) as ops:
            row = ops.upload_artifact(data, actor=CLI_ACTOR)
    if as_json:
        print_json(to_json(row))
        return
    err_console.print(
        f"uploaded {safe_text(row.name)} v{row.version} ({human_bytes(row.size)})",
        highlight=False,
        markup=False,
    )
    console.print(row.sha256, highlight=False, markup=False)


@app.command("list")
@with_connection
def list_artifacts(connection: Connection, as_json: JsonOption = False) -> None:
    """List the stored artifacts, newest first."""
    show_rows(
        connection,
        lambda ops: ops.artifacts(),
        lambda rows: artifacts_table(rows, now=time.time()),
        as_json=as_json,
    )
