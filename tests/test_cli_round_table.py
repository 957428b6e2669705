"""The round table (``fedge train``, ``simulate``, ``rounds status``) in an 80-column terminal."""

from __future__ import annotations

import pytest
from rich.console import Console, RenderableType

from coordinator.cli.round_table import compact_bytes, round_notes, rounds_table
from coordinator.cli.service_views import run_view
from coordinator.federated.runs import RoundReport
from coordinator.service.operations import RunView
from coordinator.service.store.records import RoundRow, RunRow, RunState

NOW = 1_800_000_000.0
FLEET = RoundReport(
    round=12,
    accuracy=0.9876,
    loss=0.12345,
    clients=1000,
    sampled=1000,
    uplink_bytes=123 << 20,
    downlink_bytes=1023 << 20,
    rejected={"norm": 3},
    dropped=12,
    timed_out=4,
)
FAILED = RoundReport(
    round=13,
    status="failed",
    reason="only 1 of 1000 updates accepted (min_clients 500)",
    clients=1,
    sampled=1000,
    uplink_bytes=999,
    downlink_bytes=10_000,
)


def render(renderable: RenderableType, width: int = 80) -> str:
    console = Console(record=True, width=width)
    console.print(renderable)
    return console.export_text()


def test_fleet_sized_figures_fit_80_columns() -> None:
    text = render(rounds_table([FLEET.to_json(), FAILED.to_json()], title="digits: 3 rounds"))
    assert "…" not in text
    row12 = next(line for line in text.splitlines() if line.startswith("│    12 "))
    for cell in ("1000/1000", "98.76%", "0.1235", "123 MiB", "1.00 GiB"):
        assert cell in row12, text
    row13 = next(line for line in text.splitlines() if line.startswith("│    13 "))
    for cell in ("failed", "1/1000", "999 B", "9.77 KiB"):
        assert cell in row13, text
    # What went wrong goes under the table, whole, not into a squeezed column.
    assert "round 12: rejected norm:3; 12 offline; 4 timed out" in text
    assert "round 13: only 1 of 1000 updates accepted (min_clients 500)" in text


def test_a_service_runs_rounds_show_the_same_table_in_80_columns() -> None:
    run = RunRow("run-1", {"rounds": 3}, RunState.RUNNING, "cli:op", NOW, NOW)
    done = RoundRow("run-1", 1, "ok", "", FLEET.to_json(), NOW, NOW)
    going = RoundRow("run-1", 2, "running", "", {}, NOW, None)
    text = render(run_view(RunView(run, (done, going)), now=NOW))
    assert "…" not in text
    assert "1000/1000" in text
    row2 = next(line for line in text.splitlines() if line.startswith("│     2 "))
    assert row2.split("│")[2:8] == [" running ", *[f" {'-':>{w}} " for w in (9, 8, 6, 7, 8)]]


def test_rounds_without_notes_are_only_a_table() -> None:
    clean = RoundReport(round=1, clients=3, sampled=3, accuracy=0.5, loss=1.0)
    text = render(rounds_table([clean.to_json()], title="t"))
    assert "round 1:" not in text
    assert "3/3" in text


@pytest.mark.parametrize(
    ("metrics", "header", "cell"),
    [
        ({"auc": 0.97345, "loss": 0.0123}, "auc", "0.9735"),
        ({"mse": 1234.5678, "mae": 20.0, "loss": 1234.5678}, "mse", "1235"),
    ],
)
def test_rounds_of_other_tasks_show_their_headline_metric(
    metrics: dict[str, float], header: str, cell: str
) -> None:
    measured = RoundReport(round=1, clients=1000, sampled=1000, loss=metrics["loss"],
                           metrics=metrics, uplink_bytes=123 << 20)  # fmt: skip
    text = render(rounds_table([measured.to_json(), FAILED.to_json()], title="t"))
    assert "…" not in text
    header_line = next(line for line in text.splitlines() if " round " in line)
    assert f" {header} " in header_line
    assert "accuracy" not in header_line
    row1 = next(line for line in text.splitlines() if line.startswith("│     1 "))
    assert cell in row1, text
    assert "%" not in row1


def test_text_from_devices_cannot_restyle_the_terminal() -> None:
    hostile = RoundReport(round=1, status="failed", reason="\x1b[31mred\x1b[0m [bold]x[/]")
    text = render(rounds_table([hostile.to_json()], title="t"))
    assert "\x1b" not in text
    assert "[bold]x[/]" in text


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "0.98 KiB"),
        (1536, "1.50 KiB"),
        (20 << 10, "20.0 KiB"),
        (123 << 20, "123 MiB"),
        (1023 << 20, "1.00 GiB"),
        (5000 << 30, "5000 GiB"),
    ],
)
def test_compact_bytes(size: int, text: str) -> None:
    assert compact_bytes(size) == text


def test_round_notes_name_each_problem() -> None:
    report = RoundReport(round=1, failures={"oom": 2}, rejected={"norm": 1, "nan": 2})
    assert round_notes(report.to_json()) == "rejected norm:1,nan:2; failed oom:2"
    assert round_notes({"round": 1}) == ""


def test_round_notes_count_clipped_example_counts() -> None:
    report = RoundReport(round=1, rejected={"norm_outlier": 1}, clipped_examples=2)
    assert round_notes(report.to_json()) == "rejected norm_outlier:1; 2 example count(s) clipped"
