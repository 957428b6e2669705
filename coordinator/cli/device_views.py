"""The device list of ``fedge devices`` (and ``fedge fleet`` alone), as a table or JSON (pure).

Rows are :class:`~coordinator.service.store.records.DeviceRow` values from
:meth:`Operations.devices <coordinator.service.operations.Operations.devices>`, over the
API or in-process; what a device last announced (agent version, hardware,
runtimes, installed models, local training examples, whether it holds a fresh
fleet statement) is read from the row's
``status`` document (:func:`coordinator.service.ingest.status_document`). A row
whose status is missing or malformed shows what the row itself holds::

    console.print(devices_table(rows, now=time.time()))
    print_json(devices_json(rows, time.time()))

Every string a device chose goes into a :class:`rich.text.Text` through
:func:`~coordinator.cli.views.safe_text`, never parsed as markup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from coordinator.cli.views import humanize_age, plural, safe_text
from coordinator.service.store.records import DeviceRow

__all__ = ["device_json", "devices_json", "devices_table"]


def _status(row: DeviceRow) -> Mapping[str, Any]:
    return row.status if isinstance(row.status, Mapping) else {}


def _models(row: DeviceRow) -> list[dict[str, Any]]:
    announced = _status(row).get("models")
    if isinstance(announced, list):
        return [
            {"name": m.get("name"), "version": m.get("version"), "sha256": m.get("sha256")}
            for m in announced
            if isinstance(m, Mapping)
        ]
    if row.model is None:
        return []
    return [{"name": row.model, "version": row.version, "sha256": None}]


def _train_examples(row: DeviceRow) -> int:
    value = _status(row).get("train_examples")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _train_models(row: DeviceRow) -> list[str]:
    value = _status(row).get("train_models")
    return [str(spec) for spec in value] if isinstance(value, list) else []


def _keyset_version(row: DeviceRow) -> int | None:
    value = _status(row).get("keyset_version")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _stale(row: DeviceRow) -> bool:
    return _status(row).get("stale") is True


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def device_json(row: DeviceRow, now: float) -> dict[str, Any]:
    """One device: ``device_id``, ``online``, ``agent_version``, ``hardware``,
    ``runtimes``, ``tags``, ``models`` (name, version, sha256), ``train_examples``
    (local examples for federated rounds), ``train_models`` (the PyTorch model
    factories it can train; empty without PyTorch), ``keyset_version`` (the key set
    it trusts; None with fixed key files), ``first_seen``, ``last_seen`` (unix
    factories it can train; empty without PyTorch), ``stale`` (the device has a fleet
    configured and holds no fresh fleet statement), ``first_seen``, ``last_seen`` (unix
    seconds), ``last_seen_iso`` (ISO-8601, UTC) and ``last_seen_age_s`` (never
    negative); the three ``last_seen`` fields are None when it was never seen.
    """
    status = _status(row)
    hardware = status.get("hardware")
    runtimes = status.get("runtimes")
    seen = row.last_seen > 0
    return {
        "device_id": row.device_id,
        "online": row.online,
        "agent_version": str(status.get("agent_version", "")),
        "hardware": dict(hardware) if isinstance(hardware, Mapping) else {},
        "runtimes": [str(r) for r in runtimes] if isinstance(runtimes, list) else [],
        "tags": list(row.tags),
        "models": _models(row),
        "train_examples": _train_examples(row),
        "train_models": _train_models(row),
        "keyset_version": _keyset_version(row),
        "stale": _stale(row),
        "first_seen": row.first_seen,
        "last_seen": row.last_seen if seen else None,
        "last_seen_iso": _iso(row.last_seen) if seen else None,
        "last_seen_age_s": max(0.0, now - row.last_seen) if seen else None,
    }


def devices_json(rows: Sequence[DeviceRow], now: float) -> dict[str, Any]:
    """``{"devices": [...]}``, one :func:`device_json` per row, in the given order."""
    return {"devices": [device_json(row, now) for row in rows]}


def _trains(specs: Sequence[str]) -> str:
    """What a device can train: the built-in models, and how many PyTorch ones."""
    return f"numpy + {len(specs)} torch" if specs else "numpy"


def _presence(row: DeviceRow) -> Text:
    """``online`` or ``offline``, and ``stale`` when its fleet statement expired."""
    text = Text("online", style="green") if row.online else Text("offline", style="dim")
    if _stale(row):
        text.append(", stale", style="bold yellow")
    return text


def devices_table(rows: Sequence[DeviceRow], *, now: float) -> Table:
    """The devices, one row each: status, agent, models, tags, train data, last seen."""
    table = Table(title=plural(len(rows), "device"))
    table.add_column("device", no_wrap=True)
    table.add_column("status")
    table.add_column("agent")
    table.add_column("models")
    table.add_column("tags")
    table.add_column("train data", justify="right")
    table.add_column("trains", justify="right")
    table.add_column("last seen", justify="right")
    for row in rows:
        doc = device_json(row, now)
        models = ", ".join(f"{m['name']} v{m['version']}" for m in doc["models"])
        examples = doc["train_examples"]
        table.add_row(
            Text(safe_text(row.device_id)),
            _presence(row),
            Text(safe_text(doc["agent_version"]) or "-"),
            Text(safe_text(models) or "-"),
            Text(safe_text(", ".join(row.tags)) or "-"),
            Text(str(examples) if examples else "-"),
            Text(_trains(doc["train_models"])),
            Text(humanize_age(row.last_seen, now)),
        )
    return table
