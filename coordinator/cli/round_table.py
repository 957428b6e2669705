"""The table of federated rounds, one for every command that shows rounds (pure).

``fedge train`` (live and final), ``fedge simulate`` and ``fedge rounds status``
print the same table, built from rounds in their JSON form
(:meth:`RoundReport.to_json <coordinator.federated.runs.RoundReport.to_json>`, which is
also what the service stores as a round's metrics)::

    console.print(rounds_table([r.to_json() for r in result.rounds], title="rounds"))
    console.print(rounds_table(run_rounds(view), title="3 rounds"))

The figure after the clients is the task's headline: ``accuracy`` for
classification, else the round's ``metrics`` entry ``auc`` (reconstruction) or
``mse`` (regression), and the column is named after it.

It fits an 80-column terminal with fleet-sized figures: the figure columns never
wrap or shorten (``1000/1000`` clients, ``98.76%``, byte counts to three
significant digits such as ``456 MiB``), and what went wrong in a round (rejected
updates, devices that went offline or timed out, why it failed) is not a column
but a line under the table, ``round 3: 12 offline; 4 timed out``, which wraps
at the terminal's width. Text that came from devices or the service is
sanitised with :func:`~coordinator.cli.views.safe_text` and never read as markup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from coordinator.cli.views import safe_text
from coordinator.service.operations import RunView

__all__ = ["compact_bytes", "percent", "round_notes", "rounds_table", "run_rounds"]

_STATUS_STYLES = {"ok": "green", "failed": "red", "running": "yellow"}
_HEADLINES = ("auc", "mse")
"""Headline metrics of rounds without an accuracy (reconstruction, regression)."""


def compact_bytes(n: int) -> str:
    """A byte count to three significant digits: ``999 B``, ``1.23 KiB``, ``456 MiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1000 or unit == "GiB":
            break
        size /= 1024
    if unit == "B":
        return f"{n} B"
    digits = 2 if size < 10 else 1 if size < 100 else 0
    return f"{size:.{digits}f} {unit}"


def _number(value: Any) -> float | None:
    """A JSON figure, or None when it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _clients(round_: Mapping[str, Any]) -> str:
    clients, sampled = _number(round_.get("clients")), _number(round_.get("sampled"))
    if clients is None:
        return "-"
    return f"{int(clients)}/{int(sampled)}" if sampled else str(int(clients))


def percent(value: Any) -> str:
    """A fraction as ``98.76%``, or ``-`` when it is not a number."""
    number = _number(value)
    return "-" if number is None else f"{100 * number:.2f}%"


def _loss(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.4f}"


def _metric(round_: Mapping[str, Any], key: str) -> Any:
    metrics = round_.get("metrics")
    return metrics.get(key) if isinstance(metrics, Mapping) else None


def _headline(rounds: Sequence[Mapping[str, Any]]) -> str:
    """``accuracy``, or the metric rounds without one measured (``auc``, ``mse``)."""
    for key in _HEADLINES:
        if any(r.get("accuracy") is None and _metric(r, key) is not None for r in rounds):
            return key
    return "accuracy"


def _figure(round_: Mapping[str, Any], key: str) -> str:
    if key == "accuracy":
        return percent(round_.get("accuracy"))
    number = _number(_metric(round_, key))
    return "-" if number is None else f"{number:.4g}"


def _bytes(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else compact_bytes(int(number))


def _counts(value: Any) -> str:
    if not isinstance(value, Mapping) or not value:
        return ""
    return ",".join(f"{k}:{v}" for k, v in value.items())


def round_notes(round_: Mapping[str, Any]) -> str:
    """What went wrong in a round, in a few words (empty when nothing did)."""
    notes = []
    if rejected := _counts(round_.get("rejected")):
        notes.append(f"rejected {rejected}")
    if failures := _counts(round_.get("failures")):
        notes.append(f"failed {failures}")
    if dropped := _number(round_.get("dropped")):
        notes.append(f"{int(dropped)} offline")
    if timed_out := _number(round_.get("timed_out")):
        notes.append(f"{int(timed_out)} timed out")
    if clipped := _number(round_.get("clipped_examples")):
        notes.append(f"{int(clipped)} example count(s) clipped")
    reason = round_.get("reason")
    if isinstance(reason, str) and reason:
        notes.append(reason)
    return "; ".join(notes)


def rounds_table(rounds: Sequence[Mapping[str, Any]], *, title: str) -> RenderableType:
    """The rounds, one row each, in the given order (see the module docstring).

    Args:
        rounds: Rounds in their JSON form; missing figures show as ``-``.
        title: The table's title.

    Returns:
        The table, followed by one line per round that has notes.
    """
    table = Table(title=Text(safe_text(title)), title_justify="left")
    table.add_column("round", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    headline = _headline(rounds)
    for name in ("clients", headline, "loss", "up", "down"):
        table.add_column(name, justify="right", no_wrap=True)
    notes: list[Text] = []
    for round_ in rounds:
        status = str(round_.get("status", "-"))
        number = str(round_.get("round", "-"))
        table.add_row(
            Text(number),
            Text(safe_text(status), style=_STATUS_STYLES.get(status, "")),
            Text(_clients(round_)),
            Text(_figure(round_, headline)),
            Text(_loss(round_.get("loss"))),
            Text(_bytes(round_.get("uplink_bytes"))),
            Text(_bytes(round_.get("downlink_bytes"))),
        )
        if note := round_notes(round_):
            notes.append(Text(safe_text(f"round {number}: {note}")))
    return Group(table, *notes) if notes else table


def run_rounds(view: RunView) -> list[dict[str, Any]]:
    """A service run's rounds in the JSON form :func:`rounds_table` reads."""
    return [
        {**row.metrics, "round": row.round, "status": row.status, "reason": row.reason}
        for row in view.rounds
    ]
