"""Rich renderables and JSON shapes for the fleet and deployments (pure).

Data in, renderable out: commands fetch :class:`~coordinator.link.fleet.DeviceRecord`
and :class:`~coordinator.delivery.tracker.DeviceProgress` values, pass the current time
where ages are shown, and print what these functions return, either to a
:class:`rich.console.Console` or, with ``--json``, through
:func:`~coordinator.cli.output.print_json`::

    console.print(fleet_table(fleet.records(), now=time.time()))
    print_json(fleet_json(fleet.records(), time.time()))

Every string that comes from a device (ids, tags, versions, error reasons) is put
in a :class:`rich.text.Text`, never parsed as markup, and control characters are
replaced, so a device cannot restyle or hijack the operator's terminal.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from coordinator.delivery.tracker import IN_PROGRESS_STATES, DeviceProgress, DeviceState
from coordinator.link.fleet import DeviceRecord

__all__ = [
    "BAR_WIDTH",
    "REASON_MAX_CHARS",
    "counts_line",
    "deploy_table",
    "fleet_json",
    "fleet_table",
    "humanize_age",
    "progress_bar",
    "safe_text",
]

BAR_WIDTH = 10
"""Cells of the download progress bar."""

REASON_MAX_CHARS = 60
"""Longest reason shown in a table cell; longer ones end with an ellipsis."""

_STATE_STYLES: Mapping[DeviceState, str] = {
    DeviceState.INSTALLED: "green",
    DeviceState.FAILED: "red",
    DeviceState.REJECTED: "red",
    DeviceState.ROLLED_BACK: "red",
    DeviceState.TIMED_OUT: "red",
    DeviceState.OFFLINE: "dim",
    **dict.fromkeys(IN_PROGRESS_STATES, "yellow"),
}


def safe_text(text: str) -> str:
    """Replace control and format characters (escape sequences, bidi overrides).

    Args:
        text: Untrusted text (from a device).

    Returns:
        The text with each such character replaced by U+FFFD.
    """
    return "".join("\ufffd" if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in text)


def humanize_age(last_seen: float, now: float) -> str:
    """Give how long ago something happened: ``"12s ago"``, ``"3m ago"``, ``"2h ago"``.

    Args:
        last_seen: When it happened, unix seconds; 0 or less means never.
        now: The current time, unix seconds.

    Returns:
        The age in the largest whole unit (s, m, h, d); ``"just now"`` when
        ``last_seen`` is in the future (clock skew); ``"never"`` when it is unset.
    """
    if last_seen <= 0:
        return "never"
    age = now - last_seen
    if age < 0:
        return "just now"
    return f"{humanize_duration(age)} ago"


def humanize_duration(seconds: float) -> str:
    """Give a duration in its largest whole unit: ``"12s"``, ``"3m"``, ``"2h"``, ``"5d"``.

    Negative durations (clock skew) show as ``"0s"``.
    """
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(max(seconds, 0.0))}s"


def _models(record: DeviceRecord) -> str:
    return ", ".join(f"{m.name} v{m.version}" for m in record.models)


def fleet_table(records: Sequence[DeviceRecord], *, now: float) -> Table:
    """Render devices as a table, one row each, in the given order.

    Args:
        records: The devices (usually :meth:`Fleet.records`, sorted by id).
        now: The current time, unix seconds, for the "last seen" column.

    Returns:
        A table with columns device, status, agent, models, tags, training
        examples, last seen.
    """
    table = Table(title=f"{len(records)} device{'' if len(records) == 1 else 's'}")
    table.add_column("device", no_wrap=True)
    table.add_column("status")
    table.add_column("agent")
    table.add_column("models")
    table.add_column("tags")
    table.add_column("train data", justify="right")
    table.add_column("last seen", justify="right")
    for r in records:
        table.add_row(
            Text(safe_text(r.device_id)),
            Text("online", style="green") if r.online else Text("offline", style="dim"),
            Text(safe_text(r.agent_version)),
            Text(safe_text(_models(r)) or "-"),
            Text(safe_text(", ".join(r.tags)) or "-"),
            Text(str(r.train_examples) if r.train_examples else "-"),
            Text(humanize_age(r.last_seen, now)),
        )
    return table


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def fleet_json(records: Sequence[DeviceRecord], now: float) -> list[dict[str, Any]]:
    """Give devices as JSON-able dicts, with the same information as the table.

    Args:
        records: The devices.
        now: The current time, unix seconds (for ``last_seen_age_s``).

    Returns:
        One dict per device: ``device_id``, ``online``, ``agent_version``,
        ``hardware``, ``runtimes``, ``tags``, ``models`` (name, version, sha256),
        ``train_examples`` (local examples for federated rounds),
        ``last_seen`` (unix seconds), ``last_seen_iso`` (ISO-8601, UTC),
        ``last_seen_age_s`` (seconds, never negative) and ``status_sent_at``; the
        three ``last_seen`` fields are None when the device was never seen.
    """
    out = []
    for r in records:
        seen = r.last_seen > 0
        out.append(
            {
                "device_id": r.device_id,
                "online": r.online,
                "agent_version": r.agent_version,
                "hardware": dict(r.hardware),
                "runtimes": list(r.runtimes),
                "tags": list(r.tags),
                "models": [
                    {"name": m.name, "version": m.version, "sha256": m.sha256} for m in r.models
                ],
                "train_examples": r.train_examples,
                "last_seen": r.last_seen if seen else None,
                "last_seen_iso": _iso(r.last_seen) if seen else None,
                "last_seen_age_s": max(0.0, now - r.last_seen) if seen else None,
                "status_sent_at": r.status_sent_at,
            }
        )
    return out


def progress_bar(held: int, total: int, width: int = BAR_WIDTH) -> str:
    """Give a text bar: ``progress_bar(7, 10)`` -> ``"███████░░░ 7/10"``.

    Args:
        held: Chunks held.
        total: Chunks in the transfer (> 0).
        width: Cells in the bar.

    Returns:
        The bar (filled cells rounded down, so it is full only when complete) and
        the counts.
    """
    held = min(max(held, 0), total)
    filled = held * width // total
    return f"{'█' * filled}{'░' * (width - filled)} {held}/{total}"


def _progress_cell(p: DeviceProgress) -> str:
    if p.chunks_total <= 0:
        return "-"
    if p.state is DeviceState.DOWNLOADING or (
        p.state is not DeviceState.INSTALLED and p.chunks_held < p.chunks_total
    ):
        return progress_bar(p.chunks_held, p.chunks_total)
    return "-"


def _reason_cell(p: DeviceProgress) -> str:
    parts = [x for x in (p.error_code, p.reason) if x]
    text = safe_text(": ".join(parts))
    if len(text) > REASON_MAX_CHARS:
        text = text[: REASON_MAX_CHARS - 1] + "…"
    return text


def deploy_table(progress: Sequence[DeviceProgress], *, title: str) -> Table:
    """Render a deployment's per-device progress.

    The progress column shows a bar while downloading, and for any unfinished
    device that holds part of the transfer (where it stopped); otherwise ``-``.

    Args:
        progress: One entry per device (usually sorted by id).
        title: The table title (e.g. ``"digits v3 -> tag:gpu"``).

    Returns:
        A table with columns device, state, progress, version, reason.
    """
    table = Table(title=Text(safe_text(title)))
    table.add_column("device", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("progress", no_wrap=True)
    table.add_column("version", justify="right")
    table.add_column("reason", overflow="fold")
    for p in progress:
        table.add_row(
            Text(safe_text(p.device_id)),
            Text(str(p.state), style=_STATE_STYLES[p.state]),
            Text(_progress_cell(p)),
            Text("-" if p.version is None else f"v{p.version}"),
            Text(_reason_cell(p)),
        )
    return table


def counts_line(counts: Mapping[DeviceState, int]) -> str:
    """Give ``"3 installed, 1 offline"``: the non-zero counts, in state order.

    Args:
        counts: Devices per state (e.g. :meth:`DeploymentTracker.counts`).

    Returns:
        The text, or ``"no devices"``.
    """
    parts = [f"{counts[s]} {s}" for s in DeviceState if counts.get(s, 0)]
    return ", ".join(parts) or "no devices"
