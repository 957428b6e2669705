"""Rich renderables and JSON of the operations' rows (pure).

The commands of :mod:`coordinator.cli.operate` print what these functions make of
the rows and views :class:`~coordinator.service.operations.Operations` returns: a table
(or a small group of them) for people, and with ``--json`` the rows as plain
JSON (:func:`to_json`: the same field names as the HTTP API's bodies)::

    console.print(audit_table(ops.audit_log()))
    print_json(to_json(ops.audit_log()))

As in :mod:`coordinator.cli.views`, every string a device or an API caller chose
(ids, tags, targets, reasons, audit details) goes into a :class:`rich.text.Text`
through :func:`~coordinator.cli.views.safe_text`, never parsed as markup.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from coordinator.cli.output import human_bytes
from coordinator.cli.round_table import rounds_table, run_rounds
from coordinator.cli.views import humanize_age, humanize_duration, plural, safe_text
from coordinator.service.operations import RolloutView, RunView
from coordinator.service.store.records import (
    ArtifactRow,
    AuditRow,
    PresenceRow,
    RolloutInfo,
    RunRow,
    RunState,
    TelemetryRow,
)

__all__ = [
    "FINAL_ROLLOUT_STATES",
    "artifacts_table",
    "audit_table",
    "presence_table",
    "rollout_counts",
    "rollout_view",
    "rollouts_table",
    "run_view",
    "runs_table",
    "telemetry_table",
    "to_json",
]

FINAL_ROLLOUT_STATES = frozenset({"completed", "halted", "aborted"})
"""Rollout states after which nothing more happens on its own."""

SHA_CHARS = 12
"""Leading characters of a sha256 shown in tables (``--json`` has all of them)."""

DETAIL_MAX_CHARS = 60

_ROLLOUT_STYLES = {
    "running": "yellow",
    "paused": "cyan",
    "completed": "green",
    "halted": "red",
    "aborted": "red",
}
_DEVICE_STYLES = {
    "installed": "green",
    "failed": "red",
    "rejected": "red",
    "rolled_back": "red",
    "timed_out": "red",
    "offline": "dim",
}
_RUN_STYLES = {
    RunState.RUNNING: "yellow",
    RunState.FINISHED: "green",
    RunState.FAILED: "red",
    RunState.INTERRUPTED: "red",
}


def to_json(value: Any) -> Any:
    """Give rows, views or lists of them as JSON-able values.

    Dataclasses become dicts with their field names (tuples become lists; enums
    are strings already), as in the HTTP API's bodies.
    """
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


def _text(value: object, style: str = "") -> Text:
    return Text(safe_text(str(value)), style=style)


def _short(text: str, limit: int = DETAIL_MAX_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _compact(detail: Mapping[str, Any]) -> str:
    return _short(json.dumps(detail, sort_keys=True, separators=(",", ":"))) if detail else "-"


# --- devices, telemetry, audit --------------------------------------------------------


def telemetry_table(device_id: str, rows: Sequence[TelemetryRow]) -> Table:
    """A device's telemetry windows, as given (newest first)."""
    table = Table(title=Text(safe_text(f"{device_id}: {plural(len(rows), 'window')}")))
    table.add_column("window end (UTC)", no_wrap=True)
    table.add_column("model")
    for name in ("calls", "errors", "p50 ms", "p95 ms", "p99 ms", "cpu %", "memory"):
        table.add_column(name, justify="right")
    for row in rows:
        model = "-" if row.model is None else f"{row.model} v{row.version}"
        table.add_row(
            Text(_iso(row.window_end)),
            _text(model),
            Text(str(row.predictions)),
            Text(str(row.errors), style="red" if row.errors else ""),
            Text(f"{row.p50:.1f}"),
            Text(f"{row.p95:.1f}"),
            Text(f"{row.p99:.1f}"),
            Text(f"{row.cpu_percent:.0f}"),
            Text(human_bytes(row.memory_bytes)),
        )
    return table


def presence_table(device_id: str, rows: Sequence[PresenceRow], *, now: float) -> Table:
    """A device's online/offline changes, as given (newest first), with how long each lasted."""
    table = Table(title=Text(safe_text(f"{device_id}: {plural(len(rows), 'change')}")))
    table.add_column("at (UTC)", no_wrap=True)
    table.add_column("status")
    table.add_column("for", justify="right")
    until = now
    for row in rows:
        table.add_row(
            Text(_iso(row.at)),
            Text("online", style="green") if row.online else Text("offline", style="dim"),
            Text(humanize_duration(until - row.at)),
        )
        until = row.at
    return table


def audit_table(rows: Sequence[AuditRow]) -> Table:
    """Operator actions, as given (oldest first)."""
    table = Table(title=plural(len(rows), "action"))
    table.add_column("id", justify="right")
    table.add_column("at (UTC)", no_wrap=True)
    table.add_column("actor")
    table.add_column("role")
    table.add_column("action")
    table.add_column("target")
    table.add_column("detail", overflow="fold")
    for row in rows:
        table.add_row(
            Text(str(row.audit_id)),
            Text(_iso(row.at)),
            _text(row.actor),
            _text(row.role),
            _text(row.action),
            _text(row.target or "-"),
            _text(_compact(row.detail)),
        )
    return table


# --- artifacts and rollouts ---------------------------------------------------------------


def artifacts_table(rows: Sequence[ArtifactRow], *, now: float) -> Table:
    """Stored artifacts, as given (newest first)."""
    table = Table(title=plural(len(rows), "artifact"))
    table.add_column("sha256", no_wrap=True)
    table.add_column("model")
    table.add_column("version", justify="right")
    table.add_column("size", justify="right")
    table.add_column("uploaded by")
    table.add_column("uploaded", justify="right")
    for row in rows:
        table.add_row(
            Text(row.sha256[:SHA_CHARS]),
            _text(row.name),
            Text(f"v{row.version}"),
            Text(human_bytes(row.size)),
            _text(row.uploaded_by),
            Text(humanize_age(row.uploaded_at, now)),
        )
    return table


def rollouts_table(rows: Sequence[RolloutInfo], *, now: float) -> Table:
    """Rollouts, as given (newest first)."""
    table = Table(title=plural(len(rows), "rollout"))
    table.add_column("rollout", no_wrap=True)
    table.add_column("state")
    table.add_column("artifact", no_wrap=True)
    table.add_column("target")
    table.add_column("created by")
    table.add_column("created", justify="right")
    table.add_column("updated", justify="right")
    for row in rows:
        table.add_row(
            _text(row.rollout_id),
            _text(row.state, _ROLLOUT_STYLES.get(row.state, "")),
            Text(row.artifact_sha256[:SHA_CHARS]),
            _text(_short(row.target)),
            _text(row.created_by),
            Text(humanize_age(row.created_at, now)),
            Text(humanize_age(row.updated_at, now)),
        )
    return table


def rollout_counts(view: RolloutView) -> dict[str, int]:
    """Devices per state: the engine's non-zero counts, else counted from the devices."""
    counts = view.summary.get("counts")
    if isinstance(counts, dict) and all(isinstance(n, int) for n in counts.values()):
        return {str(state): n for state, n in counts.items() if n}
    return dict(sorted(Counter(device.state for device in view.devices).items()))


def _stage(summary: Mapping[str, Any]) -> str:
    stage, stages = summary.get("stage"), summary.get("stages")
    if not isinstance(stage, int):
        return "-"
    return f"{stage + 1}/{stages}" if isinstance(stages, int) else str(stage + 1)


def _replaces(replaces: object) -> str:
    """``parent digits v1; serving digits v1 on 3 devices, nothing on 1`` (or empty)."""
    if not isinstance(replaces, Mapping):
        return ""
    parts = []
    parent = replaces.get("parent")
    if isinstance(parent, Mapping):
        parts.append(f"parent {parent.get('name')} v{parent.get('version')}")
    serving = []
    for entry in replaces.get("serving") or ():
        if isinstance(entry, Mapping) and isinstance(entry.get("devices"), int):
            model = entry.get("model")
            what = "nothing" if model is None else f"{model} v{entry.get('version')}"
            serving.append(f"{what} on {plural(entry['devices'], 'device')}")
    if serving:
        parts.append("serving " + ", ".join(serving))
    return "; ".join(parts)


def rollout_view(view: RolloutView, *, now: float, devices: bool = True) -> RenderableType:
    """One rollout: state, stage, artifact, target, what it replaces (the model's
    lineage parent, what targeted devices not on it serve), devices per state and,
    with ``devices``, one row per device."""
    row, summary = view.rollout, view.summary
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("rollout", _text(row.rollout_id))
    head.add_row("state", _text(row.state, _ROLLOUT_STYLES.get(row.state, "")))
    head.add_row("stage", Text(_stage(summary)))
    head.add_row("artifact", Text(row.artifact_sha256))
    head.add_row("target", _text(_short(row.target)))
    for key in ("reason", "halt_reason"):
        value = summary.get(key)
        if value:
            head.add_row(key.replace("_", " "), _text(_short(str(value))))
    rate = summary.get("failure_rate")
    if isinstance(rate, int | float):
        head.add_row("failure rate", Text(f"{rate:.1%}"))
    replaces = _replaces(summary.get("replaces"))
    if replaces:
        head.add_row("replaces", _text(_short(replaces, 240)))
    head.add_row("updated", Text(humanize_age(row.updated_at, now)))

    counts = Table(title="devices per state")
    counts.add_column("state")
    counts.add_column("devices", justify="right")
    for state, n in rollout_counts(view).items():
        counts.add_row(_text(state, _DEVICE_STYLES.get(state, "")), Text(str(n)))
    parts: list[RenderableType] = [head, counts]
    if devices and view.devices:
        table = Table(title=plural(len(view.devices), "device"))
        table.add_column("device", no_wrap=True)
        table.add_column("stage", justify="right")
        table.add_column("state")
        table.add_column("updated", justify="right")
        table.add_column("detail", overflow="fold")
        for device in view.devices:
            table.add_row(
                _text(device.device_id),
                Text(str(device.stage + 1)),
                _text(device.state, _DEVICE_STYLES.get(device.state, "")),
                Text(humanize_age(device.updated_at, now)),
                _text(_compact(device.detail)),
            )
        parts.append(table)
    return Group(*parts)


# --- federated runs -----------------------------------------------------------------------


def runs_table(rows: Sequence[RunRow], *, now: float) -> Table:
    """Federated runs, as given (newest first)."""
    table = Table(title=plural(len(rows), "run"))
    table.add_column("run", no_wrap=True)
    table.add_column("state")
    table.add_column("rounds", justify="right")
    table.add_column("strategy")
    table.add_column("codec")
    table.add_column("model")
    table.add_column("created by")
    table.add_column("started", justify="right")
    for row in rows:
        table.add_row(
            _text(row.run_id),
            _text(row.state, _RUN_STYLES.get(row.state, "")),
            _text(row.config.get("rounds", "-")),
            _text(row.config.get("strategy", "-")),
            _text(row.config.get("codec", "-")),
            _text(row.config.get("model", "-")),
            _text(row.created_by),
            Text(humanize_age(row.created_at, now)),
        )
    return table


def run_view(view: RunView, *, now: float) -> RenderableType:
    """A federated run: its settings and state, and one row per round."""
    run = view.run
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("run", _text(run.run_id))
    head.add_row("state", _text(run.state, _RUN_STYLES.get(run.state, "")))
    total = run.config.get("rounds", "?")
    head.add_row("rounds", _text(f"{len(view.rounds)}/{total}"))
    for key in ("strategy", "codec", "model", "family"):
        if key in run.config:
            head.add_row(key, _text(run.config[key]))
    head.add_row("started", Text(humanize_age(run.created_at, now)))
    head.add_row("updated", Text(humanize_age(run.updated_at, now)))

    table = rounds_table(run_rounds(view), title=plural(len(view.rounds), "round"))
    return Group(head, table)
