"""``fedge model lineage NAME``: where a model came from, newest to oldest.

The chain starts at the highest version of NAME and follows each manifest's
``lineage.parent`` (:func:`coordinator.delivery.lineage.lineage_chain`) through

* the coordinator's stored artifacts (``--api URL`` or ``--broker URL``, as every
  fleet command: the artifacts listing, whose rows carry each manifest), or
* the ``.fedge`` files of a directory (``--dir DIR``, offline; signatures are not
  checked: this shows records, it does not decide trust).

Each line shows the version, payload sha256, creation time, trigger, run (rounds,
strategy, codec, participants), data window and code version; the end of the chain
says whether the oldest model has no parent, a parent not found, or a loop was cut.
``--json`` prints the same as one object.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.table import Table

from coordinator.cli.operate import operations
from coordinator.cli.options import Connection, JsonOption, with_optional_connection
from coordinator.cli.output import console, print_json, reported_errors
from coordinator.cli.views import safe_text
from coordinator.delivery.lineage import (
    LineageChain,
    artifacts_in,
    lineage_chain,
    stored_link,
)

__all__ = ["lineage"]


@with_optional_connection
def lineage(
    connection: Connection | None,
    name: Annotated[str, typer.Argument(help="The model name.", show_default=False)],
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="Read the .fedge files of this directory (offline).", file_okay=False
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Print a model's lineage: the newest artifact of NAME, then its parents."""
    with reported_errors(as_json=as_json):
        if directory is not None:
            found = artifacts_in(directory)
        elif connection is None:
            raise click.UsageError(
                "say where the artifacts are: --dir DIR, or --api URL / --broker URL"
            )
        else:
            with operations(connection) as ops:
                rows = ops.artifacts()
            links = (stored_link(row.manifest, row.sha256) for row in rows)
            found = [link for link in links if link is not None]
        chain = lineage_chain(name, found)
    if as_json:
        print_json(chain_json(chain))
        return
    console.print(chain_table(chain))
    console.print(_ending(chain), highlight=False, markup=False)


def chain_json(chain: LineageChain) -> dict[str, Any]:
    """The chain as JSON: ``{"chain": [...], "missing_parent": ..., "cycle": ...}``."""
    return {
        "chain": [
            {
                "name": link.manifest.name,
                "version": link.manifest.version,
                "sha256": link.manifest.sha256,
                "created": link.manifest.created.isoformat(),
                "source": link.source,
                "lineage": None
                if link.manifest.lineage is None
                else link.manifest.lineage.to_dict(),
            }
            for link in chain.links
        ],
        "missing_parent": None if chain.missing is None else chain.missing.to_dict(),
        "cycle": chain.cycle,
    }


def _window(start: int, end: int) -> str:
    def day(moment: int) -> str:
        return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M")

    return f"{day(start)} .. {day(end)}"


def chain_table(chain: LineageChain) -> Table:
    """One row per model, newest first."""
    table = Table(title=f"lineage of {safe_text(chain.links[0].manifest.name)}")
    for column in ("model", "sha256", "created", "trigger", "run", "data window", "code"):
        table.add_column(column, overflow="fold")
    for link in chain.links:
        manifest = link.manifest
        record = manifest.lineage
        run = window = code = "-"
        trigger = "unknown (no lineage)"
        if record is not None:
            trigger = record.trigger.describe()
            code = record.code.describe()
            if record.window is not None:
                window = _window(record.window.start, record.window.end)
            if record.rounds is not None:
                details = [f"{record.rounds} rounds", record.strategy, record.codec]
                if record.participants is not None:
                    details.append(f"{record.participants} devices")
                run = f"{record.run_id or '-'} ({', '.join(d for d in details if d)})"
        table.add_row(
            *(
                safe_text(text)
                for text in (
                    f"{manifest.name} v{manifest.version}",
                    manifest.sha256[:12],
                    manifest.created.strftime("%Y-%m-%d %H:%M"),
                    trigger,
                    run,
                    window,
                    code,
                )
            )
        )
    return table


def _ending(chain: LineageChain) -> str:
    oldest = chain.links[-1].manifest
    if chain.cycle:
        return f"{oldest.name} v{oldest.version} names a descendant as its parent: chain cut"
    if chain.missing is not None:
        missing = chain.missing.describe()
        return f"parent {missing} of {oldest.name} v{oldest.version} not found"
    return f"{len(chain.links)} models; {oldest.name} v{oldest.version} has no parent"
