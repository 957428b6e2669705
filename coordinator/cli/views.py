"""Rich renderables for deployments, and the text helpers every view uses (pure).

Data in, renderable out: ``fedge deploy`` and ``fedge rollback`` pass
:class:`~coordinator.delivery.tracker.DeviceProgress` values and print what
:func:`deploy_table` returns; the other views (:mod:`coordinator.cli.device_views`,
:mod:`coordinator.cli.service_views`, :mod:`coordinator.cli.round_table`) share
:func:`safe_text`, :func:`humanize_age`, :func:`humanize_duration` and :func:`plural`::

    console.print(deploy_table(result.devices, title="digits v3 -> all devices"))

Every string that comes from a device (ids, tags, versions, error reasons) is put
in a :class:`rich.text.Text`, never parsed as markup, and control characters are
replaced, so a device cannot restyle or hijack the operator's terminal.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence

from rich.table import Table
from rich.text import Text

from coordinator.delivery.tracker import IN_PROGRESS_STATES, DeviceProgress, DeviceState

__all__ = [
    "BAR_WIDTH",
    "REASON_MAX_CHARS",
    "counts_line",
    "deploy_table",
    "humanize_age",
    "plural",
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


def plural(n: int, word: str) -> str:
    """Give a count with its noun: ``"1 device"``, ``"3 devices"``, ``"0 devices"``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def humanize_duration(seconds: float) -> str:
    """Give a duration in its largest whole unit: ``"12s"``, ``"3m"``, ``"2h"``, ``"5d"``.

    Negative durations (clock skew) show as ``"0s"``.
    """
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(max(seconds, 0.0))}s"


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
