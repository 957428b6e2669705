"""Rich tables and JSON shapes for the fleet and deployments, rendered to text."""

from __future__ import annotations

import json

import pytest
from rich.console import Console, RenderableType
from rich.table import Table

from coordinator.cli.device_views import devices_json, devices_table
from coordinator.cli.drift import drift_table
from coordinator.cli.service_views import presence_table
from coordinator.cli.views import (
    REASON_MAX_CHARS,
    counts_line,
    deploy_table,
    humanize_age,
    humanize_duration,
    plural,
    progress_bar,
    safe_text,
)
from coordinator.delivery.tracker import DeviceProgress, DeviceState
from coordinator.monitoring.scores import DriftScore, FeatureDrift
from coordinator.service.ingest import status_document
from coordinator.service.store.records import DeviceRow, PresenceRow
from edge_agent.protocol import ModelInfo, Status

NOW = 1_800_000_000.0
SHA = "cd" * 32


def render(renderable: RenderableType) -> str:
    console = Console(record=True, width=120, color_system="truecolor", force_terminal=True)
    console.print(renderable)
    return console.export_text()


def rows(table: Table) -> list[list[str]]:
    """Cell texts by row (independent of layout)."""
    columns = [list(c.cells) for c in table.columns]
    return [[str(col[i]) for col in columns] for i in range(table.row_count)]


def cell_style(table: Table, column: int, row: int) -> str:
    cell = list(table.columns[column].cells)[row]
    return str(getattr(cell, "style", ""))


def record(
    device_id: str,
    *,
    online: bool = True,
    models: tuple[ModelInfo, ...] = (),
    tags: tuple[str, ...] = (),
    last_seen: float = NOW - 12,
    train_examples: int = 0,
    train_models: tuple[str, ...] = (),
    keyset_version: int | None = None,
) -> DeviceRow:
    """A device as the service stores it, from a status message it sent."""
    status = Status(
        online=online,
        agent_version="0.1.0",
        hardware={"machine": "aarch64", "cpu_count": 4},
        runtimes=("onnxruntime",),
        tags=tags,
        models=models,
        train_examples=train_examples,
        train_models=train_models,
        keyset_version=keyset_version,
    )
    return DeviceRow(
        device_id=device_id,
        first_seen=NOW - 3600,
        last_seen=last_seen,
        online=online,
        status=status_document(status),
        tags=tags,
        model=models[0].name if models else None,
        version=models[0].version if models else None,
    )


# --- helpers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "text"),
    [
        (0, "0s ago"),
        (12, "12s ago"),
        (59.9, "59s ago"),
        (60, "1m ago"),
        (3 * 60 + 59, "3m ago"),
        (2 * 3600 + 5, "2h ago"),
        (86400 * 3, "3d ago"),
        (-5, "just now"),
    ],
)
def test_humanize_age(age: float, text: str) -> None:
    assert humanize_age(NOW - age, NOW) == text


def test_humanize_age_never() -> None:
    assert humanize_age(0, NOW) == "never"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (60, "1m"), (7199, "1h"), (86400 * 2 + 5, "2d"), (-3, "0s")],
)
def test_humanize_duration(seconds: float, text: str) -> None:
    assert humanize_duration(seconds) == text


@pytest.mark.parametrize(("n", "text"), [(0, "0 devices"), (1, "1 device"), (2, "2 devices")])
def test_plural(n: int, text: str) -> None:
    assert plural(n, "device") == text


def test_presence_table_shows_how_long_each_state_lasted() -> None:
    rows = [
        PresenceRow("pi-1", online=True, at=NOW - 30),
        PresenceRow("pi-1", online=False, at=NOW - 150),
        PresenceRow("pi-1", online=True, at=NOW - 3 * 3600),
    ]
    table = presence_table("pi-1", rows, now=NOW)
    assert table.row_count == 3
    cells = [[str(c) for c in column.cells] for column in table.columns]
    assert cells[1] == ["online", "offline", "online"]
    assert cells[2] == ["30s", "2m", "2h"]  # until now, then until the next change
    assert str(table.title) == "pi-1: 3 changes"


@pytest.mark.parametrize(
    ("held", "total", "text"),
    [
        (7, 10, "███████░░░ 7/10"),
        (0, 10, "░░░░░░░░░░ 0/10"),
        (10, 10, "██████████ 10/10"),
        (1, 3, "███░░░░░░░ 1/3"),
        (99, 100, "█████████░ 99/100"),  # full only when complete
        (12, 10, "██████████ 10/10"),  # clamped
    ],
)
def test_progress_bar(held: int, total: int, text: str) -> None:
    assert progress_bar(held, total) == text


def test_safe_text_replaces_control_and_format_characters() -> None:
    assert safe_text("ok\x1b[31mred\x07\u202eevil") == "ok\ufffd[31mred\ufffd\ufffdevil"
    assert safe_text("plain [bold]text[/] é") == "plain [bold]text[/] é"


def test_counts_line() -> None:
    counts = dict.fromkeys(DeviceState, 0)
    counts[DeviceState.INSTALLED] = 3
    counts[DeviceState.OFFLINE] = 1
    assert counts_line(counts) == "3 installed, 1 offline"
    assert counts_line(dict.fromkeys(DeviceState, 0)) == "no devices"
    assert counts_line({DeviceState.FAILED: 2}) == "2 failed"


# --- devices --------------------------------------------------------------------


def fleet_records() -> list[DeviceRow]:
    return [
        record(
            "pi-1",
            models=(
                ModelInfo(name="digits", version=3, sha256=SHA),
                ModelInfo(name="other", version=1, sha256=SHA),
            ),
            tags=("gpu", "lab"),
            last_seen=NOW - 12,
            train_examples=321,
            train_models=("edge_agent.training.zoo:small_cnn", "mypkg.models:cnn"),
            keyset_version=3,
        ),
        record("pi-2", online=False, last_seen=NOW - 3 * 3600),
    ]


def test_devices_table_content() -> None:
    table = devices_table(fleet_records(), now=NOW)
    assert [str(c.header) for c in table.columns] == [
        "device",
        "status",
        "agent",
        "models",
        "tags",
        "train data",
        "trains",
        "last seen",
    ]
    assert rows(table) == [
        ["pi-1", "online", "0.1.0", "digits v3, other v1", "gpu, lab", "321", "numpy + 2 torch",
         "12s ago"],
        ["pi-2", "offline", "0.1.0", "-", "-", "-", "numpy", "3h ago"],
    ]  # fmt: skip
    text = render(table)
    assert "digits v3, other v1" in text
    assert "2 devices" in text
    assert "12s ago" in text


def test_devices_table_status_styles() -> None:
    table = devices_table(fleet_records(), now=NOW)
    assert cell_style(table, 1, 0) == "green"
    assert cell_style(table, 1, 1) == "dim"


def test_devices_table_empty_and_singular_title() -> None:
    assert "0 devices" in render(devices_table([], now=NOW))
    assert "1 device" in render(devices_table(fleet_records()[:1], now=NOW))


def test_devices_table_does_not_interpret_markup_from_devices() -> None:
    rec = record("pi-1", tags=("x[red]",))
    text = render(devices_table([rec], now=NOW))
    assert "x[red]" in text


def test_devices_json() -> None:
    doc = devices_json(fleet_records(), NOW)
    assert json.loads(json.dumps(doc)) == doc
    first, second = doc["devices"]
    assert first == {
        "device_id": "pi-1",
        "online": True,
        "agent_version": "0.1.0",
        "hardware": {"machine": "aarch64", "cpu_count": 4},
        "runtimes": ["onnxruntime"],
        "tags": ["gpu", "lab"],
        "models": [
            {"name": "digits", "version": 3, "sha256": SHA},
            {"name": "other", "version": 1, "sha256": SHA},
        ],
        "first_seen": NOW - 3600,
        "last_seen": NOW - 12,
        "last_seen_iso": "2027-01-15T07:59:48+00:00",
        "last_seen_age_s": 12.0,
        "train_examples": 321,
        "train_models": ["edge_agent.training.zoo:small_cnn", "mypkg.models:cnn"],
        "keyset_version": 3,
        "stale": False,
    }
    assert second["online"] is False
    assert second["keyset_version"] is None
    assert second["train_examples"] == 0
    assert second["train_models"] == []
    assert second["last_seen_age_s"] == 3 * 3600


def test_devices_json_never_seen_and_future() -> None:
    doc = devices_json([record("a", last_seen=0.0), record("b", last_seen=NOW + 5)], NOW)
    never, future = doc["devices"]
    assert (never["last_seen"], never["last_seen_iso"], never["last_seen_age_s"]) == (
        None,
        None,
        None,
    )
    assert future["last_seen_age_s"] == 0.0


# --- deployments --------------------------------------------------------------


def progress_rows() -> list[DeviceProgress]:
    return [
        DeviceProgress("a", DeviceState.INSTALLED, 10, 10, version=3),
        DeviceProgress("b", DeviceState.DOWNLOADING, 7, 10),
        DeviceProgress("c", DeviceState.FAILED, error_code="io_error", reason="disk full"),
        DeviceProgress("d", DeviceState.OFFLINE, 4, 10),
        DeviceProgress("e", DeviceState.PENDING),
        DeviceProgress("f", DeviceState.TIMED_OUT, reason="still verifying at the deadline"),
        DeviceProgress("g", DeviceState.REJECTED, error_code="rollback"),
        DeviceProgress("h", DeviceState.ROLLED_BACK, 10, 10, version=2),
    ]


def test_deploy_table_content() -> None:
    table = deploy_table(progress_rows(), title="digits v3 -> tag:gpu")
    assert [str(c.header) for c in table.columns] == [
        "device",
        "state",
        "progress",
        "version",
        "reason",
    ]
    assert rows(table) == [
        ["a", "installed", "-", "v3", ""],
        ["b", "downloading", "███████░░░ 7/10", "-", ""],
        ["c", "failed", "-", "-", "io_error: disk full"],
        ["d", "offline", "████░░░░░░ 4/10", "-", ""],
        ["e", "pending", "-", "-", ""],
        ["f", "timed_out", "-", "-", "still verifying at the deadline"],
        ["g", "rejected", "-", "-", "rollback"],
        ["h", "rolled_back", "-", "v2", ""],
    ]
    text = render(table)
    assert "digits v3 -> tag:gpu" in text
    assert "███████░░░ 7/10" in text
    assert "io_error: disk full" in text


def test_deploy_table_state_colors() -> None:
    table = deploy_table(progress_rows(), title="t")
    styles = [cell_style(table, 1, i) for i in range(table.row_count)]
    assert styles == ["green", "yellow", "red", "dim", "yellow", "red", "red", "red"]
    for in_progress in ("accepted", "verifying", "installing"):
        t = deploy_table([DeviceProgress("x", DeviceState(in_progress))], title="t")
        assert cell_style(t, 1, 0) == "yellow"


def test_deploy_table_downloading_bar_even_when_complete() -> None:
    table = deploy_table([DeviceProgress("a", DeviceState.DOWNLOADING, 10, 10)], title="t")
    assert rows(table)[0][2] == "██████████ 10/10"


def test_deploy_table_truncates_and_sanitizes_reason() -> None:
    long = "x" * 200
    table = deploy_table(
        [
            DeviceProgress("a", DeviceState.FAILED, error_code="io_error", reason=long),
            DeviceProgress("b", DeviceState.FAILED, reason="bad\x1b[2J[bold]thing[/]"),
        ],
        title="t",
    )
    first, second = (r[4] for r in rows(table))
    assert len(first) == REASON_MAX_CHARS
    assert first.startswith("io_error: xxx")
    assert first.endswith("…")
    assert second == "bad\ufffd[2J[bold]thing[/]"
    assert "[bold]thing[/]" in render(table)
    assert "\x1b[2J" not in render(table)


def test_a_device_without_a_usable_status_shows_what_its_row_holds() -> None:
    bare = DeviceRow("pi-9", NOW - 60, NOW - 6, False, None, ("lab",), "digits", 2)
    odd = DeviceRow("pi-8", NOW - 60, NOW - 6, True, {"models": "x", "hardware": 3}, (), None, None)
    first, second = devices_json([bare, odd], NOW)["devices"]
    assert first["models"] == [{"name": "digits", "version": 2, "sha256": None}]
    assert (first["agent_version"], first["hardware"], first["train_examples"]) == ("", {}, 0)
    assert (second["models"], second["hardware"], second["runtimes"]) == ([], {}, [])
    assert first["train_models"] == second["train_models"] == []
    assert rows(devices_table([bare], now=NOW)) == [
        ["pi-9", "offline", "-", "digits v2", "lab", "-", "numpy", "6s ago"]
    ]


def test_drift_table_names_the_signal_and_escapes_device_ids() -> None:
    def score(device: str | None, severity: str, signal: str, psi: float) -> DriftScore:
        return DriftScore(
            scope="fleet" if device is None else "device", device_id=device, model="m",
            version=2, at=NOW, windows=3, n=900, psi_max=psi, js_max=psi / 5,
            severity=severity, signal=signal, top=(FeatureDrift(4, psi, psi / 5),),
            confidence_psi=0.4 if signal == "confidence" else None, invalid={"nan": 2, "shape": 0},
            devices=("[red]x",) if device is None else (),
        )  # fmt: skip

    table = drift_table([
        score(None, "moderate", "features", 0.12),
        score("pi-1", "major", "confidence", 0.02),
        score("pi-2", "none", "features", 0.01),
    ])  # fmt: skip
    cells = rows(table)
    assert cells[0][:3] == ["fleet ([red]x)", "m v2", "moderate"]
    assert cells[1][2] == "major (confidence)"
    assert cells[1][5] == "0.400"
    assert cells[2][5] == "-"
    assert cells[1][9] == "f4=0.02"
    assert cells[1][10] == "nan=2"
    assert "3 scores" in render(table)
    assert cell_style(table, 2, 1) == "bold red"
