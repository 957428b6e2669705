"""``fedge drift [--device ID] [--model NAME] [--json]``: the fleet's input drift.

Asks :meth:`Operations.drift <coordinator.service.operations.Operations.drift>` (over
``--api``, or in-process over ``--broker`` with the service's database) for the latest
drift score of every device and of every fleet, per model version, and prints one
table: fleet rows first (with the devices that drive them), then devices, each with
its largest feature PSI and JS divergence, its severity (PSI 0.1 / 0.25
conventions; ``major (confidence)`` when the model's confidence, not its inputs,
moved), the top drifting features (``f3=0.41``: feature 3's PSI), the PSI of
the confidence signal and of the predicted classes, and the inputs the devices
refused. ``--json`` prints the scores as the API gives them (``GET /v1/drift``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from coordinator.cli.operate import show_rows
from coordinator.cli.options import Connection, JsonOption, with_connection
from coordinator.cli.views import plural, safe_text
from coordinator.monitoring.scores import FEATURES, FLEET, DriftScore

__all__ = ["drift", "drift_table"]

_STYLES = {"none": "green", "moderate": "yellow", "major": "bold red"}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _severity(score: DriftScore) -> str:
    """``major``, or ``major (confidence)`` when the inputs are not what moved."""
    if score.signal == FEATURES or score.severity in ("none", "insufficient"):
        return score.severity
    return f"{score.severity} ({score.signal})"


def drift_table(scores: Sequence[DriftScore]) -> Table:
    """The scores as given (fleet rows first), one row each."""
    table = Table(title=Text(f"drift: {plural(len(scores), 'score')}"))
    table.add_column("subject")
    table.add_column("model")
    table.add_column("severity")
    for name in ("PSI", "JS", "conf PSI", "class PSI", "windows", "inputs"):
        table.add_column(name, justify="right")
    table.add_column("top features")
    table.add_column("refused")
    table.add_column("at (UTC)", no_wrap=True)
    for score in scores:
        subject = (
            "fleet (" + ", ".join(score.devices) + ")" if score.scope == FLEET else score.device_id
        )
        refused = ", ".join(f"{k}={v}" for k, v in sorted(score.invalid.items()) if v) or "-"
        table.add_row(
            Text(safe_text(str(subject))),
            Text(safe_text(f"{score.model} v{score.version}")),
            Text(_severity(score), style=_STYLES.get(score.severity, "")),
            Text(_number(score.psi_max)),
            Text(_number(score.js_max)),
            Text(_number(score.confidence_psi)),
            Text(_number(score.classes_psi)),
            Text(str(score.windows)),
            Text(str(score.n)),
            Text(" ".join(f"f{f.index}={f.psi:.2f}" for f in score.top) or "-"),
            Text(safe_text(refused)),
            Text(datetime.fromtimestamp(score.at, UTC).strftime("%Y-%m-%d %H:%M:%S")),
        )
    return table


@with_connection
def drift(
    connection: Connection,
    device: Annotated[
        str | None, typer.Option("--device", help="Only this device's scores.", show_default=False)
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Only this model's scores.", show_default=False)
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Show input drift against each model's reference: per fleet and device, top features."""
    show_rows(
        connection,
        lambda ops: ops.drift(device_id=device, model=model),
        drift_table,
        as_json=as_json,
    )
